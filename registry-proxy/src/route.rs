//! Which upstream and which object a request names. Three addressing styles reach an upstream:
//! containerd's `?ns=<registry>` (hosts.toml mirrors), the path style
//! `/v2/<registry-host>/<repo>/...` for clients that cannot send `ns`, and plain
//! `/v2/<repo>/...` for the default upstream (Docker's `registry-mirrors`, which is Docker Hub).

use hb_core::Digest;

/// What a request under `/v2/` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// `/v2/`: the API version check.
    Base,
    /// A manifest by tag or digest.
    Manifest(Reference),
    Blob(Digest),
    TagsList,
    Referrers(Digest),
    /// `_hyperbox/startup/<digest>`: a start-up order a client learned for an image.
    Startup(Digest),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// A request resolved to an upstream (by index in the configuration) and a repository there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub upstream: usize,
    pub repo: String,
    pub object: Object,
}

/// Why a path names nothing we serve; each maps to an OCI error code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// Not an OCI distribution path (`NOT_FOUND`-ish: 404 `UNSUPPORTED`).
    NotDistribution,
    NameInvalid(String),
    /// `ns=` or the path named a registry this mirror has no upstream for.
    UnknownUpstream(String),
    TagInvalid(String),
    DigestInvalid(String),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NotDistribution => f.write_str("not an OCI distribution API path"),
            RouteError::NameInvalid(n) => write!(f, "invalid repository name {n:?}"),
            RouteError::UnknownUpstream(h) => write!(f, "this mirror has no upstream for registry {h:?}"),
            RouteError::TagInvalid(t) => write!(f, "invalid tag {t:?}"),
            RouteError::DigestInvalid(d) => write!(f, "invalid or unsupported digest {d:?} (sha256 only)"),
        }
    }
}

/// Resolves `path` (and the query's `ns`) against the upstreams' hosts (path-style names may
/// also use an upstream's alias: docker's reference syntax allows no port in a path), `default`
/// being the upstream for names without a registry.
pub fn route(
    path: &str,
    query: Option<&str>,
    hosts: &[String],
    aliases: &[Option<String>],
    default: Option<usize>,
) -> Result<Route, RouteError> {
    let rest = path.strip_prefix("/v2").ok_or(RouteError::NotDistribution)?;
    let ns = query.and_then(|q| {
        q.split('&').find_map(|kv| kv.strip_prefix("ns=")).map(|v| v.replace("%3A", ":").replace("%3a", ":"))
    });
    let find =
        |host: &str| hosts.iter().position(|h| h == host || (host == "docker.io" && h == "registry-1.docker.io"));
    if rest.is_empty() || rest == "/" {
        let upstream = match &ns {
            Some(h) => find(h).ok_or_else(|| RouteError::UnknownUpstream(h.clone()))?,
            None => default.unwrap_or(0),
        };
        return Ok(Route { upstream, repo: String::new(), object: Object::Base });
    }
    let rest = rest.strip_prefix('/').ok_or(RouteError::NotDistribution)?;
    let (name, object) = if let Some(name) = rest.strip_suffix("/tags/list") {
        (name, Object::TagsList)
    } else if let Some((name, r)) = rest.rsplit_once("/manifests/") {
        let r = if r.contains(':') {
            Reference::Digest(digest(r)?)
        } else if valid_tag(r) {
            Reference::Tag(r.to_string())
        } else {
            return Err(RouteError::TagInvalid(r.to_string()));
        };
        (name, Object::Manifest(r))
    } else if let Some((name, d)) = rest.rsplit_once("/blobs/") {
        (name, Object::Blob(digest(d)?))
    } else if let Some((name, d)) = rest.rsplit_once("/referrers/") {
        (name, Object::Referrers(digest(d)?))
    } else if let Some((name, d)) = rest.rsplit_once(&format!("/{}/", hb_core::lazy::STARTUP_PATH)) {
        (name, Object::Startup(digest(d)?))
    } else {
        return Err(RouteError::NotDistribution);
    };
    let (upstream, repo) = match (&ns, name.split_once('/')) {
        (Some(h), _) => (find(h).ok_or_else(|| RouteError::UnknownUpstream(h.clone()))?, name),
        (None, Some((first, repo))) if aliases.iter().any(|a| a.as_deref() == Some(first)) => {
            (aliases.iter().position(|a| a.as_deref() == Some(first)).expect("found"), repo)
        }
        (None, Some((first, repo))) if looks_like_host(first) => {
            (find(first).ok_or_else(|| RouteError::UnknownUpstream(first.to_string()))?, repo)
        }
        (None, _) => (default.ok_or_else(|| RouteError::UnknownUpstream("(none named)".into()))?, name),
    };
    if !valid_name(repo) {
        return Err(RouteError::NameInvalid(repo.to_string()));
    }
    // Docker Hub's official images live under `library/`, as docker itself expands `busybox`.
    let hub = matches!(hosts[upstream].as_str(), "docker.io" | "registry-1.docker.io" | "index.docker.io");
    let repo = if hub && !repo.contains('/') { format!("library/{repo}") } else { repo.to_string() };
    Ok(Route { upstream, repo, object })
}

fn digest(s: &str) -> Result<Digest, RouteError> {
    s.strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .and_then(|_| s.parse().ok())
        .ok_or_else(|| RouteError::DigestInvalid(s.to_string()))
}

/// Docker's rule: a first component with a `.` or `:`, or `localhost`, is a registry host.
fn looks_like_host(s: &str) -> bool {
    s.contains('.') || s.contains(':') || s == "localhost"
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/...)*`, at most 255 bytes.
pub fn valid_name(name: &str) -> bool {
    let component = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-'))
            && !c.contains("..")
            && !c.contains("___")
    };
    !name.is_empty() && name.len() <= 255 && name.split('/').all(component)
}

/// `[\w][\w.-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<String> {
        vec!["127.0.0.1:15000".into(), "registry-1.docker.io".into(), "ghcr.io".into()]
    }

    fn aliases() -> Vec<Option<String>> {
        vec![Some("local".into()), None, None]
    }

    #[test]
    fn the_three_addressing_styles() {
        let r = route("/v2/local/team/app/manifests/v1", None, &hosts(), &aliases(), Some(1)).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (0, "team/app"));
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = route(&format!("/v2/library/busybox/blobs/{d}"), Some("ns=docker.io"), &hosts(), &aliases(), Some(1))
            .unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (1, "library/busybox"));
        assert_eq!(r.object, Object::Blob(d.parse().unwrap()));
        let r = route("/v2/127.0.0.1:15000/team/app/manifests/v1", None, &hosts(), &aliases(), Some(1)).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (0, "team/app"));
        assert_eq!(r.object, Object::Manifest(Reference::Tag("v1".into())));
        let r = route("/v2/library/busybox/manifests/latest", None, &hosts(), &aliases(), Some(1)).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (1, "library/busybox"));
        let r = route("/v2/registry-1.docker.io/alpine/manifests/3", None, &hosts(), &aliases(), None).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (1, "library/alpine"), "Docker Hub's official images");
        let r = route("/v2/alpine/manifests/3", Some("ns=docker.io"), &hosts(), &aliases(), None).unwrap();
        assert_eq!(r.repo, "library/alpine");
        let r = route("/v2/ghcr.io/o/r/tags/list", None, &hosts(), &aliases(), None).unwrap();
        assert_eq!((r.upstream, r.object), (2, Object::TagsList));
        let r = route("/v2/", Some("ns=127.0.0.1%3A15000"), &hosts(), &aliases(), Some(1)).unwrap();
        assert_eq!((r.upstream, r.object), (0, Object::Base));
    }

    #[test]
    fn bad_paths_name_what_is_wrong() {
        let h = hosts();
        assert_eq!(
            route("/v2/quay.io/x/manifests/v1", None, &h, &aliases(), Some(1)),
            Err(RouteError::UnknownUpstream("quay.io".into()))
        );
        assert_eq!(
            route("/v2/x/manifests/v1", Some("ns=evil.example"), &h, &aliases(), Some(1)),
            Err(RouteError::UnknownUpstream("evil.example".into()))
        );
        assert!(matches!(
            route("/v2/Upper/manifests/v1", None, &h, &aliases(), Some(1)),
            Err(RouteError::NameInvalid(_))
        ));
        assert!(matches!(
            route("/v2/a/../b/manifests/v1", None, &h, &aliases(), Some(1)),
            Err(RouteError::NameInvalid(_))
        ));
        assert!(matches!(route("/v2/a/manifests/-x", None, &h, &aliases(), Some(1)), Err(RouteError::TagInvalid(_))));
        assert!(matches!(
            route("/v2/a/blobs/sha256:zz", None, &h, &aliases(), Some(1)),
            Err(RouteError::DigestInvalid(_))
        ));
        assert!(matches!(
            route("/v2/a/blobs/md5:00", None, &h, &aliases(), Some(1)),
            Err(RouteError::DigestInvalid(_))
        ));
        assert_eq!(route("/v3/a", None, &h, &aliases(), Some(1)), Err(RouteError::NotDistribution));
        assert_eq!(route("/v2/a/uploads/", None, &h, &aliases(), Some(1)), Err(RouteError::NotDistribution));
        assert!(valid_name("a/b-c/d_e.f") && !valid_name("a//b") && !valid_name("-a"));
        assert!(valid_tag("v1.2-rc_3") && !valid_tag(".x") && !valid_tag(&"x".repeat(129)));
    }
}
