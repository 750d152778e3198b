//! The one HTTP/TLS client builder (the registry client's blob reads and the mirror's upstream
//! requests), the process's trust roots read once, and rustls' crypto provider.

use std::time::Duration;

use crate::error::RegistryError;

/// The system's trust roots, read once per process and deduplicated. Every client would read them
/// again otherwise: tens of milliseconds where `SSL_CERT_DIR` names a folder of certificate files
/// (twice for a loopback registry, tried over HTTPS and HTTP). Empty when none could be read:
/// clients then look for them themselves (and fail the same way).
pub fn system_roots() -> &'static [oci_client::client::Certificate] {
    static ROOTS: std::sync::OnceLock<Vec<oci_client::client::Certificate>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "a system certificate could not be read");
        }
        let mut seen = std::collections::HashSet::new();
        found
            .certs
            .into_iter()
            .filter(|c| seen.insert(c.as_ref().to_vec()))
            .map(|c| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Der,
                data: c.as_ref().to_vec(),
            })
            .collect()
    })
}

/// Reads the system's trust roots now (a long-lived process does it at start, off its first
/// pull's path).
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

/// A reqwest client trusting the system's roots (read once) plus `s.ca_pem`.
pub fn http_client(s: &HttpSettings) -> Result<reqwest::Client, RegistryError> {
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .danger_accept_invalid_certs(s.skip_verify)
        .connect_timeout(s.connect_timeout)
        .read_timeout(Duration::from_secs(60))
        .user_agent(s.user_agent);
    if let Some(n) = s.pool_max_idle_per_host {
        b = b.pool_max_idle_per_host(n);
    }
    let roots: Vec<reqwest::Certificate> =
        system_roots().iter().filter_map(|c| reqwest::Certificate::from_der(&c.data).ok()).collect();
    if !roots.is_empty() {
        b = b.tls_certs_only(roots);
    }
    let mut certs = Vec::new();
    for pem in s.ca_pem {
        certs.push(reqwest::Certificate::from_pem(pem).map_err(|e| RegistryError::Certificate {
            registry: s.host.to_string(),
            reason: format!("a configured CA is not valid PEM: {e}"),
        })?);
    }
    if !certs.is_empty() {
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| RegistryError::Transport { registry: s.host.to_string(), reason: crate::error::chain(&e) })
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
