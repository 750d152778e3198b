//! LAN peers: cold starts on a machine whose team already holds the image, against the same
//! start with peers switched off; discovery and lookup figures; a lying peer among the holders;
//! four hosts pulling one image at the same moment against one host pulling it alone.
//!
//! Four hosts in network namespaces on one bridge (`scripts/peers-net.sh`), each its own hb
//! daemon and store (disk-backed, under /var/tmp), the registry behind a shaped uplink in a
//! namespace of its own. Per image and round: host 1 pulls the image whole (untimed); hosts 2-4
//! then each start it cold with `hb run --rm IMAGE` (the image's own command), with peers on or
//! switched off (`hb peers off`: the same daemon, node and client, no peer asked), the modes
//! alternating and their order randomized per round. Timed: the start of `hb run` to the first
//! byte of the container's output, everything the daemon does for it inside. Bytes: the
//! registry's own access log, by the starting host's address.
//!
//! Pulls at once: fresh hosts, peers connected, nobody holding the image; `hb pull` by host 1
//! alone, then (new hosts) by all four at the same instant. Timed: each pull command; the four's
//! wall time is the last to finish. Bytes: every blob byte the registry sent the hosts.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{hb_binary, median, repo_root, timed_command};

const IMAGES: [&str; 3] = ["py-app", "build-step", "big-binary"];
const REGISTRY: &str = "10.232.0.2:5000";

fn registry_log() -> PathBuf {
    PathBuf::from(std::env::var("HB_REGISTRY_DIR").unwrap_or("/var/tmp/hb-registry".into())).join("peers/registry.log")
}

fn log_len() -> u64 {
    std::fs::metadata(registry_log()).map(|m| m.len()).unwrap_or(0)
}

/// Blob bytes the registry sent `ip` since log offset `from`: (ranged layer-data reads, all).
fn registry_bytes(from: u64, ip: &str) -> anyhow::Result<(u64, u64)> {
    let log = std::fs::read(registry_log())?;
    let text = String::from_utf8_lossy(&log[(from as usize).min(log.len())..]).into_owned();
    let (mut ranged, mut all) = (0, 0);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 10 || f[0] != ip || !l.contains("/blobs/") {
            continue;
        }
        let b: u64 = f[9].parse().unwrap_or(0);
        all += b;
        if f[8] == "206" {
            ranged += b;
        }
    }
    Ok((ranged, all))
}

/// One host: a daemon with peers on in namespace `hbp<i>`.
struct Host {
    hb: PathBuf,
    dir: tempfile::TempDir,
    ns: String,
    ip: String,
    daemon: Option<Child>,
}

impl Host {
    fn start(hb: &Path, i: u32, psk: &Path, env: &[(&str, &str)]) -> anyhow::Result<Host> {
        let dir = tempfile::Builder::new().prefix("hb-bench-peer-").tempdir_in("/var/tmp")?;
        let ip = format!("10.232.0.{}", 10 + i);
        let cfg = format!(
            "version = 1\n[store]\nroot = \"{0}/store\"\n[daemon]\nsocket = \"{0}/hb.sock\"\nsnapshotter_socket = \"{0}/snap.sock\"\n\
             [p2p]\nenabled = true\npsk_file = \"{1}\"\nlisten = [\"{ip}:7946\"]\nmdns = true\n",
            dir.path().display(),
            psk.display()
        );
        std::fs::write(dir.path().join("hb.toml"), cfg)?;
        let mut h = Host { hb: hb.to_path_buf(), dir, ns: format!("--net=/run/netns/hbp{i}"), ip, daemon: None };
        let log = std::fs::File::create(h.dir.path().join("daemon.log"))?;
        let child = h
            .cmd(&["daemon"])
            .envs(env.iter().copied())
            .env("HB_LOG", "info,libp2p_mdns=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        h.daemon = Some(child);
        let t = Instant::now();
        while h.report().is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the daemon on {} did not come up", h.ip);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(h)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(&self.ns).arg(&self.hb).arg("--config").arg(self.dir.path().join("hb.toml")).args(args);
        c
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<()> {
        timed_command(&mut self.cmd(args)).map(|_| ())
    }

    fn report(&self) -> anyhow::Result<serde_json::Value> {
        let (_, o) = timed_command(&mut self.cmd(&["--json", "peers"]))?;
        Ok(serde_json::from_slice(&o.stdout)?)
    }

    /// Waits until this host has `chunks` of `holder`'s summary (90 %: it is an estimate).
    fn wait_for_holder(&self, holder: &str, chunks: u64) -> anyhow::Result<Duration> {
        let t = Instant::now();
        loop {
            let r = self.report()?;
            let seen = r["peers"].as_array().into_iter().flatten().any(|p| {
                p["id"] == holder
                    && p["connected"] == true
                    && p["chunks_held_estimate"].as_u64() >= Some(chunks * 9 / 10)
            });
            if seen {
                return Ok(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(60) {
                let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
                let _ = std::fs::copy(self.dir.path().join("daemon.log"), "/var/tmp/hb-bench-peer-failed.log");
                bail!(
                    "{} never saw {holder}'s summary: {r}\n{}",
                    self.ip,
                    log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `hb run --rm IMAGE`: (time to the first byte of output, registry layer-data bytes, all).
    fn cold_start(&self, image: &str) -> anyhow::Result<(Duration, u64, u64)> {
        let from = log_len();
        let mut cmd = self.cmd(&["-q", "run", "--rm", "--plain-http", image]);
        let started = Instant::now();
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let mut first = [0u8; 1];
        let n = child.stdout.take().expect("piped").read(&mut first)?;
        let t = started.elapsed();
        let rest = child.wait_with_output()?;
        if n == 0 || !rest.status.success() {
            bail!("hb run {image} on {} failed: {}", self.ip, String::from_utf8_lossy(&rest.stderr));
        }
        // The log is written as answers finish: give the last ones a moment.
        std::thread::sleep(Duration::from_millis(200));
        let (ranged, all) = registry_bytes(from, &self.ip)?;
        Ok((t, ranged, all))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
        if let Ok(dirs) = std::fs::read_dir(self.dir.path().join("store/images")) {
            for e in dirs.flatten().filter(|e| e.path().is_dir()) {
                let _ = self.cmd(&["-q", "umount"]).arg(e.path()).stderr(Stdio::null()).status();
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Default)]
struct Figures {
    on: Vec<Duration>,
    off: Vec<Duration>,
    liar: Vec<Duration>,
    /// The same steps as a start with a liar, the liar gone.
    no_liar: Vec<Duration>,
    on_ranged: Vec<u64>,
    off_ranged: Vec<u64>,
    /// Every blob byte from the registry (layer data, indexes, tables, configs).
    on_all: Vec<u64>,
    off_all: Vec<u64>,
    liar_ranged: Vec<u64>,
    discovery: Vec<Duration>,
    lookup_p99_us: Vec<u64>,
    lookup_cpu_p99_us: Vec<u64>,
    bans: u64,
    solo: Vec<Duration>,
    solo_bytes: Vec<u64>,
    alone: Vec<Duration>,
    alone_bytes: Vec<u64>,
    four: Vec<Duration>,
    four_bytes: Vec<u64>,
}

/// Fresh hosts 1-4 with peers connected to each other.
fn four_hosts(hb: &Path, psk: &Path) -> anyhow::Result<Vec<Host>> {
    let hosts: Vec<Host> = (1..=4).map(|i| Host::start(hb, i, psk, &[])).collect::<anyhow::Result<_>>()?;
    let t = Instant::now();
    for h in &hosts {
        loop {
            let r = h.report()?;
            let n = r["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["connected"] == true && !p["summary_generation"].is_null())
                .count();
            if n >= 3 {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{} did not connect to the other three: {r}", h.ip);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(hosts)
}

/// `hb pull` of `image` by each of `hosts` at the same instant: (the last one's time, registry
/// bytes sent to them all).
fn pull_at_once(hosts: &[&Host], image: &str) -> anyhow::Result<(Duration, u64)> {
    let from = log_len();
    let started = Instant::now();
    let times: Vec<anyhow::Result<Duration>> = std::thread::scope(|s| {
        let hs: Vec<_> = hosts
            .iter()
            .map(|h| {
                s.spawn(move || {
                    timed_command(&mut h.cmd(&["-q", "pull", "--plain-http", image]))?;
                    Ok(started.elapsed())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("a pull thread")).collect()
    });
    let mut wall = Duration::ZERO;
    for t in times {
        wall = wall.max(t?);
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut bytes = 0;
    for h in hosts {
        bytes += registry_bytes(from, &h.ip)?.1;
    }
    Ok((wall, bytes))
}

/// The hosts' namespaces and the registry behind the shaped uplink (`scripts/peers-net.sh`), taken
/// down when the run ends, however it ends: a registry left serving in its namespace would cost
/// the next benchmark on this machine CPU it does not see.
struct PeersNet;

impl PeersNet {
    fn up(rate: &str) -> anyhow::Result<PeersNet> {
        timed_command(Command::new(repo_root().join("scripts/peers-net.sh")).args(["up", "4", rate]))?;
        Ok(PeersNet)
    }
}

impl Drop for PeersNet {
    fn drop(&mut self) {
        if let Err(e) = timed_command(Command::new(repo_root().join("scripts/peers-net.sh")).arg("down")) {
            eprintln!("peers: taking the hosts' network down failed: {e:#}");
        }
    }
}

/// `pulls`: only the pulls (one host alone, peers off and on; four at once).
pub(crate) fn run(rounds: usize, rate: &str, seed: Option<u64>, pulls: bool) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let _net = PeersNet::up(rate)?;
    let keys = tempfile::tempdir()?;
    let psk = keys.path().join("swarm.key");
    timed_command(Command::new(&hb).args(["peers", "keygen"]).arg(&psk))?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("peers: seed {seed}");
    let mut order = crate::Shuffle(seed);
    let mut figures: Vec<Figures> = IMAGES.iter().map(|_| Figures::default()).collect();
    for round in 0..rounds {
        for (i, image) in IMAGES.iter().enumerate() {
            let reference = format!("{REGISTRY}/bench/{image}:hb");
            let f = &mut figures[i];
            if !pulls {
                let mut hosts: Vec<Host> = Vec::new();
                // The holder first; the others' discovery of it is timed from their start.
                hosts.push(Host::start(&hb, 1, &psk, &[])?);
                hosts[0]
                    .ok(&["-q", "pull", "--plain-http", &reference])
                    .with_context(|| format!("pulling {reference}"))?;
                let held = hosts[0].report()?["chunks_held"].as_u64().unwrap_or(0);
                let holder = hosts[0].report()?["peer_id"].as_str().unwrap_or_default().to_string();
                for h in 2..=4 {
                    let started = Instant::now();
                    let host = Host::start(&hb, h, &psk, &[])?;
                    host.wait_for_holder(&holder, held)?;
                    f.discovery.push(started.elapsed());
                    hosts.push(host);
                }
                // Modes of hosts 2-4: on/off alternating, in a random order.
                let mut modes = if round % 2 == 0 { vec![true, false, true] } else { vec![false, true, false] };
                order.shuffle(&mut modes);
                for (k, on) in modes.iter().enumerate() {
                    let host = &hosts[k + 1];
                    if !on {
                        host.ok(&["peers", "off"])?;
                    }
                    crate::lazy::drop_caches();
                    let (t, ranged, all) = host.cold_start(&reference)?;
                    eprintln!(
                        "peers: {image} round {round} host {} peers {}: {:.2} s, {} B ranged, {} B of blobs",
                        host.ip,
                        if *on { "on" } else { "off" },
                        t.as_secs_f64(),
                        ranged,
                        all
                    );
                    if *on {
                        f.on.push(t);
                        f.on_ranged.push(ranged);
                        f.on_all.push(all);
                        let stats = &host.report()?["stats"];
                        f.lookup_p99_us.push(stats["lookup_p99_us"].as_u64().unwrap_or(0));
                        f.lookup_cpu_p99_us.push(stats["lookup_cpu_p99_us"].as_u64().unwrap_or(0));
                    } else {
                        f.off.push(t);
                        f.off_ranged.push(ranged);
                        f.off_all.push(all);
                    }
                }
                for h in &mut hosts[1..] {
                    h.stop();
                }
                hosts.truncate(1);
                // A lying holder beside the honest one, against the same start without it: a host
                // pulls the image as a second holder (lying: every chunk it serves has a flipped
                // byte; or honest and stopped again, so the start has the first holder alone), then
                // a fresh host finds its holders and starts the image cold. The same steps either
                // way, so only the liar differs; two of each per round, in a random order.
                let mut modes =
                    if round % 2 == 0 { vec![true, false, false, true] } else { vec![false, true, true, false] };
                order.shuffle(&mut modes);
                for (k, lying) in modes.into_iter().enumerate() {
                    let fault: &[(&str, &str)] = if lying { &[("HB_P2P_FAULT", "corrupt-serving")] } else { &[] };
                    let mut second = Host::start(&hb, 2, &psk, fault)?;
                    second.ok(&["-q", "pull", "--plain-http", &reference])?;
                    let second_id = second.report()?["peer_id"].as_str().unwrap_or_default().to_string();
                    if !lying {
                        second.stop();
                    }
                    let starter = Host::start(&hb, 3 + (k % 2) as u32, &psk, &[])?;
                    starter.wait_for_holder(&holder, held)?;
                    if lying {
                        starter.wait_for_holder(&second_id, held)?;
                    }
                    crate::lazy::drop_caches();
                    let (t, ranged, _) = starter.cold_start(&reference)?;
                    eprintln!(
                        "peers: {image} round {round} host {} {}: {:.2} s, {} B ranged",
                        starter.ip,
                        if lying { "with a liar" } else { "without the liar" },
                        t.as_secs_f64(),
                        ranged
                    );
                    if lying {
                        f.liar.push(t);
                        f.liar_ranged.push(ranged);
                        f.bans += starter.report()?["stats"]["bans"].as_u64().unwrap_or(0);
                    } else {
                        f.no_liar.push(t);
                    }
                }
                drop(hosts);
            }
            // Pulls: one host alone with peers off (hb without peers), one alone with peers on,
            // four at once (fresh hosts each time), in a random order.
            let mut modes = [0, 1, 2];
            order.shuffle(&mut modes);
            for mode in modes {
                let hosts = four_hosts(&hb, &psk)?;
                if mode == 0 {
                    hosts[0].ok(&["peers", "off"])?;
                }
                crate::lazy::drop_caches();
                let pulling: Vec<&Host> = if mode == 2 { hosts.iter().collect() } else { vec![&hosts[0]] };
                let (t, bytes) = pull_at_once(&pulling, &reference)?;
                eprintln!(
                    "peers: {image} round {round} pull mode {mode} by {}: {:.2} s, {:.1} MB",
                    pulling.len(),
                    t.as_secs_f64(),
                    bytes as f64 / 1e6
                );
                let (times, sizes) = match mode {
                    0 => (&mut f.solo, &mut f.solo_bytes),
                    1 => (&mut f.alone, &mut f.alone_bytes),
                    _ => (&mut f.four, &mut f.four_bytes),
                };
                times.push(t);
                sizes.push(bytes);
            }
        }
    }
    println!(
        "LAN peers: 4 hosts in network namespaces on one bridge, registry behind a {rate} uplink \
         (scripts/peers-net.sh); {rounds} rounds, modes alternated in a random order (seed {seed}); medians."
    );
    if !pulls {
        println!();
        println!("| image (`hb run --rm`, image's own command) | peers on: first output | peers off | on vs off | layer data from the registry, on / off | all blob bytes from the registry (indexes, configs), on / off | with a lying holder too | the same start without it | liar vs without | discovery of a holder (start to its summary) | lookup p99 (worst start; on CPU) |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for (i, image) in IMAGES.iter().enumerate() {
            let f = &figures[i];
            let (on, off, liar) = (median(f.on.clone()), median(f.off.clone()), median(f.liar.clone()));
            let no_liar = median(f.no_liar.clone());
            let mid = |mut v: Vec<u64>| {
                v.sort_unstable();
                v.get(v.len() / 2).copied().unwrap_or(0)
            };
            println!(
            "| bench/{image}:hb | {:.2} s | {:.2} s | **{:.2}x** | {:.1} MB / {:.1} MB | {:.2} MB / {:.2} MB | {:.2} s ({} bans) | {:.2} s | {:.2}x | {:.2} s | {} us ({} us) |",
            on.as_secs_f64(),
            off.as_secs_f64(),
            on.as_secs_f64() / off.as_secs_f64(),
            mid(f.on_ranged.clone()) as f64 / 1e6,
            mid(f.off_ranged.clone()) as f64 / 1e6,
            mid(f.on_all.clone()) as f64 / 1e6,
            mid(f.off_all.clone()) as f64 / 1e6,
            liar.as_secs_f64(),
            f.bans,
            no_liar.as_secs_f64(),
            liar.as_secs_f64() / no_liar.as_secs_f64(),
            median(f.discovery.clone()).as_secs_f64(),
            f.lookup_p99_us.iter().max().copied().unwrap_or(0),
            f.lookup_cpu_p99_us.iter().max().copied().unwrap_or(0),
        );
        }
    }
    println!();
    println!("| image | one host pulls alone, peers off (layer blobs) | alone, peers on (chunks) | four hosts pull at once, peers on (last done) | wall, four vs one alone (off / on) | registry bytes: alone off / alone on / four | bytes, four vs one alone (off / on) |");
    println!("|---|---|---|---|---|---|---|");
    for (i, image) in IMAGES.iter().enumerate() {
        let f = &figures[i];
        let mid = |mut v: Vec<u64>| {
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        let (solo, one, four) = (median(f.solo.clone()), median(f.alone.clone()), median(f.four.clone()));
        let (b0, b1, b4) = (mid(f.solo_bytes.clone()), mid(f.alone_bytes.clone()), mid(f.four_bytes.clone()));
        println!(
            "| bench/{image}:hb | {:.2} s | {:.2} s | {:.2} s | **{:.2}x** / {:.2}x | {:.1} / {:.1} / {:.1} MB | **{:.2}x** / {:.2}x |",
            solo.as_secs_f64(),
            one.as_secs_f64(),
            four.as_secs_f64(),
            four.as_secs_f64() / solo.as_secs_f64(),
            four.as_secs_f64() / one.as_secs_f64(),
            b0 as f64 / 1e6,
            b1 as f64 / 1e6,
            b4 as f64 / 1e6,
            b4 as f64 / b0 as f64,
            b4 as f64 / b1 as f64
        );
    }
    Ok(())
}

/// Cold starts just after every holder switched peers off (they hold the image, stay connected,
/// and their summaries still claim it until the next refresh) against the same start with peers
/// off on the starting host; alternated per round. What switching off costs a start.
pub(crate) fn switched_off(rounds: usize, rate: &str) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let _net = PeersNet::up(rate)?;
    let keys = tempfile::tempdir()?;
    let psk = keys.path().join("swarm.key");
    timed_command(Command::new(&hb).args(["peers", "keygen"]).arg(&psk))?;
    println!("LAN peers switched off just before a cold start: 3 holders, registry behind a {rate} uplink; {rounds} rounds; medians.");
    println!();
    println!("| image | holders just switched off: first output | starter's peers off | ratio | layer data from the registry (both) |");
    println!("|---|---|---|---|---|");
    for image in IMAGES {
        let reference = format!("{REGISTRY}/bench/{image}:hb");
        let (mut just_off, mut own_off, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            for first in if round % 2 == 0 { [true, false] } else { [false, true] } {
                let hosts: Vec<Host> =
                    (1..=4).map(|i| Host::start(&hb, i, &psk, &[])).collect::<anyhow::Result<_>>()?;
                let holder_ids: Vec<String> = hosts[..3]
                    .iter()
                    .map(|h| h.report().map(|r| r["peer_id"].as_str().unwrap_or_default().to_string()))
                    .collect::<anyhow::Result<_>>()?;
                for h in &hosts[..3] {
                    h.ok(&["-q", "pull", "--plain-http", &reference])?;
                }
                let held = hosts[0].report()?["chunks_held"].as_u64().unwrap_or(0);
                for id in &holder_ids {
                    hosts[3].wait_for_holder(id, held)?;
                }
                if first {
                    for h in &hosts[..3] {
                        h.ok(&["peers", "off"])?;
                    }
                } else {
                    hosts[3].ok(&["peers", "off"])?;
                }
                crate::lazy::drop_caches();
                let (t, ranged, _) = hosts[3].cold_start(&reference)?;
                eprintln!(
                    "peers: {image} round {round} {}: {:.2} s, {ranged} B ranged",
                    if first { "holders just off" } else { "starter off" },
                    t.as_secs_f64()
                );
                if first {
                    just_off.push(t);
                } else {
                    own_off.push(t);
                }
                bytes.push(ranged);
            }
        }
        let (a, b) = (median(just_off), median(own_off));
        bytes.sort_unstable();
        println!(
            "| bench/{image}:hb | {:.2} s | {:.2} s | **{:.2}x** (+{:.0} ms) | {:.1}-{:.1} MB |",
            a.as_secs_f64(),
            b.as_secs_f64(),
            a.as_secs_f64() / b.as_secs_f64(),
            (a.as_secs_f64() - b.as_secs_f64()) * 1000.0,
            bytes[0] as f64 / 1e6,
            bytes[bytes.len() - 1] as f64 / 1e6
        );
    }
    Ok(())
}
