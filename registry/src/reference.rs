//! Image references, parsed as docker does: `busybox` is `docker.io/library/busybox:latest`.

use std::str::FromStr;

use oci_client::Reference;

use crate::error::RegistryError;

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub(crate) inner: Reference,
    /// Kept beside `inner` (whose mirror field is not public).
    mirror: Option<String>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let bad = |reason: String| RegistryError::BadReference { reference: s.to_string(), reason };
        let inner = Reference::from_str(s).map_err(|e| bad(e.to_string()))?;
        // Docker's grammar: repository components are lowercase alphanumerics and separators.
        if !inner.repository().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)) {
            return Err(bad("repository name must be lowercase".into()));
        }
        Ok(ImageRef { inner, mirror: None })
    }

    /// The registry host (with port), e.g. `docker.io` or `127.0.0.1:15000`.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The full normalised name: `docker.io/library/busybox:latest`, `host/repo@sha256:...`.
    pub fn canonical(&self) -> String {
        self.inner.whole()
    }

    /// The same repository at `digest` (through the same mirror, if any).
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        let mut inner =
            Reference::with_digest(self.registry().to_string(), self.repository().to_string(), digest.to_string());
        if let Some(m) = &self.mirror {
            inner.set_mirror_registry(m.clone());
        }
        ImageRef { inner, mirror: self.mirror.clone() }
    }

    /// The same reference, asked of the mirror at `host` (containerd's hosts.toml mirrors):
    /// requests go to `host` with `?ns=<registry>`; the name stays the registry's.
    pub fn via_mirror(&self, host: &str) -> ImageRef {
        let mut inner = self.inner.clone();
        inner.set_mirror_registry(host.to_string());
        ImageRef { inner, mirror: Some(host.to_string()) }
    }

    /// The mirror this reference is asked of, if any.
    pub fn mirror(&self) -> Option<&str> {
        self.mirror.as_deref()
    }

    /// The host requests go to: the mirror, else the registry (`index.docker.io` for Docker Hub).
    pub fn host(&self) -> &str {
        self.inner.resolve_registry()
    }

    /// The URL of blob `digest` of this repository, at the host requests go to.
    pub fn blob_url(&self, scheme: &str, digest: &impl std::fmt::Display) -> String {
        self.url(scheme, &format!("blobs/{digest}"))
    }

    /// The URL of `tail` under this repository's `/v2/<name>/`, at the host requests go to (with
    /// `?ns=` for a mirror).
    pub fn url(&self, scheme: &str, tail: &str) -> String {
        let ns = match &self.mirror {
            Some(_) => format!("?ns={}", self.registry()),
            None => String::new(),
        };
        format!("{scheme}://{}/v2/{}/{tail}{ns}", self.host(), self.repository())
    }

    /// Hosts docker talks plain HTTP to without being told: loopback (the mirror's, if any).
    pub fn is_loopback(&self) -> bool {
        let h = self.mirror.as_deref().unwrap_or(self.registry());
        let host = h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost" || host == "::1" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirrored_reference_asks_the_mirror_with_ns_and_keeps_its_name() {
        let r = ImageRef::parse("127.0.0.1:15000/app:v1").unwrap().via_mirror("127.0.0.1:6000");
        assert_eq!((r.registry(), r.host(), r.mirror()), ("127.0.0.1:15000", "127.0.0.1:6000", Some("127.0.0.1:6000")));
        assert_eq!(r.canonical(), "127.0.0.1:15000/app:v1");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(r.blob_url("http", &d), format!("http://127.0.0.1:6000/v2/app/blobs/{d}?ns=127.0.0.1:15000"));
        // A platform's manifest by digest is still asked of the mirror.
        let child = r.with_digest(&d);
        assert_eq!((child.host(), child.mirror()), ("127.0.0.1:6000", Some("127.0.0.1:6000")));
        let plain = ImageRef::parse("127.0.0.1:15000/app:v1").unwrap();
        assert_eq!(plain.blob_url("https", &d), format!("https://127.0.0.1:15000/v2/app/blobs/{d}"));
    }

    #[test]
    fn docker_defaults_ports_digests_and_errors() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("library/python:3.12", "docker.io/library/python:3.12"),
            ("docker.io/python:3.12", "docker.io/library/python:3.12"),
            ("ghcr.io/org/app:v1", "ghcr.io/org/app:v1"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("127.0.0.1:15000/busybox:latest", "127.0.0.1:15000/busybox:latest"),
        ];
        for (input, want) in cases {
            assert_eq!(ImageRef::parse(input).unwrap().canonical(), want, "{input}");
        }
        let d = "sha256:".to_string() + &"a".repeat(64);
        let r = ImageRef::parse(&format!("quay.io/x/y@{d}")).unwrap();
        assert_eq!((r.registry(), r.repository(), r.digest()), ("quay.io", "x/y", Some(d.as_str())));
        for bad in ["UPPER/case", "a:b:c:d", "", "repo@sha256:short"] {
            let e = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid image reference"), "{bad}: {e}");
        }
    }

    #[test]
    fn loopback_registries_are_recognised() {
        for (r, want) in [
            ("localhost:5000/a", true),
            ("127.0.0.1:15000/a", true),
            ("127.8.9.1/a", true),
            ("registry.example.com/a", false),
            ("10.0.0.1:5000/a", false),
        ] {
            assert_eq!(ImageRef::parse(r).unwrap().is_loopback(), want, "{r}");
        }
    }
}
