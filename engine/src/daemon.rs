//! `hb daemon`: owns the store for writing and serves the API (docs/api.md) on a Unix socket.
//!
//! Image mounts are not served by the daemon itself: each is a mount server process (`hb mount`
//! on `<root>/images/<digest>`, reading the store through a read-only view) that the daemon
//! starts, shares between containers, adopts again after a restart and unmounts when no container
//! has used it for `daemon.mount_idle_seconds`. So a daemon killed with -9 takes no running
//! container's files with it.

use crate::hosts::Hosts;
use hb_images::{Registries, Silent};
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::api::{self, Health, ImageMount, MountRequest, PullRequest, PullResponse, RemoveRequest};
use crate::output::Out;
use crate::Global;

/// Upper bounds (seconds) of the API latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

#[derive(Default)]
struct Metrics {
    requests: Mutex<HashMap<(String, u16), u64>>,
    /// Count per bucket of [`BUCKETS`] (+Inf last), and the sum in microseconds.
    latency: Mutex<([u64; BUCKETS.len() + 1], u64)>,
    errors: Mutex<HashMap<&'static str, u64>>,
    pulls: AtomicU64,
    pulled_bytes: AtomicU64,
}

impl Metrics {
    fn error(&self, kind: &'static str) {
        *self.errors.lock().expect("metrics lock").entry(kind).or_default() += 1;
    }
}

struct Daemon {
    g: Global,
    root: PathBuf,
    store: Arc<hb_store::Store>,
    /// Runs the registry and mount work that the handlers hand to blocking threads.
    work: tokio::runtime::Runtime,
    started: Instant,
    /// Image mounts by manifest digest.
    mounts: Mutex<HashMap<String, ImageMount>>,
    /// One image mount (or pull) prepared at a time: concurrent asks for one image make one mount.
    preparing: Mutex<()>,
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

/// The processes whose exit finishes a handed-over container (`hb run --rm` become the
/// runtime): one thread polls their pidfds (readable once the process exited) and finishes each
/// container on a short thread of its own.
struct ExitWatcher {
    new: std::sync::mpsc::Sender<(std::os::fd::OwnedFd, PathBuf)>,
    /// A byte here wakes the thread for new processes.
    wake: std::os::unix::net::UnixStream,
}

impl ExitWatcher {
    fn start() -> std::io::Result<ExitWatcher> {
        use rustix::event::{poll, PollFd, PollFlags};
        let (new, added) = std::sync::mpsc::channel::<(std::os::fd::OwnedFd, PathBuf)>();
        let (woken, wake) = std::os::unix::net::UnixStream::pair()?;
        woken.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        std::thread::Builder::new().name("hb-exits".into()).spawn(move || {
            let mut watched: Vec<(std::os::fd::OwnedFd, PathBuf)> = Vec::new();
            loop {
                let mut fds: Vec<PollFd> = watched.iter().map(|(fd, _)| PollFd::new(fd, PollFlags::IN)).collect();
                fds.push(PollFd::new(&woken, PollFlags::IN));
                if poll(&mut fds, None).is_err() {
                    continue; // EINTR
                }
                let ended: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
                drop(fds);
                let mut sink = [0u8; 64];
                while matches!(std::io::Read::read(&mut &woken, &mut sink), Ok(n) if n > 0) {}
                let mut ended = ended.into_iter();
                watched.retain(|(_, dir)| {
                    let done = ended.next().unwrap_or(false);
                    if done {
                        let dir = dir.clone();
                        housekeeping(move || crate::run::finish_handed_over(&dir));
                    }
                    !done
                });
                watched.extend(added.try_iter());
            }
        })?;
        Ok(ExitWatcher { new, wake })
    }

    fn watch(&self, pidfd: std::os::fd::OwnedFd, dir: PathBuf) {
        let _ = self.new.send((pidfd, dir));
        let _ = std::io::Write::write(&mut &self.wake, &[1]);
    }
}

/// One datagram from the cleanup socket, and the descriptors it carried.
fn recv_with_fds(
    socket: &tokio::net::UnixDatagram,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got =
        rustix::net::recvmsg(socket, &mut [std::io::IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let fds = control
        .drain()
        .filter_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds.collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    Ok((got.bytes, fds))
}

/// Runs cleanup work `f` on a thread of its own at the lowest priority (it should not take a CPU
/// from a starting container); here and now when no thread can be made (the process at its
/// thread or memory limit): a cleanup is never dropped.
fn housekeeping(f: impl FnOnce() + Send + 'static) {
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
        let d = Arc::new(Daemon {
            g: g.clone(),
            root,
            store,
            work: crate::runtime()?,
            started: Instant::now(),
            mounts: Mutex::new(HashMap::new()),
            preparing: Mutex::new(()),
            last_used: Mutex::new(HashMap::new()),
            idle,
            metrics: Metrics::default(),
            dirty: std::sync::atomic::AtomicBool::new(false),
            for_containerd: Mutex::new(std::collections::HashSet::new()),
            exits: ExitWatcher::start().context("starting the container exit watcher")?,
            spares: Mutex::new(HashMap::new()),
            refilling: Mutex::new(std::collections::HashSet::new()),
            handed: Mutex::new(Vec::new()),
            refill,
            advertised: Mutex::new(HashMap::new()),
            dead_since: Mutex::new(HashMap::new()),
            stopping: Mutex::new(false),
        });
        Ok((d, refills))
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

    /// The image's mount, started (and the image pulled) if needed.
    /// The live mount `req` asks for, if there is one (no pull, no mount: cheap enough to answer
    /// on the API's own thread, which is what `hb run` asks for most).
    fn existing_mount(&self, req: &MountRequest) -> anyhow::Result<Option<ImageMount>> {
        let Some((_, digest)) = crate::find_image(&self.store, &req.image)? else { return Ok(None) };
        let key = match req.layers {
            Some(n) => format!("{digest}/{n}"),
            None => digest.to_string(),
        };
        // (A request for all N layers of an N-layer image misses here; the slow path keys it as
        // the whole image.)
        Ok(self.live_mount(key))
    }

    /// The mount recorded under `key` if its server is alive and it is still mounted; marked as
    /// used now.
    fn live_mount(&self, key: String) -> Option<ImageMount> {
        let m = self.mounts.lock().expect("mounts lock").get(&key).cloned()?;
        if !(pid_alive(m.pid) && hb_fuse::is_mountpoint(&m.path)) {
            return None;
        }
        self.last_used.lock().expect("lock").insert(key, Instant::now());
        Some(m)
    }

    /// Unmounts a finished container's overlay and removes its folder (when asked) in the
    /// background: only folders of this store's containers, by their canonical path.
    fn start_cleanup(&self, c: &api::CleanupRequest) -> Result<(), CleanupRefused> {
        let dir = self.container_folder(&c.dir)?;
        // An advertised spare's `hb run` that failed before its hand-over: claimed all the same.
        self.spare_claimed(&dir);
        let remove = c.remove;
        housekeeping(move || crate::run::cleanup(&dir, remove));
        Ok(())
    }

    /// Containers using an image mount: overlays over it, its spares not counted.
    fn users(&self, m: &ImageMount) -> usize {
        let spares = self.spares.lock().expect("spares lock").get(&m.key()).map_or(0, Vec::len);
        overlay_users(&m.path).saturating_sub(spares)
    }

    /// A spare container folder for the image of `m`, if one is ready; another is prepared for
    /// the next container in the background (at the lowest priority: it waits for idle CPU).
    fn take_spare(&self, m: &ImageMount, image: &str, plain_http: bool) -> Option<PathBuf> {
        let key = m.key();
        let spare = loop {
            let Some(s) = self.spares.lock().expect("spares lock").get_mut(&key).and_then(Vec::pop) else { break None };
            // Handed out either way: to this caller, or to the `hb run` that claimed it first.
            self.handed.lock().expect("handed lock").push((s.clone(), Instant::now()));
            if self.withdraw(&s) {
                break Some(s);
            }
        };
        self.refill(Refill { key, lower: m.path.clone(), image: image.to_string(), plain_http });
        spare
    }

    /// Has a spare prepared for `r`'s image mount unless one is being prepared already.
    fn refill(&self, r: Refill) {
        if self.refilling.lock().expect("refilling lock").insert(r.key.clone()) {
            let _ = self.refill.send(r);
        }
    }

    /// Makes spare `dir` of image mount `r.key` the daemon's: on the spares (for `take_spare`),
    /// and advertised to `hb run r.image` (`api::ready_file`) unless a spare is advertised for
    /// that already or the reference names another image now. Listed even when its image mount
    /// went meanwhile: `reap_spares` releases it then.
    fn publish(&self, dir: &Path, r: &Refill) {
        let mount = self.mounts.lock().expect("mounts lock").get(&r.key).cloned();
        let live = mount.is_some();
        let file = api::ready_file(&self.root, &r.image, r.plain_http);
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let written = mount
            .ok_or_else(|| std::io::Error::other("its image mount is gone"))
            .and_then(|mut m| {
                m.spare = Some(dir.to_path_buf());
                serde_json::to_vec(&api::Ready { daemon: std::process::id(), mount: m }).map_err(std::io::Error::other)
            })
            .and_then(|bytes| std::fs::write(&tmp, bytes));
        // Held until the spare is both advertised and on the spares: whoever takes it either
        // way (`take_spare`, or the hand-over of an `hb run` that claimed it the moment it was
        // in place) finds it recorded both ways, and withdraws it or learns it was claimed.
        let mut advertised = self.advertised.lock().expect("advertised lock");
        // Checked under the lock: a pull withdraws all advertisements after it tagged.
        let names_it = crate::find_image(&self.store, &r.image)
            .ok()
            .flatten()
            .is_some_and(|(_, digest)| digest.to_string() == r.key);
        let advertised_now = written.and_then(|_| {
            if !names_it {
                return Err(std::io::Error::other(format!("{} names another image now", r.image)));
            }
            rustix::fs::renameat_with(rustix::fs::CWD, &tmp, rustix::fs::CWD, &file, rustix::fs::RenameFlags::NOREPLACE)
                .map_err(std::io::Error::from)
        });
        match advertised_now {
            Ok(()) => {
                advertised.insert(dir.to_path_buf(), Advert { file: file.clone(), made_for: r.clone() });
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                if e.kind() != std::io::ErrorKind::AlreadyExists && names_it && live {
                    tracing::warn!(error = %e, file = %file.display(), "advertising a spare container folder failed");
                }
            }
        }
        self.spares.lock().expect("spares lock").entry(r.key.clone()).or_default().push(dir.to_path_buf());
    }

    /// Withdraws spare `dir`'s advertisement, if it has one: true when the spare is still the
    /// daemon's, false when an `hb run` claimed it first (it is that run's container now).
    fn withdraw(&self, dir: &Path) -> bool {
        // Held through the rename: no new advertisement can take the file's name meanwhile.
        let mut advertised = self.advertised.lock().expect("advertised lock");
        let Some(advert) = advertised.remove(dir) else { return true };
        let tmp = advert.file.with_extension("withdrawn");
        match std::fs::rename(&advert.file, &tmp) {
            Ok(()) => {
                let _ = std::fs::remove_file(&tmp);
                true
            }
            Err(_) => false,
        }
    }

    /// Withdraws every advertisement (image references may name other images now); the spares
    /// stay, handed out through the API.
    fn withdraw_all(&self) {
        let dirs: Vec<PathBuf> = self.advertised.lock().expect("advertised lock").keys().cloned().collect();
        for dir in dirs {
            if !self.withdraw(&dir) {
                self.forget_spare(&dir);
                self.handed.lock().expect("handed lock").push((dir, Instant::now()));
            }
        }
    }

    /// Takes `dir` off the spares (claimed by an `hb run`).
    fn forget_spare(&self, dir: &Path) {
        for v in self.spares.lock().expect("spares lock").values_mut() {
            v.retain(|s| s != dir);
        }
    }

    /// A hand-over of `dir`: if it is an advertised spare an `hb run` claimed without asking
    /// (`api::claim_ready`), it is off the spares now, and the next is prepared.
    fn spare_claimed(&self, dir: &Path) {
        // By id: `dir` is canonical, the daemon's own paths need not be.
        let advert = {
            let mut advertised = self.advertised.lock().expect("advertised lock");
            let mine = advertised.keys().find(|k| k.file_name() == dir.file_name()).cloned();
            mine.and_then(|k| advertised.remove(&k).map(|a| (k, a)))
        };
        let Some((dir, advert)) = advert else { return };
        self.forget_spare(&dir);
        self.last_used.lock().expect("lock").insert(advert.made_for.key.clone(), Instant::now());
        self.refill(advert.made_for);
    }

    /// Prepares a spare container folder over image mount `lower` (key `key`): on the daemon's
    /// `hb-spares` thread, which runs at the lowest priority.
    fn prepare_spare(&self, r: Refill) {
        let stopping = self.stopping.lock().expect("stopping lock");
        if *stopping {
            self.refilling.lock().expect("refilling lock").remove(&r.key);
            return;
        }
        let (key, lower) = (r.key.clone(), r.lower.as_path());
        let dir = crate::container::containers_dir(&self.root).join(crate::container::new_id());
        let made = std::fs::create_dir_all(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|_| Ok(crate::container::make_spare_files(&dir)?))
            .and_then(|_| crate::rootfs::prepare(lower, &dir, &crate::rootfs::MOUNT_POINTS));
        let live = self.mounts.lock().expect("mounts lock").contains_key(&key);
        match made {
            Ok(()) if live => {
                self.publish(&dir, &r);
                self.prepared(&dir, r);
            }
            // Failed, or its image mount went meanwhile.
            other => {
                if let Err(e) = other {
                    tracing::warn!(error = %crate::error_chain(&e), "preparing a spare container folder failed");
                }
                crate::run::cleanup(&dir, true);
                self.refilling.lock().expect("refilling lock").remove(&key);
            }
        }
    }

    /// Spare `dir`, made for `r` and published, is no longer being prepared; if it was taken
    /// already (handed out, or claimed the moment it was advertised), whoever took it asked for
    /// the next while this one still counted as being prepared, and was not heard: the next is
    /// asked for here.
    fn prepared(&self, dir: &Path, r: Refill) {
        self.refilling.lock().expect("refilling lock").remove(&r.key);
        if !self.is_spare(&r.key, dir) && self.mounts.lock().expect("mounts lock").contains_key(&r.key) {
            self.refill(r);
        }
    }

    /// Whether `dir` is on the spares of image mount `key` (not handed out or claimed).
    fn is_spare(&self, key: &str, dir: &Path) -> bool {
        self.spares.lock().expect("spares lock").get(key).is_some_and(|v| v.iter().any(|s| s == dir))
    }

    /// The daemon stops: no spare is made from now on (one under way is waited for), and all
    /// are released.
    fn stop_spares(&self) {
        *self.stopping.lock().expect("stopping lock") = true;
        self.release_spares(None);
    }

    /// Unmounts and removes the spares of image mount `key` (all keys: `None`).
    fn release_spares(&self, key: Option<&str>) {
        let gone: Vec<PathBuf> = {
            let mut spares = self.spares.lock().expect("spares lock");
            match key {
                Some(k) => spares.remove(k).unwrap_or_default(),
                None => spares.drain().flat_map(|(_, v)| v).collect(),
            }
        };
        for dir in gone {
            if self.withdraw(&dir) {
                crate::run::cleanup(&dir, true);
            } else {
                self.handed.lock().expect("handed lock").push((dir, Instant::now()));
            }
        }
    }

    /// Spares handed out a minute ago or more that never became containers (their `hb run`
    /// died first), and spares of image mounts that are gone: released.
    fn reap_spares(&self) {
        let stale: Vec<PathBuf> = {
            let mut handed = self.handed.lock().expect("handed lock");
            let (old, young) = handed.drain(..).partition(|(_, t)| t.elapsed() >= Duration::from_secs(60));
            *handed = young;
            old.into_iter().map(|(p, _)| p).collect()
        };
        if !stale.is_empty() {
            // `hb run` writes a spare's state under this lock.
            let _lock = crate::run::lock_containers(&self.root);
            for dir in stale.into_iter().filter(|d| d.exists() && !d.join("state.json").exists()) {
                tracing::info!(dir = %dir.display(), "releasing a spare container folder nobody claimed");
                crate::run::cleanup(&dir, true);
            }
        }
        let keys: Vec<String> = self.spares.lock().expect("spares lock").keys().cloned().collect();
        let mounts: Vec<String> = self.mounts.lock().expect("mounts lock").keys().cloned().collect();
        for k in keys.iter().filter(|k| !mounts.contains(k)) {
            self.release_spares(Some(k));
        }
    }

    /// Handed-over containers whose process has been gone for 10 s and that are still there:
    /// their hand-over never reached the daemon (`hb run` killed between writing the state and
    /// sending it), or cleaning up after them failed. Finished now; cleanups left half done
    /// under `.removing/` are finished too.
    fn reap_handed_over(&self) {
        use crate::container::Status;
        let Ok(all) = crate::container::list(&self.root) else { return };
        let gone: Vec<PathBuf> = all
            .into_iter()
            .filter(|(_, s)| s.handed_over && s.status == Status::Running && !s.monitor_alive())
            .map(|(dir, _)| dir)
            .collect();
        let mut dead = self.dead_since.lock().expect("dead_since lock");
        dead.retain(|dir, _| gone.contains(dir));
        for dir in gone {
            let since = *dead.entry(dir.clone()).or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(10) {
                dead.remove(&dir);
                tracing::warn!(dir = %dir.display(), "a handed-over container outlived its process; cleaning up");
                housekeeping(move || crate::run::finish_handed_over(&dir));
            }
        }
        crate::run::sweep_removing(&self.root);
    }

    /// Container folders without a state (spares of an earlier daemon, or of an `hb run` that
    /// died before writing one): unmounted and removed.
    fn sweep_spares(&self) {
        let Ok(_lock) = crate::run::lock_containers(&self.root) else { return };
        // An earlier daemon's advertisements (`hb run` ignores them: their daemon is gone).
        let ready = api::ready_dir(&self.root);
        let _ = std::fs::remove_dir_all(&ready);
        let _ = std::fs::create_dir_all(&ready);
        let Ok(entries) = std::fs::read_dir(crate::container::containers_dir(&self.root)) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name.to_str().is_some_and(crate::container::is_id) && p.is_dir() && !p.join("state.json").exists() {
                tracing::info!(dir = %p.display(), "removing a spare container folder left by an earlier daemon");
                crate::run::cleanup(&p, true);
            }
        }
    }

    /// `dir` by its canonical path, if it is a container folder of this daemon's store.
    fn container_folder(&self, dir: &Path) -> Result<PathBuf, CleanupRefused> {
        let containers = crate::container::containers_dir(&self.root);
        match dir.canonicalize() {
            Ok(dir) if dir.starts_with(&containers) && dir != containers => Ok(dir),
            Ok(dir) => Err(CleanupRefused::NotContainer(anyhow::anyhow!(
                "{} is not a container folder of this daemon's store",
                dir.display()
            ))),
            Err(e) => Err(CleanupRefused::Missing(anyhow::anyhow!("{}: {e}", dir.display()))),
        }
    }

    /// A container `hb run --rm` handed over (`api::hand_over`): cleaned up when the process
    /// behind `pidfd` (hb, become the runtime) exits.
    fn watch_handed_over(&self, dir: &Path, pidfd: std::os::fd::OwnedFd) -> Result<(), CleanupRefused> {
        let dir = self.container_folder(dir)?;
        use std::os::fd::AsRawFd;
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap_or_default();
        if !fdinfo.lines().any(|l| l.starts_with("Pid:")) {
            return Err(CleanupRefused::NotContainer(anyhow::anyhow!(
                "the hand-over of {} carried no pidfd",
                dir.display()
            )));
        }
        self.spare_claimed(&dir);
        self.exits.watch(pidfd, dir);
        Ok(())
    }

    /// Handed-over containers a previous daemon was watching: watched again while their
    /// process runs, cleaned up now when it is gone.
    fn adopt_handed_over(&self) {
        use crate::container::{list, process_start, Status};
        let Ok(all) = list(&self.root) else { return };
        for (dir, state) in all.into_iter().filter(|(_, s)| s.handed_over && s.status == Status::Running) {
            let watched = state.monitor.is_some_and(|(pid, start)| {
                let Some(raw) = rustix::process::Pid::from_raw(pid as i32) else { return false };
                // Opened, then checked: the pidfd is of that very process if it still runs.
                rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
                    .is_ok_and(|fd| process_start(pid) == Some(start) && self.watch_handed_over(&dir, fd).is_ok())
            });
            if !watched {
                tracing::info!(container = %state.id, "a handed-over container ended while no daemon ran; cleaning up");
                housekeeping(move || crate::run::finish_handed_over(&dir));
            }
        }
    }

    fn image_mount(&self, req: &MountRequest) -> anyhow::Result<ImageMount> {
        let _one = self.preparing.lock().expect("preparing lock");
        if crate::find_image(&self.store, &req.image)?.is_none() {
            crate::mount::pull_for_mount(
                &Hosts::of(&self.g),
                &self.work,
                &self.store,
                &req.image,
                req.plain_http,
                &Silent,
            )?;
            self.metrics.pulls.fetch_add(1, Ordering::Relaxed);
            self.dirty.store(true, Ordering::SeqCst);
        }
        let (name, digest, rec) = crate::require_image(&self.store, &req.image)?;
        // The first N layers of an N-layer image are the image.
        let layers = req.layers.filter(|n| *n < rec.layers.len());
        if layers == Some(0) {
            bail!("cannot mount the first 0 layers of {name}");
        }
        let key = match layers {
            Some(n) => format!("{digest}/{n}"),
            None => digest.to_string(),
        };
        if let Some(m) = self.live_mount(key.clone()) {
            return Ok(m);
        }
        self.settle();
        let dir_name = match layers {
            Some(n) => format!("{}-{n}", &digest.hex()[..16]),
            None => digest.hex()[..16].to_string(),
        };
        let path = images_dir(&self.root).join(dir_name);
        let _ = hb_fuse::clean_stale(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let pid = self.start_mount_server(&req.image, &path, req.plain_http, layers)?;
        let m = ImageMount {
            image: name,
            digest: digest.to_string(),
            path: path.clone(),
            pid,
            config: rec.config,
            users: 0,
            layers,
            spare: None,
        };
        std::fs::write(path.with_extension("json"), serde_json::to_vec_pretty(&m)?)?;
        self.mounts.lock().expect("mounts lock").insert(key.clone(), m.clone());
        self.last_used.lock().expect("lock").insert(key, Instant::now());
        Ok(m)
    }

    /// The layer a containerd Prepare describes (image reference and layer digest labels, CRI's
    /// or the stargz family's), if hb can serve it lazily: the image has an accelerated form
    /// (its indexes are pulled now) or is in the store already. Also answers the image's layer
    /// count.
    fn remote_layer(
        &self,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<Option<(hb_snapshotter::RemoteLayer, usize)>> {
        let get = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
        let (Some(image), Some(layer)) = (
            get(&["containerd.io/snapshot/cri.image-ref", "containerd.io/snapshot/remote/stargz.reference"]),
            get(&["containerd.io/snapshot/cri.layer-digest", "containerd.io/snapshot/remote/stargz.digest"]),
        ) else {
            tracing::debug!(?labels, "a remote-snapshot Prepare without image and layer labels");
            return Ok(None);
        };
        let _one = self.preparing.lock().expect("preparing lock");
        if crate::find_image(&self.store, &image)?.is_none() {
            let r = hb_registry::ImageRef::parse(&image)?;
            let creds = crate::config::docker_credentials(r.registry())?;
            let eps = Hosts::of(&self.g).endpoints(&r, false, creds, hb_registry::Platform::default())?;
            let (registry, resolved) = crate::pull::resolve(&self.work, eps)?;
            if resolved.accelerated.is_none() {
                tracing::info!(%image, "no accelerated form: containerd unpacks its layers");
                return Ok(None);
            }
            let report = crate::pull::pull_lazy(&self.work, self.store.clone(), Arc::new(registry), resolved)?;
            self.metrics.pulls.fetch_add(1, Ordering::Relaxed);
            self.metrics.pulled_bytes.fetch_add(report.bytes_downloaded, Ordering::Relaxed);
            self.dirty.store(true, Ordering::SeqCst);
            tracing::info!(%image, summary = %crate::pull::lazy_summary(&report), "pulled lazily for containerd");
            self.for_containerd.lock().expect("lock").insert(image.clone());
        }
        let (_, _, rec) = crate::require_image(&self.store, &image)?;
        let total = rec.layers.len();
        Ok(rec
            .layers
            .iter()
            .position(|l| l.digest.to_string() == layer)
            .map(|index| (hb_snapshotter::RemoteLayer { image, index }, total)))
    }

    /// Starts `hb mount IMAGE DIR` as a process of its own (not the daemon's child in any way
    /// that matters: own process group, its own log) and returns once it serves.
    fn start_mount_server(
        &self,
        image: &str,
        dir: &Path,
        plain_http: bool,
        layers: Option<usize>,
    ) -> anyhow::Result<u32> {
        let mut cmd = std::process::Command::new(crate::self_exe());
        crate::pass_globals(&mut cmd, &self.g, &self.root);
        cmd.arg("mount").arg(image).arg(dir);
        if plain_http {
            cmd.arg("--plain-http");
        }
        if let Some(n) = layers {
            cmd.arg("--layers").arg(n.to_string());
        }
        let (mut child, _) = crate::mount::start_server(&mut cmd, &self.root, dir)
            .with_context(|| format!("starting the mount server for {image}"))?;
        // Reaped by a thread of ours when it ends (it normally outlives us).
        let pid = child.id();
        std::thread::spawn(move || child.wait());
        Ok(pid)
    }

    /// Current image mounts with their users counted.
    fn list_mounts(&self) -> Vec<ImageMount> {
        let mut v: Vec<ImageMount> = self.mounts.lock().expect("mounts lock").values().cloned().collect();
        for m in &mut v {
            m.users = self.users(m);
        }
        v.sort_by(|a, b| a.image.cmp(&b.image));
        v
    }

    /// Unmounts an image mount (refused while a container uses it, unless `force`).
    fn unmount(&self, digest: &str, force: bool) -> anyhow::Result<()> {
        let m = self.mounts.lock().expect("mounts lock").get(digest).cloned();
        let Some(m) = m else { bail!("no image mount {digest}") };
        // A spare an `hb run` claimed is a user: known once its advertisement is withdrawn.
        self.withdraw_all();
        let users = self.users(&m);
        if users > 0 && !force {
            bail!("image mount of {} is used by {users} containers", m.image);
        }
        self.release_spares(Some(digest));
        crate::mount::umount(&self.root, &m.path, &Silent)?;
        let _ = std::fs::remove_dir(&m.path);
        let _ = std::fs::remove_file(m.path.with_extension("json"));
        self.mounts.lock().expect("mounts lock").remove(digest);
        Ok(())
    }

    /// Unmounts image mounts no container has used for `idle`.
    fn reap_idle(&self) {
        let now = Instant::now();
        for m in self.list_mounts() {
            let mut last = self.last_used.lock().expect("lock");
            let seen = last.entry(m.key()).or_insert(now);
            if m.users > 0 {
                *seen = now;
                continue;
            }
            if now.duration_since(*seen) >= self.idle {
                drop(last);
                tracing::info!(image = %m.image, "unmounting an idle image mount");
                if let Err(e) = self.unmount(&m.key(), false) {
                    tracing::warn!(image = %m.image, error = %e, "unmounting an idle image mount failed");
                }
            }
        }
    }

    fn pull(&self, req: &PullRequest) -> anyhow::Result<PullResponse> {
        let _one = self.preparing.lock().expect("preparing lock");
        let r = hb_registry::ImageRef::parse(&req.reference)?;
        let creds = match &req.credentials {
            Some(c) => Some(c.clone()),
            None => crate::config::docker_credentials(r.registry())?,
        };
        let platform = match &req.platform {
            Some(p) => p.parse().map_err(anyhow::Error::msg)?,
            None => hb_registry::Platform::default(),
        };
        let eps = Hosts::of(&self.g).endpoints(&r, req.plain_http, creds, platform)?;
        let (registry, resolved) = crate::pull::resolve(&self.work, eps)?;
        self.metrics.pulls.fetch_add(1, Ordering::Relaxed);
        self.dirty.store(true, Ordering::SeqCst);
        if req.lazy && resolved.accelerated.is_some() {
            let report = crate::pull::pull_lazy(&self.work, self.store.clone(), Arc::new(registry), resolved)?;
            self.metrics.pulled_bytes.fetch_add(report.bytes_downloaded, Ordering::Relaxed);
            Ok(PullResponse {
                digest: report.digest.to_string(),
                summary: crate::pull::lazy_summary(&report),
                report: serde_json::to_value(&report)?,
            })
        } else {
            let report = crate::pull::pull(&self.work, self.store.clone(), registry, resolved, &Silent)?;
            self.metrics.pulled_bytes.fetch_add(report.bytes_downloaded, Ordering::Relaxed);
            Ok(PullResponse {
                digest: report.digest.to_string(),
                summary: crate::pull::summary(&report),
                report: serde_json::to_value(&report)?,
            })
        }
    }

    /// The chunks of `ids` the store has (verified on read), framed.
    fn chunks_get(&self, ids: &[u8]) -> anyhow::Result<Vec<u8>> {
        let ids = api::decode_ids(ids)?;
        let mut found = Vec::new();
        let mut size = 0;
        for id in ids {
            match self.store.read_chunk(&id) {
                Ok(b) => {
                    size += b.len() + 36;
                    if size > api::MAX_CHUNK_BODY {
                        break;
                    }
                    found.push((id, b));
                }
                Err(hb_store::StoreError::MissingChunk(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(api::encode_chunks(found.iter().map(|(i, b)| (i, b.as_slice()))))
    }

    /// Keeps chunks a mount server fetched (the store verifies each against its id).
    fn chunks_fill(&self, body: &[u8]) -> anyhow::Result<api::FillResponse> {
        let chunks = api::decode_chunks(body)?;
        let r = self.store.fill_chunks(&chunks)?;
        self.dirty.store(true, Ordering::SeqCst);
        Ok(api::FillResponse { filled: r.filled, skipped: r.skipped })
    }

    fn remove_images(&self, req: &RemoveRequest) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        for q in &req.images {
            let (name, digest, _) = crate::require_image(&self.store, q)?;
            self.store.remove_image_name(&name)?;
            self.dirty.store(true, Ordering::SeqCst);
            lines.push(format!("untagged {name} ({}); run `hb gc` to free its space", digest.short()));
        }
        Ok(lines)
    }

    fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            root: self.root.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            image_mounts: self.mounts.lock().expect("mounts lock").len(),
        }
    }

    /// Prometheus text format.
    fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(t, "{name}{labels} {v}");
            }
        };
        let mounts = self.list_mounts();
        metric("hb_image_mounts", "gauge", "Image mounts served.", vec![(String::new(), mounts.len() as f64)]);
        metric(
            "hb_containers_on_mounts",
            "gauge",
            "Containers whose root filesystem sits on an image mount.",
            vec![(String::new(), mounts.iter().map(|m| m.users).sum::<usize>() as f64)],
        );
        // What the mount servers report (each writes its figures beside its pid file).
        let mut sum = hb_images::mount::MountStats::default();
        let mut hist = [0f64; hb_fuse::LATENCY_BUCKETS_MS.len() + 1];
        let mut hist_sum = 0f64;
        // Chunks by tier name (the daemon, mirrors, registries): a bounded set, one per configured host.
        let mut by_source: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
        for m in &mounts {
            let Ok(raw) = std::fs::read(crate::mount::run_file(&self.root, &m.path, "stats.json")) else { continue };
            let Ok(v) = serde_json::from_slice::<hb_images::mount::MountStats>(&raw) else { continue };
            sum.local_chunks += v.local_chunks;
            sum.remote_chunks += v.remote_chunks;
            sum.remote_bytes += v.remote_bytes;
            sum.local_bytes += v.local_bytes;
            sum.wire_bytes += v.wire_bytes;
            sum.errors += v.errors;
            sum.fill_errors += v.fill_errors;
            for (h, x) in hist.iter_mut().zip(&v.fetch_latency_ms) {
                *h += *x as f64;
            }
            hist_sum += v.fetch_latency_sum_ms as f64 / 1000.0;
            for t in &v.sources {
                let e = by_source.entry(t.name.clone()).or_default();
                e.0 += t.chunks;
                e.1 += t.bytes;
                e.2 += t.errors + t.corrupt;
            }
        }
        metric(
            "hb_fetched_bytes_total",
            "counter",
            "File data bytes read by image mounts, by source.",
            vec![
                ("{source=\"local\"}".into(), sum.local_bytes as f64),
                ("{source=\"remote\"}".into(), sum.remote_bytes as f64),
                ("{source=\"wire\"}".into(), sum.wire_bytes as f64),
            ],
        );
        metric(
            "hb_chunk_lookups_total",
            "counter",
            "Chunks image mounts needed: hits in the store, misses fetched remotely.",
            vec![
                ("{result=\"hit\"}".into(), sum.local_chunks as f64),
                ("{result=\"miss\"}".into(), sum.remote_chunks as f64),
            ],
        );
        let label = |name: &str| format!("{{tier=\"{}\"}}", name.replace(['"', '\\', '\n'], "_"));
        metric(
            "hb_tier_chunks_total",
            "counter",
            "Chunks image mounts fetched, by remote tier (daemon, mirror, registry).",
            by_source.iter().map(|(n, v)| (label(n), v.0 as f64)).collect(),
        );
        metric(
            "hb_tier_bytes_total",
            "counter",
            "Uncompressed bytes image mounts fetched, by remote tier.",
            by_source.iter().map(|(n, v)| (label(n), v.1 as f64)).collect(),
        );
        metric(
            "hb_tier_errors_total",
            "counter",
            "Failed requests and corrupt chunks, by remote tier.",
            by_source.iter().map(|(n, v)| (label(n), v.2 as f64)).collect(),
        );
        let mut cumulative = 0.0;
        let mut samples = Vec::new();
        for (i, le) in hb_fuse::LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += hist[i];
            samples.push((format!("_bucket{{le=\"{}\"}}", *le as f64 / 1000.0), cumulative));
        }
        cumulative += hist[hist.len() - 1];
        samples.push(("_bucket{le=\"+Inf\"}".into(), cumulative));
        samples.push(("_sum".into(), hist_sum));
        samples.push(("_count".into(), cumulative));
        let _ = writeln!(
            t,
            "# HELP hb_remote_fetch_seconds Latency of remote chunk fetches by image mounts.\n# TYPE hb_remote_fetch_seconds histogram"
        );
        for (suffix, v) in samples {
            let _ = writeln!(t, "hb_remote_fetch_seconds{suffix} {v}");
        }
        let mut errors: Vec<(String, f64)> = vec![
            ("{kind=\"fetch\"}".into(), sum.errors as f64),
            ("{kind=\"store_fill\"}".into(), sum.fill_errors as f64),
        ];
        for (k, v) in self.metrics.errors.lock().expect("metrics lock").iter() {
            errors.push((format!("{{kind=\"{k}\"}}"), *v as f64));
        }
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(t, "{name}{labels} {v}");
            }
        };
        metric("hb_errors_total", "counter", "Errors by kind.", errors);
        metric(
            "hb_pulls_total",
            "counter",
            "Image pulls the daemon made.",
            vec![(String::new(), self.metrics.pulls.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "hb_pulled_bytes_total",
            "counter",
            "Bytes pulls downloaded.",
            vec![(String::new(), self.metrics.pulled_bytes.load(Ordering::Relaxed) as f64)],
        );
        let reqs: Vec<(String, f64)> = self
            .metrics
            .requests
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|((p, c), n)| (format!("{{path=\"{p}\",code=\"{c}\"}}"), *n as f64))
            .collect();
        metric("hb_api_requests_total", "counter", "API requests by path and status.", reqs);
        let (buckets, sum_us) = *self.metrics.latency.lock().expect("metrics lock");
        let _ =
            writeln!(t, "# HELP hb_api_request_seconds API request latency.\n# TYPE hb_api_request_seconds histogram");
        let mut c = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            c += buckets[i];
            let _ = writeln!(t, "hb_api_request_seconds_bucket{{le=\"{le}\"}} {c}");
        }
        c += buckets[BUCKETS.len()];
        let _ = writeln!(t, "hb_api_request_seconds_bucket{{le=\"+Inf\"}} {c}");
        let _ = writeln!(t, "hb_api_request_seconds_sum {}", sum_us as f64 / 1e6);
        let _ = writeln!(t, "hb_api_request_seconds_count {c}");
        t
    }
}

/// The daemon as the snapshotter's source of lazy layers.
struct DaemonLayers(Arc<Daemon>);

impl hb_snapshotter::Remote for DaemonLayers {
    fn layer(
        &self,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<hb_snapshotter::RemoteLayer>, String> {
        let found = self.0.remote_layer(labels).map_err(|e| {
            self.0.metrics.error("remote_snapshot");
            crate::error_chain(&e)
        })?;
        // The image's top layer: containerd will want the whole image next (a container on it);
        // mount it now, so the mount and its start-up prefetch are under way by then.
        if let Some((layer, total)) = &found {
            if layer.index + 1 == *total {
                let (d, image) = (self.0.clone(), layer.image.clone());
                std::thread::spawn(move || {
                    let req = MountRequest { image, plain_http: false, root: None, layers: None, spare: false };
                    if let Err(e) = d.image_mount(&req) {
                        tracing::warn!(error = %crate::error_chain(&e), "mounting a lazily pulled image ahead failed");
                    }
                });
            }
        }
        Ok(found.map(|(l, _)| l))
    }

    fn mount(&self, image: &str, layers: usize) -> Result<PathBuf, String> {
        let req =
            MountRequest { image: image.into(), plain_http: false, root: None, layers: Some(layers), spare: false };
        self.0.image_mount(&req).map(|m| m.path).map_err(|e| {
            self.0.metrics.error("mount");
            crate::error_chain(&e)
        })
    }

    fn usage(&self, layer: &hb_snapshotter::RemoteLayer) -> Result<(i64, i64), String> {
        let inner = || -> anyhow::Result<(i64, i64)> {
            let (_, _, rec) = crate::require_image(&self.0.store, &layer.image)?;
            let diff_id = rec.layers.get(layer.index).context("no such layer")?.diff_id;
            let idx = self.0.store.layer(&diff_id)?.with_context(|| format!("layer {diff_id} is missing"))?;
            let mut bytes = 0i64;
            for c in &idx.chunks {
                if self.0.store.has_chunk(&c.id)? {
                    bytes += i64::from(c.len);
                }
            }
            Ok((bytes, idx.entries.len() as i64))
        };
        inner().map_err(|e| crate::error_chain(&e))
    }

    fn release(&self, image: &str) {
        // containerd no longer uses the image: its name goes from hb's store (a daemon gc frees
        // what no other image shares), unless something else of hb's mounts it.
        let d = &self.0;
        if !d.for_containerd.lock().expect("lock").remove(image) {
            return;
        }
        let mounted = d.mounts.lock().expect("mounts lock").values().any(|m| m.image == image && d.users(m) > 0);
        if mounted {
            return;
        }
        match d.remove_images(&RemoveRequest { images: vec![image.to_string()] }) {
            Ok(lines) => lines.iter().for_each(|l| tracing::info!("{l} (containerd removed its snapshots)")),
            Err(e) => {
                tracing::warn!(image, error = %crate::error_chain(&e), "releasing an image containerd no longer uses")
            }
        }
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn error(status: StatusCode, e: &anyhow::Error) -> Response<Full<Bytes>> {
    json(status, &api::ErrorBody { error: crate::error_chain(e) })
}

/// A handler's blocking work on a thread of its own, its error mapped to a status code.
async fn blocking<T: Serialize + Send + 'static>(
    d: &Arc<Daemon>,
    kind: &'static str,
    f: impl FnOnce(&Daemon) -> anyhow::Result<T> + Send + 'static,
) -> Response<Full<Bytes>> {
    match blocking_value(d, kind, f).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(resp) => resp,
    }
}

/// A handler's blocking work: its value, or the error answer.
async fn blocking_value<T: Send + 'static>(
    d: &Arc<Daemon>,
    kind: &'static str,
    f: impl FnOnce(&Daemon) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, Response<Full<Bytes>>> {
    let d2 = d.clone();
    match tokio::task::spawn_blocking(move || f(&d2)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            d.metrics.error(kind);
            let status = if crate::error_chain(&e).contains("no image") || e.to_string().starts_with("no image mount") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            Err(error(status, &e))
        }
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, &anyhow::anyhow!("handler failed: {e}"))),
    }
}

/// A handler's blocking work answering raw bytes.
async fn blocking_raw(
    d: &Arc<Daemon>,
    kind: &'static str,
    f: impl FnOnce(&Daemon) -> anyhow::Result<Vec<u8>> + Send + 'static,
) -> Response<Full<Bytes>> {
    let d2 = d.clone();
    match tokio::task::spawn_blocking(move || f(&d2)).await {
        Ok(Ok(v)) => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(Bytes::from(v)))
            .expect("valid response"),
        Ok(Err(e)) => {
            d.metrics.error(kind);
            error(StatusCode::INTERNAL_SERVER_ERROR, &e)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &anyhow::anyhow!("handler failed: {e}")),
    }
}

/// A request body of at most [`api::MAX_CHUNK_BODY`] bytes.
async fn raw_body(req: Request<hyper::body::Incoming>) -> anyhow::Result<Bytes> {
    let limited = http_body_util::Limited::new(req.into_body(), api::MAX_CHUNK_BODY);
    limited.collect().await.map(|c| c.to_bytes()).map_err(|e| anyhow::anyhow!("reading the request body: {e}"))
}

async fn body_json<T: serde::de::DeserializeOwned>(req: Request<hyper::body::Incoming>) -> anyhow::Result<T> {
    let bytes = req.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&bytes).context("the request body is not the JSON this endpoint takes")
}

async fn handle(d: Arc<Daemon>, req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    // What may change which image a reference names: no spare stays advertised under one
    // (before, and after, as a spare may be made meanwhile).
    let renames = matches!((&method, path.as_str()), (&Method::POST, "/v1/pull" | "/v1/images/remove" | "/v1/gc"))
        || (method == Method::DELETE && path.starts_with("/v1/mounts/"));
    if renames {
        d.withdraw_all();
    }
    let resp = match (&method, path.as_str()) {
        (&Method::GET, "/v1/health") => json(StatusCode::OK, &d.health()),
        (&Method::GET, "/metrics") => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(d.metrics_text())))
            .expect("valid response"),
        (&Method::GET, "/v1/mounts") => json(StatusCode::OK, &d.list_mounts()),
        (&Method::POST, "/v1/images/mount") => match body_json::<MountRequest>(req).await {
            Ok(m) if m.root.as_deref().is_some_and(|r| !same_path(r, &d.root)) => error(
                StatusCode::CONFLICT,
                &anyhow::anyhow!(
                    "this daemon serves store {}, not {}",
                    d.root.display(),
                    m.root.unwrap_or_default().display()
                ),
            ),
            Ok(m) => {
                let spare = m.spare && m.layers.is_none();
                let (image, plain_http) = (m.image.clone(), m.plain_http);
                let mount = match d.existing_mount(&m) {
                    Ok(Some(mount)) => Ok(mount),
                    _ => blocking_value(&d, "mount", move |d| d.image_mount(&m)).await,
                };
                match mount {
                    Ok(mut mount) => {
                        if spare {
                            mount.spare = d.take_spare(&mount, &image, plain_http);
                        }
                        json(StatusCode::OK, &mount)
                    }
                    Err(resp) => resp,
                }
            }
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::DELETE, p) if p.starts_with("/v1/mounts/") => {
            let digest = p["/v1/mounts/".len()..].to_string();
            let force = query.split('&').any(|kv| kv == "force=1" || kv == "force=true");
            blocking(&d, "unmount", move |d| d.unmount(&digest, force).map(|_| serde_json::json!({}))).await
        }
        (&Method::POST, "/v1/pull") => match body_json::<PullRequest>(req).await {
            Ok(p) => blocking(&d, "pull", move |d| d.pull(&p)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/images/remove") => match body_json::<RemoveRequest>(req).await {
            Ok(r) => blocking(&d, "remove", move |d| d.remove_images(&r)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/chunks/get") => match raw_body(req).await {
            Ok(b) => blocking_raw(&d, "chunks", move |d| d.chunks_get(&b)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/chunks/fill") => match raw_body(req).await {
            Ok(b) => blocking(&d, "store_fill", move |d| d.chunks_fill(&b)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/containers/cleanup") => match body_json::<crate::api::CleanupRequest>(req).await {
            Ok(c) => match d.start_cleanup(&c) {
                Ok(()) => json(StatusCode::ACCEPTED, &serde_json::json!({})),
                Err(CleanupRefused::NotContainer(e)) => error(StatusCode::BAD_REQUEST, &e),
                Err(CleanupRefused::Missing(e)) => error(StatusCode::NOT_FOUND, &e),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/gc") => {
            blocking(&d, "gc", |d| {
                let r = d.store.gc(&hb_store::NoProgress)?;
                d.dirty.store(true, Ordering::SeqCst);
                Ok(r)
            })
            .await
        }
        _ => error(StatusCode::NOT_FOUND, &anyhow::anyhow!("no endpoint {method} {path} (see docs/api.md)")),
    };
    if renames {
        d.withdraw_all();
    }
    let took = started.elapsed();
    let label = metric_path(&path).to_string();
    *d.metrics.requests.lock().expect("metrics lock").entry((label, resp.status().as_u16())).or_default() += 1;
    {
        let mut l = d.metrics.latency.lock().expect("metrics lock");
        let i = BUCKETS.iter().position(|b| took.as_secs_f64() <= *b).unwrap_or(BUCKETS.len());
        l.0[i] += 1;
        l.1 += took.as_micros() as u64;
    }
    Ok(resp)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(g: &Global, socket: &Path, snapshotter: &Path, idle: Duration, out: &Out) -> anyhow::Result<()> {
    // Caught from here on: a signal while starting stops the daemon as soon as it serves, cleanly.
    let stopped = crate::shutdown::Shutdown::install()?.signalled();
    crate::memory::limit_malloc_arenas();
    // The first pull should not wait for the system's certificates to be read.
    std::thread::spawn(hb_registry::preload_trust_roots);
    let root = crate::store_root(g)?;
    if api::Client::find(socket, &root).is_some() {
        bail!("an hb daemon already serves {} on {}", root.display(), socket.display());
    }
    let store = match crate::open_store(g) {
        Err(e) if matches!(e.downcast_ref::<hb_store::StoreError>(), Some(hb_store::StoreError::Locked(_))) => {
            bail!("store {} is held by another hb process (a mount or a container started without the daemon): stop it first", root.display())
        }
        other => Arc::new(other?),
    };
    let (d, refills) = Daemon::new(g, root.clone(), store, idle)?;
    let sd = d.clone();
    std::thread::Builder::new().name("hb-spares".into()).spawn(move || {
        crate::rootfs::background_priority();
        for r in refills {
            sd.prepare_spare(r);
        }
    })?;
    d.adopt()?;
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
    let reaper = d.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5).min(reaper.idle.max(Duration::from_millis(200))));
        reaper.reap_spares();
        reaper.reap_handed_over();
        reaper.reap_idle();
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
    let _ = stop_snap.send(());
    if let Err(e) = server.block_on(snap_server) {
        tracing::warn!(error = %e, "the snapshotter's server ended badly");
    }
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(&cleanups_path);
    let _ = std::fs::remove_file(snapshotter);
    d.stop_spares();
    out.note(format!(
        "hb daemon stopped; {} image mounts keep serving (the next daemon adopts them)",
        d.mounts.lock().expect("mounts lock").len()
    ));
    Ok(())
}

/// The `path` label of a request: one of the API's routes, or `other` (a label copied from
/// whatever path a client sent would grow the series without bound).
fn metric_path(path: &str) -> &'static str {
    const ROUTES: [&str; 10] = [
        "/metrics",
        "/v1/health",
        "/v1/mounts",
        "/v1/chunks/fill",
        "/v1/chunks/get",
        "/v1/containers/cleanup",
        "/v1/gc",
        "/v1/images/mount",
        "/v1/images/remove",
        "/v1/pull",
    ];
    if path.starts_with("/v1/mounts/") {
        return "/v1/mounts/{digest}";
    }
    ROUTES.iter().find(|r| **r == path).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_paths_are_a_bounded_set() {
        assert_eq!(super::metric_path("/v1/pull"), "/v1/pull");
        assert_eq!(super::metric_path("/v1/mounts/sha256:abc"), "/v1/mounts/{digest}");
        assert_eq!(super::metric_path("/v1/no-such/../thing?x=1"), "other");
        assert_eq!(super::metric_path("/random-1234"), "other");
    }

    use super::*;

    /// A daemon on a fresh store with one (pretend) image mount, and a spare's request for it.
    fn daemon(dir: &Path) -> (Arc<Daemon>, std::sync::mpsc::Receiver<Refill>, Refill) {
        let root = dir.join("store");
        let store = Arc::new(hb_store::Store::open(&root, hb_store::StoreOptions::default()).unwrap());
        let g = Global {
            root: Some(root.clone()),
            config: None,
            hosts_dir: None,
            socket: None,
            json: false,
            quiet: true,
            verbose: 0,
        };
        let (d, refills) = Daemon::new(&g, root.clone(), store, Duration::from_secs(600)).unwrap();
        let key = format!("sha256:{}", "ab".repeat(32));
        let lower = dir.join("image");
        std::fs::create_dir_all(&lower).unwrap();
        let m = ImageMount {
            image: "r/busybox:latest".into(),
            digest: key.clone(),
            path: lower.clone(),
            pid: std::process::id(),
            config: "{}".into(),
            users: 0,
            layers: None,
            spare: None,
        };
        d.mounts.lock().unwrap().insert(key.clone(), m);
        let r = Refill { key, lower, image: "r/busybox:latest".into(), plain_http: false };
        (d, refills, r)
    }

    /// Runs `f` on a thread of `s` and returns once that thread waits on a lock (a futex, as its
    /// `wchan` in /proc says): it has gone as far as it can, however loaded the machine is.
    fn spawn_until_blocked<'scope, T: Send + 'scope>(
        s: &'scope std::thread::Scope<'scope, '_>,
        f: impl FnOnce() -> T + Send + 'scope,
    ) -> std::thread::ScopedJoinHandle<'scope, T> {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = s.spawn(move || {
            // "/proc/thread-self" is "<pid>/task/<tid>".
            let me = std::fs::read_link("/proc/thread-self").unwrap();
            tx.send(me.file_name().unwrap().to_string_lossy().into_owned()).unwrap();
            f()
        });
        let tid = rx.recv().unwrap();
        let t = std::time::Instant::now();
        loop {
            let wchan = std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default();
            if wchan.starts_with("futex") {
                return h;
            }
            assert!(!h.is_finished(), "the thread finished without waiting on the lock");
            assert!(t.elapsed() < Duration::from_secs(30), "the thread never waited on a lock (wchan {wchan:?})");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn spare_folder(d: &Daemon) -> PathBuf {
        let dir = crate::container::containers_dir(&d.root).join(crate::container::new_id());
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_new_spare_is_listed_no_sooner_than_its_advertisement_is_settled() {
        // Regression: a spare went on the list before it was advertised; handed out in between,
        // its withdrawal found no advertisement ("still the daemon's"), and the advertisement
        // then written named a folder another container was using.
        let tmp = tempfile::tempdir().unwrap();
        let (d, _refills, r) = daemon(tmp.path());
        let dir = spare_folder(&d);
        let held = d.advertised.lock().unwrap();
        std::thread::scope(|s| {
            // Once it waits on the advertisements lock it has gone as far as it can.
            let publishing = spawn_until_blocked(s, || d.publish(&dir, &r));
            assert!(!d.is_spare(&r.key, &dir), "listed while its advertisement was not settled");
            drop(held);
            publishing.join().unwrap();
        });
        assert!(d.is_spare(&r.key, &dir));
        // The reference names no image in this store: listed, not advertised.
        assert!(d.advertised.lock().unwrap().is_empty());
        assert!(!api::ready_file(&d.root, &r.image, r.plain_http).exists());
    }

    #[test]
    fn a_spare_taken_while_it_still_counts_as_being_prepared_is_replaced() {
        // Regression: the refill asked for by whoever took the spare was dropped (one was being
        // prepared), and no spare was made again.
        let tmp = tempfile::tempdir().unwrap();
        let (d, refills, r) = daemon(tmp.path());
        d.refill(r.clone());
        assert_eq!(refills.try_recv().map(|x| x.key).ok(), Some(r.key.clone()));
        let dir = spare_folder(&d);
        d.publish(&dir, &r);
        let m = d.mounts.lock().unwrap().get(&r.key).cloned().unwrap();
        assert_eq!(d.take_spare(&m, &r.image, r.plain_http), Some(dir.clone()));
        assert!(refills.try_recv().is_err(), "asked again while one is being prepared");
        d.prepared(&dir, r.clone());
        assert_eq!(refills.try_recv().map(|x| x.key).ok(), Some(r.key.clone()), "the taken spare was not replaced");
        // One not taken is not replaced.
        let next = spare_folder(&d);
        d.publish(&next, &r);
        d.prepared(&next, r.clone());
        assert!(refills.try_recv().is_err(), "a spare nobody took was replaced");
        // Made while its image mount went: listed all the same, and released with the others.
        d.mounts.lock().unwrap().clear();
        let late = spare_folder(&d);
        d.publish(&late, &r);
        assert!(d.is_spare(&r.key, &late), "a spare of a gone image mount was lost track of");
        d.prepared(&late, r.clone());
        assert!(refills.try_recv().is_err(), "a spare was asked for a gone image mount");
        d.reap_spares();
        assert!(!late.exists() && !next.exists(), "the spares of a gone image mount stayed");
        assert!(d.spares.lock().unwrap().is_empty());
    }

    #[test]
    fn a_stopping_daemon_makes_no_spare_and_releases_all() {
        // Regression: a spare the `hb-spares` thread finished while the daemon stopped was
        // listed after the daemon released its spares, and stayed mounted.
        let tmp = tempfile::tempdir().unwrap();
        let (d, _refills, r) = daemon(tmp.path());
        let dir = spare_folder(&d);
        d.publish(&dir, &r);
        d.prepared(&dir, r.clone());
        // A preparation under way holds the stop back until it is done.
        let held = d.stopping.lock().unwrap();
        std::thread::scope(|s| {
            let stopping = spawn_until_blocked(s, || d.stop_spares());
            assert!(dir.exists(), "spares released while one was being prepared");
            drop(held);
            stopping.join().unwrap();
        });
        assert!(!dir.exists() && d.spares.lock().unwrap().is_empty(), "a spare outlived the daemon");
        // Asked for after the stop: nothing is made.
        d.refill(r.clone());
        d.prepare_spare(r.clone());
        let left: Vec<_> = std::fs::read_dir(crate::container::containers_dir(&d.root))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "a spare was made after the stop: {left:?}");
        assert!(d.refilling.lock().unwrap().is_empty());
    }
}
