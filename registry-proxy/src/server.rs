//! The listener: HTTP or HTTPS, connections served until shutdown; `hb proxy stats`' client.

use super::*;

/// A running mirror's figures, from its `/_hb/stats` (for `hb proxy stats`).
pub async fn fetch_stats(base_url: &str) -> Result<StatsReport, MirrorError> {
    hb_registry::http::install_crypto_provider();
    let url = format!("{}/_hb/stats", base_url.trim_end_matches('/'));
    let err = |reason: String| MirrorError::Upstream { host: url.clone(), reason };
    let resp = reqwest::get(&url).await.map_err(|e| err(hb_registry::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(err(format!("answered {}", resp.status())));
    }
    resp.json().await.map_err(|e| err(format!("not an hb proxy: {e}")))
}

/// A TLS server configuration from PEM files: the certificate chain and its private key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, MirrorError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    hb_registry::http::install_crypto_provider();
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MirrorError::Config(format!("TLS certificate: {e}")))?;
    if certs.is_empty() {
        return Err(MirrorError::Config("TLS certificate file holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| MirrorError::Config(format!("TLS key: {e}")))?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| MirrorError::Config(format!("TLS certificate and key: {e}")))?;
    Ok(Arc::new(cfg))
}

/// Serves `mirror` on `listener` (over TLS when `tls` is given) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mirror: Arc<Mirror>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    let saver = {
        let m = mirror.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let _ = m.save_usage();
            }
        })
    };
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let m = mirror.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let secure = acceptor.is_some();
                    let svc = hyper::service::service_fn(move |req| m.clone().handle(req, secure, peer));
                    let http = hyper::server::conn::http1::Builder::new();
                    let done = match acceptor {
                        None => http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await,
                        Some(a) => match a.accept(stream).await {
                            Ok(s) => http.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                        },
                    };
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended");
                    }
                });
            }
        }
    }
    saver.abort();
    mirror.save_usage()
}
