//! The pull-through mirror (`hb proxy`): the OCI distribution read API on hyper, in front of
//! one or more upstream registries. Each blob crosses the upstream link once (single flight,
//! streamed to every waiting client while it downloads), is verified before it is kept, and is
//! kept by a [`MirrorStore`] (the binary wires the hb store: chunked and deduplicated). Tags are
//! revalidated after a per-pattern TTL with a HEAD, and served stale while the upstream is down.
//! Cached content of a repository the upstream guards is served only to clients the upstream
//! would let in (asked, and the answer remembered briefly).

mod accelerate;
mod flight;
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

/// Where a mirror keeps what it serves; every method may block (the mirror calls them off the
/// async threads). Objects are named by the SHA-256 of their bytes.
pub trait MirrorStore: Send + Sync + 'static {
    /// The chunks of a stored object, in order.
    fn lookup(&self, digest: &Digest) -> io::Result<Option<Vec<ChunkRef>>>;
    /// One chunk's bytes, verified against its id.
    fn chunk(&self, id: &ChunkId) -> io::Result<Vec<u8>>;
    /// Stores `input` as object `digest`, checking the digest before it becomes visible.
    fn insert(&self, digest: &Digest, input: &mut dyn Read) -> io::Result<()>;
    fn remove(&self, digest: &Digest) -> io::Result<()>;
    /// Every stored object and its size.
    fn objects(&self) -> io::Result<Vec<(Digest, u64)>>;
    /// Frees the space of removed objects.
    fn reclaim(&self) -> io::Result<()>;
    /// Makes kept layer blob `blob` (whose config names `diff_id`) an hb layer: imports it (kept
    /// until [`MirrorStore::release_layer`]), keeps its index and chunk table as objects, and
    /// describes its accelerated form; the data blob is served with [`MirrorStore::stored_chunk`].
    fn accelerate(&self, blob: &Digest, diff_id: &Digest) -> io::Result<hb_core::lazy::AccelLayer>;
    /// A chunk's stored bytes (a zstd frame or raw, as the table says), checked against its id.
    fn stored_chunk(&self, id: &ChunkId) -> io::Result<Vec<u8>>;
    fn release_layer(&self, diff_id: &Digest) -> io::Result<()>;
    fn meta(&self, key: &str) -> io::Result<Option<Vec<u8>>>;
    fn put_meta(&self, key: &str, value: &[u8]) -> io::Result<()>;
}

/// One upstream registry.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The registry's name as clients write it (`docker.io`, `127.0.0.1:5000`, `ghcr.io`).
    pub host: String,
    /// A name for path-style addressing (`mirror:5000/<alias>/repo`), for hosts with a port.
    pub alias: Option<String>,
    /// Its base URL (`https://registry-1.docker.io`).
    pub url: String,
    pub credentials: Option<(String, String)>,
    pub ca_pem: Vec<Vec<u8>>,
    pub skip_verify: bool,
    /// How long a tag's answer is served before it is revalidated, by `repo:tag` glob (`*`),
    /// first match wins; `default_tag_ttl` otherwise.
    pub tag_ttls: Vec<(String, Duration)>,
    pub default_tag_ttl: Duration,
}

impl UpstreamConfig {
    pub fn tag_ttl(&self, repo: &str, tag: &str) -> Duration {
        let name = format!("{repo}:{tag}");
        self.tag_ttls.iter().find(|(p, _)| glob(p, &name)).map(|(_, t)| *t).unwrap_or(self.default_tag_ttl)
    }
}

/// `*` matches any run of characters; everything else itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(s) = s.strip_prefix(head) else { return false };
            (0..=s.len()).filter(|&i| s.is_char_boundary(i)).any(|i| glob(rest, &s[i..]))
        }
    }
}

#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub upstreams: Vec<UpstreamConfig>,
    /// The upstream for names without a registry (Docker's `registry-mirrors`).
    pub default_upstream: Option<usize>,
    /// Size cap of the kept objects (sum of their sizes): above it, least recently used ones go
    /// until the total is under 90 % of it.
    pub max_bytes: Option<u64>,
    /// Where downloads in progress are spooled.
    pub spool_dir: PathBuf,
    /// Decoded chunks kept in memory for hot blobs.
    pub cache_bytes: usize,
    /// How long an upstream's answer to "may this client read this repository" is remembered.
    pub auth_ttl: Duration,
    /// Tries per upstream blob download (resuming with Range).
    pub attempts: u32,
    /// When not empty, clients must authenticate to the mirror itself (Basic, name and
    /// password); their credentials are then the mirror's, not passed upstream.
    pub users: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror configuration: {0}")]
    Config(String),
    #[error("upstream {host}: {reason}")]
    Upstream { host: String, reason: String },
    #[error("store: {0}")]
    Store(#[from] io::Error),
}

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
    upstreams: Vec<Upstream>,
    store: Arc<dyn MirrorStore>,
    flights: Mutex<HashMap<Digest, Arc<Flight>>>,
    tag_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cache: Mutex<ChunkCache>,
    /// Stored objects: size and last use (unix seconds).
    objects: Mutex<HashMap<Digest, (u64, u64)>>,
    /// Data blobs of accelerated forms, served from stored chunks.
    virtuals: Mutex<HashMap<Digest, accelerate::Virtual>>,
    /// The upstream's answer, and when, per (upstream, repository, principal).
    auth: Mutex<HashMap<AuthKey, (bool, Instant)>>,
    pub stats: Stats,
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

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(full(Bytes::from(body)))
        .expect("valid response")
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never: Infallible| match never {}).boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn unauthorized(message: &str) -> Response<Body> {
    let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    r.headers_mut().insert("www-authenticate", HeaderValue::from_static("Basic realm=\"hb mirror\""));
    r
}

/// Whether a client with `accept` takes a manifest of `media_type`: any client takes Docker's
/// types (old clients send no Accept for them); OCI types only when asked for, or with no
/// `Accept` at all, or `*/*`.
pub fn acceptable(accept: Option<&str>, media_type: &str) -> bool {
    let Some(a) = accept.filter(|a| !a.trim().is_empty()) else { return true };
    if !media_type.starts_with("application/vnd.oci.") {
        return true;
    }
    a.split(',').map(|t| t.split(';').next().unwrap_or("").trim()).any(|t| t == media_type || t == "*/*")
}

/// A `Range` that starts past the blob's end (416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A byte range of a blob of `size` bytes, from a `Range` header; `Err` when unsatisfiable.
/// Several ranges, or a malformed header, mean the whole blob (RFC 9110 allows ignoring it).
pub fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else { return Ok(None) };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        // A last position past the end means the end (RFC 9110 14.1.2), u64::MAX included.
        (Some(s), Some(e)) if s <= e => (s, e.saturating_add(1).min(size)),
        (Some(s), None) if b.is_empty() => (s, size),
        (None, Some(n)) if a.is_empty() && n > 0 => (size.saturating_sub(n), size),
        _ => return Ok(None),
    };
    if start >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
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
            cache: Mutex::new(ChunkCache { lru: lru::LruCache::unbounded(), bytes: 0, budget: cfg.cache_bytes }),
            cfg,
            upstreams,
            store,
            flights: Mutex::new(HashMap::new()),
            tag_locks: Mutex::new(HashMap::new()),
            objects: Mutex::new(objects),
            auth: Mutex::new(HashMap::new()),
            virtuals: Mutex::new(HashMap::new()),
            stats,
        });
        m.load_virtuals();
        Ok(m)
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
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let resp = match (req.method(), path.as_str()) {
            (&Method::GET, "/metrics") => {
                let (n, bytes) = self.kept();
                Response::builder()
                    .header(CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(full(Bytes::from(self.stats.prometheus(n, bytes, self.cfg.max_bytes))))
                    .expect("valid response")
            }
            (&Method::GET, "/_hb/stats") => {
                let (n, bytes) = self.kept();
                let body = serde_json::to_vec(&self.stats.report(n, bytes, self.cfg.max_bytes)).expect("serialisable");
                Response::builder()
                    .header(CONTENT_TYPE, "application/json")
                    .body(full(Bytes::from(body)))
                    .expect("valid response")
            }
            (m, _) if m != Method::GET && m != Method::HEAD => oci_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "this mirror is read-only: push to the upstream registry",
            ),
            _ => self.clone().distribution(req).await,
        };
        tracing::debug!(%path, status = resp.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request");
        let mut resp = resp;
        resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
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
        let mut who = Principal::from_header(req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()));
        if !self.cfg.users.is_empty() {
            let known = matches!(&who, Principal::Basic(u, p) if self.cfg.users.iter().any(|(n, w)| {
                constant_time_eq(n.as_bytes(), u.as_bytes()) & constant_time_eq(w.as_bytes(), p.as_bytes())
            }));
            if !known {
                return unauthorized("this mirror requires its own credentials");
            }
            // Upstreams see the mirror, with its configured credentials.
            who = Principal::Mirror;
        }
        let head = req.method() == Method::HEAD;
        let header = |n| req.headers().get(n).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_string);
        let stats = &self.stats.upstreams[route.upstream];
        stats.requests.inc();
        match route.object.clone() {
            // Clients send credentials only where the version check challenged them (docker,
            // containers/image): challenge anonymous ones, who then go on anonymously unless
            // they have credentials, as with any registry that takes Basic auth.
            Object::Base if who.is_anonymous() => unauthorized("credentials are optional: public content needs none"),
            Object::Base => Response::builder()
                .header(CONTENT_TYPE, "application/json")
                .body(full(Bytes::from_static(b"{}")))
                .expect("valid response"),
            Object::Manifest(r) => self.manifest(&route, r, &who, head, header(ACCEPT)).await,
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

    /// Whether `who` may read `route.repo`'s cached content: the mirror's own credentials
    /// count for anonymous clients; otherwise the upstream is asked (HEAD of `probe`) and its
    /// answer remembered for `auth_ttl`. A repository that answered anonymous clients before
    /// stays open to them while the upstream is down.
    async fn authorize(&self, route: &Route, who: &Principal, probe: &str) -> Result<(), Response<Body>> {
        let up = &self.upstreams[route.upstream];
        if who.is_anonymous() && up.cfg.credentials.is_some() {
            return Ok(());
        }
        let key = (route.upstream, route.repo.clone(), who.clone());
        if let Some((ok, at)) = self.auth.lock().expect("auth lock").get(&key) {
            if at.elapsed() < self.cfg.auth_ttl {
                return if *ok { Ok(()) } else { Err(unauthorized("the upstream refuses these credentials")) };
            }
        }
        let pq = format!("/v2/{}/{probe}", route.repo);
        let ok = match up.send(Method::HEAD, &route.repo, &pq, Default::default(), who).await {
            Ok(r) => !matches!(r.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
            Err(e) => {
                let public = who.is_anonymous() && self.is_public(route);
                tracing::warn!(upstream = %up.cfg.host, repo = %route.repo, error = %e, public, "cannot ask the upstream who may read; serving only what was public");
                if public {
                    return Ok(());
                }
                return Err(oci_error(
                    StatusCode::BAD_GATEWAY,
                    "UNAVAILABLE",
                    &format!("cannot check access to {} with the upstream: {e}", route.repo),
                ));
            }
        };
        self.remember(route, who, ok);
        if ok {
            Ok(())
        } else {
            Err(unauthorized("the upstream refuses access to this repository"))
        }
    }

    fn remember(&self, route: &Route, who: &Principal, ok: bool) {
        {
            let mut auth = self.auth.lock().expect("auth lock");
            if auth.len() >= 4096 {
                // Expired answers are worth nothing: keep the map to the live ones.
                let ttl = self.cfg.auth_ttl;
                auth.retain(|_, (_, at)| at.elapsed() < ttl);
            }
            auth.insert((route.upstream, route.repo.clone(), who.clone()), (ok, Instant::now()));
        }
        if ok && who.is_anonymous() && !self.is_public(route) {
            let _ = self.store.put_meta(&self.public_key(route), b"1");
        }
    }

    fn public_key(&self, route: &Route) -> String {
        format!("mirror/public/{}/{}", self.cfg.upstreams[route.upstream].host, route.repo)
    }

    fn is_public(&self, route: &Route) -> bool {
        matches!(self.store.meta(&self.public_key(route)), Ok(Some(_)))
    }

    async fn manifest(
        self: &Arc<Self>,
        route: &Route,
        reference: Reference,
        who: &Principal,
        head: bool,
        accept: Option<String>,
    ) -> Response<Body> {
        let stats = &self.stats.upstreams[route.upstream];
        let digest = match &reference {
            Reference::Digest(d) => *d,
            Reference::Tag(tag) => match self.resolve_tag(route, tag, who, accept.as_deref()).await {
                Ok(d) => d,
                Err(resp) => return resp,
            },
        };
        let key = format!("mirror/type/{digest}");
        let stored = self.objects.lock().expect("objects lock").contains_key(&digest);
        let mut found = None;
        if stored {
            if let Reference::Digest(d) = &reference {
                if let Err(r) = self.authorize(route, who, &format!("manifests/{d}")).await {
                    return r;
                }
                stats.hits.inc();
            }
            let media_type = self.store.meta(&key).ok().flatten().map(|b| String::from_utf8_lossy(&b).into_owned());
            match self.read_all(&digest).await {
                Ok(body) => found = Some((digest, media_type.unwrap_or_default(), body)),
                Err(e) => tracing::warn!(%digest, error = %e, "a kept manifest could not be read; fetching it again"),
            }
        }
        let (d, media_type, body) = match found {
            Some(f) => f,
            None => {
                stats.misses.inc();
                match self.fetch_manifest(route, &digest.to_string(), who, accept.as_deref(), Some(&digest)).await {
                    Ok(f) => f,
                    Err(resp) => return resp,
                }
            }
        };
        // An hb client asking a tag for its platform gets the accelerated binding (made now if
        // needed); anything going wrong there leaves it the plain manifest, pulled whole.
        if let (Reference::Tag(_), Some(platform)) = (&reference, accelerate::wanted_platform(accept.as_deref())) {
            match self.derived_index(route, &d, &body, &platform, who).await {
                Ok((di, index)) => return manifest_response(&di, crate::OCI_INDEX, index, head, stats),
                Err(e) => {
                    stats.error("convert");
                    tracing::warn!(digest = %d, %platform, error = %e, "no accelerated form for an hb client; serving the manifest as is");
                }
            }
        }
        if !acceptable(accept.as_deref(), &media_type) {
            // As distribution answers a client that did not ask for OCI types.
            return oci_error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                &format!("the manifest is {media_type}, which the request's Accept does not list"),
            );
        }
        manifest_response(&d, &media_type, body, head, stats)
    }

    /// A tag's manifest digest: remembered while fresh, else revalidated (HEAD), else fetched;
    /// the remembered one while the upstream is down.
    async fn resolve_tag(
        &self,
        route: &Route,
        tag: &str,
        who: &Principal,
        accept: Option<&str>,
    ) -> Result<Digest, Response<Body>> {
        let up = &self.upstreams[route.upstream];
        let stats = &self.stats.upstreams[route.upstream];
        let key = format!("mirror/tag/{}/{}:{tag}", up.cfg.host, route.repo);
        let _one = self.one_at_a_time(&key).await;
        let rec: Option<TagRecord> = self.store.meta(&key).ok().flatten().and_then(|b| serde_json::from_slice(&b).ok());
        let kept = rec
            .as_ref()
            .and_then(|r| r.digest.parse::<Digest>().ok())
            .filter(|d| self.objects.lock().expect("objects lock").contains_key(d));
        if let (Some(rec), Some(d)) = (&rec, kept) {
            let fresh = now().saturating_sub(rec.checked) < up.cfg.tag_ttl(&route.repo, tag).as_secs();
            if fresh {
                self.authorize(route, who, &format!("manifests/{tag}")).await?;
                stats.hits.inc();
                return Ok(d);
            }
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_TYPES));
            let pq = format!("/v2/{}/manifests/{tag}", route.repo);
            match up.send(Method::HEAD, &route.repo, &pq, headers, who).await {
                Ok(r) if r.status().is_success() => {
                    self.remember(route, who, true);
                    let current = r.headers().get(DIGEST_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
                    if current.as_deref() == Some(rec.digest.as_str()) {
                        let rec = TagRecord { checked: now(), ..rec.clone() };
                        let _ = self.store.put_meta(&key, &serde_json::to_vec(&rec).expect("serialisable"));
                        stats.hits.inc();
                        stats.revalidated.inc();
                        return Ok(d);
                    }
                }
                Ok(r) if matches!(r.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                    self.remember(route, who, false);
                    return Err(unauthorized("the upstream refuses access to this repository"));
                }
                Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                    return Err(oci_error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        &format!("tag {tag} is gone upstream"),
                    ));
                }
                Ok(r) => {
                    return self.stale(route, who, tag, d, &format!("the upstream answered {}", r.status())).await;
                }
                Err(e) => return self.stale(route, who, tag, d, &e.to_string()).await,
            }
        }
        stats.misses.inc();
        let (d, media_type, _) = self.fetch_manifest(route, tag, who, accept, None).await?;
        let rec = TagRecord { digest: d.to_string(), media_type, checked: now() };
        let _ = self.store.put_meta(&key, &serde_json::to_vec(&rec).expect("serialisable"));
        Ok(d)
    }

    /// Serialises work on `key` (a tag's resolution, an image's conversion); the entry goes when
    /// its last holder is done, so the map holds only keys in use.
    async fn one_at_a_time(&self, key: &str) -> KeyGuard<'_> {
        let lock = self.tag_locks.lock().expect("tag locks").entry(key.to_string()).or_default().clone();
        let guard = lock.lock_owned().await;
        KeyGuard { mirror: self, key: key.to_string(), guard: Some(guard) }
    }

    async fn stale(
        &self,
        route: &Route,
        who: &Principal,
        tag: &str,
        d: Digest,
        why: &str,
    ) -> Result<Digest, Response<Body>> {
        let stats = &self.stats.upstreams[route.upstream];
        self.authorize(route, who, &format!("manifests/{tag}")).await?;
        stats.stale.inc();
        stats.error("upstream");
        tracing::warn!(upstream = %self.cfg.upstreams[route.upstream].host, repo = %route.repo, tag, digest = %d, reason = why, "upstream unavailable: serving the tag's last known manifest");
        Ok(d)
    }

    /// GETs a manifest from the upstream, checks its digest (the one asked for, and the one the
    /// upstream claims), keeps it.
    async fn fetch_manifest(
        &self,
        route: &Route,
        reference: &str,
        who: &Principal,
        accept: Option<&str>,
        want: Option<&Digest>,
    ) -> Result<(Digest, String, Bytes), Response<Body>> {
        let up = &self.upstreams[route.upstream];
        let stats = &self.stats.upstreams[route.upstream];
        let mut headers = reqwest::header::HeaderMap::new();
        let accept = accept.filter(|a| !a.trim().is_empty() && a.trim() != "*/*").unwrap_or(MANIFEST_TYPES);
        headers.insert(ACCEPT, HeaderValue::from_str(accept).unwrap_or(HeaderValue::from_static(MANIFEST_TYPES)));
        let pq = format!("/v2/{}/manifests/{reference}", route.repo);
        let r =
            up.send(Method::GET, &route.repo, &pq, headers, who).await.map_err(|e| self.upstream_down(route, &e))?;
        match r.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                self.remember(route, who, false);
                return Err(unauthorized("the upstream requires credentials for this repository"));
            }
            StatusCode::NOT_FOUND => {
                return Err(oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    &format!("manifest {reference} unknown upstream"),
                ))
            }
            s => {
                stats.error("upstream");
                return Err(oci_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &format!("the upstream answered {s}")));
            }
        }
        self.remember(route, who, true);
        let claimed = r.headers().get(DIGEST_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let media_type = r.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if r.content_length().is_some_and(|n| n > MAX_MANIFEST as u64) {
            return Err(oci_error(StatusCode::BAD_GATEWAY, "MANIFEST_INVALID", "the upstream manifest is over 4 MiB"));
        }
        let body = r.bytes().await.map_err(|e| {
            self.upstream_down(
                route,
                &MirrorError::Upstream { host: up.cfg.host.clone(), reason: crate::error::chain(&e) },
            )
        })?;
        stats.bytes_upstream.add(body.len() as u64);
        let actual = Digest::of(&body);
        let wrong = want.is_some_and(|w| *w != actual) || claimed.as_deref().is_some_and(|c| c != actual.to_string());
        if wrong || body.len() > MAX_MANIFEST {
            stats.error("digest");
            tracing::error!(upstream = %up.cfg.host, repo = %route.repo, reference, %actual, "the upstream sent a manifest that does not match its digest; not kept");
            return Err(oci_error(
                StatusCode::BAD_GATEWAY,
                "DIGEST_INVALID",
                &format!("the upstream's manifest {reference} does not match its digest (got {actual})"),
            ));
        }
        let media_type = if media_type.is_empty() || media_type.starts_with("text/") || media_type == "application/json"
        {
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or(media_type)
        } else {
            media_type
        };
        // It becomes our Content-Type header: only a well-formed media type is kept or served.
        if !valid_media_type(&media_type) {
            stats.error("manifest");
            tracing::error!(upstream = %up.cfg.host, repo = %route.repo, reference, media_type = %media_type.escape_debug(), "the upstream sent a manifest with an invalid media type; not kept");
            return Err(oci_error(
                StatusCode::BAD_GATEWAY,
                "MANIFEST_INVALID",
                &format!(
                    "the upstream's manifest {reference} has an invalid media type {:?}; not kept",
                    media_type.escape_debug().to_string()
                ),
            ));
        }
        let b = body.clone();
        let (d, mt) = (actual, media_type.clone());
        let kept = self
            .blocking(move |s| {
                s.put_meta(&format!("mirror/type/{d}"), mt.as_bytes())?;
                s.insert(&d, &mut &b[..])
            })
            .await;
        match kept {
            Ok(()) => self.kept_object(actual, body.len() as u64).await,
            Err(e) => {
                stats.error("store");
                tracing::error!(digest = %actual, error = %e, "keeping a manifest failed; served anyway");
            }
        }
        Ok((actual, media_type, body))
    }

    /// Records a newly kept object and evicts the least recently used ones over the cap.
    async fn kept_object(&self, d: Digest, size: u64) {
        self.objects.lock().expect("objects lock").insert(d, (size, now()));
        let Some(max) = self.cfg.max_bytes else { return };
        let victims: Vec<Digest> = {
            let objects = self.objects.lock().expect("objects lock");
            let total: u64 = objects.values().map(|(s, _)| s).sum();
            if total <= max {
                return;
            }
            let flying = self.flights.lock().expect("flights lock");
            let mut by_age: Vec<(&Digest, &(u64, u64))> =
                objects.iter().filter(|(k, _)| **k != d && !flying.contains_key(k)).collect();
            by_age.sort_by_key(|(_, (_, used))| *used);
            let low = max / 10 * 9;
            let mut left = total;
            by_age
                .into_iter()
                .take_while(|(_, (s, _))| {
                    let go = left > low;
                    left = left.saturating_sub(*s);
                    go
                })
                .map(|(k, _)| *k)
                .collect()
        };
        if victims.is_empty() {
            return;
        }
        let n = victims.len();
        {
            let mut objects = self.objects.lock().expect("objects lock");
            victims.iter().for_each(|v| {
                objects.remove(v);
            });
        }
        let released: Vec<Digest> = {
            let mut virtuals = self.virtuals.lock().expect("virtuals lock");
            victims.iter().filter_map(|v| virtuals.remove(v)).filter_map(|x| x.diff_id.parse().ok()).collect()
        };
        if !released.is_empty() {
            self.save_virtuals();
        }
        let freed = self
            .blocking(move |s| {
                for v in &victims {
                    s.remove(v)?;
                }
                for d in &released {
                    s.release_layer(d)?;
                }
                s.reclaim()
            })
            .await;
        self.stats.evictions.add(n as u64);
        match freed {
            Ok(()) => tracing::info!(evicted = n, "over the size cap: least recently used objects removed"),
            Err(e) => tracing::error!(error = %e, "eviction failed"),
        }
        let _ = self.save_usage();
    }

    async fn chunk(&self, id: ChunkId) -> io::Result<Bytes> {
        if let Some(b) = self.cache.lock().expect("cache lock").get(&id) {
            return Ok(b);
        }
        let b = Bytes::from(self.blocking(move |s| s.chunk(&id)).await?);
        self.cache.lock().expect("cache lock").put(id, b.clone());
        Ok(b)
    }

    async fn read_all(&self, d: &Digest) -> io::Result<Bytes> {
        let d = *d;
        let chunks = self.blocking(move |s| s.lookup(&d)).await?.ok_or_else(|| io::Error::other("not kept"))?;
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&self.chunk(c.id).await?);
        }
        self.touch(&d);
        Ok(Bytes::from(out))
    }

    async fn blob(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        who: &Principal,
        head: bool,
        range: Option<String>,
    ) -> Response<Body> {
        let stats = &self.stats.upstreams[route.upstream];
        let probe = format!("blobs/{digest}");
        let kept = self.objects.lock().expect("objects lock").get(&digest).map(|(s, _)| *s);
        if let Some(size) = kept {
            if let Err(r) = self.authorize(route, who, &probe).await {
                return r;
            }
            let virt = self.virtuals.lock().expect("virtuals lock").get(&digest).cloned();
            if let Some(v) = virt {
                stats.hits.inc();
                self.touch(&digest);
                return self.virtual_blob(route, digest, v, head, range.as_deref()).await;
            }
            let d = digest;
            match self.blocking(move |s| s.lookup(&d)).await {
                Ok(Some(chunks)) => {
                    stats.hits.inc();
                    self.touch(&digest);
                    return self.stored_blob(route, digest, size, chunks, head, range.as_deref());
                }
                Ok(None) => {
                    self.objects.lock().expect("objects lock").remove(&digest);
                }
                Err(e) => {
                    stats.error("store");
                    return oci_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "UNKNOWN",
                        &format!("reading blob {digest}: {e}"),
                    );
                }
            }
        }
        if head {
            // A HEAD does not start a download.
            return self.pass_through(route, &format!("/v2/{}/{probe}", route.repo), who, true).await;
        }
        stats.misses.inc();
        let (flight, started) = match self.flight_for(route, digest, who) {
            Ok(f) => f,
            Err(e) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &e.to_string()),
        };
        let size = match flight.size().await {
            Ok(s) => s,
            Err(e) => return flight_error_response(&e),
        };
        if !started {
            if let Err(r) = self.authorize(route, who, &probe).await {
                return r;
            }
        }
        let range = match parse_range(range.as_deref(), size) {
            Ok(r) => r,
            Err(Unsatisfiable) => return range_not_satisfiable(size),
        };
        let opened = {
            // Opened under the lock the downloader takes before it unlinks the spool.
            let flights = self.flights.lock().expect("flights lock");
            std::fs::File::open(&flight.spool).map_err(|e| (e, flights.contains_key(&digest)))
        };
        let file = match opened {
            Ok(f) => f,
            Err((_, false)) => {
                // Committed meanwhile: serve it from the store.
                let range = range.map(|(a, b)| format!("bytes={a}-{}", b - 1));
                return Box::pin(self.blob(route, digest, who, head, range)).await;
            }
            Err((e, true)) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &format!("spool: {e}")),
        };
        let (pos, end) = range.unwrap_or((0, size));
        let reader = FlightReader { file, rx: flight.state.subscribe(), pos, end, whole: range.is_none() };
        let stats_bytes = self.clone();
        let upstream = route.upstream;
        let stream =
            futures_util::stream::unfold(reader, |mut r| async move { r.next().await.map(|b| (b, r)) }).map(move |b| {
                if let Ok(b) = &b {
                    stats_bytes.stats.upstreams[upstream].bytes_served.add(b.len() as u64);
                }
                b.map(Frame::data)
            });
        blob_response(&digest, size, range, BodyExt::boxed(StreamBody::new(stream)))
    }

    /// The download of `digest`: the one in progress, or a new one (then `true`).
    fn flight_for(self: &Arc<Self>, route: &Route, digest: Digest, who: &Principal) -> io::Result<(Arc<Flight>, bool)> {
        let (flight, started) = {
            let mut flights = self.flights.lock().expect("flights lock");
            match flights.get(&digest) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Flight::new(digest, self.cfg.spool_dir.join(format!("{}.partial", digest.hex())));
                    flights.insert(digest, f.clone());
                    (f, true)
                }
            }
        };
        if started {
            // Created before any reader opens it.
            if let Err(e) = std::fs::File::create(&flight.spool) {
                self.flights.lock().expect("flights lock").remove(&digest);
                return Err(io::Error::other(format!("spooling blob {digest}: {e}")));
            }
            tokio::spawn(self.clone().download(route.clone(), who.clone(), flight.clone()));
        }
        Ok((flight, started))
    }

    fn stored_blob(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        size: u64,
        chunks: Vec<ChunkRef>,
        head: bool,
        range: Option<&str>,
    ) -> Response<Body> {
        let range = match parse_range(range, size) {
            Ok(r) => r,
            Err(Unsatisfiable) => return range_not_satisfiable(size),
        };
        if head {
            return blob_response(&digest, size, range, empty());
        }
        let (start, end) = range.unwrap_or((0, size));
        // The chunks overlapping start..end, each with the part of it to send.
        let mut pieces = Vec::new();
        let mut at = 0u64;
        for c in chunks {
            let (a, b) = (at, at + c.len as u64);
            at = b;
            if b <= start || a >= end {
                continue;
            }
            pieces.push((c.id, (start.max(a) - a) as usize, (end.min(b) - a) as usize));
        }
        self.piece_stream(route, digest, size, range, pieces, false)
    }

    /// The body of `pieces` (chunk, slice of it), as decoded chunks or in their stored form.
    fn piece_stream(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        size: u64,
        range: Option<(u64, u64)>,
        pieces: Vec<(ChunkId, usize, usize)>,
        stored_form: bool,
    ) -> Response<Body> {
        let me = self.clone();
        let upstream = route.upstream;
        let stream = futures_util::stream::iter(pieces).then(move |(id, from, to)| {
            let me = me.clone();
            async move {
                let b = if stored_form {
                    Bytes::from(me.blocking(move |s| s.stored_chunk(&id)).await?)
                } else {
                    me.chunk(id).await?
                };
                if to > b.len() {
                    return Err(io::Error::other(format!("chunk {id} is shorter than its table says")));
                }
                me.stats.upstreams[upstream].bytes_served.add((to - from) as u64);
                Ok::<_, io::Error>(Frame::data(b.slice(from..to)))
            }
        });
        blob_response(&digest, size, range, BodyExt::boxed(StreamBody::new(stream)))
    }

    /// A converted layer's data blob: its chunks' stored bytes back to back, as its table says.
    async fn virtual_blob(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        v: accelerate::Virtual,
        head: bool,
        range: Option<&str>,
    ) -> Response<Body> {
        let range = match parse_range(range, v.size) {
            Ok(r) => r,
            Err(Unsatisfiable) => return range_not_satisfiable(v.size),
        };
        if head {
            return blob_response(&digest, v.size, range, empty());
        }
        let table = match v.table.parse().map_err(|e| io::Error::other(format!("{e}"))) {
            Ok(t) => self.read_all(&t).await,
            Err(e) => Err(e),
        };
        let table = match table.map(|b| hb_core::lazy::ChunkTable::decode(&b)) {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &format!("chunk table: {e}")),
            Err(e) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &format!("chunk table: {e}")),
        };
        let (start, end) = range.unwrap_or((0, v.size));
        let pieces = table
            .entries
            .iter()
            .filter(|e| e.offset + e.stored_len as u64 > start && e.offset < end)
            .map(|e| {
                let a = e.offset;
                (e.id, (start.max(a) - a) as usize, (end.min(a + e.stored_len as u64) - a) as usize)
            })
            .collect();
        self.piece_stream(route, digest, v.size, range, pieces, true)
    }

    /// Downloads one blob into its spool (resuming with Range), verifies it, keeps it, and
    /// tells every reader how it went.
    async fn download(self: Arc<Self>, route: Route, who: Principal, flight: Arc<Flight>) {
        let result = self.download_inner(&route, &who, &flight).await;
        let digest = flight.digest;
        let stats = &self.stats.upstreams[route.upstream];
        let result = match result {
            Ok(size) => {
                let spool = flight.spool.clone();
                let kept = self
                    .blocking(move |s| {
                        let mut f = std::fs::File::open(&spool)?;
                        s.insert(&digest, &mut f)
                    })
                    .await;
                match kept {
                    Ok(()) => {
                        self.kept_object(digest, size).await;
                        Ok(())
                    }
                    Err(e) => {
                        // Verified bytes, just not kept: readers still get them.
                        stats.error("store");
                        tracing::error!(%digest, error = %e, "keeping a verified blob failed");
                        Ok(())
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%digest, upstream = %self.cfg.upstreams[route.upstream].host, error = %e.message, "blob download failed; nothing kept");
                Err(e)
            }
        };
        flight.update(|s| s.done = Some(result));
        let mut flights = self.flights.lock().expect("flights lock");
        flights.remove(&digest);
        let _ = std::fs::remove_file(&flight.spool);
    }

    async fn download_inner(&self, route: &Route, who: &Principal, flight: &Flight) -> Result<u64, FlightError> {
        let up = &self.upstreams[route.upstream];
        let stats = &self.stats.upstreams[route.upstream];
        let digest = flight.digest;
        let fail = |status: u16, code: &'static str, message: String| FlightError { status, code, message };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&flight.spool)
            .map_err(|e| fail(500, "UNKNOWN", format!("spool: {e}")))?;
        let pq = format!("/v2/{}/blobs/{digest}", route.repo);
        let mut hasher = DigestHasher::new();
        let mut offset = 0u64;
        let mut size: Option<u64> = None;
        let mut failures = 0u32;
        loop {
            let mut headers = reqwest::header::HeaderMap::new();
            if offset > 0 {
                headers.insert(RANGE, HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii"));
            }
            stats.upstream_gets.inc();
            let step: Result<(), FlightError> = async {
                let r = up
                    .send(Method::GET, &route.repo, &pq, headers, who)
                    .await
                    .map_err(|e| fail(502, "UNAVAILABLE", e.to_string()))?;
                let mut skip = match r.status() {
                    StatusCode::OK => offset,
                    StatusCode::PARTIAL_CONTENT if offset > 0 => 0,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        self.remember(route, who, false);
                        return Err(FlightError {
                            status: 401,
                            code: "UNAUTHORIZED",
                            message: "the upstream requires credentials for this repository".into(),
                        });
                    }
                    StatusCode::NOT_FOUND => {
                        return Err(fail(404, "BLOB_UNKNOWN", format!("blob {digest} unknown upstream")))
                    }
                    s => return Err(fail(502, "UNAVAILABLE", format!("the upstream answered {s}"))),
                };
                if size.is_none() {
                    self.remember(route, who, true);
                    let n = r
                        .content_length()
                        .ok_or_else(|| fail(502, "UNAVAILABLE", "the upstream sent no Content-Length".into()))?;
                    size = Some(n);
                    flight.update(|s| s.size = Some(n));
                }
                let total = size.expect("set above");
                let mut body = r.bytes_stream();
                while let Some(item) = body.next().await {
                    let bytes = item.map_err(|e| fail(502, "UNAVAILABLE", crate::error::chain(&e)))?;
                    let drop = skip.min(bytes.len() as u64) as usize;
                    skip -= drop as u64;
                    let b = &bytes[drop..];
                    if b.is_empty() {
                        continue;
                    }
                    if offset + b.len() as u64 > total {
                        return Err(fail(502, "DIGEST_INVALID", format!("the upstream sent more than {total} bytes")));
                    }
                    file.write_all_at(b, offset).map_err(|e| fail(500, "UNKNOWN", format!("spool: {e}")))?;
                    hasher.update(b);
                    offset += b.len() as u64;
                    stats.bytes_upstream.add(b.len() as u64);
                    flight.update(|s| s.written = offset);
                }
                Ok(())
            }
            .await;
            let total = size.unwrap_or(u64::MAX);
            match step {
                Ok(()) if offset == total => break,
                Err(e) if e.status != 502 || e.code == "DIGEST_INVALID" => return Err(e),
                Err(e) if failures + 1 >= self.cfg.attempts.max(1) => {
                    stats.error("upstream");
                    return Err(e);
                }
                Ok(()) if failures + 1 >= self.cfg.attempts.max(1) => {
                    stats.error("upstream");
                    return Err(fail(
                        502,
                        "UNAVAILABLE",
                        format!("the upstream closed the blob after {offset} of {total} bytes"),
                    ));
                }
                other => {
                    failures += 1;
                    let wait = Duration::from_millis(200 * (1 << failures.min(4)));
                    let reason = match other {
                        Err(e) => e.message,
                        Ok(()) => format!("closed after {offset} of {total} bytes"),
                    };
                    tracing::warn!(%digest, offset, attempt = failures + 1, %reason, "upstream blob download interrupted; resuming");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let actual = hasher.finish();
        if actual != digest {
            stats.error("digest");
            return Err(fail(
                502,
                "DIGEST_INVALID",
                format!("the upstream sent bytes that do not match {digest} (got {actual}); not kept"),
            ));
        }
        Ok(offset)
    }
}

/// Whether `s` is a media type as RFC 6838 names them (`type/subtype`, restricted name characters,
/// optional `; parameter=value` parts of visible ASCII): what may go into a Content-Type header.
pub fn valid_media_type(s: &str) -> bool {
    let restricted = |t: &str| {
        !t.is_empty()
            && t.len() <= 127
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
            && t.as_bytes()[0].is_ascii_alphanumeric()
    };
    let mut parts = s.split(';');
    let essence = parts.next().unwrap_or("").trim();
    let essence_ok = essence.split_once('/').is_some_and(|(t, sub)| restricted(t) && restricted(sub));
    essence_ok
        && parts.all(|p| {
            p.trim().split_once('=').is_some_and(|(k, v)| {
                restricted(k.trim()) && !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            })
        })
}

fn manifest_response(d: &Digest, media_type: &str, body: Bytes, head: bool, stats: &UpstreamStats) -> Response<Body> {
    // Checked when kept; a record from an older version may still hold anything.
    let Ok(content_type) = HeaderValue::from_str(media_type).map_err(drop).and_then(|v| {
        if valid_media_type(media_type) {
            Ok(v)
        } else {
            Err(())
        }
    }) else {
        stats.error("manifest");
        tracing::error!(digest = %d, media_type = %media_type.escape_debug(), "a kept manifest has an invalid media type; not served");
        return oci_error(
            StatusCode::BAD_GATEWAY,
            "MANIFEST_INVALID",
            &format!("manifest {d} has an invalid media type {:?}", media_type.escape_debug().to_string()),
        );
    };
    if !head {
        stats.bytes_served.add(body.len() as u64);
    }
    Response::builder()
        .header(CONTENT_TYPE, content_type)
        .header(DIGEST_HEADER, d.to_string())
        .header(CONTENT_LENGTH, body.len())
        .body(if head { empty() } else { full(body) })
        .expect("valid response")
}

fn blob_response(d: &Digest, size: u64, range: Option<(u64, u64)>, body: Body) -> Response<Body> {
    let b = Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(DIGEST_HEADER, d.to_string())
        .header("accept-ranges", "bytes")
        .header("etag", format!("\"{d}\""));
    let b = match range {
        Some((a, e)) => b
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-range", format!("bytes {a}-{}/{size}", e - 1))
            .header(CONTENT_LENGTH, e - a),
        None => b.header(CONTENT_LENGTH, size),
    };
    b.body(body).expect("valid response")
}

fn range_not_satisfiable(size: u64) -> Response<Body> {
    let mut r =
        oci_error(StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN", "the requested range is past the blob's end");
    r.headers_mut().insert("content-range", HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"));
    r
}

fn flight_error_response(e: &FlightError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if status == StatusCode::UNAUTHORIZED {
        return unauthorized(&e.message);
    }
    oci_error(status, e.code, &e.message)
}

/// A running mirror's figures, from its `/_hb/stats` (for `hb proxy stats`).
pub async fn fetch_stats(base_url: &str) -> Result<StatsReport, MirrorError> {
    crate::client::install_crypto_provider();
    let url = format!("{}/_hb/stats", base_url.trim_end_matches('/'));
    let err = |reason: String| MirrorError::Upstream { host: url.clone(), reason };
    let resp = reqwest::get(&url).await.map_err(|e| err(crate::error::chain(&e)))?;
    if !resp.status().is_success() {
        return Err(err(format!("answered {}", resp.status())));
    }
    resp.json().await.map_err(|e| err(format!("not an hb proxy: {e}")))
}

/// A TLS server configuration from PEM files: the certificate chain and its private key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, MirrorError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    crate::client::install_crypto_provider();
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
                    let svc = hyper::service::service_fn(move |req| m.clone().handle(req));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let oci = crate::OCI_INDEX;
        assert!(acceptable(None, oci) && acceptable(Some("*/*"), oci));
        assert!(acceptable(Some(&format!("{}, {oci}", crate::DOCKER_MANIFEST)), oci));
        assert!(!acceptable(Some(crate::DOCKER_MANIFEST), oci));
        assert!(acceptable(Some(crate::OCI_MANIFEST), crate::DOCKER_LIST), "docker types are always served");
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
