//! Image mounts: an image's rootfs as a lazy FUSE mount over the store and the image's chunk
//! sources ([`crate::sources`]), the process that serves one until it is unmounted,
//! its pid file and figures, and `hb umount`'s wait for it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hb_core::{ChunkSource, Digest, StartupOrder};
use hb_fuse::{FsOptions, MountOptions, Prefetch};
use hb_store::Store;
use indicatif::HumanBytes;

use crate::sources::{sources, wire, Known, Sources};
use crate::{find_image, require_image, ImagesError, Registries, Reporter, Result};

/// How `hb mount` was asked to mount.
pub struct MountArgs {
    pub image: String,
    /// Pull (when missing, or stored for another platform) this platform [default: this
    /// machine's].
    pub platform: Option<hb_registry::Platform>,
    pub dir: PathBuf,
    pub prefetch: Prefetch,
    pub bandwidth: Option<u64>,
    pub passthrough: bool,
    pub threads: usize,
    pub plain_http: bool,
    /// Only the image's first N layers (a containerd snapshot chain's lower part).
    pub layers: Option<usize>,
    /// Record the order of first reads when the image has none and starts cold, and keep it
    /// ([`Learner`]); `hb optimize` records on its own.
    pub learn: bool,
    /// `hb run`'s options where they change what the container runs (`--entrypoint`, arguments,
    /// `-w`, `-e`): without an order, that program's files are fetched first. None: the image's.
    pub command: Option<hb_runtime::RunOptions>,
}

/// The tracing target of a cold start's phases (resolve, index fetch, mount, rootfs, runtime,
/// reads): `HB_LOG=hb::phase=debug` shows them with their times.
pub const PHASE: &str = "hb::phase";

/// How long a cold start is watched to learn its start-up order.
pub const LEARN_FOR: Duration = Duration::from_secs(10);

/// Keeps a learned start-up order where this process cannot write it itself (the daemon owns the
/// store); the keeper checks it and keeps the first one for an image.
pub trait OrderKeeper: Send + Sync {
    fn keep_order(&self, manifest: &Digest, order: &StartupOrder) -> std::result::Result<(), String>;
}

/// Learns an image's start-up order on its first cold start: records the chunks its mount reads
/// first, for [`LEARN_FOR`] or until the mount ends, then keeps them as the image's order (in the
/// store, or through an [`OrderKeeper`]). The next cold start of the image prefetches them, with
/// no build step (`hb optimize` remains for publishers).
pub struct Learner {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Learner {
    fn start(
        fetcher: Arc<hb_fuse::Fetcher>,
        store: Arc<Store>,
        manifest: Digest,
        keeper: Option<Arc<dyn OrderKeeper>>,
        offer_to: Vec<Arc<hb_registry::RangeSource>>,
    ) -> Learner {
        fetcher.start_recording();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hb-learn".into())
            .spawn(move || {
                let _ = rx.recv_timeout(LEARN_FOR);
                let order = StartupOrder { chunks: fetcher.take_recording() };
                if order.chunks.is_empty() {
                    return;
                }
                let kept = if store.is_writable() {
                    crate::pull::keep_first_order(&store, &manifest, &order.encode())
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    match &keeper {
                        Some(k) => k.keep_order(&manifest, &order),
                        None => Err("the store is read-only and no daemon keeps it".into()),
                    }
                };
                match kept {
                    Ok(()) => {
                        tracing::info!(image = %manifest, chunks = order.chunks.len(), "learned the start-up order")
                    }
                    Err(e) => {
                        tracing::warn!(image = %manifest, error = %e, "could not keep the learned start-up order")
                    }
                }
                // An hb mirror the chunks came from keeps it for its later clients (the first
                // client's order serves the rest; no push rights to the upstream needed).
                let raw = order.encode();
                for source in &offer_to {
                    match source.offer_startup(&manifest, &raw) {
                        Ok(kept) => {
                            tracing::info!(image = %manifest, kept, "offered the learned start-up order to the mirror");
                            break;
                        }
                        Err(hb_registry::RegistryError::NotFound { .. }) => {
                            tracing::debug!(image = %manifest, "the registry keeps no start-up orders (not an hb mirror)")
                        }
                        Err(e) => {
                            tracing::warn!(image = %manifest, error = %e, "offering the learned start-up order failed")
                        }
                    }
                }
            })
            .ok();
        Learner { stop: Some(tx), thread }
    }
}

impl Drop for Learner {
    /// Ends learning now (the mount is going) and keeps what was recorded.
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the process serving `dir` records its pid (and, in the background, its log).
pub fn run_file(root: &Path, dir: &Path, ext: &str) -> PathBuf {
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let h = blake3::hash(canon.as_os_str().as_encoded_bytes()).to_hex();
    root.join("run").join(format!("mount-{}.{ext}", &h[..16]))
}

/// Whether `image` must be pulled before it is mounted: the store lacks it, or holds it for
/// another platform than `platform` (when one is asked for; as docker pulls then).
pub fn needs_pull(store: &Store, image: &str, platform: Option<&hb_registry::Platform>) -> Result<bool> {
    let Some((_, digest)) = find_image(store, image)? else { return Ok(true) };
    let Some(want) = platform else { return Ok(false) };
    let Some(rec) = store.image(&digest)? else { return Ok(true) };
    let parts: Vec<&str> = rec.platform.split('/').collect();
    Ok(match parts[..] {
        [os, arch] => !want.matches(os, arch, None),
        [os, arch, variant] => !want.matches(os, arch, Some(variant)),
        _ => true,
    })
}

/// What a pull for a mount hands on to that mount in the same process: the registry client (its
/// connections and authorization, for the lazy layers' reads) and the indexes it imported
/// (decoded and verified already: the mount need not read them back from the store).
#[derive(Default)]
pub struct Pulled {
    pub known: Known,
    pub indexes: Vec<hb_core::LayerIndex>,
}

/// Pulls an image `hb mount` was asked for and the store lacks: lazily when it has an
/// accelerated form, else whole (as `docker run` pulls what it lacks).
/// Returns the registry client used, to read chunks with, and the indexes a lazy pull imported.
pub fn pull_for_mount(
    registries: &dyn Registries,
    rt: &tokio::runtime::Runtime,
    store: &Arc<Store>,
    image: &str,
    plain_http: bool,
    platform: Option<&hb_registry::Platform>,
    reporter: &dyn Reporter,
) -> Result<Pulled> {
    let r = hb_registry::ImageRef::parse(image)?;
    let creds = registries.credentials(r.registry())?;
    let eps = registries.endpoints(&r, plain_http, creds, platform.cloned().unwrap_or_default())?;
    let (registry, resolved) = crate::pull::resolve(rt, eps)?;
    tracing::debug!(target: PHASE, "resolved");
    if resolved.accelerated.is_some() {
        let registry = Arc::new(registry);
        let key = format!("{}/{}", resolved.reference.host(), resolved.reference.repository());
        let mut report =
            crate::pull::pull_lazy(rt, store.clone(), registry.clone(), resolved, registries.blob_peers())?;
        tracing::debug!(target: PHASE, layers = report.layers_lazy, bytes = report.bytes_downloaded, "indexes fetched");
        reporter.note(&crate::pull::lazy_summary(&report));
        return Ok(Pulled { known: Some((key, registry)), indexes: std::mem::take(&mut report.indexes) });
    } else {
        reporter.note(&format!("{image} has no accelerated form (`hb convert` makes one); pulling it whole"));
        let origin = crate::delta::Origin { registries, plain_http, registry: Arc::new(registry) };
        let report = crate::pull::pull(rt, store.clone(), origin, resolved, reporter)?;
        reporter.note(&crate::pull::summary(&report));
    }
    Ok(Pulled::default())
}

/// A mounted image and what it reads from.
pub struct Mount {
    pub name: String,
    pub mounted: hb_fuse::Mounted,
    pub ranges: Vec<Arc<hb_registry::RangeSource>>,
    pub lazy_layers: usize,
    pub layers: Vec<Digest>,
    /// Learning this start's order, when it is the image's first cold start. Drop it before the
    /// runtime the mount was made with: it offers the order to a mirror on that runtime.
    pub learner: Option<Learner>,
}

/// Mounts image `args.image` from the store at `args.dir`.
///
/// `daemon` is the daemon as a chunk tier, for a process whose store is a read-only view of a
/// store the daemon owns: it is asked first and keeps what comes from below it. `pulled` is what
/// a pull of the image in this process (on `rt`) handed on, if one just ran.
#[allow(clippy::too_many_arguments)]
pub fn mount_image(
    registries: &dyn Registries,
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    args: &MountArgs,
    daemon: Option<Arc<dyn ChunkSource>>,
    keeper: Option<Arc<dyn OrderKeeper>>,
    shutdown: Option<&crate::shutdown::Shutdown>,
    pulled: Option<Pulled>,
    reporter: &dyn Reporter,
) -> Result<Mount> {
    let Pulled { known, indexes: handed } = if needs_pull(&store, &args.image, args.platform.as_ref())? {
        pull_for_mount(registries, rt, &store, &args.image, args.plain_http, args.platform.as_ref(), reporter)?
    } else {
        pulled.unwrap_or_default()
    };
    let (name, digest, rec) = require_image(&store, &args.image)?;
    tracing::debug!(target: PHASE, "image found");
    let mut layers: Vec<Digest> = rec.layers.iter().map(|l| l.diff_id).collect();
    if let Some(n) = args.layers {
        if n == 0 || n > layers.len() {
            return Err(ImagesError::Invalid(format!(
                "{name} has {} layers; cannot mount the first {n}",
                layers.len()
            )));
        }
        layers.truncate(n);
    }
    let indexes = indexes_of(&store, &layers, handed)?;
    tracing::debug!(target: PHASE, layers = indexes.len(), "indexes read");
    // The merge and the sources (each ~10 ms on py-app's 12,798 entries) are independent: side by
    // side, on the path of every mount server's start.
    let (merged, sources) = std::thread::scope(|s| {
        let merging = s.spawn(|| {
            let merged = Arc::new(hb_core::merge_layers_to_serve(store.chunker(), indexes.iter()));
            tracing::debug!(target: PHASE, entries = merged.entries.len(), "layers merged");
            merged
        });
        let sources = sources(registries, rt, &store, &layers, known, args.plain_http, daemon);
        tracing::debug!(target: PHASE, "sources ready");
        (merging.join().expect("the merge does not panic"), sources)
    });
    let sources = sources?;
    let startup = usable_order(store.aux(&crate::pull::startup_key(&digest))?.as_deref(), &indexes, &name);
    let learn = args.learn && startup.is_empty() && sources.lazy_layers > 0;
    let all = sources.all_chunks();
    let Sources { chain, ranges, lazy_layers } = sources;
    // What is fetched at once goes in the order its bytes lie (fewer, longer ranges; on loopback
    // 7-17 % sooner to first output and 12-20 % fewer bytes than in read order).
    let startup = match ranges.last() {
        Some(r) => r.by_position(&startup, hb_fuse::STARTUP_WINDOW),
        None => startup,
    };
    let fetcher = hb_fuse::Fetcher::new(store.clone(), chain, Duration::from_secs(120));
    if learn {
        // From the first read on, the guessed set's claims included (the learner goes on with it).
        fetcher.start_recording();
    }
    // Without a recorded order, the image's command's program, loader and libraries come first.
    // Not for the lower layers alone (a containerd snapshot chain's part): nothing runs on them.
    let whole = args.layers.is_none_or(|n| n == rec.layers.len());
    let guess = hb_runtime::ImageConfig::from_json(rec.config.as_bytes())
        .ok()
        .and_then(|image| crate::guess::Command::of_run(&image, &args.command.clone().unwrap_or_default()))
        .filter(|_| startup.is_empty() && lazy_layers > 0 && whole)
        .map(|c| hb_fuse::Guess(Arc::new(crate::guess::EntryGuess::new(merged.clone(), c))));
    let opts = MountOptions {
        fs: FsOptions { passthrough: args.passthrough, passthrough_min: 1 << 20, image: name.clone() },
        threads: args.threads,
        prefetch: args.prefetch,
        startup,
        all,
        bandwidth: args.bandwidth,
        guess,
    };
    let mount = || hb_fuse::mount(merged, fetcher, &args.dir, opts);
    let mounted = match shutdown {
        // The mount and its unmount on a signal are one step: no signal finds the one without the other.
        Some(s) => s.starting(mount, |m| {
            let dir = m.mountpoint().to_path_buf();
            Box::new(move |_| {
                if let Err(e) = hb_fuse::unmount(&dir) {
                    tracing::error!(dir = %dir.display(), error = %e, "unmount on signal failed");
                }
            })
        })?,
        None => mount()?,
    };
    tracing::debug!(target: PHASE, lazy_layers, "mounted");
    let learner =
        learn.then(|| Learner::start(mounted.fetcher().clone(), store.clone(), digest, keeper, ranges.clone()));
    Ok(Mount { name, mounted, ranges, lazy_layers, layers, learner })
}

/// The indexes of `layers`, in order: those a pull just `handed` on (for the layers it imported),
/// the others read from the store.
fn indexes_of(store: &Store, layers: &[Digest], handed: Vec<hb_core::LayerIndex>) -> Result<Vec<hb_core::LayerIndex>> {
    let mut handed: HashMap<Digest, hb_core::LayerIndex> = handed.into_iter().map(|i| (i.diff_id, i)).collect();
    let missing: Vec<Digest> = layers.iter().filter(|d| !handed.contains_key(d)).copied().collect();
    let mut read = crate::layer_indexes(store, &missing)?.into_iter();
    let mut out = Vec::with_capacity(layers.len());
    for (i, d) in layers.iter().enumerate() {
        let index = match handed.get(d) {
            // A layer an image holds twice: a copy for all but its last place.
            Some(_) if layers[i + 1..].contains(d) => handed[d].clone(),
            Some(_) => handed.remove(d).expect("present"),
            None => read.next().ok_or_else(|| ImagesError::Invalid(format!("layer {d} is missing")))?,
        };
        out.push(index);
    }
    Ok(out)
}

/// The start-up order kept for an image, as far as it can be used: an order that does not decode,
/// or names chunks the image does not have (it came from a learner, a proxy or a publisher, none
/// of which a mount trusts), is logged and set aside, and the mount starts without it.
fn usable_order(raw: Option<&[u8]>, indexes: &[hb_core::LayerIndex], image: &str) -> Vec<hb_core::ChunkId> {
    let Some(raw) = raw else { return Vec::new() };
    let order = match StartupOrder::decode(raw) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(%image, error = %e, "the kept start-up order is corrupt; starting without one");
            return Vec::new();
        }
    };
    if let Err(e) = order.check_within(indexes) {
        tracing::warn!(%image, error = %e, "the kept start-up order is not this image's; starting without it");
        return Vec::new();
    }
    order.chunks
}

/// The pid file of a mount's serving process, for `hb umount`, which waits for that process to
/// store what it fetched and exit. Written before the mount appears (so `hb umount` never finds
/// the mount without it), removed on drop, after the serving ended. Best effort: on a full disk
/// the mount serves without one, and says so.
pub struct PidFile(Option<PathBuf>);

impl PidFile {
    pub fn create(root: &Path, dir: &Path) -> PidFile {
        let path = run_file(root, dir, "pid");
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::write(&path, std::process::id().to_string()));
        match written {
            Ok(()) => PidFile(Some(path)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::warn!(file = %path.display(), error = %e, "cannot write the mount's pid file; `hb umount` will not wait for this process");
                PidFile(None)
            }
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serves a mount until it is unmounted (`hb umount`, or SIGINT or SIGTERM through the
/// [`crate::shutdown::Shutdown`] it was mounted with), then stores what was fetched and reports.
pub fn serve(store: &Store, m: Mount, reporter: &dyn Reporter) -> Result<()> {
    let dir = m.mounted.mountpoint().to_path_buf();
    reporter.note(&format!(
        "mounted {} at {} ({} lazy layers; passthrough {})",
        m.name,
        dir.display(),
        m.lazy_layers,
        if m.mounted.passthrough() { "on" } else { "off: reads go through FUSE" }
    ));
    let stats = m.mounted.fetcher().stats.clone();
    let passthrough = m.mounted.passthrough();
    let done = m.mounted.prefetch_done();
    let watch_stats = stats.clone();
    let stats_file = run_file(store.root(), &dir, "stats.json");
    let watch_ranges = m.ranges.clone();
    let watch_fetcher = m.mounted.fetcher().clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch_stop = stop.clone();
    // Reports the end of prefetching, and keeps the figures file current for `hb daemon`'s metrics.
    let fetcher = m.mounted.fetcher().clone();
    let result = std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut reported = false;
            let mut last = None;
            let mut ticks = 0u32;
            while !watch_stop.load(std::sync::atomic::Ordering::SeqCst) {
                ticks += 1;
                if ticks.is_multiple_of(20) {
                    crate::memory::release_free_memory();
                }
                if !reported && done.load(std::sync::atomic::Ordering::SeqCst) {
                    reported = true;
                    let s = watch_stats.snapshot();
                    reporter.note(&format!(
                        "prefetch finished: {} chunks, {}",
                        s.prefetched_chunks,
                        HumanBytes(s.remote_bytes)
                    ));
                }
                let s = watch_stats.snapshot();
                if last != Some(s) {
                    write_stats(&stats_file, &s, &watch_fetcher.sources(), &watch_ranges, passthrough);
                    last = Some(s);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let result = m.mounted.wait();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        result
    });
    let mut complete = 0;
    // A read-only view (the daemon holds the store) leaves completing layers to their next writer.
    for l in m.layers.iter().filter(|_| store.is_writable()) {
        if store.lazy_source(l)?.is_some() && store.complete_lazy_layer(l)? {
            complete += 1;
        }
    }
    let s = stats.snapshot();
    let (wire, http) = wire(&m.ranges);
    let tiers = fetcher.sources();
    drop(fetcher);
    // Where fetched chunks came from, when more than one tier could serve them.
    let from = if tiers.len() > 1 {
        let parts: Vec<String> = tiers.iter().map(|t| format!("{} {}", t.name, t.chunks)).collect();
        format!("; from {}", parts.join(", "))
    } else {
        String::new()
    };
    reporter.note(&format!(
        "unmounted {}: {} chunks local, {} fetched ({} on demand, {} prefetched; {} of file data, {} over the wire in {} requests{from}), {} errors{}",
        dir.display(),
        s.local_chunks,
        s.remote_chunks,
        s.remote_chunks - s.prefetched_chunks,
        s.prefetched_chunks,
        HumanBytes(s.remote_bytes),
        HumanBytes(wire),
        http,
        s.errors,
        if complete > 0 { format!("; {complete} layers now complete") } else { String::new() }
    ));
    // For scripts, benchmarks and the daemon's metrics: the figures above beside the pid file.
    write_stats(&run_file(store.root(), &dir, "stats.json"), &s, &tiers, &m.ranges, passthrough);
    // Last (the caller's `PidFile` goes after this): `hb umount` waits for this process.
    result?;
    Ok(())
}

/// A mount server's figures, written beside its pid file (`<root>/run/mount-<hash>.stats.json`)
/// and read by the daemon's metrics and by benchmarks.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MountStats {
    pub local_chunks: u64,
    pub remote_chunks: u64,
    pub local_bytes: u64,
    pub prefetched_chunks: u64,
    /// Uncompressed bytes of chunks fetched from the remote tiers.
    pub remote_bytes: u64,
    /// Compressed bytes received by Range requests, and the requests.
    pub wire_bytes: u64,
    pub requests: u64,
    pub errors: u64,
    pub fill_errors: u64,
    /// Remote fetches by latency ([`hb_fuse::LATENCY_BUCKETS_MS`], then the rest).
    pub fetch_latency_ms: Vec<u64>,
    pub fetch_latency_sum_ms: u64,
    pub passthrough: bool,
    /// Each remote tier (daemon, mirrors, registry), top first.
    pub sources: Vec<hb_core::TierStats>,
}

/// Writes a mount's figures as JSON (atomically: temp file + rename).
fn write_stats(
    path: &Path,
    s: &hb_fuse::StatsSnapshot,
    sources: &[hb_core::TierStats],
    ranges: &[Arc<hb_registry::RangeSource>],
    passthrough: bool,
) {
    let (wire_bytes, requests) = wire(ranges);
    let v = MountStats {
        local_chunks: s.local_chunks,
        remote_chunks: s.remote_chunks,
        local_bytes: s.local_bytes,
        prefetched_chunks: s.prefetched_chunks,
        remote_bytes: s.remote_bytes,
        wire_bytes,
        requests,
        errors: s.errors,
        fill_errors: s.fill_errors,
        fetch_latency_ms: s.fetch_latency.to_vec(),
        fetch_latency_sum_ms: s.fetch_latency_sum_ms,
        passthrough,
        sources: sources.to_vec(),
    };
    let tmp = path.with_extension("json.tmp");
    if serde_json::to_vec(&v).is_ok_and(|b| std::fs::write(&tmp, b).is_ok()) {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Runs `cmd` (an `hb mount` serving `dir`) as a process of its own (own process group, no
/// terminal, its stderr in `<root>/run/mount-<hash>.log`) and returns it once `dir` is mounted,
/// or the reason (its log) when it ends first or does not mount within 300 s.
pub fn start_server(
    cmd: &mut std::process::Command,
    root: &Path,
    dir: &Path,
) -> Result<(std::process::Child, PathBuf)> {
    let log = run_file(root, dir, "log");
    let child = spawn_server(cmd, &log, std::process::Stdio::null(), "starting the mount process")?;
    wait_mounted(child, log, dir)
}

/// Spawns `cmd` as a mount process of its own: own process group (no terminal's signals), its
/// stderr in `log` (made, with its folder), stdout nowhere.
fn spawn_server(
    cmd: &mut std::process::Command,
    log: &Path,
    stdin: std::process::Stdio,
    what: &str,
) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let folder = log.parent().expect("has a parent");
    std::fs::create_dir_all(folder).map_err(ImagesError::io(format!("creating {}", folder.display())))?;
    let log_file = std::fs::File::create(log).map_err(ImagesError::io(format!("creating {}", log.display())))?;
    cmd.stdin(stdin)
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .map_err(ImagesError::io(what.to_string()))
}

/// Waits for `child` (logging to `log`) to mount `dir`: the reason (its log) when it ends first
/// or does not mount within 300 s.
fn wait_mounted(mut child: std::process::Child, log: PathBuf, dir: &Path) -> Result<(std::process::Child, PathBuf)> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(ImagesError::io("waiting for the mount process"))? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(ImagesError::Invalid(format!(
                "the mount process for {} exited ({status}):\n{}",
                dir.display(),
                text.trim_end()
            )));
        }
        if hb_fuse::is_mountpoint(dir) {
            return Ok((child, log));
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            return Err(ImagesError::Invalid(format!(
                "the mount process did not mount {} within 300 s (log {})",
                dir.display(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A mount server started ahead of need (`hb-engine mount-standby`): running, its libraries
/// loaded, waiting on its stdin for the arguments of the `hb mount` it is to be. What a start
/// costs before a mount server does anything of its own (exec, the loader, its settings: ~25-30
/// ms from a cold page cache) is then paid before the start that needs it.
pub struct Standby {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    log: PathBuf,
}

impl Standby {
    /// Starts `cmd` (an `hb-engine mount-standby`) as [`start_server`] starts a server, its
    /// stderr in `<root>/run/standby.log` until it is given its mount (one standby per store).
    pub fn start(cmd: &mut std::process::Command, root: &Path) -> Result<Standby> {
        let log = root.join("run").join("standby.log");
        let mut child = spawn_server(cmd, &log, std::process::Stdio::piped(), "starting a standby mount process")?;
        let stdin = child.stdin.take().expect("stdin is piped");
        Ok(Standby { child, stdin, log })
    }

    /// Makes it `hb mount ARGS` serving `dir` (its log becomes the mount's) and returns it once
    /// `dir` is mounted, as [`start_server`] does; None when it had ended before it was asked
    /// (nothing was asked of it: start a server the usual way).
    pub fn serve(mut self, root: &Path, dir: &Path, args: &[String]) -> Result<Option<(std::process::Child, PathBuf)>> {
        use std::io::Write;
        let gone = |mut child: std::process::Child, log: &Path| {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(log);
            Ok(None)
        };
        match self.child.try_wait() {
            Ok(None) => {}
            ended => {
                let said = std::fs::read_to_string(&self.log).unwrap_or_default();
                tracing::warn!(status = ?ended, log = %said.trim_end(), "the standby mount process had ended; starting a server instead");
                return gone(self.child, &self.log);
            }
        }
        let log = run_file(root, dir, "log");
        if let Err(e) = std::fs::rename(&self.log, &log) {
            tracing::warn!(error = %e, log = %log.display(), "cannot move a standby mount process's log; starting another");
            return gone(self.child, &self.log);
        }
        let line = serde_json::to_string(args).expect("strings serialize") + "\n";
        if self.stdin.write_all(line.as_bytes()).is_err() {
            return gone(self.child, &log);
        }
        drop(self.stdin);
        wait_mounted(self.child, log, dir).map(Some)
    }
}

/// A standby mount process's job, read from `input`: the arguments of the `hb mount` it is to
/// be (one JSON line, an array of strings); None when its daemon went away first.
pub fn standby_job(mut input: impl std::io::BufRead) -> Result<Option<Vec<String>>> {
    let mut line = String::new();
    let n = input.read_line(&mut line).map_err(ImagesError::io("reading a standby mount's arguments"))?;
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| ImagesError::Invalid(format!("a standby mount's arguments are not a JSON list of strings: {e}")))
}

/// Unmounts `dir` and waits for the process that served it to store what it fetched and exit.
pub fn umount(root: &Path, dir: &Path, reporter: &dyn Reporter) -> Result<()> {
    let pid_file = run_file(root, dir, "pid");
    // Read before unmounting: the serving process removes the file as it finishes, and it still
    // holds the store until it has exited.
    let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok());
    let stale = hb_fuse::clean_stale(dir)?;
    if stale {
        reporter.note(&format!("detached a stale mount at {} (its process had died)", dir.display()));
    } else if hb_fuse::is_mountpoint(dir) {
        hb_fuse::unmount(dir)?;
    } else {
        return Err(ImagesError::Invalid(format!("{} is not mounted", dir.display())));
    }
    let Some(pid) = pid else { return Ok(()) };
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let exited = || {
        // A zombie (our own child in tests) has exited already.
        !proc_dir.exists() || std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|s| s.contains(") Z "))
    };
    let started = Instant::now();
    let mut told = false;
    while !exited() {
        if !told && started.elapsed() > Duration::from_secs(10) {
            told = true;
            reporter.note(&format!(
                "waiting for the mount process (pid {pid}) to store what it fetched and exit; it serves on while \
                 something still uses the mount (an overlay over it, a process inside, a copy in another mount namespace)"
            ));
        }
        if started.elapsed() > UMOUNT_WAIT {
            return Err(ImagesError::Invalid(format!(
                "{} is detached, but its mount process (pid {pid}) still serves it after {} s: something still \
                 uses the mount (an overlay over it, a process inside, a copy in another mount namespace); \
                 it exits when they are gone",
                dir.display(),
                UMOUNT_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

/// How long `hb umount` waits for the serving process to finish.
const UMOUNT_WAIT: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    /// A pull's indexes are taken as handed on (a layer held twice gets a copy for each place),
    /// the others read from the store, in the image's layer order; one found nowhere is an error.
    #[test]
    fn a_mount_takes_the_indexes_a_pull_handed_on_and_reads_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        let layer = |name: &str, body: &[u8]| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, body).unwrap();
            let tar = b.into_inner().unwrap();
            store.import_layer(&tar[..], &hb_store::NoProgress).unwrap().diff_id
        };
        let (a, b) = (layer("a", b"one"), layer("b", b"two"));
        let stored = |d: Digest| crate::layer_indexes(&store, &[d]).unwrap().remove(0);
        // Told apart from the stored one: the handed index lost its chunk list.
        let mut handed = stored(a);
        handed.chunks.clear();
        assert_ne!(handed, stored(a));
        let got = indexes_of(&store, &[a, b, a], vec![handed.clone()]).unwrap();
        assert_eq!(got, vec![handed.clone(), stored(b), handed]);
        assert_eq!(indexes_of(&store, &[b, a], Vec::new()).unwrap(), vec![stored(b), stored(a)]);
        let absent = Digest::of(b"no such layer");
        let err = indexes_of(&store, &[a, absent], Vec::new()).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn a_standby_reads_one_json_line_of_arguments_and_nothing_when_its_daemon_is_gone() {
        let line = b"[\"reg/app:v1\",\"/var/lib/hb/images/ab\",\"--layers\",\"2\"]\n[\"ignored\"]\n";
        let args = standby_job(&line[..]).unwrap().unwrap();
        assert_eq!(args, ["reg/app:v1", "/var/lib/hb/images/ab", "--layers", "2"]);
        assert_eq!(standby_job(&b""[..]).unwrap(), None, "stdin closed: no job");
        let err = standby_job(&b"{\"image\": 1}\n"[..]).unwrap_err().to_string();
        assert!(err.contains("not a JSON list of strings"), "{err}");
    }
}
