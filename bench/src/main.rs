//! `hb-bench`: HyperBox's benchmarks. Each one runs hb and its baseline side by side in one run,
//! interleaved and repeated, and reports the medians and their ratio (this machine is noisy:
//! compare within a run, never across runs). Results go to stdout as Markdown for
//! docs/benchmarks.md; progress to stderr.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hb_core::ChunkerParams;
use hb_store::{NoProgress, Store, StoreOptions};

mod coldstart;
mod lazy;
mod peers;
mod plot;
mod proxy;
mod update;

#[derive(Parser)]
#[command(about = "HyperBox benchmarks: hb against its baselines, reported as ratios")]
struct Cli {
    /// Runs of each side (interleaved); medians are reported
    #[arg(long, default_value_t = 3, global = true)]
    runs: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// FastCDC + BLAKE3 per chunk vs BLAKE3 alone vs SHA-256 alone, in memory, one core
    Chunking {
        /// Uncompress this layer into memory as the data (default: the Debian minbase layer)
        #[arg(long)]
        layer: Option<PathBuf>,
    },
    /// Whole-layer `hb` ingest vs `tar -xzf` of the same gzip'ed layer, both onto tmpfs
    Ingest {
        #[arg(long)]
        layer: Option<PathBuf>,
    },
    /// Ten versions of an image series stored in hb vs the sum of their gzip'ed layers
    Dedup {
        /// Folder with v1.tar.gz .. v10.tar.gz (bench/series.sh builds it)
        #[arg(long)]
        series: Option<PathBuf>,
    },
    /// Bloom filter size per million chunks at 1 % false positives, measured FP rate, lookups/s
    Bloom {
        #[arg(long, default_value_t = 1_000_000)]
        items: usize,
    },
    /// Layer index: size vs the tar headers it replaces, decode time vs listing the tar
    Index {
        #[arg(long)]
        layer: Option<PathBuf>,
    },
    /// `hb pull` vs `ctr images pull` (containerd, overlayfs: download and unpack) vs `skopeo copy`
    /// to an OCI layout, from the same local registry, each into a fresh store; then v2 after v1
    Pull {
        /// Image to pull (scripts/images.sh pushes it)
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v1")]
        image: String,
        /// The next version, pulled after `image` for the dedup figures
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v2")]
        next: String,
        /// Run every client (and containerd) in this network namespace, e.g. `hbnet` from
        /// scripts/netns.sh, pulling from 10.231.0.1:15010 over its shaped link
        #[arg(long)]
        netns: Option<String>,
    },
    /// Lazy starts: time to first output of a command in the image from a lazy mount (hb convert,
    /// hb pull --lazy, hb mount) vs `ctr images pull` + `ctr run` (overlayfs), bytes fetched before
    /// it; sequential read and `find | xargs stat` through the mount vs overlayfs
    Lazy {
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v1")]
        image: String,
        /// Run the clients (and containerd) in this network namespace (see `pull --netns`)
        #[arg(long)]
        netns: Option<String>,
        /// Skip the sequential-read and stat comparisons
        #[arg(long)]
        start_only: bool,
    },
    /// `hb run --rm busybox true` vs `runc run` of a pre-extracted bundle of the same image; cold
    /// `hb run` of the large image to first output vs `ctr images pull` + `ctr run`
    Run {
        #[arg(long, default_value = "127.0.0.1:15000/busybox:latest")]
        small: String,
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v1")]
        large: String,
    },
    /// Resident memory of an idle `hb daemon` (and its image mount server) holding the large image,
    /// vs an idle containerd holding the same image
    Memory {
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v1")]
        image: String,
    },
    /// containerd with hb as its snapshotter pulling lazily vs containerd with overlayfs: pull
    /// start to first output of a command in the large image
    Snapshotter {
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v1")]
        large: String,
    },
    /// Warm-hit throughput and p50/p99 latency under `ab -k -c 32`: hb proxy vs docker-registry
    /// in proxy mode, same upstream and blobs
    Proxy {
        #[arg(long, default_value = "127.0.0.1:15000/busybox:latest")]
        small: String,
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v1")]
        large: String,
    },
    /// An image update: `hb pull` of v2 with v1 stored, from accelerated forms (new chunks by
    /// Range), vs `ctr images pull` of v2 after v1; bytes from the registry's log, time
    Update {
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v1")]
        v1: String,
        #[arg(long, default_value = "127.0.0.1:15000/debian-app:v2")]
        v2: String,
    },
    /// The ten-version series (`bench/series.sh push 127.0.0.1:15000`) pulled in order through
    /// accelerated forms by hb vs by containerd: bytes over the wire per version
    Series {
        #[arg(long, default_value = "127.0.0.1:15000")]
        registry: String,
    },
    /// Cold starts, fairly: pull start to first output of the image's own command in a container,
    /// containerd + overlayfs vs stargz-snapshotter (on demand, optimized) vs hb's snapshotter and
    /// `hb run` (no recorded order, recorded order), three images (bench/images.py), random order
    Coldstart {
        #[arg(long, default_value = "127.0.0.1:15000")]
        registry: String,
        /// Seed of the run order (printed; random when not given)
        #[arg(long)]
        seed: Option<u64>,
        /// Use the converted images already in the registry
        #[arg(long)]
        skip_prepare: bool,
        /// Pull over a link of this rate (e.g. 100mbit): the same registry storage served on
        /// 127.0.0.1:15010, its answers shaped by htb on lo (scripts/shaped-lo.sh)
        #[arg(long)]
        link: Option<String>,
        /// Only these images (comma-separated: py-app, build-step, big-binary); all by default
        #[arg(long, value_delimiter = ',')]
        images: Vec<String>,
        /// Only these tools (comma-separated: overlayfs, stargz, stargz-optimized, hb-snapshotter,
        /// hb-snapshotter-ordered, hb-run, hb-run-ordered); all by default. A ratio whose
        /// baseline was left out is shown as "-": for profiling, not for figures to quote
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
    },
    /// An SVG chart of the cold-start tables a run printed (its markdown, e.g. docs/benchmarks.md
    /// or a saved `hb-bench coldstart` output): time to first output per tool, per image
    Plot {
        /// The markdown holding the tables
        input: PathBuf,
        /// Where the SVG goes
        #[arg(short, long)]
        output: PathBuf,
        /// Only the tables after the first line containing this text (a section's heading)
        #[arg(long)]
        after: Option<String>,
        /// Only the tables before the first line containing this text (after `--after`)
        #[arg(long)]
        until: Option<String>,
        /// The chart's title
        #[arg(long, default_value = "Cold starts: pull start to first output (lower is better)")]
        title: String,
    },
    /// LAN peers: cold starts on a host whose peers hold the image vs the same start with peers
    /// switched off, a lying holder among them, discovery and lookup times (scripts/peers-net.sh)
    Peers {
        /// The registry's uplink rate
        #[arg(long, default_value = "100mbit")]
        link: String,
        /// Seed of the mode order (printed; random when not given)
        #[arg(long)]
        seed: Option<u64>,
        /// Only this: a cold start just after every holder switched peers off (`hb peers off`),
        /// against the same start with peers off on the starting host
        #[arg(long)]
        switched_off: bool,
        /// Only the pulls: one host alone (peers off, then on) and four hosts at once
        #[arg(long, conflicts_with = "switched_off")]
        pulls: bool,
    },
    /// Every benchmark above
    All,
}

fn testdata(name: &str) -> PathBuf {
    std::env::var_os("HB_TESTDATA").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/hb-testdata".into()).join(name)
}

pub(crate) fn scratch() -> anyhow::Result<tempfile::TempDir> {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    Ok(tempfile::Builder::new().prefix("hb-bench-").tempdir_in(base)?)
}

/// A small deterministic generator for the run order (its seed is printed).
pub(crate) struct Shuffle(pub(crate) u64);

impl Shuffle {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The 95 % interval of `median(a) / median(b)` by the bootstrap: 2000 resamples of each (with
/// replacement, same sizes). A fixed-seed xorshift draws them, so an interval follows from its
/// samples alone. How far a run's ratio may sit from the true one on a noisy machine.
pub(crate) fn ratio_interval(a: &[Duration], b: &[Duration]) -> (f64, f64) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let mut ratios: Vec<f64> = (0..2000)
        .map(|_| {
            let ma = median((0..a.len()).map(|_| a[next(a.len())]).collect());
            let mb = median((0..b.len()).map(|_| b[next(b.len())]).collect());
            ma.as_secs_f64() / mb.as_secs_f64()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    (ratios[ratios.len() * 25 / 1000], ratios[ratios.len() * 975 / 1000])
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

fn gunzip(path: &Path) -> anyhow::Result<Vec<u8>> {
    let out =
        Command::new("gzip").arg("-dc").arg(path).output().with_context(|| format!("gzip -dc {}", path.display()))?;
    if !out.status.success() {
        bail!("gzip -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

fn chunking(runs: usize, layer: &Path) -> anyhow::Result<()> {
    let data = gunzip(layer)?;
    let p = ChunkerParams::default();
    eprintln!("chunking: {} MiB of {}", data.len() >> 20, layer.display());
    let cdc_hash = || {
        let mut n = 0usize;
        for c in fastcdc::v2020::FastCDC::new(&data, p.min_size as usize, p.avg_size as usize, p.max_size as usize) {
            let id = blake3::hash(&data[c.offset..c.offset + c.length]);
            n += id.as_bytes()[0] as usize;
        }
        n
    };
    let cdc_only =
        || fastcdc::v2020::FastCDC::new(&data, p.min_size as usize, p.avg_size as usize, p.max_size as usize).count();
    let blake = || blake3::hash(&data).as_bytes()[0];
    let sha = || {
        use sha2::Digest;
        sha2::Sha256::digest(&data)[0]
    };
    let (mut a, mut b, mut c, mut d) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        a.push(time(cdc_hash).0);
        b.push(time(cdc_only).0);
        c.push(time(blake).0);
        d.push(time(sha).0);
    }
    let len = data.len() as u64;
    let (a, b, c, d) = (median(a), median(b), median(c), median(d));
    println!("| work (one thread, {} MiB in memory) | MiB/s | vs BLAKE3 alone |", len >> 20);
    println!("|---|---|---|");
    for (name, t) in [
        ("FastCDC 2020 + BLAKE3 per chunk (hb)", a),
        ("FastCDC 2020 alone", b),
        ("BLAKE3 alone", c),
        ("SHA-256 alone", d),
    ] {
        println!("| {name} | {:.0} | {:.2}x |", mib_s(len, t), c.as_secs_f64() / t.as_secs_f64());
    }
    Ok(())
}

fn ingest(runs: usize, layer: &Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(layer)?.len();
    eprintln!("ingest: {} ({} MiB gzip), {runs} runs each, interleaved", layer.display(), size >> 20);
    let (mut hb, mut tar) = (vec![], vec![]);
    let mut content = 0;
    for _ in 0..runs {
        let dir = scratch()?;
        let (t, r) = time(|| -> anyhow::Result<_> {
            let store = Store::open(&dir.path().join("store"), StoreOptions::default())?;
            let f = std::fs::File::open(layer)?;
            Ok(store.import_layer(std::io::BufReader::new(f), &NoProgress)?)
        });
        content = r?.content_bytes;
        hb.push(t);
        let out = dir.path().join("tar");
        std::fs::create_dir(&out)?;
        let (t, st) = time(|| Command::new("tar").arg("-xzf").arg(layer).arg("-C").arg(&out).status());
        if !st?.success() {
            bail!("tar -xzf failed");
        }
        tar.push(t);
    }
    let (h, t) = (median(hb), median(tar));
    println!(
        "| {} ({} MiB gzip, {} MiB of files), onto tmpfs | median of {runs} | uncompressed MiB/s |",
        layer.file_name().unwrap().to_string_lossy(),
        size >> 20,
        content >> 20
    );
    println!("|---|---|---|");
    println!("| `tar -xzf` (baseline) | {:.2} s | {:.0} |", t.as_secs_f64(), mib_s(content, t));
    println!(
        "| hb ingest: gunzip, chunk, hash, dedup, zstd, pack, commit | {:.2} s | {:.0} |",
        h.as_secs_f64(),
        mib_s(content, h)
    );
    println!("| **ratio hb / tar** | **{:.2}x** the time | |", h.as_secs_f64() / t.as_secs_f64());
    Ok(())
}

fn dedup(series: &Path) -> anyhow::Result<()> {
    let dir = scratch()?;
    let store = Store::open(&dir.path().join("store"), StoreOptions::default())?;
    let mut gz_total = 0u64;
    println!("| version | gzip'ed layer | new chunk bytes stored (uncompressed) | on disk after import |");
    println!("|---|---|---|---|");
    for i in 1..=10 {
        let p = series.join(format!("v{i}.tar.gz"));
        let size = std::fs::metadata(&p).with_context(|| format!("{} (run bench/series.sh)", p.display()))?.len();
        gz_total += size;
        let r = store.import_layer(std::io::BufReader::new(std::fs::File::open(&p)?), &NoProgress)?;
        let u = store.usage()?;
        println!(
            "| v{i} | {:.1} MB | {:.1} MB | {:.1} MB |",
            size as f64 / 1e6,
            r.new_bytes as f64 / 1e6,
            (u.pack_bytes + u.metadata_bytes) as f64 / 1e6
        );
        eprintln!("dedup: v{i} imported");
    }
    drop(store);
    let store = Store::open(&dir.path().join("store"), StoreOptions::default())?;
    let u = store.usage()?;
    let stored = u.pack_bytes + u.metadata_bytes;
    println!();
    println!("| ten versions | bytes |");
    println!("|---|---|");
    println!(
        "| sum of the gzip'ed layers (baseline: what a registry or containerd keeps) | {:.1} MB |",
        gz_total as f64 / 1e6
    );
    println!("| logical (every version's files) | {:.1} MB |", u.logical_bytes as f64 / 1e6);
    println!("| distinct chunks, uncompressed | {:.1} MB |", u.unique_bytes as f64 / 1e6);
    println!(
        "| hb store on disk: packs + RocksDB + Bloom | {:.1} MB ({:.1} + {:.1}) |",
        stored as f64 / 1e6,
        u.pack_bytes as f64 / 1e6,
        u.metadata_bytes as f64 / 1e6
    );
    println!("| **ratio gzip'ed layers / hb store** | **{:.2}x smaller** |", gz_total as f64 / stored as f64);
    Ok(())
}

fn bloom(runs: usize, items: usize) -> anyhow::Result<()> {
    use hb_core::ChunkId;
    let ids: Vec<ChunkId> = (0..items as u64).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
    let absent: Vec<ChunkId> = (items as u64..2 * items as u64).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
    // Sized exactly for `items` at 1 %: what the store's filter costs per million chunks at capacity.
    let mut f = hb_store::ChunkFilter::exact(items as u64, blake3::hash(b"hb-bench").as_bytes());
    ids.iter().for_each(|id| f.insert(id));
    let bytes = f.bitmap_bytes();
    let fps = absent.iter().filter(|id| f.maybe_contains(id)).count();
    let (mut hit, mut miss) = (vec![], vec![]);
    for _ in 0..runs {
        hit.push(time(|| ids.iter().filter(|id| f.maybe_contains(id)).count()).0);
        miss.push(time(|| absent.iter().filter(|id| f.maybe_contains(id)).count()).0);
    }
    let per_s = |d: Duration| items as f64 / d.as_secs_f64() / 1e6;
    let (hit, miss) = (median(hit), median(miss));
    println!("| Bloom filter, {} chunks at 1 % target | value |", items);
    println!("|---|---|");
    println!("| size | {:.3} MB ({:.2} bits per chunk) |", bytes as f64 / 1e6, (bytes * 8) as f64 / items as f64);
    println!("| size per million chunks | {:.3} MB |", bytes as f64 / 1e6 * 1e6 / items as f64);
    println!("| measured false positives ({} absent ids) | {:.2} % |", items, fps as f64 * 100.0 / items as f64);
    println!("| lookups, present ids | {:.1} M/s |", per_s(hit));
    println!("| lookups, absent ids | {:.1} M/s |", per_s(miss));
    Ok(())
}

fn index(runs: usize, layer: &Path) -> anyhow::Result<()> {
    let dir = scratch()?;
    let tar_path = dir.path().join("layer.tar");
    std::fs::write(&tar_path, gunzip(layer)?)?;
    let store = Store::open(&dir.path().join("store"), StoreOptions::default())?;
    let r = store.import_layer(std::fs::File::open(&tar_path)?, &NoProgress)?;
    let encoded = store.layer(&r.diff_id)?.context("layer just imported")?.encode();
    let (mut dec, mut list) = (vec![], vec![]);
    let mut headers = 0u64;
    for _ in 0..runs {
        dec.push(time(|| hb_core::LayerIndex::decode(&encoded).map(|i| i.entries.len())).0);
        // Baseline: the least work that learns the tree from the tar, reading only its headers
        // (seeking over file data) from the page cache.
        let (t, n) = time(|| -> anyhow::Result<u64> {
            let mut a = tar::Archive::new(std::fs::File::open(&tar_path)?);
            let mut n = 0u64;
            for e in a.entries_with_seek()? {
                // One 512-byte header per entry (long names and PAX records add more).
                n += e?.header().as_bytes().len() as u64;
            }
            Ok(n)
        });
        headers = n?;
        list.push(t);
    }
    let (d, l) = (median(dec), median(list));
    println!(
        "| layer index of {} ({} entries, {} chunks) | hb index | tar headers (baseline) | ratio |",
        layer.file_name().unwrap().to_string_lossy(),
        r.entries,
        r.unique_chunks
    );
    println!("|---|---|---|---|");
    println!("| bytes | {:.0} KiB ({:.0} B per entry incl. chunk refs) | at least {:.0} KiB of headers, no chunk refs | {:.2}x |", encoded.len() as f64 / 1024.0, encoded.len() as f64 / r.entries as f64, headers as f64 / 1024.0, encoded.len() as f64 / headers as f64);
    println!("| load the tree (median of {runs}) | {:.1} ms (decode + full validation) | {:.1} ms (`tar` crate, seeking over data) | {:.2}x the time |", d.as_secs_f64() * 1e3, l.as_secs_f64() * 1e3, d.as_secs_f64() / l.as_secs_f64());
    Ok(())
}

/// The repository: `HB_REPO`, else the current directory when it is one (the bench is run from
/// the clone; a binary built by another clone sharing the target dir carries that clone's path),
/// else where this binary was built.
pub(crate) fn repo_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HB_REPO") {
        return PathBuf::from(p);
    }
    if let Ok(cwd) = std::env::current_dir() {
        if cwd.join("bench/src/main.rs").exists() {
            return cwd;
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// The `hb` binary built beside this one (`cargo build --release -p hb-cli -p hb-engine -p hb-bench`).
pub(crate) fn hb_binary() -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name("hb");
    if !p.exists() {
        bail!("{} is missing: build it with `scripts/build-release.sh`", p.display());
    }
    // A dynamic executable names its loader near its start; the release `hb` is static.
    let head = std::fs::read(&p)?.into_iter().take(4096).collect::<Vec<u8>>();
    if head.windows(9).any(|w| w == b"ld-linux-") {
        eprintln!("note: {} is dynamically linked; `scripts/build-release.sh` links it as released", p.display());
    }
    Ok(p)
}

pub(crate) fn timed_command(cmd: &mut Command) -> anyhow::Result<(Duration, std::process::Output)> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((d, out))
}

fn pull(runs: usize, image: &str, next: &str, netns: Option<&str>) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let containerd = repo_root().join("scripts/containerd.sh");
    let sock =
        std::env::var("HB_CONTAINERD_DIR").unwrap_or_else(|_| "/dev/shm/hb-containerd".into()) + "/containerd.sock";
    // Every client runs inside the namespace when one is given (containerd too, for unpacking).
    let cmd = |program: &Path| -> Command {
        match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    };
    let (image, next, link) = match netns {
        Some(_) => (
            image.replace("127.0.0.1:15000", "10.231.0.1:15010"),
            next.replace("127.0.0.1:15000", "10.231.0.1:15010"),
            "100 Mbit/s veth link (scripts/netns.sh)",
        ),
        None => (image.to_string(), next.to_string(), "loopback registry"),
    };
    let (image, next) = (image.as_str(), next.as_str());
    let (mut t_hb, mut t_ctr, mut t_skopeo) = (vec![], vec![], vec![]);
    for run in 0..runs {
        eprintln!("pull: run {}/{runs}", run + 1);
        let mut reset = Command::new(&containerd);
        reset.arg("reset");
        if let Some(ns) = netns {
            reset.env("HB_NETNS", ns);
        }
        timed_command(&mut reset)?;
        let ctr = ["-a", &sock, "-n", "bench", "images", "pull", "--plain-http", image];
        // ctr fetches in the client (containerd's content service only stores), so it runs there too.
        t_ctr.push(timed_command(cmd(Path::new("ctr")).args(ctr))?.0);
        let dir = scratch()?;
        let layout = format!("oci:{}:t", dir.path().join("layout").display());
        let skopeo = ["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{image}"), &layout];
        t_skopeo.push(timed_command(cmd(Path::new("skopeo")).args(skopeo))?.0);
        let store = dir.path().join("store");
        t_hb.push(timed_command(cmd(&hb).arg("--root").arg(&store).args(["-q", "pull", "--plain-http", image]))?.0);
    }
    timed_command(Command::new(&containerd).arg("stop"))?;
    let (h, c, k) = (median(t_hb), median(t_ctr), median(t_skopeo));
    println!("| pull {image}, {link}, cold, median of {runs} | time | vs hb |");
    println!("|---|---|---|");
    println!("| hb pull (download, verify, chunk, dedup, store) | {:.2} s | 1.00x |", h.as_secs_f64());
    println!(
        "| `ctr images pull` (containerd 1.6, overlayfs: download + unpack) | {:.2} s | **{:.2}x** |",
        c.as_secs_f64(),
        c.as_secs_f64() / h.as_secs_f64()
    );
    println!(
        "| `skopeo copy` to an OCI layout (download only) | {:.2} s | **{:.2}x** |",
        k.as_secs_f64(),
        k.as_secs_f64() / h.as_secs_f64()
    );

    // v2 after v1: what crosses the wire and what is stored.
    let dir = scratch()?;
    let root = dir.path().join("store");
    let json = |r: &str| -> anyhow::Result<serde_json::Value> {
        let (_, out) = timed_command(cmd(&hb).arg("--root").arg(&root).args(["--json", "pull", "--plain-http", r]))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    json(image)?;
    let v2 = json(next)?;
    let (_, insp) = timed_command(Command::new(&hb).arg("--root").arg(&root).args(["inspect", next]))?;
    let insp: serde_json::Value = serde_json::from_slice(&insp.stdout)?;
    let v2_size: u64 =
        insp["manifest"]["layers"].as_array().map(|l| l.iter().filter_map(|x| x["size"].as_u64()).sum()).unwrap_or(0);
    println!();
    println!("| {next} pulled after {image} | bytes | of v2's compressed size |");
    println!("|---|---|---|");
    println!("| v2's layers (compressed) | {:.1} MB | 100 % |", v2_size as f64 / 1e6);
    let dl = v2["bytes_downloaded"].as_u64().unwrap_or(0);
    let new = v2["new_chunk_bytes"].as_u64().unwrap_or(0);
    println!(
        "| downloaded by hb (layers whose diff_id it lacks) | {:.1} MB | {:.1} % |",
        dl as f64 / 1e6,
        dl as f64 * 100.0 / v2_size as f64
    );
    println!(
        "| new chunk bytes hb stored (uncompressed) | {:.2} MB | {:.2} % |",
        new as f64 / 1e6,
        new as f64 * 100.0 / v2_size as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runs = cli.runs.max(1);
    let layer = |l: Option<PathBuf>| l.unwrap_or_else(|| testdata("minbase.tar.gz"));
    let series = |s: Option<PathBuf>| {
        s.unwrap_or_else(|| {
            std::env::var_os("HB_BENCH_DATA")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/var/tmp/hb-bench".into())
                .join("series")
        })
    };
    match cli.cmd {
        Cmd::Chunking { layer: l } => chunking(runs, &layer(l))?,
        Cmd::Ingest { layer: l } => ingest(runs, &layer(l))?,
        Cmd::Dedup { series: s } => dedup(&series(s))?,
        Cmd::Bloom { items } => bloom(runs, items)?,
        Cmd::Index { layer: l } => index(runs, &layer(l))?,
        Cmd::Pull { image, next, netns } => pull(runs, &image, &next, netns.as_deref())?,
        Cmd::Lazy { image, netns, start_only } => lazy::run(runs, &image, netns.as_deref(), start_only)?,
        Cmd::Run { small, large } => lazy::containers(runs, &small, &large)?,
        Cmd::Memory { image } => lazy::memory(&image)?,
        Cmd::Snapshotter { large } => lazy::snapshotter(runs, &large)?,
        Cmd::Proxy { small, large } => proxy::run(runs, &small, &large)?,
        Cmd::Update { v1, v2 } => update::update(runs, &v1, &v2)?,
        Cmd::Coldstart { registry, seed, skip_prepare, link, images, variants } => {
            let only = coldstart::Only::parse(&images, &variants)?;
            coldstart::run(runs, &registry, seed, skip_prepare, link.as_deref(), &only)?
        }
        Cmd::Series { registry } => update::series(&registry)?,
        Cmd::Plot { input, output, after, until, title } => {
            let md = std::fs::read_to_string(&input).with_context(|| format!("reading {}", input.display()))?;
            let from = match &after {
                Some(a) => md.find(a.as_str()).with_context(|| format!("{a:?} is not in {}", input.display()))?,
                None => 0,
            };
            let md = &md[from..];
            let to = match &until {
                Some(u) => md.find(u.as_str()).with_context(|| format!("{u:?} is not after {after:?}"))?,
                None => md.len(),
            };
            let groups = plot::coldstart_tables(&md[..to]);
            if groups.is_empty() {
                bail!("no cold-start tables in {}", input.display());
            }
            let note = format!("medians; made by `hb-bench plot` from {}", input.display());
            std::fs::write(&output, plot::bars_svg(&title, &note, &groups, "s"))
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!("plot: {} groups into {}", groups.len(), output.display());
        }
        Cmd::Peers { link, seed, switched_off: false, pulls } => peers::run(runs, &link, seed, pulls)?,
        Cmd::Peers { link, switched_off: true, .. } => peers::switched_off(runs, &link)?,
        Cmd::All => {
            chunking(runs, &layer(None))?;
            println!();
            ingest(runs, &layer(None))?;
            println!();
            dedup(&series(None))?;
            println!();
            bloom(runs, 1_000_000)?;
            println!();
            index(runs, &layer(None))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_interval_brackets_the_true_ratio_and_narrows_with_samples() {
        let ms = |v: &[u64]| v.iter().map(|&m| Duration::from_micros(m)).collect::<Vec<_>>();
        // Twice as long, sample for sample: every resample's ratio is exactly 2.
        let a: Vec<u64> = (0..200).map(|i| 1000 + (i * 37 % 101)).collect();
        let doubled: Vec<u64> = a.iter().map(|m| m * 2).collect();
        let (lo, hi) = ratio_interval(&ms(&doubled), &ms(&a));
        assert!(lo <= 2.0 && hi >= 2.0 && hi - lo < 0.05, "{lo}..{hi}");
        // The same spread, shifted by 10 %: the interval holds 1.1 and not 1.0.
        let shifted: Vec<u64> = a.iter().map(|m| m + 100).collect();
        let (lo, hi) = ratio_interval(&ms(&shifted), &ms(&a));
        assert!(lo > 1.0 && lo < 1.1 && hi > 1.09, "{lo}..{hi}");
        // Fewer samples, a wider interval.
        let (lo5, hi5) = ratio_interval(&ms(&shifted[..10]), &ms(&a[..10]));
        assert!(hi5 - lo5 > hi - lo, "{lo5}..{hi5} vs {lo}..{hi}");
    }
}
