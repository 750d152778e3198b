//! Talking to one registry: resolving a reference to a manifest for a platform, and fetching
//! blobs as streams that resume after a dropped connection.

use futures_util::StreamExt;
use hb_core::{Digest, DigestHasher};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use tokio::sync::mpsc;

use crate::error::RegistryError;
pub use crate::manifest::{LayerDesc, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
pub use crate::options::{RegistryOptions, Scheme};
use crate::reference::ImageRef;

const MANIFEST_TYPES: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// A reference resolved to one platform's image, manifest and config verified by digest.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    pub reference: ImageRef,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub manifest: Vec<u8>,
    pub config_digest: Digest,
    pub config: Vec<u8>,
    pub layers: Vec<LayerDesc>,
    pub platform: String,
    /// The hb accelerated manifest (digest, size) bound to this image in its index, if any.
    pub accelerated: Option<(Digest, u64)>,
}

/// A client for the registry of one reference.
pub struct Registry {
    /// Clients in order of preference (HTTPS, then HTTP for loopback); `chosen` is the one in use.
    pub(crate) clients: Vec<Client>,
    /// The URL scheme of each client.
    pub(crate) schemes: Vec<&'static str>,
    pub(crate) chosen: std::sync::atomic::AtomicUsize,
    /// Our own HTTP client for blob downloads, and the Authorization header for it.
    pub(crate) blobs: crate::blob::BlobHttp,
    pub(crate) authorization: std::sync::Mutex<Option<String>>,
    pub(crate) auth: RegistryAuth,
    /// What requests authenticate with: `auth`, or the access token an identity token was
    /// exchanged for.
    pub(crate) effective: std::sync::Mutex<RegistryAuth>,
    pub(crate) opts: RegistryOptions,
    pub(crate) registry: String,
    /// Set once a protocol and an authorization were chosen.
    pub(crate) connected: std::sync::atomic::AtomicBool,
    /// Held by the first caller that connects; the others wait for its answer instead of each
    /// probing the schemes and authorizing (a mount's first reads start eight at once).
    pub(crate) connecting: tokio::sync::Mutex<()>,
    /// The last failed attempt to connect: when, why, and whether worth retrying. The requests
    /// that waited for it take its answer rather than each trying again in turn.
    pub(crate) connect_failure: std::sync::Mutex<Option<(std::time::Instant, String, bool)>>,
    /// What a request and a byte cost on the link to this registry (measured from blob reads):
    /// how wide a gap a batch of range reads bridges.
    pub(crate) link: crate::link::LinkCost,
}

impl Registry {
    /// A client for `r`'s registry, speaking what `opts.scheme` says: HTTPS (with the system's
    /// roots plus `opts.ca_pem`), plain HTTP, or for loopback registries HTTPS falling back to HTTP.
    /// One HTTP client (one connection pool, the trust roots read only if a certificate is ever
    /// checked) serves the manifest requests of every scheme and the blob reads.
    /// Fails only when a configured CA is not valid PEM.
    pub fn new(r: &ImageRef, opts: RegistryOptions) -> Result<Self, RegistryError> {
        let shared = crate::http::http_client(&crate::http::HttpSettings {
            ca_pem: &opts.ca_pem,
            skip_verify: opts.skip_verify,
            ..crate::http::HttpSettings::new(r.host())
        })?;
        let make = |protocol: ClientProtocol| {
            Client::new(ClientConfig { protocol, http_client: Some(shared.clone()), ..ClientConfig::default() })
        };
        let http = || make(ClientProtocol::HttpsExcept(vec![r.host().to_string()]));
        let (clients, schemes) = match opts.scheme {
            Scheme::Http => (vec![http()], vec!["http"]),
            Scheme::Https => (vec![make(ClientProtocol::Https)], vec!["https"]),
            Scheme::Auto if r.is_loopback() => (vec![make(ClientProtocol::Https), http()], vec!["https", "http"]),
            Scheme::Auto => (vec![make(ClientProtocol::Https)], vec!["https"]),
        };
        let auth = match &opts.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let blobs = crate::blob::BlobHttp { http: shared };
        Ok(Registry {
            clients,
            schemes,
            chosen: Default::default(),
            blobs,
            authorization: Default::default(),
            effective: std::sync::Mutex::new(auth.clone()),
            auth,
            opts,
            registry: r.host().to_string(),
            connected: Default::default(),
            connecting: Default::default(),
            connect_failure: Default::default(),
            link: Default::default(),
        })
    }

    /// Whether the protocol it connected with is plain HTTP (false before it connected).
    pub fn plain_http(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Acquire)
            && self.schemes[self.chosen.load(std::sync::atomic::Ordering::Relaxed)] == "http"
    }

    pub(crate) fn client(&self) -> &Client {
        &self.clients[self.chosen.load(std::sync::atomic::Ordering::Relaxed)]
    }

    /// Finds a protocol the registry answers (HTTPS first). Keeps the first error when none does:
    /// a certificate problem says more than "HTTP response to an HTTPS client".
    pub(crate) async fn connect(&self, r: &ImageRef) -> Result<(), RegistryError> {
        self.connect_op(r, RegistryOperation::Pull).await
    }

    /// [`Registry::connect`] for an operation (pull, or push for `hb convert`).
    pub(crate) async fn connect_op(&self, r: &ImageRef, op: RegistryOperation) -> Result<(), RegistryError> {
        let mut first = None;
        for (i, c) in self.clients.iter().enumerate() {
            // An identity token (docker's `identitytoken`, user `<token>`) is exchanged for an
            // access token at the registry's token service first (OAuth2 refresh_token grant).
            let auth = match &self.auth {
                RegistryAuth::Basic(user, token) if user == hb_core::IDENTITY_TOKEN_USER => {
                    match self.exchange_identity_token(self.schemes[i], r, op, token).await {
                        Ok(access) => RegistryAuth::Bearer(access),
                        Err(e) if e.is_transient() => {
                            first.get_or_insert(e);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                a => a.clone(),
            };
            match c.auth(&r.inner, &auth, op).await.map_err(self.err(r)) {
                Err(e) if e.is_transient() => {
                    tracing::debug!(registry = %self.registry, error = %e, "protocol failed; trying the next");
                    first.get_or_insert(e);
                }
                Err(e) => return Err(e),
                Ok(token) => {
                    self.chosen.store(i, std::sync::atomic::Ordering::Relaxed);
                    let header = match (token, &self.auth) {
                        (Some(t), _) => Some(format!("Bearer {t}")),
                        (None, RegistryAuth::Basic(u, p)) => {
                            use base64::Engine;
                            Some(format!(
                                "Basic {}",
                                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                            ))
                        }
                        (None, _) => None,
                    };
                    *self.authorization.lock().expect("authorization lock") = header;
                    *self.effective.lock().expect("auth lock") = auth;
                    self.connected.store(true, std::sync::atomic::Ordering::Release);
                    return Ok(());
                }
            }
        }
        Err(first.expect("at least one client"))
    }

    /// Exchanges an identity token (an OAuth2 refresh token) for an access token to `r`'s
    /// repository: the registry's `/v2/` names its token service (`WWW-Authenticate: Bearer
    /// realm=...,service=...`), which takes a form-encoded `grant_type=refresh_token` POST, as
    /// docker sends it.
    async fn exchange_identity_token(
        &self,
        scheme: &str,
        r: &ImageRef,
        op: RegistryOperation,
        token: &str,
    ) -> Result<String, RegistryError> {
        let refused = |reason: String| RegistryError::Unauthorized { registry: self.registry.clone(), reason };
        let http = &self.blobs.http;
        let probe = http.get(format!("{scheme}://{}/v2/", r.host())).send().await.map_err(|e| {
            RegistryError::Transport { registry: self.registry.clone(), reason: crate::error::chain(&e) }
        })?;
        let challenge = probe
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(crate::http::bearer_challenge)
            .unwrap_or_default();
        let Some(realm) = challenge.get("realm") else {
            return Err(refused("the registry names no token service: an identity token cannot be used there".into()));
        };
        let actions = match op {
            RegistryOperation::Push => "pull,push",
            RegistryOperation::Pull => "pull",
        };
        let mut form = vec![
            ("grant_type", "refresh_token".to_string()),
            ("refresh_token", token.to_string()),
            ("client_id", "hb".to_string()),
            ("scope", format!("repository:{}:{actions}", r.repository())),
        ];
        if let Some(service) = challenge.get("service") {
            form.push(("service", service.clone()));
        }
        let body: Vec<String> = form.iter().map(|(k, v)| format!("{k}={}", crate::http::form_encode(v))).collect();
        let answer = http
            .post(realm)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body.join("&"))
            .send()
            .await
            .map_err(|e| RegistryError::Transport {
                registry: self.registry.clone(),
                reason: crate::error::chain(&e),
            })?;
        let status = answer.status();
        if status.is_server_error() || status.as_u16() == 429 {
            // Busy or failing: transient, retried as any registry answer would be.
            return Err(RegistryError::Busy {
                registry: self.registry.clone(),
                status: status.as_u16(),
                retry_after: None,
            });
        }
        if !status.is_success() {
            let said = answer.text().await.unwrap_or_default();
            let said: String = said.trim().chars().take(200).collect();
            return Err(refused(format!("the token service {realm} refused the identity token ({status}) {said}")));
        }
        let raw = answer.bytes().await.map_err(|e| refused(format!("the token service {realm} answered: {e}")))?;
        let v: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|e| refused(format!("the token service {realm} answered no JSON: {e}")))?;
        v["access_token"]
            .as_str()
            .or_else(|| v["token"].as_str())
            .map(str::to_string)
            .ok_or_else(|| refused(format!("the token service {realm} answered no access_token")))
    }

    pub(crate) fn err(&self, r: &ImageRef) -> impl Fn(oci_client::errors::OciDistributionError) -> RegistryError + '_ {
        let reference = r.canonical();
        move |e| RegistryError::from_oci(&self.registry, &reference, e)
    }

    pub(crate) async fn manifest(&self, r: &ImageRef) -> Result<(Vec<u8>, Digest), RegistryError> {
        // hb's own type, with the platform, asks an hb proxy for an accelerated binding (it makes
        // one for any image); registries ignore it.
        let hb_type = format!("{}; platform={}", hb_core::lazy::ARTIFACT_TYPE, self.opts.platform);
        let mut accept: Vec<&str> = MANIFEST_TYPES.to_vec();
        if r.digest().is_none() {
            accept.push(&hb_type);
        }
        let auth = self.effective.lock().expect("auth lock").clone();
        let (bytes, _) = self.client().pull_manifest_raw(&r.inner, &auth, &accept).await.map_err(self.err(r))?;
        let actual = Digest::of(&bytes);
        if let Some(want) = r.digest() {
            if want != actual.to_string() {
                return Err(RegistryError::DigestMismatch { what: "manifest", expected: want.to_string(), actual });
            }
        }
        Ok((bytes.to_vec(), actual))
    }

    /// Resolves `r` to the image for the configured platform: follows an index or manifest
    /// list, checks every digest, and pairs each layer with its diff_id from the config.
    /// Transient failures (connection errors, 5xx, 429) are retried with exponential backoff.
    pub async fn resolve(&self, r: &ImageRef) -> Result<ResolvedImage, RegistryError> {
        let attempts = self.opts.attempts.max(1);
        let mut tried = 0;
        let mut reauthorized = false;
        loop {
            tried += 1;
            match self.resolve_once(r).await {
                // An expired token: each attempt starts with a fresh authorization, so one more
                // attempt is a renewal (wrong credentials fail again the same way).
                Err(RegistryError::Unauthorized { .. }) if !reauthorized && self.opts.credentials.is_some() => {
                    reauthorized = true;
                    tracing::info!(reference = %r, "authorization refused; renewing it once");
                }
                Err(e)
                    if e.is_transient()
                        && tried < attempts
                        && e.retry_after().is_none_or(|a| a <= crate::retry::MAX_RETRY_AFTER) =>
                {
                    let wait = crate::retry::delay(tried, e.retry_after());
                    tracing::warn!(reference = %r, attempt = tried + 1, wait_ms = wait.as_millis() as u64, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn resolve_once(&self, r: &ImageRef) -> Result<ResolvedImage, RegistryError> {
        self.connect(r).await?;
        let malformed =
            |what: &'static str, reason: String| RegistryError::Malformed { reference: r.canonical(), what, reason };
        let (mut bytes, mut digest) = self.manifest(r).await?;
        let reference = r.canonical();
        let mut platform = self.opts.platform.to_string();
        let mut accelerated = None;
        let mut parsed = crate::manifest::parse(&reference, &bytes, &self.opts.platform)?;
        if let crate::manifest::Parsed::Index(chosen) = parsed {
            platform = chosen.platform;
            accelerated = chosen.accelerated;
            let child = r.with_digest(&chosen.digest);
            (bytes, digest) = self.manifest(&child).await?;
            parsed = crate::manifest::parse(&reference, &bytes, &self.opts.platform)?;
        }
        let crate::manifest::Parsed::Image(image) = parsed else {
            return Err(malformed("index", "an index inside an index".into()));
        };
        let config_digest = image.config.digest;
        let media_type = image.media_type.clone();
        // The config is a blob like any other: the same verified, resumable download.
        let desc = image.config.clone();
        let (tx, mut rx) = mpsc::channel::<Result<Vec<u8>, String>>(16);
        let collect = async {
            let mut v = Vec::new();
            while let Some(Ok(b)) = rx.recv().await {
                v.extend_from_slice(&b);
            }
            v
        };
        let (fetched, config) = tokio::join!(self.fetch_blob(r, &desc, tx), collect);
        fetched.map_err(|e| match e {
            RegistryError::DigestMismatch { expected, actual, .. } => {
                RegistryError::DigestMismatch { what: "config", expected, actual }
            }
            other => other,
        })?;
        let layers = crate::manifest::pair_layers(&reference, &image, &config)?;
        Ok(ResolvedImage {
            reference: r.clone(),
            manifest_digest: digest,
            manifest_media_type: media_type,
            manifest: bytes,
            config_digest,
            config,
            layers,
            platform,
            accelerated,
        })
    }

    /// Checks that the configured credentials are accepted by the registry of `r` (as `docker
    /// login` does): the token service issues a token, and a request with it (or with basic
    /// credentials) is not refused. A missing repository counts as accepted.
    pub async fn check_credentials(&self, r: &ImageRef) -> Result<(), RegistryError> {
        self.connect(r).await?;
        let auth = self.effective.lock().expect("auth lock").clone();
        match self.client().fetch_manifest_digest(&r.inner, &auth).await.map_err(self.err(r)) {
            Ok(_) | Err(RegistryError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Streams a blob into `out`, resuming with a Range request after a dropped connection and
    /// retrying server errors with backoff. Verifies size and SHA-256 of the whole; returns the
    /// byte count. The receiver sees bytes as they arrive and must not trust them until this
    /// returns `Ok` (the store checks the digest itself before it commits).
    pub async fn fetch_blob(
        &self,
        r: &ImageRef,
        layer: &LayerDesc,
        out: mpsc::Sender<Result<Vec<u8>, String>>,
    ) -> Result<u64, RegistryError> {
        let scheme = self.schemes[self.chosen.load(std::sync::atomic::Ordering::Relaxed)];
        let url = r.blob_url(scheme, &layer.digest);
        let attempts = self.opts.attempts.max(1);
        let mut hasher = DigestHasher::new();
        let mut offset = 0u64;
        let mut failures = 0u32;
        let mut reauthorized = false;
        loop {
            let authorization = self.authorization.lock().expect("authorization lock").clone();
            let resp = self.blobs.get(&self.registry, &url, authorization.as_deref(), offset, None).await;
            let step: Result<bool, RegistryError> = async {
                let (resp, mut skip) = match resp? {
                    crate::blob::BlobBody::Full(resp) => (resp, offset),
                    crate::blob::BlobBody::Partial(resp) => (resp, 0),
                };
                let mut stream = resp.bytes_stream();
                while let Some(item) = stream.next().await {
                    let bytes = item.map_err(|e| RegistryError::Transport {
                        registry: self.registry.clone(),
                        reason: format!("blob {}: {}", layer.digest, crate::error::chain(&e)),
                    })?;
                    let mut b = &bytes[..];
                    // A server that ignored the Range header resent the start.
                    let drop = skip.min(b.len() as u64) as usize;
                    b = &b[drop..];
                    skip -= drop as u64;
                    if b.is_empty() {
                        continue;
                    }
                    hasher.update(b);
                    offset += b.len() as u64;
                    if offset > layer.size {
                        return Err(RegistryError::DigestMismatch {
                            what: "blob (longer than its manifest size)",
                            expected: layer.digest.to_string(),
                            actual: hasher.clone().finish(),
                        });
                    }
                    if out.send(Ok(b.to_vec())).await.is_err() {
                        return Err(RegistryError::ReceiverGone { blob: layer.digest.to_string() });
                    }
                }
                Ok(offset == layer.size)
            }
            .await;
            match step {
                Ok(true) => break,
                // A token that expired during a long pull: get a new one and resume, once.
                Err(RegistryError::Unauthorized { .. }) if !reauthorized => {
                    reauthorized = true;
                    tracing::info!(blob = %layer.digest, offset, "authorization expired; fetching a new token");
                    self.connect(r).await?;
                }
                Err(RegistryError::Busy { retry_after: Some(wait), .. }) if wait > crate::retry::MAX_RETRY_AFTER => {
                    let e =
                        RegistryError::Busy { registry: self.registry.clone(), status: 429, retry_after: Some(wait) };
                    let _ = out.send(Err(e.to_string())).await;
                    return Err(e);
                }
                Ok(false) | Err(RegistryError::Transport { .. }) | Err(RegistryError::Busy { .. })
                    if failures + 1 < attempts =>
                {
                    failures += 1;
                    // The registry's own Retry-After, when it gave one, is the least we wait.
                    let after = step.as_ref().err().and_then(RegistryError::retry_after);
                    let wait = crate::retry::delay(failures, after);
                    tracing::warn!(blob = %layer.digest, offset, attempt = failures + 1, wait_ms = wait.as_millis() as u64, "blob download interrupted; resuming");
                    tokio::time::sleep(wait).await;
                }
                Ok(false) => {
                    let e = RegistryError::Transport {
                        registry: self.registry.clone(),
                        reason: format!(
                            "blob {}: connection closed after {offset} of {} bytes",
                            layer.digest, layer.size
                        ),
                    };
                    let _ = out.send(Err(e.to_string())).await;
                    return Err(e);
                }
                Err(e) => {
                    let _ = out.send(Err(e.to_string())).await;
                    return Err(e);
                }
            }
        }
        let actual = hasher.finish();
        if actual != layer.digest {
            let e = RegistryError::DigestMismatch { what: "blob", expected: layer.digest.to_string(), actual };
            let _ = out.send(Err(e.to_string())).await;
            return Err(e);
        }
        Ok(offset)
    }
}
