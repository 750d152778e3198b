//! Cold starts, fairly: the time from the start of the pull to the first output of the image's own
//! command in a new container, for the tools users pick, side by side on the same images, registry,
//! link and client:
//!
//! - containerd + overlayfs (`ctr images pull` + `ctr run`),
//! - containerd + stargz-snapshotter on eStargz (`ctr-remote images rpull` + `ctr run`), on demand
//!   and after `ctr-remote image optimize` (its recorded prefetch),
//! - containerd + hb's snapshotter on hb's accelerated form, without a recorded order and after
//!   `hb optimize` (the same two modes), the same client commands,
//! - `hb run --rm` on a cold store, both modes.
//!
//! Three images of different shapes (bench/images.py), none that hb was tuned on; the same command
//! for every tool (the image's own); every order recorded by a separate run before timing. Each
//! sample starts cold: containerd's root wiped, stargz's root wiped, hb's store new, all on a
//! disk-backed filesystem except containerd's own root (tmpfs, as `scripts/containerd.sh` keeps it:
//! in overlayfs's favour). Samples run in a random order (seed printed). Bytes are the registry's
//! own count (its log) until the first output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::update::Meter;
use crate::{hb_binary, median, repo_root, timed_command};

const IMAGES: [&str; 3] = ["py-app", "build-step", "big-binary"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Overlayfs,
    Stargz,
    StargzOptimized,
    HbSnapshotter,
    HbSnapshotterOrdered,
    HbRun,
    HbRunOrdered,
}

const VARIANTS: [Variant; 7] = [
    Variant::Overlayfs,
    Variant::Stargz,
    Variant::StargzOptimized,
    Variant::HbSnapshotter,
    Variant::HbSnapshotterOrdered,
    Variant::HbRun,
    Variant::HbRunOrdered,
];

impl Variant {
    /// Its name on the command line (`--variants`).
    fn name(self) -> &'static str {
        match self {
            Variant::Overlayfs => "overlayfs",
            Variant::Stargz => "stargz",
            Variant::StargzOptimized => "stargz-optimized",
            Variant::HbSnapshotter => "hb-snapshotter",
            Variant::HbSnapshotterOrdered => "hb-snapshotter-ordered",
            Variant::HbRun => "hb-run",
            Variant::HbRunOrdered => "hb-run-ordered",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Overlayfs => "containerd + overlayfs: `ctr images pull` + `ctr run`",
            Variant::Stargz => {
                "containerd + stargz-snapshotter, eStargz on demand: `ctr-remote images rpull` + `ctr run`"
            }
            Variant::StargzOptimized => "containerd + stargz-snapshotter, `ctr-remote image optimize`d (prefetch)",
            Variant::HbSnapshotter => {
                "containerd + hb snapshotter, no recorded order: `ctr-remote images rpull` + `ctr run`"
            }
            Variant::HbSnapshotterOrdered => "containerd + hb snapshotter, after `hb optimize`",
            Variant::HbRun => "`hb run --rm`, cold store, no recorded order",
            Variant::HbRunOrdered => "`hb run --rm`, cold store, after `hb optimize`",
        }
    }

    /// The tag of the image form this variant pulls.
    fn tag(self) -> &'static str {
        match self {
            Variant::Overlayfs => "v1",
            Variant::Stargz => "esgz",
            Variant::StargzOptimized => "esgz-opt",
            Variant::HbSnapshotter | Variant::HbRun => "hb",
            Variant::HbSnapshotterOrdered | Variant::HbRunOrdered => "hb-opt",
        }
    }
}

/// Which images and tools a run measures (all by default).
pub(crate) struct Only {
    images: Vec<usize>,
    variants: Vec<usize>,
}

impl Only {
    pub(crate) fn parse(images: &[String], variants: &[String]) -> anyhow::Result<Only> {
        fn pick(asked: &[String], names: &[&str], what: &str) -> anyhow::Result<Vec<usize>> {
            if asked.is_empty() {
                return Ok((0..names.len()).collect());
            }
            asked
                .iter()
                .map(|a| {
                    names
                        .iter()
                        .position(|n| n == a)
                        .with_context(|| format!("no {what} {a:?}; one of {}", names.join(", ")))
                })
                .collect()
        }
        let variant_names: Vec<&str> = VARIANTS.iter().map(|v| v.name()).collect();
        Ok(Only { images: pick(images, &IMAGES, "image")?, variants: pick(variants, &variant_names, "tool")? })
    }
}

struct Tools {
    hb: PathBuf,
    containerd: PathBuf,
    stargz: PathBuf,
    sock: String,
}

impl Tools {
    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.args(["-a", &self.sock, "-n", "bench"]);
        c
    }

    fn ctr_remote(&self) -> Command {
        let mut c = Command::new("ctr-remote");
        c.args(["-a", &self.sock, "-n", "bench"]);
        c
    }

    /// containerd reset, with the snapshotter sockets given registered as proxy plugins.
    fn containerd(&self, hb_sock: Option<&Path>, stargz_sock: Option<&str>) -> anyhow::Result<()> {
        let mut c = Command::new(&self.containerd);
        c.arg("reset");
        if let Some(s) = hb_sock {
            c.env("HB_SNAPSHOTTER_SOCK", s);
        }
        if let Some(s) = stargz_sock {
            c.env("HB_STARGZ_SOCK", s);
        }
        timed_command(&mut c)?;
        Ok(())
    }

    fn stargz(&self, what: &str) -> anyhow::Result<String> {
        let (_, out) = timed_command(Command::new(&self.stargz).arg(what))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// Tags `reference` exists in the registry.
fn exists(reference: &str) -> bool {
    Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes every form of every image (untimed): hb's two (always, they take seconds), stargz's two
/// (once: about two minutes each on two cores; kept in the registry).
fn prepare(t: &Tools, reg: &str) -> anyhow::Result<()> {
    let status = Command::new("python3").arg(repo_root().join("bench/images.py")).arg(reg).status()?;
    if !status.success() {
        bail!("bench/images.py failed");
    }
    let stargz_sock = t.stargz("socket")?;
    for image in IMAGES {
        let orig = format!("{reg}/bench/{image}:v1");
        let conv = tempfile::Builder::new().prefix("hb-bench-cold-").tempdir_in("/var/tmp")?;
        let store = conv.path().join("store");
        eprintln!("coldstart: hb convert + optimize {image}");
        for tag in ["hb", "hb-opt"] {
            let dst = format!("{reg}/bench/{image}:{tag}");
            timed_command(Command::new(&t.hb).arg("--root").arg(&store).args(["-q", "convert", &orig, &dst]))?;
        }
        // The order comes from a run of its own, with the image's own command.
        let opt = format!("{reg}/bench/{image}:hb-opt");
        timed_command(Command::new(&t.hb).arg("--root").arg(&store).args(["-q", "optimize", &opt]))?;
        for (tag, optimize) in [("esgz", false), ("esgz-opt", true)] {
            let dst = format!("{reg}/bench/{image}:{tag}");
            if exists(&dst) {
                continue;
            }
            eprintln!("coldstart: ctr-remote {} {image} (minutes)", if optimize { "optimize" } else { "convert" });
            t.stargz("reset")?;
            t.containerd(None, Some(&stargz_sock))?;
            timed_command(t.ctr().args(["images", "pull", "--plain-http", &orig]))?;
            if optimize {
                timed_command(
                    t.ctr_remote()
                        .args(["image", "optimize", "--oci", "--dns-nameservers", "127.0.0.1"])
                        .args([&orig, &dst]),
                )?;
            } else {
                timed_command(t.ctr_remote().args(["image", "convert", "--estargz", "--oci"]).args([&orig, &dst]))?;
            }
            timed_command(t.ctr().args(["images", "push", "--plain-http", &dst]))?;
        }
    }
    Ok(())
}

/// Where a cold start spent its time: each phase's end, from the start of the pull.
#[derive(Default)]
struct Phases {
    /// containerd rows: `ctr images pull` / `ctr-remote images rpull` done.
    pulled: Option<Duration>,
    /// hb's rows, from the `hb::phase` debug lines (`hb run`'s, or the snapshotter's daemon's and
    /// mount server's; their own clock, UTC).
    resolved: Option<Duration>,
    indexes: Option<Duration>,
    mounted: Option<Duration>,
    runtime: Option<Duration>,
    /// Range requests and the time reads waited on the network, summed over threads (whole run).
    requests: Option<u64>,
    net_wait: Option<Duration>,
}

/// Seconds since midnight UTC of `t` (the phase lines' clock is UTC; a run is far shorter than a day).
fn day_secs(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
}

/// Reads `hb run`'s `hb::phase` lines (`2026-12-07T02:05:03.436886Z DEBUG resolved`, ...) from
/// its stderr into the phases of a start that began at wall-clock `t0`.
fn parse_phases(stderr: &str, t0: std::time::SystemTime) -> Phases {
    let start = day_secs(t0);
    let mut p = Phases::default();
    for line in stderr.lines() {
        let mut words = line.split_whitespace();
        let (Some(stamp), Some("DEBUG")) = (words.next(), words.next()) else { continue };
        let Some(clock) = stamp.split('T').nth(1).and_then(|c| c.strip_suffix('Z')) else { continue };
        let mut hms = clock.split(':').map(|x| x.parse::<f64>().unwrap_or(f64::NAN));
        let (Some(h), Some(m), Some(sec)) = (hms.next(), hms.next(), hms.next()) else { continue };
        let at = (h * 3600.0 + m * 60.0 + sec - start).rem_euclid(86_400.0);
        if !at.is_finite() {
            continue;
        }
        let at = Some(Duration::from_secs_f64(at));
        let rest: Vec<&str> = words.collect();
        let field = |k: &str| rest.iter().find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok());
        match rest.first().copied() {
            Some("resolved") => p.resolved = at,
            // (Not a mount's `indexes read` from the store.)
            Some("indexes") if rest.get(1) == Some(&"fetched") => p.indexes = at,
            Some("mounted") => p.mounted = at,
            Some("runtime") => p.runtime = at,
            Some("reads") => {
                p.requests = field("remote_requests");
                p.net_wait = field("network_wait_ms").map(Duration::from_millis);
            }
            _ => {}
        }
    }
    p
}

/// Runs `cmd`: (time from `started` to its first byte of stdout, time to its exit, bytes the
/// registry had served for `repo` by the first output, its stderr).
fn first_output(
    mut cmd: Command,
    started: Instant,
    meter: &Meter,
    repo: &str,
) -> anyhow::Result<(Duration, Duration, u64, String)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("{cmd:?}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut first = [0u8; 1];
    let n = out.read(&mut first)?;
    let t = started.elapsed();
    let bytes = meter.bytes_now(repo)?;
    let rest = child.wait_with_output()?;
    let exit = started.elapsed();
    if n == 0 || !rest.status.success() {
        bail!("{cmd:?} printed nothing or failed: {}", String::from_utf8_lossy(&rest.stderr));
    }
    Ok((t, exit, bytes, String::from_utf8_lossy(&rest.stderr).into_owned()))
}

struct Sample {
    first: Duration,
    exit: Duration,
    bytes: u64,
    phases: Phases,
}

/// One cold start of `image` by `v`.
fn sample(t: &Tools, reg: &str, log: &str, image: &str, v: Variant, n: usize) -> anyhow::Result<Sample> {
    let reference = format!("{reg}/bench/{image}:{}", v.tag());
    let repo = format!("bench/{image}");
    let name = format!("cold-{n}");
    let disk = tempfile::Builder::new().prefix("hb-bench-cold-").tempdir_in("/var/tmp")?;
    let store = disk.path().join("store");
    let mut daemon = None;
    match v {
        Variant::Overlayfs => t.containerd(None, None)?,
        Variant::Stargz | Variant::StargzOptimized => {
            t.stargz("reset")?;
            t.containerd(None, Some(&t.stargz("socket")?))?;
        }
        Variant::HbSnapshotter | Variant::HbSnapshotterOrdered => {
            let log = disk.path().join("daemon.log");
            let (child, _, snap) = crate::lazy::start_daemon_logged(&t.hb, &store, disk.path(), Some(&log))?;
            daemon = Some(child);
            t.containerd(Some(&snap), None)?;
        }
        Variant::HbRun | Variant::HbRunOrdered => {}
    }
    crate::lazy::drop_caches();
    let meter = Meter::start_at(log)?;
    let (started, wall) = (Instant::now(), std::time::SystemTime::now());
    let mut phases = Phases::default();
    let timed = match v {
        Variant::Overlayfs => {
            timed_command(t.ctr().args(["images", "pull", "--plain-http", &reference]))?;
            phases.pulled = Some(started.elapsed());
            let mut run = t.ctr();
            run.args(["run", "--rm", &reference, &name]);
            first_output(run, started, &meter, &repo)
        }
        Variant::Stargz | Variant::StargzOptimized | Variant::HbSnapshotter | Variant::HbSnapshotterOrdered => {
            let snapshotter = if matches!(v, Variant::Stargz | Variant::StargzOptimized) { "stargz" } else { "hb" };
            timed_command(t.ctr_remote().args([
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                snapshotter,
                &reference,
            ]))?;
            phases.pulled = Some(started.elapsed());
            let mut run = t.ctr();
            run.args(["run", "--rm", "--snapshotter", snapshotter, &reference, &name]);
            first_output(run, started, &meter, &repo)
        }
        Variant::HbRun | Variant::HbRunOrdered => {
            let mut run = Command::new(&t.hb);
            // The phase lines (debug, to stderr) cost a few writes; nothing else is logged.
            // `--plain-http` as the containerd rows' `ctr`/`ctr-remote` get it (the same facts).
            run.arg("--root").arg(&store).env("HB_LOG", "hb::phase=debug").args([
                "-q",
                "run",
                "--rm",
                "--plain-http",
                &reference,
            ]);
            first_output(run, started, &meter, &repo)
        }
    };
    // Teardown, untimed for every tool.
    let _ = timed_command(Command::new(&t.containerd).arg("stop"));
    if matches!(v, Variant::Stargz | Variant::StargzOptimized) {
        let _ = t.stargz("stop");
    }
    if let Some(mut d) = daemon {
        let _ = Command::new("kill").args(["-TERM", &d.id().to_string()]).status();
        let _ = d.wait();
    }
    if let Ok(dirs) = std::fs::read_dir(store.join("images")) {
        for e in dirs.flatten().filter(|e| e.path().is_dir()) {
            let _ = Command::new(&t.hb).arg("--root").arg(&store).arg("umount").arg(e.path()).status();
        }
    }
    let (first, exit, bytes, stderr) = timed.with_context(|| format!("{image} by {v:?}"))?;
    match v {
        Variant::HbRun | Variant::HbRunOrdered => phases = parse_phases(&stderr, wall),
        // The daemon's lines (resolve, index pull) and its mount server's (mount, reads).
        Variant::HbSnapshotter | Variant::HbSnapshotterOrdered => {
            let mut lines = std::fs::read_to_string(disk.path().join("daemon.log")).unwrap_or_default();
            for e in std::fs::read_dir(store.join("run")).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("mount-") && name.ends_with(".log") {
                    lines += &std::fs::read_to_string(e.path()).unwrap_or_default();
                }
            }
            phases = Phases { pulled: phases.pulled, ..parse_phases(&lines, wall) };
        }
        _ => {}
    }
    Ok(Sample { first, exit, bytes, phases })
}

pub(crate) fn run(
    rounds: usize,
    reg: &str,
    seed: Option<u64>,
    skip_prepare: bool,
    link: Option<&str>,
    only: &Only,
) -> anyhow::Result<()> {
    let t = Tools {
        hb: hb_binary()?,
        containerd: repo_root().join("scripts/containerd.sh"),
        stargz: repo_root().join("scripts/stargz.sh"),
        sock: std::env::var("HB_CONTAINERD_DIR").unwrap_or_else(|_| "/dev/shm/hb-containerd".into())
            + "/containerd.sock",
    };
    timed_command(Command::new(&t.stargz).arg("build"))?;
    if !skip_prepare {
        prepare(&t, reg)?;
    }
    // Over a shaped link: the same storage behind a second registry whose answers tbf slows.
    let shaped = repo_root().join("scripts/shaped-lo.sh");
    let (reg, log, where_) = match link {
        Some(rate) => {
            timed_command(Command::new(&shaped).args(["up", rate]))?;
            ("127.0.0.1:15010", "shaped-lo", format!("a {rate} link (scripts/shaped-lo.sh: htb on lo)"))
        }
        None => (reg, "open", "loopback".to_string()),
    };
    let result = measure(&t, reg, log, &where_, rounds, seed, only);
    if link.is_some() {
        let _ = timed_command(Command::new(&shaped).arg("down"));
    }
    result
}

fn measure(
    t: &Tools,
    reg: &str,
    log: &str,
    where_: &str,
    rounds: usize,
    seed: Option<u64>,
    only: &Only,
) -> anyhow::Result<()> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("coldstart: seed {seed}");
    let mut order: Vec<(usize, usize)> = (0..rounds)
        .flat_map(|_| only.images.iter().flat_map(|&i| only.variants.iter().map(move |&v| (i, v))))
        .collect();
    crate::Shuffle(seed).shuffle(&mut order);
    let mut samples: Vec<Vec<Vec<Sample>>> =
        (0..IMAGES.len()).map(|_| (0..VARIANTS.len()).map(|_| Vec::new()).collect()).collect();
    for (n, &(i, v)) in order.iter().enumerate() {
        eprintln!("coldstart: {}/{} {} {:?}", n + 1, order.len(), IMAGES[i], VARIANTS[v]);
        let s = sample(t, reg, log, IMAGES[i], VARIANTS[v], n)?;
        eprintln!(
            "coldstart:   first output {:.3} s, exit {:.3} s, {:.1} MB",
            s.first.as_secs_f64(),
            s.exit.as_secs_f64(),
            s.bytes as f64 / 1e6
        );
        samples[i][v].push(s);
    }
    let _ = t.stargz("stop");
    println!("Cold starts, registry over {where_}, {rounds} rounds in a random order (seed {seed}); medians.");
    for (i, image) in IMAGES.iter().enumerate().filter(|(i, _)| only.images.contains(i)) {
        let orig = format!("{reg}/bench/{image}:v1");
        println!();
        println!("| {orig}: pull start to first output | first output | exit (`--rm` done) | bytes before first output | vs stargz on demand | vs stargz optimized | vs overlayfs |");
        println!("|---|---|---|---|---|---|---|");
        let med = |v: usize| {
            let s: Vec<Duration> = samples[i][v].iter().map(|s| s.first).collect();
            (!s.is_empty()).then(|| median(s))
        };
        let (ov, sz, szo) = (med(0), med(1), med(2));
        for (v, variant) in VARIANTS.iter().enumerate().filter(|(v, _)| only.variants.contains(v)) {
            let s = &samples[i][v];
            let first = med(v).expect("measured");
            let exit = median(s.iter().map(|s| s.exit).collect());
            let mut bytes: Vec<u64> = s.iter().map(|s| s.bytes).collect();
            bytes.sort_unstable();
            let ratio = |base: Option<Duration>| {
                base.map_or_else(|| "-".to_string(), |b| format!("{:.2}x", b.as_secs_f64() / first.as_secs_f64()))
            };
            println!(
                "| {} | {:.2} s | {:.2} s | {:.1} MB | {} | {} | {} |",
                variant.label(),
                first.as_secs_f64(),
                exit.as_secs_f64(),
                bytes[bytes.len() / 2] as f64 / 1e6,
                ratio(sz),
                ratio(szo),
                ratio(ov)
            );
        }
        print_phases(&samples[i], only);
    }
    Ok(())
}

/// Where the time went, per tool (medians of each phase's end, from the start of the pull): the
/// containerd rows split at the end of the pull; hb's rows (`hb run`, the snapshotter's daemon
/// and mount server) also by their own phase lines.
fn print_phases(samples: &[Vec<Sample>], only: &Only) {
    println!();
    println!("| phases (medians, from pull start) | pull done | resolved | indexes fetched | mounted | runtime started | first output | range requests (whole run) | reads waiting on the network (whole run, summed over threads) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let ms = |get: &dyn Fn(&Sample) -> Option<Duration>, s: &[Sample]| {
        let v: Vec<Duration> = s.iter().filter_map(get).collect();
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{} ms", median(v).as_millis())
        }
    };
    for (v, variant) in VARIANTS.iter().enumerate().filter(|(v, _)| only.variants.contains(v)) {
        let s = &samples[v];
        let mut requests: Vec<u64> = s.iter().filter_map(|s| s.phases.requests).collect();
        requests.sort_unstable();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            variant.name(),
            ms(&|s| s.phases.pulled, s),
            ms(&|s| s.phases.resolved, s),
            ms(&|s| s.phases.indexes, s),
            ms(&|s| s.phases.mounted, s),
            ms(&|s| s.phases.runtime, s),
            ms(&|s| Some(s.first), s),
            requests.get(requests.len() / 2).map_or("-".to_string(), |r| r.to_string()),
            ms(&|s| s.phases.net_wait, s),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_read_from_hb_runs_debug_lines_relative_to_the_start() {
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 7_503); // 02:05:03 UTC
        let stderr = "2026-12-07T02:05:03.436886Z DEBUG resolved\n\
            2026-12-07T02:05:03.533254Z DEBUG indexes fetched layers=3 bytes=776367\n\
            hello, a line without a stamp\n\
            2026-12-07T02:05:03.580000Z DEBUG indexes read layers=3\n\
            2026-12-07T02:05:03.600000Z DEBUG mounted lazy_layers=3\n\
            2026-12-07T02:05:03.700000Z  INFO runtime started\n\
            2026-12-07T02:05:03.710000Z DEBUG runtime started\n\
            2026-12-07T02:05:04.038319Z DEBUG reads remote_requests=34 remote_bytes=10594548 prefetched_chunks=129 network_wait_ms=477\n";
        let p = parse_phases(stderr, t0);
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis());
        assert_eq!(ms(p.resolved), Some(436));
        assert_eq!(ms(p.indexes), Some(533), "the pull's indexes, not the mount's read of them");
        assert_eq!(ms(p.mounted), Some(600));
        assert_eq!(ms(p.runtime), Some(710), "only DEBUG phase lines count");
        assert_eq!(p.requests, Some(34));
        assert_eq!(p.net_wait, Some(Duration::from_millis(477)));
        assert!(p.pulled.is_none());
        // Across midnight: a line at 00:00:00.1 after a start at 23:59:59.9 is 0.2 s in.
        let late = std::time::UNIX_EPOCH + Duration::from_secs_f64(20_001.0 * 86_400.0 - 0.1);
        let p = parse_phases("2026-12-08T00:00:00.100000Z DEBUG mounted\n", late);
        assert!(matches!(ms(p.mounted), Some(199..=200)), "{:?}", p.mounted);
    }

    #[test]
    fn a_snapshotter_daemons_phase_lines_carry_fields_after_the_phase() {
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 7_503);
        let lines = "2026-12-07T02:05:03.100000Z DEBUG resolved image=127.0.0.1:15000/bench/py-app:hb\n\
            2026-12-07T02:05:03.150000Z DEBUG indexes fetched image=127.0.0.1:15000/bench/py-app:hb layers=3 bytes=772155\n\
            2026-12-07T02:05:03.200000Z DEBUG store view opened\n\
            2026-12-07T02:05:03.250000Z DEBUG mounted lazy_layers=3\n";
        let p = parse_phases(lines, t0);
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis());
        assert_eq!((ms(p.resolved), ms(p.indexes), ms(p.mounted)), (Some(100), Some(150), Some(250)));
        assert!(p.runtime.is_none());
    }

    #[test]
    fn only_picks_images_and_tools_by_name_and_names_what_it_does_not_know() {
        let all = Only::parse(&[], &[]).unwrap();
        assert_eq!((all.images.len(), all.variants.len()), (IMAGES.len(), VARIANTS.len()));
        let some = Only::parse(&["big-binary".into()], &["stargz".into(), "hb-snapshotter".into()]).unwrap();
        assert_eq!(some.images, vec![2]);
        assert_eq!(
            some.variants.iter().map(|&v| VARIANTS[v]).collect::<Vec<_>>(),
            vec![Variant::Stargz, Variant::HbSnapshotter]
        );
        let err = Only::parse(&[], &["nydus".into()]).err().unwrap().to_string();
        assert!(err.contains("\"nydus\"") && err.contains("hb-run-ordered"), "{err}");
    }
}
