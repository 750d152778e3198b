//! LAN peers: real daemons, each in its own network namespace with its own store, finding each
//! other by mDNS on a bridge of their own (`scripts/peers-net.sh`), and a real registry behind a
//! shaped uplink whose access log counts what crossed it.

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use hb_tests::*;

use super::daemon::wait_for;
use super::lazy::convert;
use super::pull::{open_registry, run};

/// The namespaces are shared: one test at a time uses them.
static NET: Mutex<()> = Mutex::new(());
const REGISTRY: &str = "10.232.0.2:5000";

fn net_up() {
    run(Command::new(workspace().join("scripts/peers-net.sh")).args(["up", "4", "100mbit"]));
    // Regression: the registry was started with `ip netns exec`, which gives it a mount namespace
    // of its own: a copy of every mount there was, so other tests' FUSE mounts stayed alive after
    // `hb umount` (their servers never exited). It must share ours.
    let o = Command::new("pgrep").args(["-f", "docker-registry serve .*peers/config.yml"]).output().unwrap();
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_eq!(theirs, ours, "the peers' registry (pid {pid}) runs in a mount namespace of its own");
    }
    assert!(o.status.success(), "no peers' registry running");
}

fn registry_log() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("HB_REGISTRY_DIR").unwrap_or("/var/tmp/hb-registry".into()))
        .join("peers/registry.log")
}

/// What peers at `ips` read from the registry since log offset `from`: (ranged reads of layer
/// data, their bytes, all bytes).
fn registry_reads(from: u64, ips: &[String]) -> (u64, u64, u64) {
    let log = std::fs::read(registry_log()).unwrap();
    let text = String::from_utf8_lossy(&log[from as usize..]).into_owned();
    let (mut ranged, mut ranged_bytes, mut all) = (0, 0, 0);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 10 || !ips.iter().any(|ip| ip == f[0]) || !l.contains("/blobs/") {
            continue;
        }
        let bytes: u64 = f[9].parse().unwrap_or(0);
        all += bytes;
        if f[8] == "206" {
            ranged += 1;
            ranged_bytes += bytes;
        }
    }
    (ranged, ranged_bytes, all)
}

fn log_len() -> u64 {
    std::fs::metadata(registry_log()).map(|m| m.len()).unwrap_or(0)
}

/// A daemon in namespace `hbp<i>` with peers on, stopped on drop (its mounts too).
struct Peer {
    hb: Hb,
    ns: String,
    ip: String,
    child: Option<Child>,
}

impl Peer {
    fn start(i: u32, psk: &std::path::Path, env: &[(&str, &str)]) -> Peer {
        let ip = format!("10.232.0.{}", 10 + i);
        let hb = Hb::new();
        let cfg = format!(
            "version = 1\n[daemon]\nsocket = \"{}\"\nsnapshotter_socket = \"{}\"\n\
             [p2p]\nenabled = true\npsk_file = \"{}\"\nlisten = [\"{ip}:7946\"]\nmdns = true\n",
            hb.path("hb.sock").display(),
            hb.path("snap.sock").display(),
            psk.display()
        );
        std::fs::write(hb.path("hb.toml"), cfg).unwrap();
        let hb = Hb { config: Some(hb.path("hb.toml")), ..hb };
        let ns = format!("--net=/run/netns/hbp{i}");
        let mut c = hb.command_via(&["nsenter", &ns], &["daemon"]);
        c.envs(env.iter().copied()).env("HB_LOG", "info").stdout(Stdio::null());
        c.stderr(std::fs::File::create(hb.path("daemon.log")).unwrap());
        let child = c.spawn().unwrap();
        let p = Peer { hb, ns, ip, child: Some(child) };
        wait_for("the peer's daemon", || p.hb.path("hb.sock").exists() && p.try_report().is_some());
        p
    }

    fn cmd(&self, args: &[&str]) -> Command {
        self.hb.command_via(&["nsenter", &self.ns], args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args).output().unwrap();
        assert!(o.status.success(), "hb {args:?} on {}: {}", self.ip, String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }

    fn try_report(&self) -> Option<serde_json::Value> {
        let o = self.cmd(&["--json", "peers"]).output().ok()?;
        serde_json::from_slice(&o.stdout).ok()
    }

    fn report(&self) -> serde_json::Value {
        self.try_report().unwrap_or_else(|| panic!("no hb peers report on {}", self.ip))
    }

    fn peer_id(&self) -> String {
        self.report()["peer_id"].as_str().unwrap().to_string()
    }

    /// This node's view of `other`.
    fn sees(&self, other: &str) -> Option<serde_json::Value> {
        self.report()["peers"].as_array().unwrap().iter().find(|p| p["id"] == other).cloned()
    }

    /// Waits until this node has `holder`'s summary of at least `chunks` chunks.
    fn wait_for_summary(&self, holder: &Peer, chunks: u64) {
        let id = holder.peer_id();
        wait_for("a holder's summary", || {
            self.sees(&id)
                .is_some_and(|p| p["connected"] == true && p["chunks_held_estimate"].as_u64() >= Some(chunks * 9 / 10))
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
        super::daemon::unmount_all(&self.hb);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Its mount servers (the image it was serving from) die with it here.
        let _ = Command::new("pkill").args(["-9", "-f", &format!("root {}", self.hb.root.display())]).status();
        super::daemon::unmount_all(&self.hb);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.hb.path("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            eprintln!("--- daemon log of {} ---\n{}", self.ip, tail.join("\n"));
        }
        self.stop();
    }
}

fn psk(dir: &Hb, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    dir.ok(&["peers", "keygen", p.to_str().unwrap()]);
    p
}

/// The image as peers name it (the same storage as the open registry).
fn accelerated() -> String {
    let reg = open_registry();
    convert(&format!("{reg}/debian-app:v1"), "p2p").replace(&reg, REGISTRY)
}

fn run_42(p: &Peer, image: &str) {
    let out = p.ok(&["run", "--rm", "--plain-http", image, "python3", "-c", "print(6*7)"]);
    assert_eq!(out, "42\n", "on {}", p.ip);
}

#[test]
fn a_peer_holding_an_image_serves_three_cold_starts_with_no_layer_data_from_the_registry() {
    let _net = NET.lock().unwrap_or_else(|e| e.into_inner());
    net_up();
    let image = accelerated();
    let keys = Hb::new();
    let key = psk(&keys, "swarm.key");
    let mut peers: Vec<Peer> = (1..=4).map(|i| Peer::start(i, &key, &[])).collect();
    peers[0].ok(&["pull", "--plain-http", &image]);
    let held = peers[0].report()["chunks_held"].as_u64().unwrap();
    assert!(held > 100, "{held}");
    for p in &peers[1..] {
        p.wait_for_summary(&peers[0], held);
    }

    // Three cold starts at once: every chunk from the holder (or from each other), none by Range.
    let from = log_len();
    std::thread::scope(|s| {
        for p in &peers[1..] {
            let image = image.clone();
            s.spawn(move || run_42(p, &image));
        }
    });
    let ips: Vec<String> = peers[1..].iter().map(|p| p.ip.clone()).collect();
    let (ranged, ranged_bytes, all) = registry_reads(from, &ips);
    assert_eq!((ranged, ranged_bytes), (0, 0), "layer data came from the registry ({all} bytes of blobs in all)");
    for p in &peers[1..] {
        let r = p.report();
        assert!(r["stats"]["chunks_received"].as_u64().unwrap() > 0, "{r:#}");
        assert_eq!(r["stats"]["corrupt_chunks"], 0);
        // The layers' indexes and chunk tables came from a peer too (the holder kept those its
        // pull read).
        assert!(r["stats"]["blobs_received"].as_u64().unwrap() >= 2, "{r:#}");
    }
    let h = peers[0].report();
    assert!(h["stats"]["chunks_sent"].as_u64().unwrap() > 0);
    assert!(h["stats"]["blobs_sent"].as_u64().unwrap() >= 2, "{h:#}");
    let m = curl_metrics(&peers[1]);
    assert!(m.contains("hb_p2p_bytes_total{direction=\"received\"}"), "{m}");
    for p in &mut peers {
        p.stop();
        p.hb.fsck_clean();
    }
}

fn curl_metrics(p: &Peer) -> String {
    let o = Command::new("curl")
        .args(["-sf", "--unix-socket", p.hb.path("hb.sock").to_str().unwrap(), "http://hb/metrics"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_lying_peer_is_banned_a_stranger_never_connects_and_a_dead_holder_costs_no_start() {
    let _net = NET.lock().unwrap_or_else(|e| e.into_inner());
    net_up();
    let image = accelerated();
    let keys = Hb::new();
    let key = psk(&keys, "swarm.key");
    let other_key = psk(&keys, "other.key");
    let honest = Peer::start(1, &key, &[]);
    let liar = Peer::start(2, &key, &[("HB_P2P_FAULT", "corrupt-serving")]);
    let victim = Peer::start(3, &key, &[]);
    let stranger = Peer::start(4, &other_key, &[]);
    honest.ok(&["pull", "--plain-http", &image]);
    liar.ok(&["pull", "--plain-http", &image]);
    let held = honest.report()["chunks_held"].as_u64().unwrap();
    victim.wait_for_summary(&honest, held);
    victim.wait_for_summary(&liar, held);

    // The victim starts the image: the liar's chunks are refused, the liar banned, the honest
    // holder (or the registry) serves the rest; the container sees only right bytes.
    run_42(&victim, &image);
    let r = victim.report();
    assert!(r["stats"]["bans"].as_u64().unwrap() >= 1, "{r:#}");
    let seen = victim.sees(&liar.peer_id()).expect("the liar is listed");
    assert!(seen["banned_for_seconds"].as_u64().unwrap() > 3000, "{seen:#}");
    assert!(seen["ban_reason"].as_str().unwrap().contains("wrong bytes"), "{seen:#}");
    assert_eq!(seen["connected"], false, "a banned peer is disconnected: {seen:#}");
    assert!(victim.sees(&honest.peer_id()).unwrap()["bytes_received"].as_u64().unwrap() > 0);

    // The node with another key saw the others on mDNS but never got a connection.
    let s = stranger.report();
    assert!(s["peers"].as_array().unwrap().iter().all(|p| p["connected"] == false), "{s:#}");
    run_42(&stranger, &image);
    assert_eq!(stranger.report()["stats"]["chunks_received"], 0);

    // A holder killed while a cold start reads from it: the start still succeeds (the registry
    // serves what the dead peer did not), and nothing wrong is kept.
    let mut honest = honest;
    let mut liar = liar;
    let mut stranger = stranger;
    liar.stop();
    stranger.stop();
    let mut late = Peer::start(4, &key, &[]);
    late.wait_for_summary(&honest, held);
    std::thread::scope(|s| {
        let t = s.spawn(|| run_42(&late, &image));
        std::thread::sleep(Duration::from_millis(150));
        honest.kill9();
        t.join().unwrap();
    });
    let mut victim = victim;
    for p in [&mut victim, &mut stranger, &mut late, &mut honest, &mut liar] {
        p.stop();
        p.hb.fsck_clean();
    }
}
