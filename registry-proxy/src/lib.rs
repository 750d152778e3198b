//! The pull-through mirror (`hb proxy`): the OCI distribution read API on hyper, in front of
//! one or more upstream registries. Each blob crosses the upstream link once (single flight,
//! streamed to every waiting client while it downloads), is verified before it is kept, and is
//! kept by a [`MirrorStore`] (the binary wires the hb store: chunked and deduplicated). Tags are
//! revalidated after a per-pattern TTL with a HEAD, and served stale while the upstream is down.
//! Cached content of a repository the upstream guards is served only to clients the upstream
//! would let in (asked, and the answer remembered briefly).

mod accelerate;
mod flight;
mod learned;
pub mod route;
mod stats;
mod upstream;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use hb_core::{ChunkId, ChunkRef, Digest, DigestHasher};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use flight::{Flight, FlightError, FlightReader};
pub use route::{Object, Reference, Route, RouteError};
pub use stats::{Stats, StatsReport, UpstreamReport, UpstreamStats};
use upstream::{Principal, Upstream};

type Body = BoxBody<Bytes, io::Error>;
/// rustls' server configuration (re-exported so the binary needs no rustls of its own).
pub type TlsServerConfig = rustls::ServerConfig;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Manifests larger than this are refused (distribution's own limit is 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;
const DIGEST_HEADER: &str = "docker-content-digest";

mod auth;
mod blobs;
mod config;
mod http;
mod manifests;
mod server;
mod token;

pub use auth::{hash_password, is_bcrypt};
pub use config::{glob, MirrorConfig, MirrorError, MirrorStore, UpstreamConfig};
use http::*;
pub use http::{acceptable, parse_range, valid_media_type, Unsatisfiable};
pub use server::{fetch_stats, serve, tls_config};

/// What is remembered about a tag.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TagRecord {
    digest: String,
    media_type: String,
    /// Unix seconds of the last upstream answer.
    checked: u64,
}

type AuthKey = (usize, String, Principal);

/// Held while working on one key of `Mirror::tag_locks`.
struct KeyGuard<'a> {
    mirror: &'a Mirror,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.mirror.tag_locks.lock().expect("tag locks");
        drop(self.guard.take());
        // Only the map holds the mutex now: nobody waits on it, the entry can go.
        if locks.get(&self.key).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(&self.key);
        }
    }
}

pub struct Mirror {
    cfg: MirrorConfig,
    /// What a reload (SIGHUP) may change while serving: the users and the size cap.
    live: std::sync::RwLock<Live>,
    /// Credentials checked against a bcrypt hash, by a digest of name, password and hash: a
    /// hash costs tens of milliseconds to check, and Docker sends credentials on every request.
    /// Refusals are kept too (for a minute), so repeated wrong passwords cost one check each.
    verified: Mutex<HashMap<[u8; 32], (bool, Instant)>>,
    upstreams: Vec<Upstream>,
    store: Arc<dyn MirrorStore>,
    flights: Mutex<HashMap<Digest, Arc<Flight>>>,
    tag_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cache: Mutex<ChunkCache>,
    /// Stored objects: size and last use (unix seconds).
    objects: Mutex<HashMap<Digest, (u64, u64)>>,
    /// Data blobs of accelerated forms, served from stored chunks.
    virtuals: Mutex<HashMap<Digest, accelerate::Virtual>>,
    /// Decoded chunk tables of the most recently read data blobs (by data blob digest).
    tables: Mutex<lru::LruCache<Digest, Arc<hb_core::ChunkTable>>>,
    /// The upstream's answer, and when, per (upstream, repository, principal).
    auth: Mutex<HashMap<AuthKey, (bool, Instant)>>,
    /// Tokens this mirror issued (`token.rs`).
    tokens: token::Tokens,
    pub stats: Stats,
}

struct Live {
    users: Vec<(String, String)>,
    max_bytes: Option<u64>,
}

struct ChunkCache {
    lru: lru::LruCache<ChunkId, Bytes>,
    bytes: usize,
    budget: usize,
}

impl ChunkCache {
    fn get(&mut self, id: &ChunkId) -> Option<Bytes> {
        self.lru.get(id).cloned()
    }
    fn put(&mut self, id: ChunkId, b: Bytes) {
        if b.len() > self.budget {
            return;
        }
        self.bytes += b.len();
        if let Some(old) = self.lru.put(id, b) {
            self.bytes -= old.len();
        }
        while self.bytes > self.budget {
            match self.lru.pop_lru() {
                Some((_, b)) => self.bytes -= b.len(),
                None => break,
            }
        }
    }
}

/// Compares without an early exit, so timing says nothing about where a guess went wrong.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Mirror {
    /// A mirror over `store`: spool leftovers of a killed process are removed, the kept objects
    /// listed (their last use restored from the store).
    pub fn new(cfg: MirrorConfig, store: Arc<dyn MirrorStore>) -> Result<Arc<Mirror>, MirrorError> {
        if cfg.upstreams.is_empty() {
            return Err(MirrorError::Config("no upstream registry configured".into()));
        }
        let _ = std::fs::remove_dir_all(&cfg.spool_dir);
        std::fs::create_dir_all(&cfg.spool_dir)?;
        let upstreams = cfg.upstreams.iter().cloned().map(Upstream::new).collect::<Result<Vec<_>, _>>()?;
        let used: HashMap<String, u64> =
            store.meta("mirror/used")?.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let objects = store
            .objects()?
            .into_iter()
            .map(|(d, size)| (d, (size, used.get(&d.to_string()).copied().unwrap_or(0))))
            .collect();
        let stats = Stats::new(cfg.upstreams.iter().map(|u| u.host.clone()).collect());
        let m = Arc::new(Mirror {
            live: std::sync::RwLock::new(Live { users: cfg.users.clone(), max_bytes: cfg.max_bytes }),
            verified: Mutex::new(Default::default()),
            cache: Mutex::new(ChunkCache { lru: lru::LruCache::unbounded(), bytes: 0, budget: cfg.cache_bytes }),
            cfg,
            upstreams,
            store,
            flights: Mutex::new(HashMap::new()),
            tag_locks: Mutex::new(HashMap::new()),
            objects: Mutex::new(objects),
            auth: Mutex::new(HashMap::new()),
            tokens: token::Tokens::new()?,
            virtuals: Mutex::new(HashMap::new()),
            tables: Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(32).expect("not zero"))),
            stats,
        });
        m.load_virtuals();
        Ok(m)
    }

    /// Takes what may change while serving from `cfg` (a reloaded config file): the users and
    /// the size cap. Returns what changed, and what only a restart applies.
    pub fn reload(&self, cfg: &MirrorConfig) -> Vec<String> {
        let mut notes = Vec::new();
        {
            let mut live = self.live.write().expect("live lock");
            if live.users != cfg.users {
                notes.push(format!("users: {} (were {})", cfg.users.len(), live.users.len()));
                live.users = cfg.users.clone();
                self.verified.lock().expect("verified lock").clear();
            }
            if live.max_bytes != cfg.max_bytes {
                notes.push(format!("max size: {:?} bytes (was {:?})", cfg.max_bytes, live.max_bytes));
                live.max_bytes = cfg.max_bytes;
            }
        }
        let shape = |c: &MirrorConfig| format!("{:?} {:?}", c.upstreams, c.default_upstream);
        if shape(cfg) != shape(&self.cfg) {
            notes.push("upstreams changed: they take a restart of hb proxy".into());
        }
        notes
    }

    /// Who a request is, for the access log: a user name, `token` for an upstream's token, `-`.
    fn user_of(&self, authorization: Option<&str>) -> String {
        match self.tokens.who(authorization) {
            token::Who::Known(Principal::Basic(u, _)) => u,
            token::Who::Known(Principal::Bearer(_)) => "token".into(),
            token::Who::Known(Principal::Mirror) => "-".into(),
            token::Who::Expired => "expired-token".into(),
        }
    }

    /// The size cap in force.
    pub(crate) fn max_bytes(&self) -> Option<u64> {
        self.live.read().expect("live lock").max_bytes
    }

    /// Whether clients must be the mirror's own users.
    pub(crate) fn has_users(&self) -> bool {
        !self.live.read().expect("live lock").users.is_empty()
    }

    /// Kept objects and their total size.
    pub fn kept(&self) -> (usize, u64) {
        let o = self.objects.lock().expect("objects lock");
        (o.len(), o.values().map(|(s, _)| s).sum())
    }

    /// Saves when each object was last used (for eviction after a restart).
    pub fn save_usage(&self) -> io::Result<()> {
        let used: HashMap<String, u64> =
            self.objects.lock().expect("objects lock").iter().map(|(d, (_, t))| (d.to_string(), *t)).collect();
        self.store.put_meta("mirror/used", &serde_json::to_vec(&used).expect("serialisable"))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn MirrorStore) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store)).await.map_err(io::Error::other)?
    }

    fn touch(&self, d: &Digest) {
        if let Some(o) = self.objects.lock().expect("objects lock").get_mut(d) {
            o.1 = now();
        }
    }

    /// Answers one request; every failure becomes an OCI error body here.
    /// `secure`: the client came over TLS (the token service's address in challenges says so).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        secure: bool,
        peer: std::net::SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let user = self.user_of(req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()));
        let host = req.headers().get(hyper::header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string);
        let resp = match (req.method(), path.as_str()) {
            (&Method::GET, "/_hb/token") => self.token(&req).await,
            // For load balancers and systemd: up and serving (no auth, no upstream asked).
            (&Method::GET | &Method::HEAD, "/healthz") => Response::builder()
                .header(CONTENT_TYPE, "text/plain")
                .body(full(Bytes::from_static(b"ok\n")))
                .expect("valid response"),
            (&Method::GET, "/metrics") => {
                let (n, bytes) = self.kept();
                Response::builder()
                    .header(CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(full(Bytes::from(self.stats.prometheus(n, bytes, self.max_bytes()))))
                    .expect("valid response")
            }
            (&Method::GET, "/status") => {
                let (n, bytes) = self.kept();
                let urls: Vec<String> = self.cfg.upstreams.iter().map(|u| u.url.clone()).collect();
                Response::builder()
                    .header(CONTENT_TYPE, "text/html; charset=utf-8")
                    .body(full(Bytes::from(self.stats.report(n, bytes, self.max_bytes()).status_page(&urls))))
                    .expect("valid response")
            }
            (&Method::GET, "/_hb/stats") => {
                let (n, bytes) = self.kept();
                let body = serde_json::to_vec(&self.stats.report(n, bytes, self.max_bytes())).expect("serialisable");
                Response::builder()
                    .header(CONTENT_TYPE, "application/json")
                    .body(full(Bytes::from(body)))
                    .expect("valid response")
            }
            // The one write: a start-up order an hb client learned (`learned.rs`).
            (m, p) if m != Method::GET && m != Method::HEAD && !(m == Method::PUT && is_startup_path(p)) => oci_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "this mirror is read-only: push to the upstream registry",
            ),
            _ => self.clone().distribution(req).await,
        };
        // The access log: one info event per request, under the target `access` (HB_LOG=access=info
        // alone; HB_LOG_FORMAT=json for JSON lines).
        tracing::info!(
            target: "access",
            %peer,
            method = %method,
            %path,
            status = resp.status().as_u16(),
            bytes = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()),
            user = %user,
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
        let mut resp = resp;
        resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
        if resp.status() == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert("www-authenticate", token::challenge(host.as_deref(), secure));
        }
        Ok(resp)
    }

    async fn distribution(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let hosts: Vec<String> = self.cfg.upstreams.iter().map(|u| u.host.clone()).collect();
        let aliases: Vec<Option<String>> = self.cfg.upstreams.iter().map(|u| u.alias.clone()).collect();
        let route = match route::route(req.uri().path(), req.uri().query(), &hosts, &aliases, self.cfg.default_upstream)
        {
            Ok(r) => r,
            Err(e) => {
                let (status, code) = match &e {
                    RouteError::NotDistribution => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
                    RouteError::NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
                    RouteError::UnknownUpstream(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
                    RouteError::TagInvalid(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
                    RouteError::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
                };
                return oci_error(status, code, &e.to_string());
            }
        };
        let authorization = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let mut who = match self.tokens.who(authorization) {
            token::Who::Known(p) => p,
            token::Who::Expired => return unauthorized("this mirror's token has run out: ask for another"),
        };
        if self.has_users() {
            if !self.is_user(&who).await {
                return unauthorized("this mirror requires its own credentials");
            }
            // Upstreams see the mirror, with its configured credentials.
            who = Principal::Mirror;
        }
        let head = req.method() == Method::HEAD;
        let header = |n| req.headers().get(n).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
        // Go clients (Docker) send one `Accept` line per media type: all of them count.
        let accept = accept_of(req.headers());
        let stats = &self.stats.upstreams[route.upstream];
        stats.requests.inc();
        match route.object.clone() {
            // Clients send credentials only where the version check challenged them (docker,
            // containers/image): challenge those that sent nothing; they fetch a token (an
            // anonymous one without credentials, see `token.rs`) and come back with it.
            Object::Base if authorization.is_none() => {
                unauthorized("credentials are optional: public content needs none, ask /_hb/token")
            }
            Object::Base => Response::builder()
                .header(CONTENT_TYPE, "application/json")
                .body(full(Bytes::from_static(b"{}")))
                .expect("valid response"),
            Object::Startup(image) if req.method() == Method::PUT => {
                self.offer_startup(&route, image, req.into_body(), &who).await
            }
            Object::Startup(_) => oci_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "start-up orders are offered with PUT and served inside the accelerated form",
            ),
            Object::Manifest(r) => self.manifest(&route, r, &who, head, accept).await,
            Object::Blob(d) => self.blob(&route, d, &who, head, header(RANGE)).await,
            Object::TagsList | Object::Referrers(_) => {
                let tail = req.uri().path().rsplit_once(&format!("{}/", route.repo)).map(|(_, t)| t).unwrap_or("");
                let query: Vec<&str> = req
                    .uri()
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .filter(|kv| !kv.is_empty() && !kv.starts_with("ns="))
                    .collect();
                let mut pq = format!("/v2/{}/{tail}", route.repo);
                if !query.is_empty() {
                    pq = format!("{pq}?{}", query.join("&"));
                }
                self.pass_through(&route, &pq, &who, head).await
            }
        }
    }

    /// Sends a request on to the upstream and its answer back (tags/list, referrers).
    async fn pass_through(&self, route: &Route, pq: &str, who: &Principal, head: bool) -> Response<Body> {
        let up = &self.upstreams[route.upstream];
        let method = if head { Method::HEAD } else { Method::GET };
        match up.send(method, &route.repo, pq, Default::default(), who).await {
            Err(e) => self.upstream_down(route, &e),
            Ok(r) if r.status() == StatusCode::UNAUTHORIZED => unauthorized("the upstream requires credentials"),
            Ok(r) => {
                let mut b = Response::builder().status(r.status().as_u16());
                for name in ["content-type", "link"] {
                    if let Some(v) = r.headers().get(name) {
                        b = b.header(name, v.as_bytes());
                    }
                }
                let body = r.bytes().await.unwrap_or_default();
                b.header(CONTENT_LENGTH, body.len())
                    .body(if head { empty() } else { full(body) })
                    .expect("valid response")
            }
        }
    }

    fn upstream_down(&self, route: &Route, e: &MirrorError) -> Response<Body> {
        self.stats.upstreams[route.upstream].error("upstream");
        tracing::warn!(upstream = %self.cfg.upstreams[route.upstream].host, repo = %route.repo, error = %e, "upstream unavailable");
        oci_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &e.to_string())
    }
}

/// Whether `path` is where hb clients offer learned start-up orders.
fn is_startup_path(path: &str) -> bool {
    path.rsplit_once('/').is_some_and(|(dir, _)| dir.ends_with(&format!("/{}", hb_core::lazy::STARTUP_PATH)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: Docker sends one `Accept` line per media type; only the first was read, so
    /// an OCI manifest was "unknown" to `docker pull` through the mirror.
    #[test]
    fn every_accept_line_counts() {
        let mut h = hyper::HeaderMap::new();
        assert_eq!(accept_of(&h), None);
        for t in ["application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"]
        {
            h.append(ACCEPT, HeaderValue::from_static(t));
        }
        let accept = accept_of(&h);
        assert!(acceptable(accept.as_deref(), "application/vnd.oci.image.manifest.v1+json"), "{accept:?}");
        assert!(!acceptable(accept.as_deref(), "application/vnd.oci.image.index.v1+json"), "{accept:?}");
    }

    #[test]
    fn accept_negotiation() {
        let oci = hb_registry::OCI_INDEX;
        assert!(acceptable(None, oci) && acceptable(Some("*/*"), oci));
        assert!(acceptable(Some(&format!("{}, {oci}", hb_registry::DOCKER_MANIFEST)), oci));
        assert!(!acceptable(Some(hb_registry::DOCKER_MANIFEST), oci));
        assert!(
            acceptable(Some(hb_registry::OCI_MANIFEST), hb_registry::DOCKER_LIST),
            "docker types are always served"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=2-4"), 10), Ok(Some((2, 5))));
        assert_eq!(parse_range(Some("bytes=2-"), 10), Ok(Some((2, 10))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 10))));
        assert_eq!(parse_range(Some("bytes=5-100"), 10), Ok(Some((5, 10))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=1-2,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=4-2"), 10), Ok(None));
    }

    /// Regression (found by fuzzing, `fuzz/` target `range_header`): a last position of
    /// u64::MAX overflowed `e + 1` (a panic with overflow checks; without them the range
    /// (100, 0) and a 206 whose Content-Length and Content-Range wrapped around).
    #[test]
    fn a_range_ending_at_u64_max_means_the_end_of_the_blob() {
        assert_eq!(parse_range(Some("bytes=100-18446744073709551615"), 1000), Ok(Some((100, 1000))));
        assert_eq!(parse_range(Some("bytes=0-18446744073709551615"), u64::MAX), Ok(Some((0, u64::MAX))));
        assert_eq!(parse_range(Some("bytes=18446744073709551615-18446744073709551615"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-18446744073709551616"), 10), Ok(None), "not a u64: ignored");
    }

    #[test]
    fn tag_ttls_by_pattern() {
        assert!(glob("*", "a:b") && glob("lib*:latest", "library/x:latest") && !glob("lib*:latest", "library/x:v1"));
        assert!(glob("*:v*", "a/b:v1.2") && !glob("a", "ab") && glob("a*b*c", "aXbYc"));
        let u = UpstreamConfig {
            host: "h".into(),
            alias: None,
            url: "http://h".into(),
            credentials: None,
            ca_pem: vec![],
            skip_verify: false,
            tag_ttls: vec![("*:latest".into(), Duration::from_secs(60)), ("*".into(), Duration::from_secs(3600))],
            default_tag_ttl: Duration::from_secs(5),
        };
        assert_eq!(u.tag_ttl("x", "latest"), Duration::from_secs(60));
        assert_eq!(u.tag_ttl("x", "v1"), Duration::from_secs(3600));
    }
}
