//! The daemon's standby mount server: started ahead of need, it serves the next image mount.

use hb_tests::*;

use super::daemon::{ok, unmount_all, wait_for, Daemon};
use super::pull::open_registry;

/// This store's standby mount processes (`hb-engine mount-standby`) that do not serve a mount
/// yet (a standby that took its mount keeps its command line): their pids.
fn standbys(hb: &Hb, serving: &[u64]) -> Vec<u32> {
    let root = hb.root.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let zombie = std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| s.contains(") Z "));
        if !zombie
            && !serving.contains(&u64::from(pid))
            && args.iter().any(|a| a == "mount-standby")
            && args.contains(&root)
        {
            out.push(pid);
        }
    }
    out
}

/// The pids of the daemon's image mounts' servers.
fn serving(d: &Daemon) -> Vec<u64> {
    let mounts: serde_json::Value = serde_json::from_str(&d.get("/v1/mounts").unwrap()).unwrap();
    mounts.as_array().unwrap().iter().filter_map(|m| m["pid"].as_u64()).collect()
}

#[test]
fn the_daemon_keeps_a_mount_server_standing_by_and_the_next_mount_is_served_by_it() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    wait_for("a standby mount process", || standbys(&hb, &[]).len() == 1);
    let waiting = standbys(&hb, &[])[0];
    assert_eq!(ok(&hb, &["run", "--rm", &image, "echo", "served"]), "served\n");
    assert_eq!(serving(&d), vec![u64::from(waiting)], "the mount's server is the standby that waited");
    // Its log is the mount's now, and the next one stands by (a moment after the use).
    wait_for("the next standby mount process", || {
        let s = standbys(&hb, &serving(&d));
        s.len() == 1 && s[0] != waiting
    });
    let log = std::fs::read_to_string(hb.root.join("run/standby.log")).unwrap_or_default();
    assert!(!log.contains("mounted"), "the mount's log stayed the standby's:\n{log}");
    // A second image's mount: served by the new standby.
    let next = standbys(&hb, &serving(&d))[0];
    let lazy = super::lazy::convert(&format!("{}/debian-app:v1", open_registry()), "standby");
    assert_eq!(ok(&hb, &["run", "--rm", &lazy, "python3", "-c", "print(6*7)"]), "42\n");
    let pids = serving(&d);
    assert!(pids.contains(&u64::from(next)), "the second mount's server is the second standby: {pids:?}");
    // With its daemon gone, a standby ends (its stdin closes); the mount servers serve on.
    wait_for("a third standby", || standbys(&hb, &pids).len() == 1);
    d.stop();
    wait_for("the standby to end with its daemon", || standbys(&hb, &pids).is_empty());
    unmount_all(&hb);
    hb.fsck_clean();
}
