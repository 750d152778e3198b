//! `hb mount` / `hb umount`: an image's rootfs as a lazy FUSE mount, served by this process
//! (in the foreground, or in a background child with `--background`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hb_core::{ChunkId, ChunkSource, Digest, StartupOrder};
use hb_fuse::{FsOptions, MountOptions, Prefetch};
use hb_store::Store;
use indicatif::HumanBytes;

use crate::output::Out;
use crate::Global;

/// How `hb mount` was asked to mount.
pub struct MountArgs {
    pub image: String,
    pub dir: PathBuf,
    pub prefetch: Prefetch,
    pub bandwidth: Option<u64>,
    pub passthrough: bool,
    pub threads: usize,
    pub plain_http: bool,
    /// Only the image's first N layers (a containerd snapshot chain's lower part).
    pub layers: Option<usize>,
}

/// Key of an image's recorded start-up order in the store's auxiliary records.
pub fn startup_key(manifest: &Digest) -> String {
    format!("startup/{manifest}")
}

/// Where the process serving `dir` records its pid (and, in the background, its log).
pub fn run_file(root: &Path, dir: &Path, ext: &str) -> PathBuf {
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let h = blake3::hash(canon.as_os_str().as_encoded_bytes()).to_hex();
    root.join("run").join(format!("mount-{}.{ext}", &h[..16]))
}

/// The remote tiers of a mount, assembled in one place: the daemon (when this process reads a
/// store the daemon owns), each mirror hosts.toml names for the layers' registries, then the
/// registries themselves. New tiers (LAN peers) go in here.
pub struct Sources {
    pub chain: hb_core::SourceChain,
    /// The Range readers among the tiers (mirrors and registries), for wire figures.
    pub ranges: Vec<Arc<hb_registry::RangeSource>>,
    /// Layers with chunks to fetch.
    pub lazy_layers: usize,
}

/// Compressed bytes received and Range requests made by `ranges`.
pub fn wire(ranges: &[Arc<hb_registry::RangeSource>]) -> (u64, u64) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    ranges.iter().fold((0, 0), |(b, r), s| (b + load(&s.bytes), r + load(&s.requests)))
}

impl Sources {
    /// Every chunk the lazy layers name, blob by blob (for a full prefetch).
    pub fn all_chunks(&self) -> Vec<ChunkId> {
        self.ranges.last().map(|r| r.all_chunks()).unwrap_or_default()
    }
}

/// A client already connected to `host/repository`, reused for that repository's reads.
pub type Known = Option<(String, Arc<hb_registry::Registry>)>;

/// Assembles the chunk sources of a mount of `layers` (see [`Sources`]).
pub fn sources(
    g: &Global,
    rt: &tokio::runtime::Runtime,
    store: &Store,
    layers: &[Digest],
    known: Known,
    plain_http: bool,
    daemon: Option<Arc<crate::api::Client>>,
) -> anyhow::Result<Sources> {
    let mut lazy = Vec::new();
    for l in layers {
        if let Some(s) = store.lazy_source(l)? {
            lazy.push(s);
        }
    }
    let mut chain = hb_core::SourceChain::new();
    if let Some(client) = daemon {
        chain.push("hb daemon", Arc::new(DaemonSource { client }));
    }
    let mut ranges = Vec::new();
    if !lazy.is_empty() {
        // Each layer's endpoints: its registry's mirrors, then the registry.
        let mut tiers: Vec<(String, Vec<hb_core::LazySource>)> = Vec::new();
        let mut endpoints: std::collections::HashMap<String, crate::pull::Endpoint> = Default::default();
        for l in &lazy {
            let r = hb_registry::ImageRef::parse(&l.repository)?;
            let creds = crate::config::docker_credentials(r.registry()).unwrap_or(None);
            for ep in crate::endpoints(g, &r, plain_http, creds, hb_registry::Platform::default())? {
                match tiers.iter_mut().find(|(n, _)| *n == ep.name) {
                    Some((_, ls)) => ls.push(l.clone()),
                    None => tiers.push((ep.name.clone(), vec![l.clone()])),
                }
                endpoints.entry(format!("{}|{}", ep.name, l.repository)).or_insert(ep);
            }
        }
        // Mirrors above registries, each in the order first named.
        tiers.sort_by_key(|(n, _)| !n.starts_with("mirror "));
        for (name, ls) in tiers {
            let src = hb_registry::RangeSource::new(rt.handle().clone(), &ls, |r| {
                let repo = format!("{}/{}", r.registry(), r.repository());
                let ep = endpoints.remove(&format!("{name}|{repo}")).expect("an endpoint per tier and repository");
                let reference = ep.reference;
                if let Some((known_repo, reg)) = &known {
                    if *known_repo == format!("{}/{}", reference.host(), r.repository()) {
                        return Ok((reg.clone(), reference));
                    }
                }
                hb_registry::Registry::new(&reference, ep.opts).map(|reg| (Arc::new(reg), reference))
            })?;
            let src = Arc::new(src);
            chain.push(name, src.clone());
            ranges.push(src);
        }
    }
    Ok(Sources { chain, ranges, lazy_layers: lazy.len() })
}

/// Pulls an image `hb mount` was asked for and the store lacks: lazily when it has an
/// accelerated form, else whole (as `docker run` pulls what it lacks).
/// Returns the registry client used, to read chunks with.
pub(crate) fn pull_for_mount(
    g: &Global,
    rt: &tokio::runtime::Runtime,
    store: &Arc<Store>,
    image: &str,
    plain_http: bool,
    out: &Out,
) -> anyhow::Result<Known> {
    let r = hb_registry::ImageRef::parse(image)?;
    let creds = crate::config::docker_credentials(r.registry())?;
    let eps = crate::endpoints(g, &r, plain_http, creds, hb_registry::Platform::default())?;
    let (registry, resolved) = crate::pull::resolve(rt, eps)?;
    if resolved.accelerated.is_some() {
        let registry = Arc::new(registry);
        let key = format!("{}/{}", resolved.reference.host(), resolved.reference.repository());
        let report = crate::pull::pull_lazy(rt, store.clone(), registry.clone(), resolved)?;
        crate::pull::print_lazy_report(out, &report);
        return Ok(Some((key, registry)));
    } else {
        out.note(format!("{image} has no accelerated form (`hb convert` makes one); pulling it whole"));
        let report = crate::pull::pull(rt, store.clone(), registry, resolved, out)?;
        crate::pull::print_report(out, &report);
    }
    Ok(None)
}

/// The daemon that owns the store, as a tier: it has what other mounts fetched since this
/// process opened its read-only view, and keeps what the tiers below it return.
struct DaemonSource {
    client: Arc<crate::api::Client>,
}

impl DaemonSource {
    fn unavailable(e: anyhow::Error) -> hb_core::SourceError {
        hb_core::SourceError::Unavailable { source_name: "hb daemon".into(), reason: crate::error_chain(&e) }
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

    fn keep(&self, chunks: &[(ChunkId, Vec<u8>)]) -> Result<usize, hb_core::SourceError> {
        let mut kept = 0;
        // Bodies under the daemon's limit.
        let mut start = 0;
        while start < chunks.len() {
            let mut end = start;
            let mut size = 0;
            while end < chunks.len() && (end == start || size + chunks[end].1.len() + 36 <= crate::api::MAX_CHUNK_BODY)
            {
                size += chunks[end].1.len() + 36;
                end += 1;
            }
            let body = crate::api::encode_chunks(chunks[start..end].iter().map(|(i, b)| (i, b.as_slice())));
            let r: crate::api::FillResponse = self
                .client
                .call_raw("POST", "/v1/chunks/fill", &body)
                .and_then(|b| Ok(serde_json::from_slice(&b)?))
                .map_err(Self::unavailable)?;
            kept += r.filled;
            start = end;
        }
        Ok(kept)
    }
}

/// A mounted image and what it reads from.
pub struct Mount {
    pub name: String,
    pub mounted: hb_fuse::Mounted,
    pub ranges: Vec<Arc<hb_registry::RangeSource>>,
    pub lazy_layers: usize,
    pub layers: Vec<Digest>,
}

/// Mounts image `args.image` from the store at `args.dir`.
pub fn mount_image(
    g: &Global,
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    args: &MountArgs,
    shutdown: Option<&crate::shutdown::Shutdown>,
    out: &Out,
) -> anyhow::Result<Mount> {
    let known = if crate::find_image(&store, &args.image)?.is_none() {
        pull_for_mount(g, rt, &store, &args.image, args.plain_http, out)?
    } else {
        None
    };
    let (name, digest, rec) = crate::require_image(&store, &args.image)?;
    let mut layers: Vec<Digest> = rec.layers.iter().map(|l| l.diff_id).collect();
    if let Some(n) = args.layers {
        if n == 0 || n > layers.len() {
            bail!("{name} has {} layers; cannot mount the first {n}", layers.len());
        }
        layers.truncate(n);
    }
    let indexes = layers
        .iter()
        .map(|d| store.layer(d)?.with_context(|| format!("layer {d} is missing")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let merged = hb_core::merge_layers(store.chunker(), indexes.iter());
    // On a read-only view of a store the daemon owns, the daemon is asked first and keeps what
    // comes from below it.
    let daemon = if store.is_writable() { None } else { crate::daemon_client(g).map(Arc::new) };
    let sources = sources(g, rt, &store, &layers, known, args.plain_http, daemon)?;
    let startup = match store.aux(&startup_key(&digest))? {
        Some(raw) => StartupOrder::decode(&raw).context("the stored start-up order is corrupt")?.chunks,
        None => Vec::new(),
    };
    let all = sources.all_chunks();
    let Sources { chain, ranges, lazy_layers } = sources;
    let fetcher = hb_fuse::Fetcher::new(store.clone(), chain, Duration::from_secs(120));
    let opts = MountOptions {
        fs: FsOptions { passthrough: args.passthrough, passthrough_min: 1 << 20, image: name.clone() },
        threads: args.threads,
        prefetch: args.prefetch,
        startup,
        all,
        bandwidth: args.bandwidth,
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
    Ok(Mount { name, mounted, ranges, lazy_layers, layers })
}

/// `hb run`'s images without a daemon: this process's store (opened on first use, kept for the
/// container's mount) and its own FUSE mount of the image.
#[derive(Default)]
pub struct StoreImages {
    store: std::sync::Mutex<Option<Arc<Store>>>,
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
    fn ensure(&self, g: &Global, image: &str, plain_http: bool, out: &Out) -> anyhow::Result<()> {
        let store = self.store(g, out)?;
        if crate::find_image(&store, image)?.is_none() {
            pull_for_mount(g, &crate::runtime()?, &store, image, plain_http, out)?;
        }
        Ok(())
    }

    fn release(&self) {
        self.store.lock().expect("store lock").take();
    }

    fn mount(
        &self,
        g: &Global,
        image: &str,
        plain_http: bool,
        dir: &Path,
        out: &Out,
    ) -> anyhow::Result<(String, Box<dyn hb_cli::run::LocalMount>)> {
        let store = self.store(g, out)?;
        let rt = crate::runtime()?;
        let args = MountArgs {
            image: image.into(),
            dir: dir.to_path_buf(),
            prefetch: Prefetch::Startup,
            bandwidth: None,
            passthrough: true,
            threads: 8,
            plain_http,
            layers: None,
        };
        let mount = mount_image(g, &rt, store.clone(), &args, None, out)?;
        let (_, _, rec) = crate::require_image(&store, image)?;
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
        if let Err(e) = mount.mounted.wait() {
            tracing::warn!(error = %e, "the image mount ended with an error");
        }
        drop(rt);
    }
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
pub fn serve(store: &Store, m: Mount, out: &Out) -> anyhow::Result<()> {
    let dir = m.mounted.mountpoint().to_path_buf();
    out.note(format!(
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
    let quiet = out.quiet || out.json;
    let stats_file = run_file(store.root(), &dir, "stats.json");
    let watch_ranges = m.ranges.clone();
    let watch_fetcher = m.mounted.fetcher().clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch_stop = stop.clone();
    // Reports the end of prefetching, and keeps the figures file current for `hb daemon`'s metrics.
    let watch_out = *out;
    let watcher = std::thread::spawn(move || {
        let out = watch_out;
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
                if !quiet {
                    let s = watch_stats.snapshot();
                    out.note(format!(
                        "prefetch finished: {} chunks, {}",
                        s.prefetched_chunks,
                        HumanBytes(s.remote_bytes)
                    ));
                }
            }
            let s = watch_stats.snapshot();
            if last != Some(s) {
                write_stats(&stats_file, &s, &watch_fetcher.sources(), &watch_ranges, passthrough);
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let fetcher = m.mounted.fetcher().clone();
    let result = m.mounted.wait();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watcher.join();
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
    out.note(format!(
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

/// Writes a mount's figures as JSON (atomically: temp file + rename).
fn write_stats(
    path: &Path,
    s: &hb_fuse::StatsSnapshot,
    sources: &[hb_core::TierStats],
    ranges: &[Arc<hb_registry::RangeSource>],
    passthrough: bool,
) {
    let (wire_bytes, requests) = wire(ranges);
    let v = crate::api::MountStats {
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

/// Runs `cmd` (an `hb mount` serving `dir`) as a process of its own (own process group, no
/// terminal, its stderr in `<root>/run/mount-<hash>.log`) and returns it once `dir` is mounted,
/// or the reason (its log) when it ends first or does not mount within 300 s.
pub fn start_server(
    cmd: &mut std::process::Command,
    root: &Path,
    dir: &Path,
) -> anyhow::Result<(std::process::Child, PathBuf)> {
    use std::os::unix::process::CommandExt;
    let log = run_file(root, dir, "log");
    std::fs::create_dir_all(log.parent().expect("has a parent"))?;
    let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .context("starting the mount process")?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("the mount process for {} exited ({status}):\n{}", dir.display(), text.trim_end());
        }
        if hb_fuse::is_mountpoint(dir) {
            return Ok((child, log));
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            bail!("the mount process did not mount {} within 300 s (log {})", dir.display(), log.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Unmounts `dir` and waits for the process that served it to store what it fetched and exit.
pub fn umount(root: &Path, dir: &Path, out: &Out) -> anyhow::Result<()> {
    let pid_file = run_file(root, dir, "pid");
    // Read before unmounting: the serving process removes the file as it finishes, and it still
    // holds the store until it has exited.
    let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok());
    let stale = hb_fuse::clean_stale(dir)?;
    if stale {
        out.note(format!("detached a stale mount at {} (its process had died)", dir.display()));
    } else if hb_fuse::is_mountpoint(dir) {
        hb_fuse::unmount(dir)?;
    } else {
        bail!("{} is not mounted", dir.display());
    }
    if let Some(pid) = pid {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let started = Instant::now();
        while proc_dir.exists() && started.elapsed() < Duration::from_secs(120) {
            // A zombie (our own child in tests) has exited already.
            if std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|s| s.contains(") Z ")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    Ok(())
}
