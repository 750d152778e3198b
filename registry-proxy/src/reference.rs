//! Image references, parsed as docker does: `busybox` is `docker.io/library/busybox:latest`.

use std::str::FromStr;

use oci_client::Reference;

use crate::error::RegistryError;

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub(crate) inner: Reference,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let bad = |reason: String| RegistryError::BadReference { reference: s.to_string(), reason };
        let inner = Reference::from_str(s).map_err(|e| bad(e.to_string()))?;
        // Docker's grammar: repository components are lowercase alphanumerics and separators.
        if !inner.repository().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)) {
            return Err(bad("repository name must be lowercase".into()));
        }
        Ok(ImageRef { inner })
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

    /// The same repository at `digest`.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            inner: Reference::with_digest(
                self.registry().to_string(),
                self.repository().to_string(),
                digest.to_string(),
            ),
        }
    }

    /// Registries docker talks plain HTTP to without being told: loopback.
    pub fn is_loopback(&self) -> bool {
        let host = self.registry().rsplit_once(':').map(|(h, _)| h).unwrap_or(self.registry());
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
