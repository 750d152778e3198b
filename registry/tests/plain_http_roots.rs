//! A registry spoken to in plain HTTP never costs the system's trust roots: they are read when a
//! server's certificate is first checked, not when a client is built (tens of ms of a cold start
//! where `SSL_CERT_DIR` names a folder of certificates). Its own process: nothing else here may
//! have read them.

use std::io::{Read, Write};

use hb_registry::{ImageRef, Registry, RegistryOptions, Scheme};

/// Answers every connection with a 404, whatever came (a TLS ClientHello too); counts them.
fn not_found_server() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (addr, served)
}

#[test]
fn plain_http_registries_never_read_the_trust_roots() {
    let (addr, served) = not_found_server();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // A loopback registry is probed over HTTPS first (the server answers the ClientHello in plain
    // HTTP), then spoken to in HTTP; `--plain-http` speaks HTTP at once.
    for scheme in [Scheme::Auto, Scheme::Http] {
        let r = ImageRef::parse(&format!("{addr}/app:latest")).unwrap();
        let registry = Registry::new(&r, RegistryOptions { scheme, attempts: 1, ..Default::default() }).unwrap();
        let err = rt.block_on(registry.resolve(&r)).unwrap_err().to_string();
        assert!(err.contains("not found") || err.contains("404"), "{scheme:?}: {err}");
    }
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) >= 2, "the server was asked");
    assert!(!hb_registry::http::system_roots_read(), "no certificate was checked, so no root was read");

    // Building a verifying client for an HTTPS registry does not read them either.
    let r = ImageRef::parse("registry.example:5000/app").unwrap();
    Registry::new(&r, RegistryOptions { scheme: Scheme::Https, ..Default::default() }).unwrap();
    assert!(!hb_registry::http::system_roots_read());
}
