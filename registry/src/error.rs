use hb_core::Digest;

/// What can go wrong talking to a registry. Messages name the reference, registry or blob.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error(
        "{registry}: not authorized: {reason} (pass --creds USER:PASSWORD, or add credentials to docker's config.json)"
    )]
    Unauthorized { registry: String, reason: String },
    #[error("{reference}: not found in the registry")]
    NotFound { reference: String },
    #[error("{what} {expected}: the registry sent bytes with digest {actual}")]
    DigestMismatch { what: &'static str, expected: String, actual: Digest },
    #[error("{reference}: no image for platform {wanted} (available: {available})")]
    NoPlatform { reference: String, wanted: String, available: String },
    #[error("{reference}: unsupported {what} media type {media_type:?}")]
    Unsupported { reference: String, what: &'static str, media_type: String },
    #[error("{reference}: malformed {what}: {reason}")]
    Malformed { reference: String, what: &'static str, reason: String },
    #[error("{registry}: {reason}")]
    Transport { registry: String, reason: String },
    /// Overloaded or failing (408, 429, 5xx); `retry_after` is what it asked for.
    #[error("{registry}: busy (HTTP {status}){}", retry_after.map(|d| format!(", asked to retry after {} s", d.as_secs())).unwrap_or_default())]
    Busy { registry: String, status: u16, retry_after: Option<std::time::Duration> },
    /// The registry answered, and the answer was no (a 4xx other than 401/403/404/408/429).
    #[error("{registry}: {reason}")]
    Rejected { registry: String, reason: String },
    /// Whoever consumed the blob stopped reading (e.g. the store refused the layer); not retried:
    /// the consumer's error is the one to report.
    #[error("blob {blob}: its consumer stopped reading")]
    ReceiverGone { blob: String },
    #[error("{registry}: TLS certificate not trusted: {reason} (trust its CA with `ca = \"...\"` in <hosts-dir>/{registry}/hosts.toml, see --hosts-dir)")]
    Certificate { registry: String, reason: String },
}

/// An error with every cause it wraps, `a: b: c` (reqwest hides the interesting part deep down).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = c.source();
    }
    text
}

impl RegistryError {
    /// How long the server asked us to wait (`Retry-After` on a 429 or 503), if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            RegistryError::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Translates the OCI client's error once, at this boundary.
    pub(crate) fn from_oci(registry: &str, reference: &str, e: oci_client::errors::OciDistributionError) -> Self {
        use oci_client::errors::OciDistributionError as E;
        match e {
            E::AuthenticationFailure(reason) | E::RegistryTokenDecodeError(reason) => RegistryError::Unauthorized {
                registry: registry.to_string(),
                reason: if reason.trim().is_empty() {
                    "the token service refused these credentials".into()
                } else {
                    reason
                },
            },
            E::UnauthorizedError { url } => RegistryError::Unauthorized {
                registry: registry.to_string(),
                reason: format!("the registry refused {url}"),
            },
            E::ImageManifestNotFoundError(_) => RegistryError::NotFound { reference: reference.to_string() },
            E::ServerError { code: 404, .. } => RegistryError::NotFound { reference: reference.to_string() },
            E::ServerError { code, message, url }
                if (400..500).contains(&code) && code != 408 && code != 429 && code != 401 && code != 403 =>
            {
                RegistryError::Rejected {
                    registry: registry.to_string(),
                    reason: format!("HTTP {code} for {url}: {}", message.trim()),
                }
            }
            E::ServerError { code, message, .. } if code == 401 || code == 403 => RegistryError::Unauthorized {
                registry: registry.to_string(),
                reason: format!("HTTP {code}: {message}"),
            },
            // Registries' OCI error codes (NAME_UNKNOWN, MANIFEST_UNKNOWN, UNAUTHORIZED, DENIED)
            // arrive inside several variants, spelled in either case.
            other => {
                let text = chain(&other);
                let lower = text.to_lowercase();
                if lower.contains("unauthorized") || lower.contains("denied") {
                    RegistryError::Unauthorized { registry: registry.to_string(), reason: text }
                } else if lower.contains("certificate") {
                    RegistryError::Certificate { registry: registry.to_string(), reason: text }
                } else if lower.contains("unknown") || lower.contains("not found") {
                    RegistryError::NotFound { reference: reference.to_string() }
                } else {
                    RegistryError::Transport { registry: registry.to_string(), reason: text }
                }
            }
        }
    }

    /// Worth another try: the network or the server failed, not the request.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Transport { .. } | RegistryError::Busy { .. })
    }
}
