//! What an image update costs: bytes over the wire and time, hb (`hb pull` of v2 with v1 in the
//! store, from accelerated forms made by `hb convert`) against containerd (`ctr images pull` of v2
//! after v1: the changed layers whole, then unpacked). Both pull the same references from the same
//! loopback registry, and one meter counts both: the registry's own log (`http.response.written`
//! of every request to the repository).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::{hb_binary, median, repo_root, timed_command};

/// The shared test registry's log (scripts/registry.sh), read from a point on.
pub(crate) struct Meter {
    log: PathBuf,
    from: u64,
}

impl Meter {
    pub(crate) fn start() -> anyhow::Result<Meter> {
        Self::start_at("open")
    }

    /// A meter on the log of the registry in `$HB_REGISTRY_DIR/<name>/` (`open`, `shaped-lo`).
    pub(crate) fn start_at(name: &str) -> anyhow::Result<Meter> {
        let dir =
            std::env::var_os("HB_REGISTRY_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/hb-registry".into());
        let log = dir.join(name).join("registry.log");
        let from =
            std::fs::metadata(&log).with_context(|| format!("{} (scripts/registry.sh start)", log.display()))?.len();
        Ok(Meter { log, from })
    }

    /// Body bytes the registry wrote for requests under `/v2/<repo>/` since the start.
    fn bytes(&self, repo: &str) -> anyhow::Result<u64> {
        // The registry logs a request just after answering it: let the last line land.
        std::thread::sleep(Duration::from_millis(200));
        self.bytes_now(repo)
    }

    /// [`Meter::bytes`] as logged at this moment (requests still in flight are not counted).
    pub(crate) fn bytes_now(&self, repo: &str) -> anyhow::Result<u64> {
        let all = std::fs::read(&self.log)?;
        let text = String::from_utf8_lossy(&all[self.from as usize..]);
        let uri = format!(r#""http.request.uri":"/v2/{repo}/"#);
        Ok(text
            .lines()
            .filter(|l| l.contains("response completed") && l.contains(&uri))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["http.response.written"].as_u64())
            .sum())
    }
}

/// A store on a disk-backed filesystem, as users have one.
fn disk_scratch() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("hb-bench-update-").tempdir_in("/var/tmp")?)
}

fn convert(hb: &Path, src: &str, dst: &str) -> anyhow::Result<()> {
    let dir = disk_scratch()?;
    timed_command(Command::new(hb).arg("--root").arg(dir.path().join("store")).args(["-q", "convert", src, dst]))?;
    Ok(())
}

struct Containerd {
    script: PathBuf,
    sock: String,
}

impl Containerd {
    fn new() -> Containerd {
        let sock =
            std::env::var("HB_CONTAINERD_DIR").unwrap_or_else(|_| "/dev/shm/hb-containerd".into()) + "/containerd.sock";
        Containerd { script: repo_root().join("scripts/containerd.sh"), sock }
    }

    fn reset(&self) -> anyhow::Result<()> {
        timed_command(Command::new(&self.script).arg("reset"))?;
        Ok(())
    }

    fn pull(&self, image: &str) -> anyhow::Result<Duration> {
        let args = ["-a", &self.sock, "-n", "bench", "images", "pull", "--plain-http", image];
        Ok(timed_command(Command::new("ctr").args(args))?.0)
    }

    fn stop(&self) -> anyhow::Result<()> {
        timed_command(Command::new(&self.script).arg("stop"))?;
        Ok(())
    }
}

/// `v2` after `v1`, both converted into a repository of the bench's own, `runs` times each side in
/// alternating order (hb first in even runs, containerd first in odd ones).
pub(crate) fn update(runs: usize, v1: &str, v2: &str) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let reg = v1.split('/').next().unwrap_or("127.0.0.1:15000");
    let repo = "bench-update/app";
    let (a, b) = (format!("{reg}/{repo}:v1"), format!("{reg}/{repo}:v2"));
    eprintln!("update: converting {v1} and {v2}");
    convert(&hb, v1, &a)?;
    convert(&hb, v2, &b)?;
    let ctr = Containerd::new();
    let (mut t_hb, mut t_ctr, mut bytes_hb, mut bytes_ctr) = (vec![], vec![], 0, 0);
    for run in 0..runs {
        eprintln!("update: run {}/{runs}", run + 1);
        for side in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let dir = disk_scratch()?;
                let root = dir.path().join("store");
                timed_command(Command::new(&hb).arg("--root").arg(&root).args(["-q", "pull", "--plain-http", &a]))?;
                let m = Meter::start()?;
                let (t, _) =
                    timed_command(Command::new(&hb).arg("--root").arg(&root).args(["-q", "pull", "--plain-http", &b]))?;
                t_hb.push(t);
                bytes_hb = m.bytes(repo)?;
            } else {
                ctr.reset()?;
                ctr.pull(&a)?;
                let m = Meter::start()?;
                t_ctr.push(ctr.pull(&b)?);
                bytes_ctr = m.bytes(repo)?;
            }
        }
    }
    ctr.stop()?;
    let (h, c) = (median(t_hb), median(t_ctr));
    println!("| {v2} after {v1}, loopback registry, median of {runs} (alternating order) | time | bytes from the registry (its log) |");
    println!("|---|---|---|");
    println!(
        "| `ctr images pull` (containerd 1.6, overlayfs: changed layers whole + unpack) | {:.2} s | {:.1} MB |",
        c.as_secs_f64(),
        bytes_ctr as f64 / 1e6
    );
    println!(
        "| `hb pull` from the accelerated forms (new chunks by Range, store on ext4) | {:.2} s | {:.2} MB |",
        h.as_secs_f64(),
        bytes_hb as f64 / 1e6
    );
    println!(
        "| **hb / containerd** | **{:.2}x the time** | **{:.2} % of the bytes** |",
        h.as_secs_f64() / c.as_secs_f64(),
        bytes_hb as f64 * 100.0 / bytes_ctr.max(1) as f64
    );
    Ok(())
}

/// The ten-version series (bench/series.sh, pushed as `<registry>/hb-series:vN`), converted and
/// pulled in order into one hb store; containerd pulls the same references in order.
pub(crate) fn series(registry: &str) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let repo = "bench-update/series";
    let refs: Vec<String> = (1..=10).map(|i| format!("{registry}/{repo}:v{i}")).collect();
    for (i, r) in refs.iter().enumerate() {
        eprintln!("series: converting v{}", i + 1);
        convert(&hb, &format!("{registry}/hb-series:v{}", i + 1), r)
            .context("bench/series.sh push 127.0.0.1:15000 pushes the series")?;
    }
    let dir = disk_scratch()?;
    let root = dir.path().join("store");
    let ctr = Containerd::new();
    ctr.reset()?;
    println!("| version | gzip'ed layer (containerd's download, from the log) | hb's download (from the log) | how |");
    println!("|---|---|---|---|");
    let (mut total_hb, mut total_ctr) = (0u64, 0u64);
    for (i, r) in refs.iter().enumerate() {
        let m = Meter::start()?;
        ctr.pull(r)?;
        let c = m.bytes(repo)?;
        let m = Meter::start()?;
        let (_, out) =
            timed_command(Command::new(&hb).arg("--root").arg(&root).args(["--json", "pull", "--plain-http", r]))?;
        let h = m.bytes(repo)?;
        let rep: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let how = if rep["layers_by_chunks"].as_u64().unwrap_or(0) > 0 {
            format!("{} new chunks", rep["chunks_fetched"])
        } else {
            "whole layer".to_string()
        };
        println!("| v{} | {:.1} MB | {:.1} MB | {how} |", i + 1, c as f64 / 1e6, h as f64 / 1e6);
        total_hb += h;
        total_ctr += c;
    }
    ctr.stop()?;
    println!(
        "| **ten versions** | **{:.1} MB** | **{:.1} MB** | **{:.1}x fewer bytes** |",
        total_ctr as f64 / 1e6,
        total_hb as f64 / 1e6,
        total_ctr as f64 / total_hb.max(1) as f64
    );
    Ok(())
}
