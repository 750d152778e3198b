//! Soaks, bounded in count and time, on loopback only: many containers through one daemon leak
//! nothing. Sizes come from the environment (the documented runs use the larger ones;
//! `docs/reliability.md`): `HB_SOAK_CONTAINERS` (default 100).

use std::collections::BTreeSet;

use hb_tests::*;

use super::daemon::{container_mounts, folders, spares, unmount_all, wait_for, with_socket, Daemon};
use super::pull::open_registry;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so read after its closing parenthesis.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.insert(p);
        }
    }
    out
}

/// Processes anywhere whose command line names `needle` (a store's path).
fn processes_naming(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    out
}

#[test]
fn the_daemon_starts_and_stops_many_containers_across_five_images_and_leaks_nothing() {
    let reg = open_registry();
    let images: Vec<String> = ["busybox:latest", "busybox:zstd", "busybox:v2s2", "debian-app:v1", "debian-app:v2"]
        .iter()
        .map(|i| format!("{reg}/{i}"))
        .collect();
    let n = env_count("HB_SOAK_CONTAINERS", 100);
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    let pid = d.pid();
    let hbv = |args: &[&str]| with_socket(&hb, args);
    let run_one = |k: usize| {
        let image = &images[k % images.len()];
        if k % 10 == 9 {
            // Every tenth: detached, then stopped and removed, as docker users do.
            let args = hbv(&["run", "-d", "--runtime", "runc", image, "sleep", "30"]);
            let id = hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim().to_string();
            let args = hbv(&["stop", "-t", "5", &id]);
            hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let args = hbv(&["rm", &id]);
            hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        } else {
            let args = hbv(&["run", "--rm", "--runtime", "runc", image, "sh", "-c", &format!("echo {k}")]);
            let out = hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(out, format!("{k}\n"), "container {k} on {image}");
        }
    };
    // Warm-up: every image mounted, a round of each kind of run.
    for k in 0..images.len() * 2 {
        run_one(k);
    }
    let settled = |what: &str| {
        wait_for(what, || {
            let removing = hb.root.join("containers").join(".removing");
            let spare_set: Vec<String> =
                spares(&hb).iter().map(|s| s.join("rootfs").to_string_lossy().into_owned()).collect();
            folders(&hb).iter().all(|f| !f.join("state.json").exists())
                && spare_set.len() <= images.len()
                && std::fs::read_dir(&removing).map_or(true, |mut r| r.next().is_none())
                && container_mounts(&hb).iter().all(|m| spare_set.contains(m))
        })
    };
    settled("the warm-up's containers to be cleaned up");
    let (fds_warm, kids_warm) = (fds(pid), children(pid));
    let t = std::time::Instant::now();
    for k in images.len() * 2..n {
        run_one(k);
    }
    let took = t.elapsed();
    settled("every container to be cleaned up");
    let (fds_end, kids_end) = (fds(pid), children(pid));
    println!(
        "soak: {n} containers across {} images in {:.1} s; daemon fds {fds_warm} -> {fds_end}, children {} -> {}",
        images.len(),
        took.as_secs_f64(),
        kids_warm.len(),
        kids_end.len()
    );
    assert!(fds_end <= fds_warm + 4, "the daemon's open files grew from {fds_warm} to {fds_end}");
    assert_eq!(kids_end, kids_warm, "the daemon's child processes changed (mount servers only)");
    assert_eq!(kids_end.len(), images.len(), "one mount server per image");
    let runc: Vec<String> = std::fs::read_dir("/run/runc")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let ours: BTreeSet<String> =
        folders(&hb).iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(runc.iter().all(|id| !ours.contains(id)), "runtime state left: {runc:?}");
    d.stop();
    unmount_all(&hb);
    let root = hb.root.to_string_lossy().into_owned();
    wait_for("the mount servers to exit", || processes_naming(&root).is_empty());
    assert!(container_mounts(&hb).is_empty(), "mounts left: {:?}", container_mounts(&hb));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&root), "mounts under the store left");
    assert!(folders(&hb).is_empty(), "container folders left: {:?}", folders(&hb));
    hb.fsck_clean();
}
