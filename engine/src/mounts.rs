//! The engine's side of image mounts: the daemon as a chunk tier (its API client), `hb run`'s
//! images without a daemon (this process's store and mount), and `hb mount --background`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hb_core::{ChunkId, ChunkSource};
use hb_fuse::Prefetch;
use hb_images::mount::{mount_image, pull_for_mount, start_server, Mount, MountArgs, OrderKeeper};
use hb_store::Store;

use crate::hosts::Hosts;
use crate::output::Out;
use crate::progress::Report;
use crate::Global;

/// The daemon that owns the store, as a tier: it has what other mounts fetched since this
/// process opened its read-only view, and keeps what the tiers below it return.
pub struct DaemonSource {
    client: Arc<crate::api::Client>,
}

impl DaemonSource {
    /// The daemon as a chunk tier, for a process whose `store` is a read-only view of the store
    /// the daemon owns (none when this process owns the store or no daemon answers).
    pub fn for_view(g: &Global, store: &Store) -> Option<Arc<DaemonSource>> {
        if store.is_writable() {
            return None;
        }
        let client = Arc::new(crate::daemon_client(g)?);
        Some(Arc::new(DaemonSource { client }))
    }

    /// [`DaemonSource::for_view`] as the two roles a mount gives it: chunk tier, order keeper.
    pub fn roles(g: &Global, store: &Store) -> DaemonRoles {
        match Self::for_view(g, store) {
            Some(d) => (Some(d.clone() as Arc<dyn ChunkSource>), Some(d as Arc<dyn OrderKeeper>)),
            None => (None, None),
        }
    }

    fn unavailable(e: anyhow::Error) -> hb_core::SourceError {
        hb_core::SourceError::Unavailable { source_name: "hb daemon".into(), reason: crate::error_chain(&e) }
    }
}

/// The daemon as a mount's chunk tier and as the keeper of its learned order (none without one).
pub type DaemonRoles = (Option<Arc<dyn ChunkSource>>, Option<Arc<dyn OrderKeeper>>);

impl OrderKeeper for DaemonSource {
    fn keep_order(&self, manifest: &hb_core::Digest, order: &hb_core::StartupOrder) -> Result<(), String> {
        let path = format!("/v1/startup?manifest={manifest}");
        self.client.call_raw("POST", &path, &order.encode()).map(|_| ()).map_err(|e| crate::error_chain(&e))
    }
}

impl ChunkSource for DaemonSource {
    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, hb_core::SourceError> {
        Ok(self.fetch_many(std::slice::from_ref(id))?.into_iter().find(|(i, _)| i == id).map(|(_, b)| b))
    }

    fn fetch_many(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, hb_core::SourceError> {
        let body = ids.iter().flat_map(|i| i.as_bytes().iter().copied()).collect::<Vec<u8>>();
        // A daemon that is restarting fails here: the chain asks the tiers below it.
        let b = self.client.call_raw("POST", "/v1/chunks/get", &body).map_err(Self::unavailable)?;
        crate::api::decode_chunks(&b).map_err(Self::unavailable)
    }

    fn keeps(&self) -> bool {
        true
    }

    /// Chunks that came as zstd frames go to the daemon as those frames (smaller, and kept as
    /// they are: the daemon does not compress them again); the others as bytes.
    fn keep(
        &self,
        chunks: &[(ChunkId, Vec<u8>)],
        frames: &HashMap<ChunkId, Vec<u8>>,
    ) -> Result<usize, hb_core::SourceError> {
        let (framed, plain): (Vec<_>, Vec<_>) = chunks.iter().partition(|(id, _)| frames.contains_key(id));
        let framed: Vec<(ChunkId, u32, &[u8])> =
            framed.into_iter().map(|(id, b)| (*id, b.len() as u32, frames[id].as_slice())).collect();
        let kept = self.fill_in_bodies(
            "/v1/chunks/fill-frames",
            &framed,
            |(_, _, f)| f.len() + 40,
            |part| crate::api::encode_frames(part.iter().map(|(i, n, f)| (i, *n, *f))),
        )?;
        let plain = self.fill_in_bodies(
            "/v1/chunks/fill",
            &plain,
            |(_, b)| b.len() + 36,
            |part| crate::api::encode_chunks(part.iter().map(|(i, b)| (i, b.as_slice()))),
        )?;
        Ok(kept + plain)
    }
}

impl DaemonSource {
    /// Posts `items` to `path` in bodies under the daemon's limit; the chunks it filled.
    fn fill_in_bodies<T>(
        &self,
        path: &str,
        items: &[T],
        size: impl Fn(&T) -> usize,
        encode: impl Fn(&[T]) -> Vec<u8>,
    ) -> Result<usize, hb_core::SourceError> {
        let mut kept = 0;
        let mut start = 0;
        while start < items.len() {
            let (mut end, mut bytes) = (start, 0);
            while end < items.len() && (end == start || bytes + size(&items[end]) <= crate::api::MAX_CHUNK_BODY) {
                bytes += size(&items[end]);
                end += 1;
            }
            let r: crate::api::FillResponse = self
                .client
                .call_raw("POST", path, &encode(&items[start..end]))
                .and_then(|b| Ok(serde_json::from_slice(&b)?))
                .map_err(Self::unavailable)?;
            kept += r.filled;
            start = end;
        }
        Ok(kept)
    }
}

/// `hb run`'s images without a daemon: this process's store (opened on first use, kept for the
/// container's mount) and its own FUSE mount of the image.
#[derive(Default)]
pub struct StoreImages {
    store: std::sync::Mutex<Option<Arc<Store>>>,
    /// What [`LocalImages::ensure`]'s pull handed on to the mount of the same image that follows.
    pulled: std::sync::Mutex<Option<Handover>>,
}

/// A pull's runtime (its connections live on it) and what it hands on to the image's mount.
struct Handover {
    image: String,
    rt: tokio::runtime::Runtime,
    pulled: hb_images::mount::Pulled,
}

impl StoreImages {
    fn store(&self, g: &Global, out: &Out) -> anyhow::Result<Arc<Store>> {
        let mut s = self.store.lock().expect("store lock");
        if let Some(store) = &*s {
            return Ok(store.clone());
        }
        let store = Arc::new(crate::open_store_for(g, true, out)?);
        *s = Some(store.clone());
        Ok(store)
    }
}

impl hb_cli::run::LocalImages for StoreImages {
    fn ensure(
        &self,
        g: &Global,
        image: &str,
        plain_http: bool,
        pull: hb_cli::api::PullPolicy,
        platform: Option<&str>,
        out: &Out,
    ) -> anyhow::Result<()> {
        // A cold start over HTTPS needs the system's trust roots (tens of ms): they load beside
        // the store's opening. At the thread's own priority: the start may wait for it (a nice 19
        // thread holding that wait could be starved on a busy host). Plain HTTP never reads them.
        if pull != hb_cli::api::PullPolicy::Never && !plain_http {
            std::thread::spawn(hb_registry::preload_trust_roots);
        }
        let store = self.store(g, out)?;
        let platform = platform.map(|p| p.parse::<hb_registry::Platform>().map_err(anyhow::Error::msg)).transpose()?;
        if pull.pull_now(image, !hb_images::mount::needs_pull(&store, image, platform.as_ref())?)? {
            let report = Report::new(out);
            let rt = crate::runtime()?;
            let pulled = pull_for_mount(&Hosts::of(g), &rt, &store, image, plain_http, platform.as_ref(), &report)?;
            *self.pulled.lock().expect("pulled lock") = Some(Handover { image: image.to_string(), rt, pulled });
        }
        Ok(())
    }

    fn release(&self) {
        self.pulled.lock().expect("pulled lock").take();
        self.store.lock().expect("store lock").take();
    }

    fn mount(
        &self,
        g: &Global,
        image: &str,
        plain_http: bool,
        run: &hb_runtime::RunOptions,
        dir: &Path,
        out: &Out,
    ) -> anyhow::Result<(String, Box<dyn hb_cli::run::LocalMount>)> {
        let store = self.store(g, out)?;
        // The pull that just ran for this image: its runtime and client go on serving the mount's
        // reads (no new connection and authorization), its indexes are not read back.
        let handover = self.pulled.lock().expect("pulled lock").take().filter(|h| h.image == image);
        let (rt, pulled) = match handover {
            Some(h) => (h.rt, Some(h.pulled)),
            None => (crate::runtime()?, None),
        };
        let args = MountArgs {
            platform: None,
            image: image.into(),
            dir: dir.to_path_buf(),
            prefetch: Prefetch::Startup,
            bandwidth: None,
            passthrough: true,
            threads: 8,
            plain_http,
            layers: None,
            learn: true,
            command: Some(run.clone()),
        };
        let (daemon, keeper) = DaemonSource::roles(g, &store);
        let mount =
            mount_image(&Hosts::of(g), &rt, store.clone(), &args, daemon, keeper, None, pulled, &Report::new(out))?;
        let (_, _, rec) = hb_images::require_image(&store, image)?;
        Ok((rec.config, Box::new(OwnMount { mount, _rt: rt, dir: dir.to_path_buf() })))
    }
}

/// A container's image mount served by its own monitor (no daemon).
struct OwnMount {
    mount: Mount,
    /// Drives the mount's remote fetches; dropped after it.
    _rt: tokio::runtime::Runtime,
    dir: PathBuf,
}

impl hb_cli::run::LocalMount for OwnMount {
    fn unmount(self: Box<Self>) {
        let OwnMount { mount, _rt: rt, dir } = *self;
        let _ = hb_fuse::unmount(&dir);
        let Mount { mounted, learner, .. } = mount;
        let s = mounted.fetcher().stats.snapshot();
        tracing::debug!(
            target: hb_images::mount::PHASE,
            remote_requests = s.remote_requests,
            remote_bytes = s.remote_bytes,
            prefetched_chunks = s.prefetched_chunks,
            network_wait_ms = s.fetch_latency_sum_ms,
            "reads"
        );
        if let Err(e) = mounted.wait() {
            tracing::warn!(error = %e, "the image mount ended with an error");
        }
        // The learner keeps (and offers a mirror) what it learned on the runtime: before it goes.
        drop(learner);
        drop(rt);
    }
}

/// Starts `hb mount` again without `--background` as a detached child and returns once the
/// mount is up (or the child failed, with its log).
pub fn background(root: &Path, dir: &Path, out: &Out) -> anyhow::Result<()> {
    let args: Vec<_> = std::env::args_os().skip(1).filter(|a| a != "-d" && a != "--background").collect();
    if hb_fuse::clean_stale(dir)? {
        out.note(format!("detached a stale mount at {} (its process had died)", dir.display()));
    }
    let mut cmd = std::process::Command::new(crate::self_exe());
    cmd.args(args);
    let (child, log) = start_server(&mut cmd, root, dir)?;
    out.note(format!("mounted at {} (pid {}, log {})", dir.display(), child.id(), log.display()));
    Ok(())
}
