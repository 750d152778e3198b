//! hb as containerd's remote snapshotter: the real containerd from Debian with its own root,
//! state, socket and config, hb's daemon registered as `[proxy_plugins.hb] type = "snapshot"`.

use std::process::Command;

use hb_tests::*;

use super::daemon::{metric, snapshotter_socket, unmount_all, wait_for, Daemon};
use super::pull::open_registry;

/// A private containerd (scripts/containerd.sh) with hb's snapshotter; stopped and wiped on drop.
pub(crate) struct Containerd {
    dir: String,
}

impl Containerd {
    fn start(hb: &Hb) -> Self {
        Self::start_with(hb, Some(snapshotter_socket(hb)))
    }

    /// Without hb's snapshotter (containerd's own overlayfs).
    pub(crate) fn start_plain(hb: &Hb) -> Self {
        Self::start_with(hb, None)
    }

    fn start_with(hb: &Hb, snapshotter: Option<String>) -> Self {
        // One per test (tests run in parallel in one process): named after the test's scratch dir.
        let dir = format!("/dev/shm/hb-ctd-{}", hb.dir.path().file_name().unwrap().to_string_lossy());
        let mut c = Command::new(containerd_script());
        c.arg("reset").env("HB_CONTAINERD_DIR", &dir).env_remove("HB_SNAPSHOTTER_SOCK");
        if let Some(s) = snapshotter {
            c.env("HB_SNAPSHOTTER_SOCK", s);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "containerd did not start: {}", String::from_utf8_lossy(&o.stderr));
        Containerd { dir }
    }

    /// `ctr -a SOCK -n hbtest ARGS`: (exit code, stdout, stderr).
    fn ctr(&self, args: &[&str]) -> (i32, String, String) {
        let o = Command::new("ctr")
            .args(["-a", &format!("{}/containerd.sock", self.dir), "-n", "hbtest"])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctr(args);
        assert_eq!(code, 0, "ctr {args:?}: {err}");
        out
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new(containerd_script()).arg("stop").env("HB_CONTAINERD_DIR", &self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn containerd_script() -> std::path::PathBuf {
    hb_tests::workspace().join("scripts/containerd.sh")
}

fn snapshot_keys(c: &Containerd) -> Vec<String> {
    c.ok(&["snapshots", "--snapshotter", "hb", "ls"])
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn containerd_pulls_and_runs_images_through_hb_snapshots_with_containerd_semantics() {
    let reg = open_registry();
    let (small, large) = (format!("{reg}/busybox:latest"), format!("{reg}/debian-app:v1"));
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    let c = Containerd::start(&hb);
    assert!(c.ok(&["plugins", "ls"]).lines().any(|l| l.contains(" hb ") && l.trim_end().ends_with("ok")));
    // Ordinary layers: unpacked into hb's overlayfs snapshots, then run.
    c.ok(&["images", "pull", "--plain-http", "--snapshotter", "hb", &small]);
    c.ok(&["images", "pull", "--plain-http", "--snapshotter", "hb", &large]);
    let out = c.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "hb",
        &small,
        "hb-snap-1",
        "sh",
        "-c",
        "echo hello; echo x > /tmp/f; cat /tmp/f",
    ]);
    assert_eq!(out, "hello\nx\n");
    let out = c.ok(&["run", "--rm", "--snapshotter", "hb", &large, "hb-snap-2", "python3", "-c", "print(6*7)"]);
    assert_eq!(out, "42\n");
    let layers = snapshot_keys(&c);
    assert_eq!(layers.len(), 4, "busybox's layer and the large image's three: {layers:?}");
    // Snapshot semantics as containerd sees them.
    let top = c.ok(&["snapshots", "--snapshotter", "hb", "ls"]);
    let committed =
        top.lines().skip(1).find(|l| l.contains("Committed")).unwrap().split_whitespace().next().unwrap().to_string();
    c.ok(&["snapshots", "--snapshotter", "hb", "prepare", "k1", &committed]);
    let (code, _, err) = c.ctr(&["snapshots", "--snapshotter", "hb", "prepare", "k1", &committed]);
    assert!(code != 0 && err.contains("already exists"), "{err}");
    let m = c.ok(&["snapshots", "--snapshotter", "hb", "mounts", "/mnt", "k1"]);
    assert!(m.contains("-t overlay") && m.contains("upperdir=") && m.contains("lowerdir="), "{m}");
    // (Views are exercised over gRPC in snapshotter/tests/grpc.rs: one made by `ctr snapshots view`
    // carries no gc root, so containerd's gc may remove it at any moment.)
    c.ok(&["snapshots", "--snapshotter", "hb", "commit", "c1", "k1"]);
    let (code, _, err) = c.ctr(&["snapshots", "--snapshotter", "hb", "rm", &committed]);
    assert!(code != 0 && err.contains("child"), "a parent with children stays: {err}");
    c.ok(&["snapshots", "--snapshotter", "hb", "label", "c1", "team=db"]);
    let info: serde_json::Value =
        serde_json::from_str(&c.ok(&["snapshots", "--snapshotter", "hb", "info", "c1"])).unwrap();
    assert_eq!((info["Kind"].as_str(), info["Labels"]["team"].as_str()), (Some("Committed"), Some("db")));
    let usage = c.ok(&["snapshots", "--snapshotter", "hb", "usage"]);
    assert!(usage.lines().any(|l| l.starts_with(&committed) && !l.contains(" 0.0 B")), "real usage: {usage}");
    let (code, _, err) = c.ctr(&["snapshots", "--snapshotter", "hb", "info", "nope"]);
    assert!(code != 0 && err.contains("not found"), "{err}");
    c.ok(&["snapshots", "--snapshotter", "hb", "rm", "c1"]);
    // Removing the images lets containerd's gc remove every snapshot, and hb its folders. `--sync`
    // runs that gc now: left to its scheduler, the next one may come minutes later (its interval
    // grows with the time the last one took; a CI run waited 60 s in vain).
    c.ok(&["images", "rm", "--sync", &small, &large]);
    wait_for("containerd's gc to remove the snapshots", || snapshot_keys(&c).is_empty());
    wait_for("hb to remove the snapshots' folders", || {
        std::fs::read_dir(hb.root.join("snapshots")).unwrap().flatten().all(|e| !e.path().is_dir())
    });
    drop(c);
    d.stop();
    unmount_all(&hb);
    hb.fsck_clean();
}

#[test]
fn containerd_starts_an_accelerated_image_lazily_through_hb() {
    let reg = open_registry();
    let lazy = super::lazy::convert(&format!("{reg}/debian-app:v1"), "containerd");
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    let c = Containerd::start(&hb);
    // ctr-remote sets the remote-snapshot labels on each layer's Prepare; hb answers that it has
    // the layer (its indexes pulled), so containerd downloads no layer blob.
    let o = Command::new("ctr-remote")
        .args(["-a", &format!("{}/containerd.sock", c.dir), "-n", "hbtest", "images", "rpull", "--plain-http"])
        .args(["--snapshotter", "hb", &lazy])
        .output()
        .unwrap();
    assert!(o.status.success(), "rpull: {}", String::from_utf8_lossy(&o.stderr));
    let snaps = c.ok(&["snapshots", "--snapshotter", "hb", "ls"]);
    assert_eq!(snaps.lines().skip(1).filter(|l| l.contains("Committed")).count(), 3, "{snaps}");
    let info: serde_json::Value = serde_json::from_str(&c.ok(&[
        "snapshots",
        "--snapshotter",
        "hb",
        "info",
        snaps.lines().nth(1).unwrap().split_whitespace().next().unwrap(),
    ]))
    .unwrap();
    assert_eq!(info["Labels"]["containerd.io/snapshot/remote"], "hb", "{info}");
    let out = c.ok(&["run", "--rm", "--snapshotter", "hb", &lazy, "hb-lazy-1", "python3", "-c", "print(6*7)"]);
    assert_eq!(out, "42\n");
    // gcc needs the container's own writable layer over the lazy ones.
    let out = c.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "hb",
        &lazy,
        "hb-lazy-2",
        "sh",
        "-c",
        "printf 'int main(){return 7;}' > /tmp/t.c && gcc -o /tmp/t /tmp/t.c; /tmp/t; echo $?",
    ]);
    assert_eq!(out, "7\n");
    wait_for("the mount server's figures", || {
        let m = curl_metrics(&hb);
        metric(&m, "hb_chunk_lookups_total{result=\"miss\"}") > 0.0
    });
    let m = curl_metrics(&hb);
    let wire = metric(&m, "hb_fetched_bytes_total{source=\"wire\"}");
    assert!(wire > 0.0 && wire < 100e6, "fetched over the wire: {wire} bytes of a 193 MB image");
    assert_eq!(metric(&m, "hb_errors_total{kind=\"fetch\"}"), 0.0);
    // Usage of a lazy layer: the bytes of its data held locally (some, after those runs).
    let usage = c.ok(&["snapshots", "--snapshotter", "hb", "usage"]);
    assert!(usage.lines().skip(1).any(|l| !l.contains(" 0.0 B")), "local bytes of lazy layers: {usage}");
    // Removing the image lets containerd's gc remove the lazy snapshots too, and hb lets go of
    // the image it pulled for them.
    c.ok(&["images", "rm", "--sync", &lazy]);
    wait_for("containerd's gc to remove the snapshots", || snapshot_keys(&c).is_empty());
    wait_for("hb to untag the image it pulled for containerd", || {
        let o = hb.run(&["--socket", hb.path("hb.sock").to_str().unwrap(), "images"]);
        !String::from_utf8_lossy(&o.stdout).contains("lazy-test")
    });
    drop(c);
    d.stop();
    unmount_all(&hb);
    hb.fsck_clean();
}

fn curl_metrics(hb: &Hb) -> String {
    let o = Command::new("curl")
        .args(["-sf", "--unix-socket", hb.path("hb.sock").to_str().unwrap(), "http://hb/metrics"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// containerd 1.6's own snapshotter conformance suite (Go, `snapshots/testsuite` from Debian's
/// golang-github-containerd-containerd-dev) against hb, through containerd's `snapshots/proxy`
/// client as containerd reaches a proxy plugin: scripts/snapshotter-conformance.sh builds it once
/// (cached under /var/tmp/hb-conformance) and runs it; tests/conformance/hb_snapshotter_test.go
/// starts a fresh `hb daemon` for each suite test and stops it with SIGTERM.
#[test]
fn containerds_snapshotter_conformance_suite_passes_against_hb() {
    let script = containerd_script().with_file_name("snapshotter-conformance.sh");
    let o = Command::new(&script).env("HB_BIN", hb_bin()).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let shown = format!("{out}\n--- stderr ---\n{err}");
    assert!(o.status.success(), "the conformance suite failed ({}):\n{shown}", o.status);
    let passed = out.lines().filter(|l| l.trim_start().starts_with("--- PASS: TestHbSnapshotter/")).count();
    assert!(passed >= 15, "only {passed} suite tests passed:\n{shown}");
    assert!(!out.contains("--- FAIL"), "a suite test failed:\n{shown}");
    assert!(out.lines().any(|l| l.starts_with("conformance: ") && l.contains(" passed, 0 failed")), "{shown}");
}
