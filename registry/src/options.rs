//! How to reach a registry: the protocol, trust, credentials, platform and retries.

use crate::platform::Platform;

/// Which protocol to speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheme {
    /// HTTPS; for loopback registries HTTPS first, then plain HTTP (as docker treats them).
    #[default]
    Auto,
    Https,
    Http,
}

/// How to reach and authenticate to a registry.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    pub scheme: Scheme,
    /// Extra root certificates (PEM) to trust for this registry, beside the system's.
    pub ca_pem: Vec<Vec<u8>>,
    /// Accept any certificate (hosts.toml `skip_verify`).
    pub skip_verify: bool,
    pub credentials: Option<(String, String)>,
    pub platform: Platform,
    /// Tries per blob request (the first included) before giving up.
    pub attempts: u32,
}
