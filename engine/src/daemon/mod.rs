//! `hb daemon`: owns the store for writing and serves the API (docs/api.md) on a Unix socket.
//!
//! Image mounts are not served by the daemon itself: each is a mount server process (`hb mount`
//! on `<root>/images/<digest>`, reading the store through a read-only view) that the daemon
//! starts, shares between containers, adopts again after a restart and unmounts when no container
//! has used it for `daemon.mount_idle_seconds`. So a daemon killed with -9 takes no running
//! container's files with it.

mod handover;
mod http;
mod layers;
mod metrics;
mod mounts;
mod spares;
mod store_api;
#[cfg(test)]
mod tests;

use crate::hosts::Hosts;
use handover::*;
use hb_images::{Registries, Silent};
use http::*;
use layers::*;
use metrics::*;
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store_api::Learning;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::api::{self, Health, ImageMount, MountRequest, PullRequest, PullResponse, RemoveRequest};
use crate::output::Out;
use crate::Global;

struct Daemon {
    g: Global,
    root: PathBuf,
    store: Arc<hb_store::Store>,
    /// Runs the registry and mount work that the handlers hand to blocking threads.
    work: tokio::runtime::Runtime,
    started: Instant,
    /// Image mounts by manifest digest.
    mounts: Mutex<HashMap<String, ImageMount>>,
    /// One image mount (or pull) prepared at a time: concurrent asks for one image make one mount
    /// (`Daemon::prepare`).
    preparing: Mutex<()>,
    /// The preparation under way, for fetches made for peers (`Daemon::fetch_through`).
    learning: Mutex<Option<Learning>>,
    /// Fetches for peers waiting for it (`Daemon::await_learning`).
    learn_waiters: std::sync::atomic::AtomicUsize,
    /// When each image mount was last seen in use.
    last_used: Mutex<HashMap<String, Instant>>,
    idle: Duration,
    metrics: Metrics,
    /// Metadata was written since the last flush (see `settle`).
    dirty: std::sync::atomic::AtomicBool,
    /// Images pulled for containerd's remote snapshots (released when containerd drops them;
    /// images pulled by people are left alone).
    for_containerd: Mutex<std::collections::HashSet<String>>,
    /// Handed-over containers' processes (`hb run --rm`).
    exits: ExitWatcher,
    /// Spare container folders (overlay mounted, no state yet) by image mount key, handed to the
    /// next `hb run` of that image (`MountRequest::spare`).
    spares: Mutex<HashMap<String, Vec<PathBuf>>>,
    /// Keys whose spare is being prepared.
    refilling: Mutex<std::collections::HashSet<String>>,
    /// Spares handed out, and when: released if still without a state a minute later.
    handed: Mutex<Vec<(PathBuf, Instant)>>,
    /// Spares to prepare, to the `hb-spares` thread.
    refill: std::sync::mpsc::Sender<Refill>,
    /// Spares advertised to `hb run` (`api::claim_ready`): by folder, the file that names it and
    /// the request it answers.
    advertised: Mutex<HashMap<PathBuf, Advert>>,
    /// Handed-over containers seen with their process gone, and since when (`reap_handed_over`).
    dead_since: Mutex<HashMap<PathBuf, Instant>>,
    /// Set when the daemon stops (`stop_spares`); held while a spare is prepared, so stopping
    /// waits for one under way rather than leave it mounted.
    stopping: Mutex<bool>,
    /// The LAN peers node, when `[p2p]` is on.
    peers: std::sync::OnceLock<hb_p2p::Node>,
    /// Fetches made for peers as the owner of chunks nobody holds.
    through: hb_images::sources::LazyFetch,
    /// The next image mount's server, started ahead of need (`Daemon::start_mount_server`).
    standby: Mutex<Option<hb_images::mount::Standby>>,
    /// This daemon, for work it hands to threads of its own.
    this: std::sync::Weak<Daemon>,
    /// Registries known to speak plain HTTP (`Daemon::known_plain`).
    plain: Mutex<std::collections::HashSet<String>>,
}

/// `daemon.gc_above`: a gc when the store passes the size, once per change (a store that stays
/// above it after a gc is not collected again until it grows or its images change).
#[derive(Default)]
struct AutoGc {
    /// The store's size after the last automatic gc, and its image names (`name=digest`) then.
    last: Option<(u64, Vec<String>)>,
}

impl AutoGc {
    fn check(&mut self, d: &Daemon, limit: u64) {
        let (Ok(size), Ok(names)) = (d.store.disk_bytes(), d.store.image_names()) else { return };
        let names: Vec<String> = names.iter().map(|n| format!("{}={}", n.name, n.digest)).collect();
        if size <= limit
            || self.last.as_ref().is_some_and(|(after, seen)| *seen == names && size <= after + after / 100)
        {
            return;
        }
        // As `POST /v1/gc`: no spare stays advertised under a name while it runs.
        d.withdraw_all();
        let r = d.gc();
        d.withdraw_all();
        match r {
            Ok(r) => {
                let after = d.store.disk_bytes().unwrap_or(size);
                tracing::info!(
                    before = size,
                    after,
                    limit,
                    "automatic gc (the store passed daemon.gc_above): {}",
                    crate::store_cmds::gc_summary(&r)
                );
                if after > limit {
                    tracing::warn!(
                        after, limit,
                        "the store is still above daemon.gc_above: named images use the rest (`hb image prune -a` removes those no container uses)"
                    );
                }
                self.last = Some((after, names));
            }
            Err(e) => tracing::warn!(error = %e, "automatic gc failed"),
        }
    }
}

/// A spare to prepare: over image mount `lower` (key `key`), for `hb run IMAGE` (`image`,
/// `plain_http` as asked).
#[derive(Clone)]
struct Refill {
    key: String,
    lower: PathBuf,
    image: String,
    plain_http: bool,
}

/// A spare's advertisement: its ready file, and what the spare was made for (the next one is
/// made for the same when it is claimed).
struct Advert {
    file: PathBuf,
    made_for: Refill,
}

fn images_dir(root: &Path) -> PathBuf {
    root.join("images")
}

/// Containers (overlayfs mounts) whose lower layer is `dir`, from the mount table.
fn overlay_users(dir: &Path) -> usize {
    let needle = format!("lowerdir={}", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().filter(|l| l.contains(" - overlay ") && l.contains(&needle)).count())
        .unwrap_or(0)
}

fn same_path(a: &Path, b: &Path) -> bool {
    a == b || std::fs::canonicalize(a).ok().zip(std::fs::canonicalize(b).ok()).is_some_and(|(a, b)| a == b)
}

/// Why a cleanup request was refused.
enum CleanupRefused {
    NotContainer(anyhow::Error),
    Missing(anyhow::Error),
}

/// Cleanups under way ([`housekeeping`]), which a stopping daemon waits for.
static HOUSEKEEPING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one cleanup under way while it lives.
struct Underway;

impl Underway {
    fn new() -> Underway {
        HOUSEKEEPING.fetch_add(1, Ordering::SeqCst);
        Underway
    }
}

impl Drop for Underway {
    fn drop(&mut self) {
        HOUSEKEEPING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits, at most `limit`, for the cleanups under way: a daemon stopped as usual leaves no
/// container folder of a handed-over `hb run --rm` behind.
fn finish_housekeeping(limit: Duration) {
    let started = Instant::now();
    while HOUSEKEEPING.load(Ordering::SeqCst) > 0 && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs cleanup work `f` on a thread of its own at the lowest priority (it should not take a CPU
/// from a starting container); here and now when no thread can be made (the process at its
/// thread or memory limit): a cleanup is never dropped.
fn housekeeping(f: impl FnOnce() + Send + 'static) {
    let underway = Underway::new();
    let f = move || {
        f();
        drop(underway);
    };
    let f = std::sync::Arc::new(std::sync::Mutex::new(Some(f)));
    let g = f.clone();
    let spawned = std::thread::Builder::new().name("hb-cleanup".into()).spawn(move || {
        crate::rootfs::background_priority();
        if let Some(f) = g.lock().expect("cleanup lock").take() {
            f()
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for a cleanup; doing it now");
        if let Some(f) = f.lock().expect("cleanup lock").take() {
            f()
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    crate::container::process_start(pid).is_some()
}

impl Daemon {
    /// A daemon for store `store` at `root`, and the receiving end of its spare refills (for
    /// the `hb-spares` thread).
    fn new(
        g: &Global,
        root: PathBuf,
        store: Arc<hb_store::Store>,
        idle: Duration,
    ) -> anyhow::Result<(Arc<Daemon>, std::sync::mpsc::Receiver<Refill>)> {
        let (refill, refills) = std::sync::mpsc::channel::<Refill>();
        let work = crate::runtime()?;
        let exits = ExitWatcher::start().context("starting the container exit watcher")?;
        let d = Arc::new_cyclic(|this| Daemon {
            g: g.clone(),
            root,
            store,
            work,
            started: Instant::now(),
            mounts: Mutex::new(HashMap::new()),
            preparing: Mutex::new(()),
            learning: Mutex::new(None),
            learn_waiters: Default::default(),
            last_used: Mutex::new(HashMap::new()),
            idle,
            metrics: Metrics::default(),
            dirty: std::sync::atomic::AtomicBool::new(false),
            for_containerd: Mutex::new(std::collections::HashSet::new()),
            exits,
            spares: Mutex::new(HashMap::new()),
            refilling: Mutex::new(std::collections::HashSet::new()),
            handed: Mutex::new(Vec::new()),
            refill,
            advertised: Mutex::new(HashMap::new()),
            dead_since: Mutex::new(HashMap::new()),
            stopping: Mutex::new(false),
            peers: std::sync::OnceLock::new(),
            through: Default::default(),
            standby: Mutex::new(None),
            this: this.clone(),
            plain: Mutex::new(std::collections::HashSet::new()),
        });
        Ok((d, refills))
    }

    /// Where registries and peers are reached, for the daemon's own work.
    fn hosts(&self) -> Hosts {
        Hosts::with_node(&self.g, self.peers.get())
    }

    /// `hb gc` in the daemon (`POST /v1/gc`, and `daemon.gc_above`): what it wrote is flushed by
    /// the next [`Daemon::settle`].
    fn gc(&self) -> Result<hb_store::GcReport, hb_store::StoreError> {
        let r = self.store.gc(&hb_store::NoProgress);
        self.dirty.store(true, Ordering::SeqCst);
        r
    }

    /// Flushes metadata written since the last call: frees the memtables a burst of writes (a
    /// pull) filled, and spares mount servers replaying it into their read-only views.
    fn settle(&self) {
        if self.dirty.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.store.flush_metadata() {
                tracing::warn!(error = %e, "flushing the store's metadata failed");
                self.metrics.error("store_flush");
            }
        }
    }

    /// Finds the image mounts a previous daemon left running (their servers outlive it).
    fn adopt(&self) -> anyhow::Result<()> {
        let dir = images_dir(&self.root);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(raw) = std::fs::read(path.with_extension("json")) else {
                if path.is_dir() {
                    if hb_fuse::clean_stale(&path).unwrap_or(false) {
                        tracing::warn!(dir = %path.display(), "detached a stale image mount");
                    }
                    let _ = std::fs::remove_dir(&path);
                }
                continue;
            };
            let Ok(m) = serde_json::from_slice::<ImageMount>(&raw) else { continue };
            if pid_alive(m.pid) && hb_fuse::is_mountpoint(&m.path) {
                tracing::info!(image = %m.image, pid = m.pid, "adopted a running image mount");
                self.mounts.lock().expect("mounts lock").insert(m.key(), m);
            } else {
                let _ = hb_fuse::clean_stale(&m.path);
                let _ = std::fs::remove_file(path.with_extension("json"));
            }
        }
        Ok(())
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(
    g: &Global,
    socket: &Path,
    snapshotter: &Path,
    idle: Duration,
    metrics: Option<std::net::SocketAddr>,
    out: &Out,
) -> anyhow::Result<()> {
    // Settings first: a bad one stops the daemon before it says it is ready.
    let gc_above = hb_cli::file_config(g)?
        .daemon
        .gc_above
        .as_deref()
        .map(crate::parse_rate)
        .transpose()
        .context("daemon.gc_above")?;
    // Caught from here on: a signal while starting stops the daemon as soon as it serves, cleanly.
    let stopped = crate::shutdown::Shutdown::install()?.signalled();
    crate::memory::limit_malloc_arenas();
    // The first pull should not wait for the system's certificates to be read.
    std::thread::spawn(hb_registry::preload_trust_roots);
    let root = crate::store_root(g)?;
    if api::Client::find(socket, &root).is_some() {
        bail!("an hb daemon already serves {} on {}", root.display(), socket.display());
    }
    let store = match crate::open_store(g, true) {
        Err(e) if matches!(e.downcast_ref::<hb_store::StoreError>(), Some(hb_store::StoreError::Locked(_))) => {
            bail!("store {} is held by another hb process (a mount or a container started without the daemon): stop it first", root.display())
        }
        other => Arc::new(other?),
    };
    let (d, refills) = Daemon::new(g, root.clone(), store, idle)?;
    if let Some(cfg) = crate::peers::settings(g, &root)? {
        let listen = cfg.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
        let weak = Arc::downgrade(&d);
        let through: crate::peers::Through =
            Box::new(move |ids| weak.upgrade().map(|d| d.fetch_through(ids)).unwrap_or_default());
        let local = Arc::new(crate::peers::StoreChunks { store: d.store.clone(), through: Some(through) });
        let node = hb_p2p::Node::start(cfg, local, d.work.handle().clone()).context("starting the LAN peers node")?;
        out.note(format!("LAN peers: node {} on {listen}", node.peer_id()));
        let _ = d.peers.set(node);
    }
    let sd = d.clone();
    std::thread::Builder::new().name("hb-spares".into()).spawn(move || {
        crate::rootfs::background_priority();
        for r in refills {
            sd.prepare_spare(r);
        }
    })?;
    d.adopt()?;
    d.start_standby();
    d.adopt_handed_over();
    d.sweep_spares();
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    let server = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = server
        .block_on(async { tokio::net::UnixListener::bind(socket) })
        .with_context(|| format!("listening on {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
    // Prometheus scrapes over TCP: `/metrics` and `/healthz` only (the API stays on the socket).
    if let Some(addr) = metrics {
        let tcp = server
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("listening for metrics on {addr}"))?;
        out.note(format!("metrics on http://{addr}/metrics"));
        let md = d.clone();
        server.spawn(async move {
            loop {
                let stream = match tcp.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors, say: no busy loop while it lasts.
                        tracing::warn!(error = %e, "accepting a metrics connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let md = md.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| http::metrics_only(md.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    // Finished containers' cleanups, one datagram each: `hb run` sends and goes, no round trip.
    let cleanups_path = api::cleanup_socket(socket);
    let _ = std::fs::remove_file(&cleanups_path);
    let cleanups = server
        .block_on(async { tokio::net::UnixDatagram::bind(&cleanups_path) })
        .with_context(|| format!("listening on {}", cleanups_path.display()))?;
    std::fs::set_permissions(&cleanups_path, std::fs::Permissions::from_mode(0o660))?;
    let cd = d.clone();
    server.spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let got = cleanups.async_io(tokio::io::Interest::READABLE, || recv_with_fds(&cleanups, &mut buf)).await;
            let (n, mut fds) = match got {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the cleanup socket failed");
                    continue;
                }
            };
            let refused = match serde_json::from_slice::<api::CleanupRequest>(&buf[..n]) {
                Ok(c) if c.when_exits => match (fds.pop(), fds.is_empty()) {
                    (Some(pidfd), true) => cd.watch_handed_over(&c.dir, pidfd).err(),
                    _ => Some(CleanupRefused::NotContainer(anyhow::anyhow!(
                        "the hand-over of {} must carry one pidfd",
                        c.dir.display()
                    ))),
                },
                Ok(c) => cd.start_cleanup(&c).err(),
                Err(e) => Some(CleanupRefused::NotContainer(e.into())),
            }
            .map(|r| match r {
                CleanupRefused::NotContainer(e) | CleanupRefused::Missing(e) => e,
            });
            if let Some(e) = refused {
                cd.metrics.error("cleanup");
                tracing::warn!(error = %crate::error_chain(&e), "a cleanup request was refused");
            }
        }
    });
    out.note(format!(
        "hb daemon {} serving store {} on {} (pid {}; {} image mounts adopted)",
        env!("CARGO_PKG_VERSION"),
        root.display(),
        socket.display(),
        std::process::id(),
        d.mounts.lock().expect("mounts lock").len()
    ));
    // containerd's remote snapshotter (proxy_plugins.<name>, type "snapshot") on its own socket.
    let snapshots = Arc::new(
        hb_snapshotter::Snapshots::open(&root.join("snapshots"))
            .map_err(|e| anyhow::anyhow!("snapshots: {e}"))?
            .with_remote(Arc::new(DaemonLayers(d.clone()))),
    );
    if let Some(parent) = snapshotter.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let _ = std::fs::remove_file(snapshotter);
    let snap_listener = server
        .block_on(async { tokio::net::UnixListener::bind(snapshotter) })
        .with_context(|| format!("listening on {}", snapshotter.display()))?;
    std::fs::set_permissions(snapshotter, std::fs::Permissions::from_mode(0o660))?;
    let (stop_snap, snap_stopped) = tokio::sync::oneshot::channel::<()>();
    let snap_server = server.spawn(hb_snapshotter::service::serve(snapshots, snap_listener, async {
        let _ = snap_stopped.await;
    }));
    out.note(format!("containerd snapshotter on {} (proxy_plugins, type \"snapshot\")", snapshotter.display()));
    tracing::info!(socket = %socket.display(), root = %root.display(), "daemon ready");
    crate::notify::ready(&format!("serving store {} on {}", root.display(), socket.display()));
    let reaper = d.clone();
    let mut auto_gc = AutoGc::default();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5).min(reaper.idle.max(Duration::from_millis(200))));
        reaper.reap_spares();
        reaper.reap_handed_over();
        reaper.reap_idle();
        if let Some(limit) = gc_above {
            auto_gc.check(&reaper, limit);
        }
        reaper.settle();
        // Also after the work's threads ended (their caches are freed then, not before).
        crate::memory::release_free_memory();
    });
    server.block_on(async {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(s) => s,
                        Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                    };
                    let d = d.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(d.clone(), req));
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await
                        {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                _ = &mut stopped => break,
            }
        }
        anyhow::Ok(())
    })?;
    crate::notify::stopping();
    let _ = stop_snap.send(());
    if let Err(e) = server.block_on(snap_server) {
        tracing::warn!(error = %e, "the snapshotter's server ended badly");
    }
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(&cleanups_path);
    let _ = std::fs::remove_file(snapshotter);
    // Handed-over containers whose process ended: finished now, not left to the next daemon.
    d.reap_handed_over();
    finish_housekeeping(Duration::from_secs(10));
    d.stop_spares();
    out.note(format!(
        "hb daemon stopped; {} image mounts keep serving (the next daemon adopts them)",
        d.mounts.lock().expect("mounts lock").len()
    ));
    Ok(())
}
