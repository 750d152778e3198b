//! Lazy, read-only FUSE mounts of images.
//!
//! An image's merged tree (its layer indexes, whiteouts and opaque directories applied) is served
//! from memory: lookup, getattr, readdir, readlink and the xattr calls never touch the network.
//! File data comes chunk by chunk through a [`Fetcher`]: memory, the local store, then a remote
//! [`hb_core::ChunkSource`], every remote chunk verified and kept in the store. Fully-local big
//! files are served by FUSE passthrough from a materialised backing file where the kernel allows.
//!
//! What it must not do: know about registries or HTTP (remote sources come in as trait objects),
//! print, or exit the process.

mod fetch;
mod fs;
mod window;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hb_core::{ChunkId, LayerIndex};

pub use fetch::{FetchError, FetchStats, Fetcher, StatsSnapshot, LATENCY_BUCKETS_MS};
pub use fs::FsOptions;

/// What to fetch in the background after mounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefetch {
    None,
    /// The image's recorded start-up order.
    #[default]
    Startup,
    /// The start-up order, then every other chunk.
    All,
}

impl std::str::FromStr for Prefetch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Prefetch::None),
            "startup" => Ok(Prefetch::Startup),
            "all" => Ok(Prefetch::All),
            _ => Err(format!("unknown prefetch mode {s:?} (none, startup or all)")),
        }
    }
}

/// Chooses what a first start without a recorded order will read first (a program, its loader
/// and libraries), reading what it needs through the fetcher, and hands each set of chunks to
/// `fetch` as soon as it knows it: they are claimed at once (their readers wait for them) and
/// fetched in the background, several batches at once.
/// `stop` is set when the mount ends: the guess returns soon after.
pub trait StartupGuess: Send + Sync {
    fn guess(&self, fetcher: &Fetcher, fetch: &(dyn Fn(&[ChunkId]) + Sync), stop: &AtomicBool);
}

/// A [`StartupGuess`] in [`MountOptions`].
#[derive(Clone)]
pub struct Guess(pub Arc<dyn StartupGuess>);

impl std::fmt::Debug for Guess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guess")
    }
}

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub fs: FsOptions,
    /// FUSE worker threads (reads that wait for the network do not block other requests).
    pub threads: usize,
    pub prefetch: Prefetch,
    /// The recorded start-up order (may be empty).
    pub startup: Vec<ChunkId>,
    /// Every chunk the image needs, in the order worth fetching them (for [`Prefetch::All`]).
    pub all: Vec<ChunkId>,
    /// Cap on background fetching, bytes per second.
    pub bandwidth: Option<u64>,
    /// What to fetch first when there is no start-up order (not under a bandwidth cap).
    pub guess: Option<Guess>,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mount point {0} is not a directory")]
    NotADirectory(PathBuf),
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> MountError {
    move |source| MountError::Io { context, source }
}

/// A live mount. Dropping it without [`Mounted::wait`] unmounts.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    fetcher: Arc<Fetcher>,
    passthrough: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    prefetcher: Option<JoinHandle<()>>,
    prefetched: Arc<AtomicBool>,
}

/// Mounts `index` (a merged image tree) at `dir`, reading chunks through `fetcher`. A stale
/// mount left at `dir` by a dead process is detached first.
pub fn mount(
    index: Arc<LayerIndex>,
    fetcher: Arc<Fetcher>,
    dir: &Path,
    opts: MountOptions,
) -> Result<Mounted, MountError> {
    if clean_stale(dir)? {
        tracing::warn!(dir = %dir.display(), "detached a stale hb mount left by a dead process");
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(MountError::NotADirectory(dir.to_path_buf())),
        Err(e) => return Err(MountError::Io { context: format!("mount point {}", dir.display()), source: e }),
    }
    let passthrough = Arc::new(AtomicBool::new(false));
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("hb:{}", opts.fs.image)),
        fuser::MountOption::Subtype("hb".into()),
        fuser::MountOption::RO,
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Suid,
        fuser::MountOption::Dev,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    // The start-up order's chunks are claimed before the first read can come: a reader of one
    // waits for the prefetch (a while) instead of fetching it (and its window) again. Not under a
    // bandwidth cap: capped background work must not hold up reads.
    let claim_first = opts.prefetch != Prefetch::None && fetcher.has_remote() && opts.bandwidth.is_none();
    let claimed = if claim_first {
        fetcher.claim(&opts.startup).map_err(|e| MountError::Io {
            context: "claiming the start-up order".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    } else {
        Vec::new()
    };
    let fs = fs::ImageFs::new(index, fetcher.clone(), opts.fs.clone(), passthrough.clone());
    let session = fuser::Session::new(fs, dir, &config)
        .and_then(fuser::Session::spawn)
        .map_err(io_err(format!("mounting FUSE at {}", dir.display())))?;
    let stop = Arc::new(AtomicBool::new(false));
    let prefetched = Arc::new(AtomicBool::new(false));
    let prefetcher = if opts.prefetch != Prefetch::None && fetcher.has_remote() {
        let (f, stop, o, done) = (fetcher.clone(), stop.clone(), opts.clone(), prefetched.clone());
        Some(
            std::thread::Builder::new()
                .name("hb-prefetch".into())
                .spawn(move || {
                    prefetch(&f, &o, claim_first.then_some(claimed), &stop);
                    done.store(true, Ordering::SeqCst);
                })
                .map_err(io_err("starting the prefetch thread".into()))?,
        )
    } else {
        prefetched.store(true, Ordering::SeqCst);
        None
    };
    Ok(Mounted {
        session: Some(session),
        mountpoint: dir.to_path_buf(),
        fetcher,
        passthrough,
        stop,
        prefetcher,
        prefetched,
    })
}

/// Batches of the start-up order in flight at once.
const STARTUP_BATCHES_IN_FLIGHT: usize = 4;
/// Chunks per background batch (the source coalesces neighbours into ranges).
const BATCH: usize = 64;
/// The start-up chunks in flight at once: within such a window, fetching in the order the
/// bytes lie in the data blobs beats the order they are read in (neighbours in one run, no
/// chunk bridged twice by two batches); see `RangeSource::by_position`.
pub const STARTUP_WINDOW: usize = STARTUP_BATCHES_IN_FLIGHT * BATCH;

/// Fetches the start-up order's `claimed` chunks in order, [`STARTUP_BATCHES_IN_FLIGHT`] batches
/// at once, without yielding to reads (they wait for these chunks); returns chunks and bytes.
/// Only without a bandwidth cap (under one nothing is claimed: see [`mount`]).
fn prefetch_claimed(f: &Fetcher, claimed: &[ChunkId], stop: &AtomicBool) -> (usize, u64) {
    let batches: Vec<&[ChunkId]> = claimed.chunks(BATCH).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (chunks, bytes) = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..STARTUP_BATCHES_IN_FLIGHT.min(batches.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(batch) = batches.get(i) else { return };
                fetch_batch(f, batch, stop, &chunks, &bytes);
            });
        }
    });
    (chunks.into_inner() as usize, bytes.into_inner())
}

/// Fetches one claimed batch of the start-up set (gives it back unfetched once `stop` is set),
/// adding to the counts.
fn fetch_batch(
    f: &Fetcher,
    batch: &[ChunkId],
    stop: &AtomicBool,
    chunks: &std::sync::atomic::AtomicU64,
    bytes: &std::sync::atomic::AtomicU64,
) {
    if stop.load(Ordering::Relaxed) {
        return f.unclaim(batch);
    }
    match f.fetch_claimed(batch) {
        Ok((n, b)) => {
            chunks.fetch_add(n as u64, Ordering::Relaxed);
            bytes.fetch_add(b, Ordering::Relaxed);
        }
        // Its chunks went back to their readers, who fetch them with their own retries.
        Err(e) => tracing::warn!(error = %e, "a start-up prefetch batch failed"),
    }
}

/// Runs `guess` and fetches what it names as it names it: each set claimed at once, then fetched
/// [`STARTUP_BATCHES_IN_FLIGHT`] batches at once, first named first.
fn prefetch_guessed(f: &Fetcher, guess: &Guess, stop: &AtomicBool) -> (usize, u64) {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<ChunkId>>();
    let rx = std::sync::Mutex::new(rx);
    let (chunks, bytes) = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..STARTUP_BATCHES_IN_FLIGHT {
            s.spawn(|| loop {
                let Ok(batch) = rx.lock().expect("guess queue lock").recv() else { return };
                fetch_batch(f, &batch, stop, &chunks, &bytes);
            });
        }
        let tx = std::sync::Mutex::new(tx);
        let fetch = |ids: &[ChunkId]| {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            f.mark_guessed(ids);
            match f.claim(ids) {
                Ok(mine) => {
                    let tx = tx.lock().expect("guess queue lock");
                    for batch in mine.chunks(BATCH) {
                        if tx.send(batch.to_vec()).is_err() {
                            f.unclaim(batch);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not claim a guessed start-up set"),
            }
        };
        guess.0.guess(f, &fetch, stop);
        drop(tx);
    });
    (chunks.into_inner() as usize, bytes.into_inner())
}

/// Background fetch: the start-up order first (its `claimed` chunks at once, or under a
/// bandwidth cap like the rest), then (with [`Prefetch::All`]) the rest, yielding to on-demand
/// reads and keeping under the cap.
fn prefetch(f: &Fetcher, o: &MountOptions, claimed: Option<Vec<ChunkId>>, stop: &AtomicBool) {
    let started = Instant::now();
    let (mut chunks, mut bytes) = match (&claimed, &o.guess) {
        (Some(_), Some(g)) if o.startup.is_empty() => prefetch_guessed(f, g, stop),
        (Some(c), _) => prefetch_claimed(f, c, stop),
        (None, _) => (0, 0),
    };
    let mut lists: Vec<&[ChunkId]> = Vec::new();
    if claimed.is_none() && o.prefetch != Prefetch::None {
        lists.push(&o.startup);
    }
    if o.prefetch == Prefetch::All {
        lists.push(&o.all);
    }
    for list in lists {
        // Batches of up to 64 chunks; the source coalesces neighbours into ranges.
        for batch in list.chunks(BATCH) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let mut waited = 0;
            while f.busy() && waited < 200 {
                std::thread::sleep(Duration::from_millis(2));
                waited += 1;
            }
            if let Some(cap) = o.bandwidth.filter(|c| *c > 0) {
                let due = Duration::from_secs_f64(bytes as f64 / cap as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            match f.prefetch(batch) {
                Ok((n, b)) => {
                    chunks += n;
                    bytes += b;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "prefetch stopped");
                    return;
                }
            }
        }
    }
    tracing::info!(chunks, bytes, secs = started.elapsed().as_secs_f64(), "prefetch finished");
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// True when the kernel accepted FUSE passthrough for this mount.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// Becomes true once the background prefetch has finished (or at once if there is none).
    pub fn prefetch_done(&self) -> Arc<AtomicBool> {
        self.prefetched.clone()
    }

    /// Blocks until the filesystem is unmounted (by [`unmount`], `umount` or the kernel), then
    /// stops background work and writes every fetched chunk to the store.
    pub fn wait(mut self) -> Result<(), MountError> {
        let session = self.session.take().expect("present until wait");
        let out = session.join().map_err(io_err(format!("serving {}", self.mountpoint.display())));
        self.finish();
        out
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.prefetcher.take() {
            let _ = h.join();
        }
        self.fetcher.shutdown();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                tracing::warn!(dir = %self.mountpoint.display(), error = %e, "unmount failed");
            }
            self.finish();
        }
    }
}

/// Unmounts an hb mount at `dir`. A busy mount is detached (it goes away when its last user
/// does); a stale one (its process died) likewise.
pub fn unmount(dir: &Path) -> Result<(), MountError> {
    use rustix::mount::{unmount as umount2, UnmountFlags};
    match umount2(dir, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) | Err(rustix::io::Errno::NOTCONN) => {
            umount2(dir, UnmountFlags::DETACH).map_err(|e| io_err(format!("detaching {}", dir.display()))(e.into()))
        }
        Err(e) => Err(io_err(format!("unmounting {}", dir.display()))(e.into())),
    }
}

/// Detaches a FUSE mount at `dir` whose server is gone (every access fails with ENOTCONN).
/// Returns true if there was one.
pub fn clean_stale(dir: &Path) -> Result<bool, MountError> {
    // statfs always asks the server (getattr may be answered from the kernel's cache).
    match rustix::fs::statfs(dir) {
        Err(rustix::io::Errno::NOTCONN | rustix::io::Errno::CONNABORTED) => {
            rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH)
                .map_err(|e| io_err(format!("detaching stale mount {}", dir.display()))(e.into()))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// True when `dir` is the root of a mount: the kernel's `STATX_ATTR_MOUNT_ROOT` (Linux 5.8+; one
/// system call), else /proc/self/mountinfo (also for a mount whose FUSE server is gone, which
/// `statx` cannot reach).
pub fn is_mountpoint(dir: &Path) -> bool {
    use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
    if let Ok(st) = statx(CWD, dir, AtFlags::empty(), StatxFlags::empty()) {
        if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
            return st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
        }
    }
    let Ok(canon) = std::fs::canonicalize(dir) else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|p| unescape_mountinfo(p) == canon.as_os_str().to_string_lossy()))
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_roots_are_told_from_plain_folders() {
        assert!(is_mountpoint(Path::new("/")));
        assert!(is_mountpoint(Path::new("/proc")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mountpoint(dir.path()));
        assert!(!is_mountpoint(&dir.path().join("missing")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
    }
}
