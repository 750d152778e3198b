//! Image references, parsed as docker does: `busybox` is `docker.io/library/busybox:latest`.

use oci_client::Reference;

use crate::error::RegistryError;

/// Docker's reference grammar, checked by hand. oci-spec's `Reference::from_str` matches one
/// large regex that is compiled on first use in every process: 50-65 ms of CPU, measured as a
/// quarter of a mount server's start-up (`perf record` of `hb mount`), paid again by every `hb`
/// command that names an image. The rules below are the same (the differential test in this
/// file checks them against oci-spec's parser); only `\w` in tags is ASCII here, as in docker's
/// Go grammar, where the regex crate's is Unicode.
mod grammar {
    pub(super) struct Parsed {
        pub registry: String,
        pub repository: String,
        pub tag: Option<String>,
        pub digest: Option<String>,
    }

    const INVALID: &str = "invalid reference format";

    pub(super) fn parse(s: &str) -> Result<Parsed, &'static str> {
        if s.is_empty() {
            return Err("repository name must have at least one component");
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[slash..].find(':') {
            Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
            None => (rest, None),
        };
        if tag.is_some_and(|t| !tag_ok(t)) || digest.is_some_and(|d| !digest_ok(d)) {
            return Err(INVALID);
        }
        if !name_ok(name) {
            return Err(if name_ok(&name.to_ascii_lowercase()) {
                "repository name must be lowercase"
            } else {
                INVALID
            });
        }
        let (registry, repository) = split_domain(name);
        // `UPPER/case` matches the grammar (a registry host may have capitals) but is a Docker
        // Hub repository once split.
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err("repository name must be lowercase");
        }
        if repository.len() > 255 {
            return Err("repository name must not be more than 255 characters");
        }
        if let Some(d) = digest {
            let want = match d.split_once(':') {
                Some(("sha256", _)) => 64,
                Some(("sha384", _)) => 96,
                Some(("sha512", _)) => 128,
                _ => return Err("unsupported digest algorithm"),
            };
            if d.len() - d.find(':').map_or(0, |i| i + 1) != want {
                return Err("invalid checksum digest length");
            }
        }
        Ok(Parsed { registry, repository, tag: tag.map(String::from), digest: digest.map(String::from) })
    }

    fn word(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b == b'_'
    }

    /// `[\w][\w.-]{0,127}`
    fn tag_ok(t: &str) -> bool {
        let b = t.as_bytes();
        !b.is_empty() && b.len() <= 128 && word(b[0]) && b.iter().all(|&c| word(c) || c == b'.' || c == b'-')
    }

    /// `[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[[:xdigit:]]{32,}`
    fn digest_ok(d: &str) -> bool {
        let Some((algo, hex)) = d.split_once(':') else { return false };
        let algo_ok = algo.split(['-', '_', '+', '.']).all(|part| {
            let b = part.as_bytes();
            !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
        });
        algo_ok && hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
    }

    /// A path component: `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`.
    fn component_ok(c: &str) -> bool {
        let b = c.as_bytes();
        let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return false;
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            match &b[start..i] {
                b"." | b"_" | b"__" => {}
                sep if sep.iter().all(|&x| x == b'-') => {}
                _ => return false,
            }
        }
        true
    }

    /// A domain: labels `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]` joined by dots, then an
    /// optional `:port`.
    fn domain_ok(d: &str) -> bool {
        let (host, port) = match d.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        };
        let label_ok = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        };
        host.split('.').all(label_ok) && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
    }

    /// `(domain/)?component(/component)*`
    fn name_ok(name: &str) -> bool {
        let all = |parts: &str| parts.split('/').all(component_ok);
        all(name) || name.split_once('/').is_some_and(|(d, rest)| domain_ok(d) && all(rest))
    }

    /// docker's split: the first component is a registry when it has a dot or a port or is
    /// `localhost`; Docker Hub's official images get `library/`.
    fn split_domain(name: &str) -> (String, String) {
        let (mut domain, mut rest) = match name.split_once('/') {
            Some((d, r)) if d.contains(['.', ':']) || d == "localhost" => (d.to_string(), r.to_string()),
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if domain == "index.docker.io" {
            domain = "docker.io".into();
        }
        if domain == "docker.io" && !rest.contains('/') {
            rest = format!("library/{rest}");
        }
        (domain, rest)
    }
}

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub(crate) inner: Reference,
    /// Kept beside `inner` (whose mirror field is not public).
    mirror: Option<String>,
}

impl ImageRef {
    /// Parses `s` with docker's grammar (distribution/reference) and docker's defaults.
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let bad = |reason: &str| RegistryError::BadReference { reference: s.to_string(), reason: reason.to_string() };
        let p = grammar::parse(s).map_err(bad)?;
        let inner = match (p.tag, p.digest) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(p.registry, p.repository, t, d),
            (None, Some(d)) => Reference::with_digest(p.registry, p.repository, d),
            (t, None) => Reference::with_tag(p.registry, p.repository, t.unwrap_or_else(|| "latest".into())),
        };
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

    /// The hand-written grammar accepts and splits exactly what oci-spec's regex does, on
    /// ASCII inputs (the regex's `\w` is Unicode, docker's is not): hand-picked cases, then
    /// 300,000 random strings built from the grammar's own pieces.
    #[test]
    fn the_grammar_agrees_with_oci_specs_regex_parser() {
        use std::str::FromStr;
        let hex = "0123456789abcdef".repeat(9);
        let fixed = [
            "busybox",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "lowercase:Uppercase",
            "Uppercase:tag",
            "a/b/c/d/e:1.0-rc_2",
            "a__b/c---d/e.f_g",
            "a___b",
            "a..b",
            "a._b",
            "-a/b",
            "a-/b",
            "index.docker.io/busybox",
            "index.docker.io/a/b",
            "localhost/x",
            "localhost:5000/x@sha256:",
            "host-/x",
            "-host.com/x",
            "ho-st.c-om:1/x",
            "h:/x",
            "a:b:c",
            "a@b@c",
            ":tag",
            "@sha256:x",
        ];
        let mut inputs: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
        for algo in ["sha256", "sha384", "sha512", "md5", "sha256+b64", "Sha256", "9x"] {
            for n in [31, 32, 64, 96, 128, 129] {
                inputs.push(format!("repo@{algo}:{}", &hex[..n]));
                inputs.push(format!("h.io/repo:t@{algo}:{}", &hex[..n]));
            }
        }
        inputs.push(format!("x/{}", "a".repeat(250)));
        inputs.push(format!("x/{}", "a".repeat(260)));
        inputs.push(format!("repo:{}", "t".repeat(128)));
        inputs.push(format!("repo:{}", "t".repeat(129)));
        let pieces = [
            "a",
            "b",
            "z",
            "0",
            "9",
            "A",
            "Q",
            ".",
            "..",
            "_",
            "__",
            "___",
            "-",
            "--",
            "/",
            "//",
            ":",
            "5000",
            "@",
            "sha256:",
            "localhost",
            "docker.io",
            "index.docker.io",
            "library",
            "host.com",
            "x-y",
            "+",
        ];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..300_000 {
            let mut s = String::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = 1 + (x % 8) as usize;
            for k in 0..n {
                s.push_str(pieces[((x >> (8 * k)) % pieces.len() as u64) as usize]);
            }
            if x.is_multiple_of(5) {
                s.push_str(&format!("@sha256:{}", &hex[..64]));
            }
            inputs.push(s);
        }
        let mut accepted = 0;
        for s in &inputs {
            let ours = ImageRef::parse(s);
            // hb refuses what oci-spec splits into an uppercase Docker Hub repository.
            let theirs =
                Reference::from_str(s).ok().filter(|r| !r.repository().bytes().any(|b| b.is_ascii_uppercase()));
            match (&ours, &theirs) {
                (Ok(a), Some(b)) => {
                    accepted += 1;
                    assert_eq!(
                        (a.registry(), a.repository(), a.inner.tag(), a.digest()),
                        (b.registry(), b.repository(), b.tag(), b.digest()),
                        "{s:?}"
                    );
                }
                (Err(_), None) => {}
                _ => panic!("{s:?}: ours {ours:?}, oci-spec's {theirs:?}"),
            }
        }
        assert!(accepted > 10_000, "too few accepted inputs to compare: {accepted}");
        assert!(ImageRef::parse("Busybox").unwrap_err().to_string().contains("must be lowercase"));
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
