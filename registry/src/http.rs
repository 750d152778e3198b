//! The one HTTP/TLS client builder (the registry client's manifest and blob requests, the
//! mirror's upstream requests), the process's trust roots read once and only when a server's
//! certificate is first checked, and rustls' crypto provider.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::RegistryError;

/// The system's trust roots, read once per process and deduplicated.
static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();

/// The system's trust roots, read on first use. Every client would read them again otherwise:
/// tens of milliseconds where `SSL_CERT_DIR` names a folder of certificate files. Empty when none
/// could be read (every server certificate is then refused as untrusted).
pub fn system_roots() -> &'static [CertificateDer<'static>] {
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "a system certificate could not be read");
        }
        let mut seen = std::collections::HashSet::new();
        found.certs.into_iter().filter(|c| seen.insert(c.as_ref().to_vec())).collect()
    })
}

/// Whether this process has read the system's trust roots yet (a client that has spoken only
/// plain HTTP never needs them).
pub fn system_roots_read() -> bool {
    ROOTS.get().is_some()
}

/// Reads the system's trust roots now: a process that will verify a server's certificate soon
/// does it beside other work (a long-lived one at start, off its first pull's path).
pub fn preload_trust_roots() {
    let _ = system_roots();
}

/// Installs rustls' crypto provider (ring) once per process.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// What an HTTP client for one host is built with.
#[derive(Clone, Debug)]
pub struct HttpSettings<'a> {
    /// The host, for error messages.
    pub host: &'a str,
    /// Extra root certificates (PEM) beside the system's.
    pub ca_pem: &'a [Vec<u8>],
    /// Accept any certificate (hosts.toml `skip_verify`).
    pub skip_verify: bool,
    pub user_agent: &'static str,
    pub connect_timeout: Duration,
    /// Idle connections kept per host (reqwest's default when `None`).
    pub pool_max_idle_per_host: Option<usize>,
}

impl<'a> HttpSettings<'a> {
    /// hb's defaults for `host`: 15 s to connect, 60 s between reads, the `hb/<version>` agent.
    pub fn new(host: &'a str) -> Self {
        HttpSettings {
            host,
            ca_pem: &[],
            skip_verify: false,
            user_agent: concat!("hb/", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(15),
            pool_max_idle_per_host: None,
        }
    }
}

/// A reqwest client trusting the system's roots (read once, when a first certificate is
/// checked) plus `s.ca_pem`, or any certificate with `s.skip_verify`.
pub fn http_client(s: &HttpSettings) -> Result<reqwest::Client, RegistryError> {
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .connect_timeout(s.connect_timeout)
        .read_timeout(Duration::from_secs(60))
        .user_agent(s.user_agent);
    if let Some(n) = s.pool_max_idle_per_host {
        b = b.pool_max_idle_per_host(n);
    }
    b = if s.skip_verify {
        // Nothing is verified: no roots needed.
        b.danger_accept_invalid_certs(true)
    } else {
        b.tls_backend_preconfigured(tls_config(s)?)
    };
    b.build().map_err(|e| RegistryError::Transport { registry: s.host.to_string(), reason: crate::error::chain(&e) })
}

/// rustls for HTTP/1.1 with a [`LazyRoots`] verifier over the system's roots and `s.ca_pem`
/// (parsed and checked now: a bad configured CA fails the client, not a later handshake).
fn tls_config(s: &HttpSettings) -> Result<rustls::ClientConfig, RegistryError> {
    let bad = |reason: String| RegistryError::Certificate { registry: s.host.to_string(), reason };
    let mut extra = Vec::new();
    for pem in s.ca_pem {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("a configured CA is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad("a configured CA holds no PEM certificate".into()));
        }
        for c in &certs {
            rustls::RootCertStore::empty()
                .add(c.clone())
                .map_err(|e| bad(format!("a configured CA is not a valid certificate: {e}")))?;
        }
        extra.extend(certs);
    }
    let provider =
        CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let verifier = Arc::new(LazyRoots { extra, provider: provider.clone(), verifier: OnceLock::new() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS settings: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// rustls' WebPKI verifier over the system's roots and a host's configured CAs, built when a
/// server's certificate is first checked: a client that only speaks plain HTTP (a loopback or
/// `--plain-http` registry, and the HTTPS probe of a loopback registry that answers in plain
/// HTTP) never reads or parses the roots.
#[derive(Debug)]
struct LazyRoots {
    extra: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    verifier: OnceLock<Result<Arc<WebPkiServerVerifier>, rustls::Error>>,
}

impl LazyRoots {
    fn verifier(&self) -> Result<&WebPkiServerVerifier, rustls::Error> {
        let built = self.verifier.get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(system_roots().iter().cloned());
            for c in &self.extra {
                roots.add(c.clone())?;
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("no trust roots to verify with: {e}")))
        });
        built.as_deref().map_err(Clone::clone)
    }
}

impl ServerCertVerifier for LazyRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The parameters of a `WWW-Authenticate: Bearer k="v",...` challenge (realm, service, scope).
pub fn bearer_challenge(header: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Some(rest) = header.trim().strip_prefix("Bearer ").or_else(|| header.trim().strip_prefix("bearer ")) else {
        return out;
    };
    let mut rest = rest.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            },
            None => after.split_once(',').unwrap_or((after, "")),
        };
        out.insert(key, value.to_string());
        rest = next.trim_start_matches(',').trim();
    }
    out
}

/// `s` as an `application/x-www-form-urlencoded` value.
pub fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod challenge_tests {
    #[test]
    fn bearer_challenges_and_form_values() {
        let c = super::bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c["realm"], "https://auth.example/token");
        assert_eq!(c["service"], "registry.example");
        assert_eq!(c["scope"], "repository:a/b:pull,push");
        assert!(super::bearer_challenge("Basic realm=\"x\"").is_empty());
        assert_eq!(super::form_encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
