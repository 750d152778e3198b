//! The system's trust roots are read once per process, never again for each registry client.
//!
//! Regression test for oci-client 0.18's `Client::try_from`, which built a default HTTP client
//! (and so read and parsed every system certificate) only to drop it
//! (`third_party/oci-client/PATCHED.md`). Its own process: it points `SSL_CERT_FILE` and
//! `SSL_CERT_DIR` at a folder of its own.

use hb_registry::{ImageRef, Registry, RegistryOptions, Scheme};

/// A self-signed CA certificate (EC P-256), only ever parsed as a trust root here.
const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBlDCCATmgAwIBAgIUH2BMVUbS64D55DFepmUfMSA66KMwCgYIKoZIzj0EAwIw
HjEcMBoGA1UEAwwTaGIgdHJ1c3Qtcm9vdHMgdGVzdDAgFw0yNjEyMDcxNTEzNTJa
GA8yMTI2MTExMzE1MTM1MlowHjEcMBoGA1UEAwwTaGIgdHJ1c3Qtcm9vdHMgdGVz
dDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABLop7v4Q1MLAfQvZxptz12ja2gaE
SIa0phR4Hmn58Ryjy+00tasK7UmWVjxee1wgrefgfbGl36ZdIytfyknn1/WjUzBR
MB0GA1UdDgQWBBQRmf175qufN1nP+/HY3EMyyQatyTAfBgNVHSMEGDAWgBQRmf17
5qufN1nP+/HY3EMyyQatyTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kA
MEYCIQC4pqg+MdSU5FgizgayGdV/tH3xRkEHwLc/7i0boJ2r9gIhANxO3advljg3
EIl3HD/wruHu54UrfsDzgdMtFJPydhM+
-----END CERTIFICATE-----
";

#[test]
fn registry_clients_are_built_from_the_roots_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let (file, certs) = (dir.path().join("ca.pem"), dir.path().join("certs"));
    std::fs::write(&file, CA).unwrap();
    std::fs::create_dir(&certs).unwrap();
    // Before any thread that could read the environment starts.
    std::env::set_var("SSL_CERT_FILE", &file);
    std::env::set_var("SSL_CERT_DIR", &certs);
    assert_eq!(hb_registry::http::system_roots().len(), 1, "the one root is read");

    // The system has no roots from now on: anything that read them again would find none
    // (reqwest's default client then fails to build, and panics).
    std::fs::remove_file(&file).unwrap();
    for (reference, scheme) in
        [("127.0.0.1:5000/app", Scheme::Auto), ("registry.example:5000/app", Scheme::Https), ("h:1/a", Scheme::Http)]
    {
        let r = ImageRef::parse(reference).unwrap();
        let built = std::panic::catch_unwind(|| Registry::new(&r, RegistryOptions { scheme, ..Default::default() }));
        assert!(
            matches!(built, Ok(Ok(_))),
            "a client for {reference} ({scheme:?}) was built from the roots read once, not from the system's again"
        );
    }
}
