//! kill -9 at random moments during ingest and gc: the store always passes fsck and nothing that
//! was committed is lost.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hb_tests::*;

/// A plain tar with one large pseudo-random file, so an import spends its time writing chunks.
fn big_layer(dir: &Path, seed: u64) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    let data = pseudo_random(seed, 40 << 20);
    let mut h = file_header(data.len() as u64, 0o644);
    b.append_data(&mut h, format!("data-{seed}"), &data[..]).unwrap();
    let small = format!("small file of layer {seed}");
    let mut h = file_header(small.len() as u64, 0o600);
    b.append_data(&mut h, "etc/small", small.as_bytes()).unwrap();
    let p = dir.join(format!("layer-{seed}.tar"));
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    p
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
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
fn kill_9_during_ingest_and_gc_leaves_a_consistent_store() {
    let hb = Hb::new();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let layers: Vec<PathBuf> = (0..5).map(|i| big_layer(hb.dir.path(), i)).collect();
    // One committed layer before the storm, and the time a whole import takes.
    let t = Instant::now();
    let first = hb.import(&layers[0]);
    let full = t.elapsed();
    let mut committed = vec![(first["diff_id"].as_str().unwrap().to_string(), 0usize)];
    let (mut killed, mut finished) = (0, 0);
    for round in 0..24 {
        let which = 1 + round % (layers.len() - 1);
        let delay = Duration::from_micros(rng.next() % (full.as_micros() as u64 * 5 / 4).max(1));
        let path = layers[which].to_str().unwrap();
        if run_and_kill(&hb, &["layer", "import", path], delay) {
            finished += 1;
        } else {
            killed += 1;
        }
        hb.fsck_clean();
        // Whether or not the kill landed first, the layer is either fully there or absent.
        let listed = hb.json(&["layer", "ls"]);
        for l in listed.as_array().unwrap() {
            let d = l["diff_id"].as_str().unwrap().to_string();
            if !committed.iter().any(|(c, _)| *c == d) {
                committed.push((d, which));
            }
        }
    }
    println!("ingest: {killed} killed, {finished} finished");
    assert!(killed > 0, "no kill landed during an import (seed {seed})");

    // Kills during gc (layer removal and pack compaction).
    for (d, _) in committed.iter().skip(1).take(2) {
        hb.ok(&["layer", "rm", d]);
    }
    let mut gc_killed = 0;
    for _ in 0..6 {
        let delay = Duration::from_micros(rng.next() % 300_000);
        if !run_and_kill(&hb, &["gc"], delay) {
            gc_killed += 1;
        }
        hb.fsck_clean();
    }
    println!("gc: {gc_killed} killed");
    hb.ok(&["gc"]);
    hb.fsck_clean();

    // Every layer still pinned exports exactly what went in.
    let pinned: Vec<String> = hb.json(&["layer", "ls"]).as_array().unwrap().iter()
        .filter(|l| l["pinned"] == true).map(|l| l["diff_id"].as_str().unwrap().to_string()).collect();
    assert!(!pinned.is_empty());
    for d in pinned {
        let which = committed.iter().find(|(c, _)| *c == d).unwrap().1;
        let out = hb.path("check.tar");
        hb.ok(&["layer", "export", &d, "-o", out.to_str().unwrap()]);
        let want = fingerprint_tar(&std::fs::read(&layers[which]).unwrap());
        assert_same_tree(&format!("layer {which} after crashes"), &want, &fingerprint_tar(&std::fs::read(&out).unwrap()), false);
    }
}
