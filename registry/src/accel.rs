//! What lazy pulls and `hb convert` need beyond a pull: byte ranges of blobs, small verified
//! blobs, the accelerated form bound to an image, and pushes.

use hb_core::lazy::{AccelConfig, MEDIA_TYPE_CONFIG};
use hb_core::Digest;
use oci_client::RegistryOperation;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::client::{LayerDesc, Registry};
use crate::error::RegistryError;
use crate::reference::ImageRef;

/// `os/arch[/variant]` as an OCI platform object.
pub fn platform_json(p: &str) -> serde_json::Value {
    let mut parts = p.split('/');
    let mut v =
        serde_json::json!({"os": parts.next().unwrap_or("linux"), "architecture": parts.next().unwrap_or("amd64")});
    if let Some(var) = parts.next() {
        v["variant"] = serde_json::json!(var);
    }
    v
}

/// The accelerated manifest for `cfg` (serialised as `cfg_bytes`): its config and every blob the
/// config names as layers, so registries keep them (their garbage collection follows manifests).
pub fn accel_manifest(cfg: &AccelConfig, cfg_bytes: &[u8]) -> Vec<u8> {
    use hb_core::lazy::{ARTIFACT_TYPE, MEDIA_TYPE_DATA, MEDIA_TYPE_INDEX, MEDIA_TYPE_STARTUP, MEDIA_TYPE_TABLE};
    let mut blobs: Vec<(&str, Digest, u64)> = Vec::new();
    for l in &cfg.layers {
        blobs.push((MEDIA_TYPE_INDEX, l.index, l.index_size));
        blobs.push((MEDIA_TYPE_TABLE, l.table, l.table_size));
        blobs.push((MEDIA_TYPE_DATA, l.data, l.data_size));
    }
    if let Some((d, s)) = cfg.startup {
        blobs.push((MEDIA_TYPE_STARTUP, d, s));
    }
    let layers: Vec<serde_json::Value> = blobs
        .iter()
        .map(|(mt, d, size)| serde_json::json!({"mediaType": mt, "digest": d.to_string(), "size": size}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": Digest::of(cfg_bytes).to_string(), "size": cfg_bytes.len()},
        "layers": layers,
        "annotations": {"io.hyperbox.source.manifest": cfg.manifest.to_string()},
    }))
    .expect("serialisable")
}

/// An OCI index of `entries` (the original manifests, each with its platform) and the
/// accelerated manifest `accel` (digest, size) bound to the original manifest `original` of
/// `platform`. The accelerated entry's platform has a variant no client matches
/// ([`hb_core::lazy::FOREIGN_VARIANT`]): docker, containerd and skopeo pull the original only.
pub fn binding_index(
    mut entries: Vec<serde_json::Value>,
    accel: (&Digest, u64),
    platform: &str,
    original: &Digest,
) -> Vec<u8> {
    use hb_core::lazy::{ANNOTATION, ANNOTATION_MANIFEST, ARTIFACT_TYPE, FOREIGN_VARIANT};
    let mut p = platform_json(platform);
    p["variant"] = serde_json::json!(FOREIGN_VARIANT);
    entries.push(serde_json::json!({
        "mediaType": crate::OCI_MANIFEST, "artifactType": ARTIFACT_TYPE, "digest": accel.0.to_string(),
        "size": accel.1, "platform": p,
        "annotations": {ANNOTATION: "v1", ANNOTATION_MANIFEST: original.to_string(), "io.hyperbox.platform": platform},
    }));
    serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": crate::OCI_INDEX, "manifests": entries}))
        .expect("serialisable")
}

/// Largest index, table or config blob accepted.
pub const MAX_META_BLOB: u64 = 512 << 20;

#[derive(Deserialize)]
struct AccelManifest {
    config: AccelDesc,
}

#[derive(Deserialize)]
struct AccelDesc {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
}

impl Registry {
    fn blob_url(&self, r: &ImageRef, digest: &Digest) -> String {
        let scheme = self.schemes[self.chosen.load(std::sync::atomic::Ordering::Relaxed)];
        r.blob_url(scheme, digest)
    }

    /// Makes sure a scheme and an authorization were chosen (a lazy mount starts without a pull).
    pub async fn ensure_connected(&self, r: &ImageRef) -> Result<(), RegistryError> {
        if self.connected.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let asked = std::time::Instant::now();
        let _one = self.connecting.lock().await;
        if self.connected.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        // The attempt this request waited for failed: its answer, not another attempt (eight
        // first reads against a dead registry would each wait for their own timeout in turn).
        if let Some((at, reason, transient)) = self.connect_failure.lock().expect("failure lock").clone() {
            if at >= asked {
                let reason = format!("{reason} (the attempt to connect this request waited for)");
                return Err(if transient {
                    RegistryError::Transport { registry: self.registry.clone(), reason }
                } else {
                    RegistryError::Rejected { registry: self.registry.clone(), reason }
                });
            }
        }
        let out = self.connect(r).await;
        if let Err(e) = &out {
            *self.connect_failure.lock().expect("failure lock") =
                Some((std::time::Instant::now(), e.to_string(), e.is_transient()));
        }
        out
    }

    /// Reads `len` bytes at `start` of blob `digest` with one Range request; retries transient
    /// failures with backoff and renews the authorization once. The caller verifies the bytes
    /// (chunk hashes): a range cannot be checked against the blob's digest.
    pub async fn fetch_range(
        &self,
        r: &ImageRef,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        use futures_util::StreamExt;
        let attempts = self.opts.attempts.max(1);
        let mut failures = 0;
        let mut reauthorized = false;
        loop {
            let url = self.blob_url(r, digest);
            let authorization = self.authorization.lock().expect("authorization lock").clone();
            let sent = std::time::Instant::now();
            // A whole blob sent for a range says nothing of what a range costs.
            let mut ranged = true;
            let step: Result<Vec<u8>, RegistryError> = async {
                let resp = self.blobs.get(&self.registry, &url, authorization.as_deref(), start, Some(start + len - 1)).await?;
                let (resp, skip) = match resp {
                    crate::blob::BlobBody::Partial(resp) => (resp, 0u64),
                    crate::blob::BlobBody::Full(resp) => {
                        ranged = false;
                        tracing::warn!(blob = %digest, "registry ignored the Range header; reading the blob from its start");
                        (resp, start)
                    }
                };
                let mut out = Vec::with_capacity(len as usize);
                let mut skip = skip;
                let mut stream = resp.bytes_stream();
                while let Some(item) = stream.next().await {
                    let bytes = item.map_err(|e| RegistryError::Transport {
                        registry: self.registry.clone(),
                        reason: format!("blob {digest}: {}", crate::error::chain(&e)),
                    })?;
                    let mut b = &bytes[..];
                    let drop = skip.min(b.len() as u64) as usize;
                    b = &b[drop..];
                    skip -= drop as u64;
                    let want = (len as usize - out.len()).min(b.len());
                    out.extend_from_slice(&b[..want]);
                    if out.len() as u64 == len {
                        break;
                    }
                }
                if (out.len() as u64) < len {
                    return Err(RegistryError::Transport {
                        registry: self.registry.clone(),
                        reason: format!("blob {digest}: range {start}+{len} ended after {} bytes", out.len()),
                    });
                }
                Ok(out)
            }
            .await;
            match step {
                Ok(b) => {
                    if ranged {
                        self.link.request(len, sent.elapsed());
                    }
                    return Ok(b);
                }
                Err(RegistryError::Unauthorized { .. }) if !reauthorized => {
                    reauthorized = true;
                    tracing::info!(blob = %digest, "authorization refused; fetching a new token");
                    self.connect(r).await?;
                }
                Err(e) if e.is_transient() && failures + 1 < attempts => {
                    failures += 1;
                    let after = e.retry_after().filter(|a| *a <= crate::retry::MAX_RETRY_AFTER);
                    let wait = crate::retry::delay(failures, after);
                    tracing::warn!(blob = %digest, start, len, attempt = failures + 1, error = %e, "range read failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// How wide a gap between wanted chunks a batch of range reads bridges (see `link.rs`).
    pub fn bridge_gap(&self) -> u64 {
        self.link.gap()
    }

    /// Downloads a whole small blob into memory, verified by digest and size.
    pub async fn fetch_bytes(&self, r: &ImageRef, digest: &Digest, size: u64) -> Result<Vec<u8>, RegistryError> {
        if size > MAX_META_BLOB {
            return Err(RegistryError::Malformed {
                reference: r.canonical(),
                what: "blob",
                reason: format!("{digest} is {size} bytes (limit {MAX_META_BLOB})"),
            });
        }
        self.ensure_connected(r).await?;
        let desc = LayerDesc { digest: *digest, size, media_type: String::new(), diff_id: *digest };
        let (tx, mut rx) = mpsc::channel::<Result<Vec<u8>, String>>(16);
        let collect = async {
            let mut v = Vec::with_capacity(size as usize);
            while let Some(Ok(b)) = rx.recv().await {
                v.extend_from_slice(&b);
            }
            v
        };
        let sent = std::time::Instant::now();
        let (fetched, bytes) = tokio::join!(self.fetch_blob(r, &desc, tx), collect);
        fetched?;
        self.link.request(size, sent.elapsed());
        Ok(bytes)
    }

    /// The accelerated form's config, checked to belong to the image `manifest`.
    pub async fn fetch_accel_config(
        &self,
        r: &ImageRef,
        accel: &(Digest, u64),
        manifest: &Digest,
    ) -> Result<AccelConfig, RegistryError> {
        let malformed =
            |reason: String| RegistryError::Malformed { reference: r.canonical(), what: "accelerated image", reason };
        self.ensure_connected(r).await?;
        let (bytes, _) = self.manifest(&r.with_digest(&accel.0.to_string())).await?;
        let m: AccelManifest = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
        if m.config.media_type != MEDIA_TYPE_CONFIG {
            return Err(malformed(format!("config media type {}", m.config.media_type)));
        }
        let digest: Digest = m.config.digest.parse().map_err(|e: hb_core::DigestError| malformed(e.to_string()))?;
        let raw = self.fetch_bytes(r, &digest, m.config.size).await?;
        let cfg: AccelConfig = serde_json::from_slice(&raw).map_err(|e| malformed(format!("config: {e}")))?;
        if cfg.version != 1 {
            return Err(malformed(format!("format version {} (this build reads 1)", cfg.version)));
        }
        if cfg.manifest != *manifest {
            return Err(malformed(format!("it was made for image {}, not {manifest}", cfg.manifest)));
        }
        Ok(cfg)
    }

    /// Offers a start-up order learned for image `manifest` to an hb mirror (`hb proxy`), which
    /// checks it and serves it to its later clients (`docs/formats/lazy-image.md`). True when it
    /// was kept, false when the mirror had one; [`RegistryError::NotFound`] from a registry that
    /// is not an hb mirror (it has no such path).
    pub async fn offer_startup(&self, r: &ImageRef, manifest: &Digest, order: Vec<u8>) -> Result<bool, RegistryError> {
        self.ensure_connected(r).await?;
        let scheme = self.schemes[self.chosen.load(std::sync::atomic::Ordering::Relaxed)];
        let url = r.url(scheme, &format!("{}/{manifest}", hb_core::lazy::STARTUP_PATH));
        let authorization = self.authorization.lock().expect("authorization lock").clone();
        let status = self
            .blobs
            .put(&self.registry, &url, authorization.as_deref(), hb_core::lazy::MEDIA_TYPE_STARTUP, order)
            .await?;
        Ok(status == 201)
    }

    /// Authorizes pushes to `r`'s repository.
    pub async fn connect_push(&self, r: &ImageRef) -> Result<(), RegistryError> {
        self.connect_op(r, RegistryOperation::Push).await
    }

    pub async fn blob_exists(&self, r: &ImageRef, digest: &Digest) -> Result<bool, RegistryError> {
        self.client().blob_exists(&r.inner, &digest.to_string()).await.map_err(self.err(r))
    }

    /// Uploads a blob unless the repository has it. Returns true if it was uploaded.
    pub async fn push_blob(&self, r: &ImageRef, data: Vec<u8>) -> Result<bool, RegistryError> {
        let digest = Digest::of(&data);
        if self.blob_exists(r, &digest).await? {
            return Ok(false);
        }
        self.client().push_blob(&r.inner, data, &digest.to_string()).await.map_err(self.err(r))?;
        Ok(true)
    }

    /// Makes blob `digest` of repository `from` (same registry) available in `r`'s repository
    /// by a cross-repository mount. Returns false when the registry would not mount it.
    pub async fn mount_blob(&self, r: &ImageRef, from: &ImageRef, digest: &Digest) -> Result<bool, RegistryError> {
        if self.blob_exists(r, digest).await? {
            return Ok(true);
        }
        let _ = self.client().mount_blob(&r.inner, &from.inner, &digest.to_string()).await;
        self.blob_exists(r, digest).await
    }

    /// Uploads a manifest (or index) under `r`'s tag or digest.
    pub async fn push_manifest(&self, r: &ImageRef, media_type: &str, body: Vec<u8>) -> Result<(), RegistryError> {
        let ct = reqwest::header::HeaderValue::from_str(media_type).map_err(|_| RegistryError::Malformed {
            reference: r.canonical(),
            what: "manifest",
            reason: format!("bad media type {media_type:?}"),
        })?;
        self.client().push_manifest_raw(&r.inner, body, ct).await.map_err(self.err(r))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A registry that answers `GET /v2/` with 200 (anonymous access) and counts those probes.
    fn counting_registry() -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let probes = Arc::new(AtomicUsize::new(0));
        let counted = probes.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line.starts_with("GET /v2/ ") {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        // The rest of the head.
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                        }
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
                    }
                });
            }
        });
        (addr, probes)
    }

    /// A plain-HTTP client of the registry at `addr`, and the answers of eight first requests
    /// made with it at once.
    async fn connect_eight_at_once(addr: &str) -> ((Arc<Registry>, ImageRef), Vec<Result<(), RegistryError>>) {
        let r = ImageRef::parse(&format!("{addr}/app:v1")).unwrap();
        let opts = crate::RegistryOptions { scheme: crate::Scheme::Http, attempts: 1, ..Default::default() };
        let reg = Arc::new(Registry::new(&r, opts).unwrap());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (reg, r) = (reg.clone(), r.clone());
                tokio::spawn(async move { reg.ensure_connected(&r).await })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        ((reg, r), results)
    }

    /// Cold-start issue: a mount's first reads start at once; one of them probes the registry and
    /// authorizes, the others wait for its answer (they each tried HTTPS first, then HTTP).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_requests_connect_once() {
        let (addr, probes) = counting_registry();
        let (_, results) = connect_eight_at_once(&addr).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(probes.load(Ordering::SeqCst), 1, "eight first requests, one probe of /v2/");
    }

    /// A loopback registry tried over HTTPS first answers over plain HTTP: the client says so once
    /// connected (the daemon then tells its mount servers, which skip the HTTPS try).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_says_when_it_connected_over_plain_http() {
        let (addr, _) = counting_registry();
        let r = ImageRef::parse(&format!("{addr}/app:v1")).unwrap();
        let opts = crate::RegistryOptions { scheme: crate::Scheme::Auto, attempts: 1, ..Default::default() };
        let reg = Registry::new(&r, opts).unwrap();
        assert!(!reg.plain_http(), "not connected yet");
        reg.ensure_connected(&r).await.unwrap();
        assert!(reg.plain_http());
        let tls = crate::RegistryOptions { scheme: crate::Scheme::Https, attempts: 1, ..Default::default() };
        let reg = Registry::new(&r, tls).unwrap();
        assert!(reg.ensure_connected(&r).await.is_err() && !reg.plain_http());
    }

    /// A registry that accepts connections and closes them unanswered after a while, counting them.
    fn dead_registry() -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                counted.fetch_add(1, Ordering::SeqCst);
                // Held a while, then closed unanswered: a registry that hangs, then fails (closed
                // at once, the first attempt could fail before the last request asked).
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    drop(conn);
                });
            }
        });
        (addr, accepted)
    }

    /// When the first connection fails, the requests that waited for it take its failure instead
    /// of each trying again in turn (against a registry that hangs, each would wait its timeout).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_waiting_for_a_failed_connection_share_its_failure() {
        let (addr, accepted) = dead_registry();
        let ((reg, r), results) = connect_eight_at_once(&addr).await;
        assert!(results.iter().all(Result::is_err), "{results:?}");
        let n = accepted.load(Ordering::SeqCst);
        assert!(n <= 2, "eight waiting requests made {n} connections");
        // A later request tries again.
        assert!(reg.ensure_connected(&r).await.is_err());
        assert!(accepted.load(Ordering::SeqCst) > n, "a new request did not try again");
    }
}
