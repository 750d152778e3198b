//! kill -9 at random moments during ingest and gc: the store always passes fsck and nothing that
//! was committed is lost.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hb_tests::*;

/// A plain tar with one large pseudo-random file, so an import spends its time writing chunks.
fn big_layer(dir: &Path, seed: u64, mib: usize) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    let data = pseudo_random(seed, mib << 20);
    let mut h = file_header(data.len() as u64, 0o644);
    b.append_data(&mut h, format!("data-{seed}"), &data[..]).unwrap();
    let small = format!("small file of layer {seed}");
    let mut h = file_header(small.len() as u64, 0o600);
    b.append_data(&mut h, "etc/small", small.as_bytes()).unwrap();
    let p = dir.join(format!("layer-{seed}.tar"));
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    p
}

/// Kill delays that adapt: shorter after a run that finished, longer after one that was killed,
/// so kills keep landing inside the operation however fast this machine runs it right now.
struct Killer {
    rng: Rng,
    max_us: u64,
    killed: usize,
    finished: usize,
}

impl Killer {
    fn new(seed: u64, full: Duration) -> Self {
        Killer { rng: Rng(seed), max_us: (full.as_micros() as u64).max(1000), killed: 0, finished: 0 }
    }

    /// Runs hb with `args`, SIGKILLs it after a random delay unless it finished, and adapts.
    fn attempt(&mut self, hb: &Hb, args: &[&str]) {
        let done = run_and_kill(hb, args, Duration::from_micros(self.rng.next() % self.max_us));
        if done {
            self.finished += 1;
            self.max_us = (self.max_us * 7 / 10).max(1000);
        } else {
            self.killed += 1;
            self.max_us = self.max_us * 11 / 10;
        }
    }
}

/// Runs `args`, killing it with SIGKILL after `delay` unless it finished; true when it finished.
fn run_and_kill(hb: &Hb, args: &[&str], delay: Duration) -> bool {
    let mut child = hb.command(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "hb {args:?} failed on its own: {status}");
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    status.success()
}

#[test]
fn kill_9_during_ingest_leaves_a_consistent_store() {
    let hb = Hb::new();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("crash test seed {seed}");
    let layers: Vec<PathBuf> = (0..5).map(|i| big_layer(hb.dir.path(), i, 40)).collect();
    // One committed layer before the storm, and the time a whole import takes.
    let t = Instant::now();
    let first = hb.import(&layers[0]);
    let full = t.elapsed();
    let mut committed = vec![(first["diff_id"].as_str().unwrap().to_string(), 0usize)];
    let mut killer = Killer::new(seed, full);
    // Rounds alternate between layers, so kills land both while new chunks are written and while
    // an already-stored layer's refcounts are committed again.
    for round in 0..24 {
        let which = 1 + round % (layers.len() - 1);
        killer.attempt(&hb, &["layer", "import", layers[which].to_str().unwrap()]);
        hb.fsck_clean();
        // Whether or not the kill landed first, the layer is either fully there or absent.
        let listed: Vec<String> = hb
            .json(&["layer", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["diff_id"].as_str().unwrap().to_string())
            .collect();
        // Nothing committed before this kill was lost by it.
        for (c, from) in &committed {
            assert!(
                listed.contains(c),
                "round {round}: layer {c} (from layer file {from}) was committed and is gone (seed {seed})"
            );
        }
        for d in listed {
            if !committed.iter().any(|(c, _)| *c == d) {
                committed.push((d, which));
            }
        }
    }
    println!("ingest: {} killed, {} finished", killer.killed, killer.finished);
    assert!(killer.killed > 0, "no kill landed during an import (seed {seed})");

    // Every layer still pinned exports exactly what went in.
    let pinned: Vec<String> = hb
        .json(&["layer", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["pinned"] == true)
        .map(|l| l["diff_id"].as_str().unwrap().to_string())
        .collect();
    assert!(!pinned.is_empty());
    for d in pinned {
        let which = committed.iter().find(|(c, _)| *c == d).unwrap().1;
        let out = hb.path("check.tar");
        hb.ok(&["layer", "export", &d, "-o", out.to_str().unwrap()]);
        let want = fingerprint_tar(&std::fs::read(&layers[which]).unwrap());
        assert_same_tree(
            &format!("layer {which} after crashes"),
            &want,
            &fingerprint_tar(&std::fs::read(&out).unwrap()),
            false,
        );
    }
}

#[test]
fn kill_9_during_gc_and_compaction_leaves_a_consistent_store() {
    let hb = Hb::new();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("gc crash test seed {seed}");
    let keep = big_layer(hb.dir.path(), 50, 12);
    let garbage = big_layer(hb.dir.path(), 51, 40);
    let keep_id = hb.import(&keep)["diff_id"].as_str().unwrap().to_string();
    // Each round: add a layer, unpin it, and gc: its chunks go and the pack it shares with the
    // kept layer falls below half live, so gc also rewrites the kept layer's chunks.
    let round = |hb: &Hb| {
        let d = hb.import(&garbage)["diff_id"].as_str().unwrap().to_string();
        hb.ok(&["layer", "rm", &d]);
    };
    round(&hb);
    let t = Instant::now();
    let r = hb.json(&["gc"]);
    let full = t.elapsed();
    assert_eq!(r["packs_compacted"], 1, "the scenario must compact: {r:#}");
    let mut killer = Killer::new(seed, full);
    for _ in 0..10 {
        round(&hb);
        killer.attempt(&hb, &["gc"]);
        hb.fsck_clean();
        // The kept layer survives every killed gc, whole.
        let listed = hb.json(&["layer", "ls"]);
        assert!(
            listed.as_array().unwrap().iter().any(|l| l["diff_id"] == keep_id.as_str() && l["pinned"] == true),
            "the kept layer was lost by a killed gc (seed {seed}): {listed:#}"
        );
    }
    println!("gc: {} killed, {} finished", killer.killed, killer.finished);
    assert!(killer.killed > 0, "no kill landed during a gc (seed {seed})");
    hb.ok(&["gc"]);
    hb.fsck_clean();
    let out = hb.path("keep.tar");
    hb.ok(&["layer", "export", &keep_id, "-o", out.to_str().unwrap()]);
    assert_same_tree(
        "kept layer after gc crashes",
        &fingerprint_tar(&std::fs::read(&keep).unwrap()),
        &fingerprint_tar(&std::fs::read(&out).unwrap()),
        false,
    );
}

/// kill -9 during `hb pull` (several layers downloading into concurrent ingests at once): the
/// store always passes fsck, and a final pull completes what the killed ones left.
#[test]
fn kill_9_during_pull_leaves_a_consistent_store() {
    let port: u16 = std::env::var("HB_REGISTRY_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(15000);
    let reg = format!("127.0.0.1:{port}");
    assert!(std::net::TcpStream::connect(&reg).is_ok(), "no registry on {reg}: run scripts/images.sh");
    let image = format!("{reg}/debian-app:v1");
    let hb = Hb::new();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("pull crash test seed {seed}");
    // Calibrate on a throwaway store, then kill pulls into the real one.
    let probe = Hb::new();
    let t = Instant::now();
    probe.ok(&["pull", &image]);
    let mut killer = Killer::new(seed, t.elapsed());
    for _ in 0..8 {
        killer.attempt(&hb, &["pull", &image]);
        hb.fsck_clean();
        // Only a finished pull names the image; a killed one leaves at most unnamed layers.
        let images = hb.json(&["images"]);
        assert!(images.as_array().unwrap().len() <= 1, "{images:#}");
        // Start the next round empty, so it downloads everything again.
        if !images.as_array().unwrap().is_empty() {
            hb.ok(&["rmi", &image]);
        }
        hb.ok(&["gc"]);
        assert_eq!(hb.json(&["du"])["chunks"], 0, "gc left chunks of unnamed layers");
        hb.fsck_clean();
    }
    println!("pull: {} killed, {} finished", killer.killed, killer.finished);
    assert!(killer.killed > 0, "no kill landed during a pull (seed {seed})");
    hb.ok(&["pull", &image]);
    let (a, b) = (hb.path("a"), probe.path("b"));
    hb.ok(&["export", &image, a.to_str().unwrap()]);
    probe.ok(&["export", &image, b.to_str().unwrap()]);
    assert_same_tree("pull after kills vs a clean pull", &fingerprint_dir(&b, &[]), &fingerprint_dir(&a, &[]), true);
    hb.fsck_clean();
}
