//! `hb daemon`: the real daemon on its own socket, real mount servers, real runc containers.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hb_tests::*;

use super::pull::{open_registry, run};

/// A daemon on `hb`'s store and a socket in its scratch folder; stopped (SIGTERM) on drop.
pub(crate) struct Daemon<'a> {
    hb: &'a Hb,
    child: Option<Child>,
}

impl<'a> Daemon<'a> {
    pub(crate) fn start(hb: &'a Hb) -> Self {
        let snap = snapshotter_socket(hb);
        let child = hb
            .command(&["--socket", &socket(hb), "daemon", "--snapshotter-socket", &snap])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(hb.path("daemon.log")).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { hb, child: Some(child) };
        wait_for("the daemon's socket to answer", || d.get("/v1/health").is_some());
        d
    }

    /// The daemon's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `curl --unix-socket` GET; None when nothing answers.
    pub(crate) fn get(&self, path: &str) -> Option<String> {
        curl(self.hb, "GET", path)
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            run(Command::new("kill").args(["-TERM", &c.id().to_string()]));
            assert!(c.wait().unwrap().success(), "the daemon exits cleanly on SIGTERM");
            // Its spares went with it (regression: one finished as it stopped stayed mounted).
            assert_eq!(spares(self.hb), Vec::<std::path::PathBuf>::new(), "a stopped daemon left spares");
        }
    }
}

impl Drop for Daemon<'_> {
    /// A test that failed leaves no spare mounted: SIGTERM (the daemon releases its spares),
    /// SIGKILL after 10 s.
    fn drop(&mut self) {
        // A failed test shows what the daemon logged, and what is left of its containers.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.hb.path("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
            eprintln!("--- the daemon's log (last 60 lines) ---\n{}", tail.join("\n"));
            eprintln!("--- container folders: {:?}", folders(self.hb));
            eprintln!("--- advertised spares: {:?}", adverts(self.hb));
            eprintln!(
                "--- /run/runc: {:?}",
                std::fs::read_dir("/run/runc").map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            for _ in 0..200 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn socket(hb: &Hb) -> String {
    hb.path("hb.sock").to_str().unwrap().to_string()
}

/// Where the test daemon serves containerd's snapshotter API.
pub(crate) fn snapshotter_socket(hb: &Hb) -> String {
    hb.path("snapshotter.sock").to_str().unwrap().to_string()
}

fn curl(hb: &Hb, method: &str, path: &str) -> Option<String> {
    let o = Command::new("curl")
        .args(["-sf", "-X", method, "--unix-socket", &socket(hb), &format!("http://hb{path}")])
        .output()
        .unwrap();
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// An `Hb` whose config file names the test daemon's socket (as an installed hb finds its
/// daemon: every command goes through it), with `extra` lines in `[daemon]`.
pub(crate) fn hb_for_daemon(extra: &str) -> Hb {
    let mut hb = Hb::new();
    let config = hb.path("hb.toml");
    std::fs::write(&config, format!("version = 1\n[daemon]\nsocket = \"{}\"\n{extra}", socket(&hb))).unwrap();
    hb.config = Some(config);
    hb
}

/// `hb --socket <the test daemon's> ARGS`.
pub(crate) fn with_socket(hb: &Hb, args: &[&str]) -> Vec<String> {
    let mut v = vec!["--socket".to_string(), socket(hb)];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

pub(crate) fn ok(hb: &Hb, args: &[&str]) -> String {
    let v = with_socket(hb, args);
    hb.ok(&v.iter().map(String::as_str).collect::<Vec<_>>())
}

fn fails(hb: &Hb, args: &[&str], code: i32) -> String {
    let v = with_socket(hb, args);
    hb.fails(&v.iter().map(String::as_str).collect::<Vec<_>>(), code)
}

pub(crate) fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A `/metrics` answer as Prometheus wants it: `hb_build_info` for `program`, every family with
/// HELP and TYPE lines before its samples.
pub(crate) fn assert_exposition(text: &str, program: &str) {
    assert!(text.contains(&format!("hb_build_info{{program=\"{program}\",version=\"")), "{text}");
    let mut helped = std::collections::HashSet::new();
    let mut typed = std::collections::HashSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(helped.contains(&name), "{name} has no HELP line:\n{text}");
            typed.insert(name);
        } else if !l.is_empty() {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            assert!(typed.contains(name) || typed.contains(family), "a sample of an undeclared family: {l}");
        }
    }
}

pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Unmounts what the daemon's mount servers still serve (they outlive it by design).
pub(crate) fn unmount_all(hb: &Hb) {
    if let Ok(entries) = std::fs::read_dir(hb.root.join("images")) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                let _ = hb.run(&["umount", e.path().to_str().unwrap()]);
            }
        }
    }
}

#[test]
fn the_daemon_runs_containers_and_a_kill_9_and_restart_does_not_disturb_a_reading_container() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    let h: serde_json::Value = serde_json::from_str(&d.get("/v1/health").unwrap()).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["root"].as_str(), hb.root.to_str());
    // Pull and run through the daemon; reading commands read a view of its store.
    assert!(ok(&hb, &["pull", &image]).starts_with("sha256:"));
    assert!(ok(&hb, &["images"]).contains("busybox"));
    assert_eq!(ok(&hb, &["run", "--rm", &image, "echo", "via", "daemon"]), "via daemon\n");
    let mounts: serde_json::Value = serde_json::from_str(&d.get("/v1/mounts").unwrap()).unwrap();
    assert_eq!(mounts.as_array().unwrap().len(), 1, "one shared image mount: {mounts}");
    // A writing command that does not go through the daemon says so.
    let err = fails(&hb, &["layer", "rm", "sha256:00"], 1);
    assert!(err.contains("owned by the hb daemon"), "{err}");
    // A container that keeps reading files, across a kill -9 and a restart of the daemon.
    let script = "while true; do if md5sum /bin/busybox /etc/passwd >/dev/null; then echo ok; else echo FAIL; fi; sleep 0.05; done";
    ok(&hb, &["run", "-d", "--name", "reader", &image, "sh", "-c", script]);
    let oks = |hb: &Hb| ok(hb, &["logs", "reader"]).lines().filter(|l| *l == "ok").count();
    wait_for("the reader's first reads", || oks(&hb) >= 3);
    d.kill9();
    let before = oks(&hb);
    wait_for("reads while the daemon is dead", || oks(&hb) >= before + 10);
    let mut d = Daemon::start(&hb);
    let h: serde_json::Value = serde_json::from_str(&d.get("/v1/health").unwrap()).unwrap();
    assert_eq!(h["image_mounts"], 1, "the new daemon adopted the running image mount");
    let before = oks(&hb);
    wait_for("reads after the restart", || oks(&hb) >= before + 10);
    let logs = ok(&hb, &["logs", "reader"]);
    assert!(!logs.contains("FAIL"), "a read failed:\n{logs}");
    assert_eq!(
        ok(&hb, &["run", "--rm", &image, "echo", "again"]),
        "again\n",
        "the adopted mount serves new containers"
    );
    // Metrics: mounts, containers on them, API requests. (The `--rm` container's overlay goes in
    // the daemon's background cleanup, after hb reported its exit.)
    wait_for("the finished container's overlay to go", || {
        metric(&d.get("/metrics").unwrap(), "hb_containers_on_mounts") == 1.0
    });
    let m = d.get("/metrics").unwrap();
    assert_eq!(metric(&m, "hb_image_mounts"), 1.0);
    assert_eq!(metric(&m, "hb_containers_on_mounts"), 1.0, "{m}");
    assert!(m.contains("hb_api_requests_total{path=\"/v1/images/mount\",code=\"200\"}"), "{m}");
    assert!(m.contains("hb_remote_fetch_seconds_bucket{le=\"+Inf\"}"), "{m}");
    assert_exposition(&m, "hb daemon");
    ok(&hb, &["rm", "-f", "reader"]);
    // `hb run --rm` hands its cleanup to the daemon: nothing of the container is left.
    wait_for("removed containers' folders to go", || containers_gone(&hb, &[]));
    // (by one datagram on its cleanup socket, beside the API's: no round trip)
    assert!(!m.contains("/v1/containers/cleanup"), "the cleanup went through the API, not the datagram: {m}");
    // It cleans only its own containers' folders, whichever way it is asked.
    let outside = hb.path("not-a-container");
    std::fs::create_dir_all(&outside).unwrap();
    let body = format!(r#"{{"dir":"{}","remove":true}}"#, outside.display());
    let dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
    dgram.send_to(body.as_bytes(), hb.path("hb.cleanup.sock")).unwrap();
    wait_for("the refused datagram to be counted", || {
        d.get("/metrics").is_some_and(|m| m.contains("hb_errors_total{kind=\"cleanup\"} 1"))
    });
    let o = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "--unix-socket", &socket(&hb)])
        .args(["-d", &body, "http://hb/v1/containers/cleanup"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "400");
    assert!(outside.exists(), "a folder outside the store's containers was removed");
    // An unused image mount can be removed through the API; a used one is refused.
    let digest = mounts[0]["digest"].as_str().unwrap().to_string();
    assert!(curl(&hb, "DELETE", &format!("/v1/mounts/{digest}")).is_some());
    assert_eq!(d.get("/v1/mounts").unwrap(), "[]");
    // What is not there is a 404, decided by the error's type (it was decided by its text).
    let status = |method: &str, path: &str, body: &str| {
        let o = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "--unix-socket", &socket(&hb)])
            .args(["-d", body, &format!("http://hb{path}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(status("DELETE", &format!("/v1/mounts/{digest}"), ""), "404");
    assert_eq!(status("POST", "/v1/images/remove", r#"{"images":["no-such-image:1"]}"#), "404");
    d.stop();
    unmount_all(&hb);
    hb.fsck_clean();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(hb.dir.path().to_str().unwrap()), "a mount of this test is left:\n{mounts}");
}

/// The store's container folders (not hb's dot entries): containers (with a state) and the
/// daemon's spares (without one yet).
pub(crate) fn folders(hb: &Hb) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(hb.root.join("containers")).map_or(Vec::new(), |d| {
        d.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).map(|e| e.path()).collect()
    })
}

fn container_ids(hb: &Hb) -> Vec<String> {
    folders(hb)
        .into_iter()
        .filter(|p| p.join("state.json").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The daemon's spare container folders: no state, the overlay mounted.
pub(crate) fn spares(hb: &Hb) -> Vec<std::path::PathBuf> {
    folders(hb).into_iter().filter(|p| !p.join("state.json").exists()).collect()
}

/// Mount points (from the mount table) under the store's containers folder.
pub(crate) fn container_mounts(hb: &Hb) -> Vec<String> {
    let c = hb.root.join("containers");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(c.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

/// Nothing of the store's containers is left: no folder, no overlay, no runtime state; only
/// the daemon's spare for the next container (one at most, with its overlay).
fn containers_gone(hb: &Hb, ids: &[String]) -> bool {
    let removing = hb.root.join("containers").join(".removing");
    let spares = spares(hb);
    let spare_mounts: Vec<String> = spares.iter().map(|s| s.join("rootfs").to_string_lossy().into_owned()).collect();
    container_ids(hb).is_empty()
        && spares.len() <= 1
        && std::fs::read_dir(removing).map_or(true, |mut d| d.next().is_none())
        && container_mounts(hb).iter().all(|m| spare_mounts.contains(m))
        && ids.iter().all(|id| !std::path::Path::new("/run/runc").join(id).exists())
}

/// `hb run --rm` `sleep`ing in the foreground (runc: its state is in `/run/runc`), once it runs:
/// the child and the container's id.
fn sleeping(hb: &Hb, image: &str, secs: &str) -> (Child, String) {
    let (child, _) = just_made(hb, image, secs);
    wait_for("the container to run", || {
        container_ids(hb).first().is_some_and(|id| std::path::Path::new("/run/runc").join(id).exists())
    });
    let id = container_ids(hb).remove(0);
    (child, id)
}

/// `hb run --rm` `sleep`ing in the foreground, as soon as hb lists it (the runtime may not have
/// made it yet): the child and the container's id.
fn just_made(hb: &Hb, image: &str, secs: &str) -> (Child, String) {
    let child = hb
        .command(
            &with_socket(hb, &["run", "--runtime", "runc", "--rm", image, "sleep", secs])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Polled each millisecond: the runtime takes tens of them to make and start it.
    let started = std::time::Instant::now();
    while container_ids(hb).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting for the container to be made");
        std::thread::sleep(Duration::from_millis(1));
    }
    let id = container_ids(hb).remove(0);
    (child, id)
}

#[test]
fn a_foreground_rm_container_is_handed_to_the_daemon_which_cleans_up_after_it_whatever_happens() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    ok(&hb, &["pull", &image]);
    // Output and exit code straight from the runtime hb became.
    let o = hb
        .command(
            &with_socket(&hb, &["run", "--rm", &image, "sh", "-c", "echo out; echo err >&2; exit 3"])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    wait_for("the first container's cleanup", || containers_gone(&hb, &[]));
    // While it runs, `hb ps` shows it, and the process hb started is the runtime now.
    let (mut child, id) = sleeping(&hb, &image, "30");
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap();
    assert_eq!(comm.trim(), "runc", "hb did not become the runtime");
    assert!(ok(&hb, &["ps"]).contains(&id[..12]));
    let err = fails(&hb, &["logs", &id], 1);
    assert!(err.contains("passes the output straight through"), "{err}");
    // kill -9 of it: the runtime cannot stop the container; the daemon does, and cleans up.
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("the killed container's cleanup", || containers_gone(&hb, std::slice::from_ref(&id)));
    assert!(ok(&hb, &["ps", "-a"]).lines().count() == 1, "{}", ok(&hb, &["ps", "-a"]));
    // `hb stop` of it: TERM (which `sleep` as the container's init ignores), KILL after 1 s.
    let (mut child, id) = sleeping(&hb, &image, "30");
    ok(&hb, &["stop", "-t", "1", &id]);
    assert_eq!(child.wait().unwrap().code(), Some(137));
    wait_for("the stopped container's cleanup", || containers_gone(&hb, std::slice::from_ref(&id)));
    // Regression: `hb stop` as soon as `hb ps` lists it, before the runtime made or started it,
    // failed ("container does not exist"), or killed it before its start (exit code 1).
    for _ in 0..3 {
        let (mut child, id) = just_made(&hb, &image, "30");
        ok(&hb, &["stop", "-t", "1", &id]);
        assert_eq!(child.wait().unwrap().code(), Some(137));
        wait_for("the stopped container's cleanup", || containers_gone(&hb, std::slice::from_ref(&id)));
    }
    // A daemon restarted while the container runs watches it again.
    let (mut child, id) = sleeping(&hb, &image, "2");
    d.kill9();
    let mut d = Daemon::start(&hb);
    assert!(child.wait().unwrap().success());
    wait_for("the cleanup by the restarted daemon", || containers_gone(&hb, std::slice::from_ref(&id)));
    // A container that ended while no daemon ran is cleaned up by the next one.
    let (mut child, id) = sleeping(&hb, &image, "1");
    d.kill9();
    assert!(child.wait().unwrap().success());
    assert_eq!(container_ids(&hb), vec![id.clone()], "nobody cleaned up without a daemon");
    let mut d = Daemon::start(&hb);
    wait_for("the cleanup by the next daemon", || containers_gone(&hb, std::slice::from_ref(&id)));
    // A hand-over without a pidfd is refused and counted.
    let outside = hb.root.join("containers").join("0123");
    std::fs::create_dir_all(&outside).unwrap();
    let body = format!(r#"{{"dir":"{}","remove":true,"when_exits":true}}"#, outside.display());
    let dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
    dgram.send_to(body.as_bytes(), hb.path("hb.cleanup.sock")).unwrap();
    wait_for("the refused hand-over to be counted", || {
        d.get("/metrics").is_some_and(|m| m.contains("hb_errors_total{kind=\"cleanup\"} 1"))
    });
    assert!(outside.exists(), "a hand-over without a pidfd removed a folder");
    std::fs::remove_dir(&outside).unwrap();
    // A handed-over container whose hand-over never came (its `hb run` killed between writing
    // the state and sending it): its process is gone, the daemon finishes it all the same. While
    // its runtime cannot delete it (a process of it stuck), its folder is kept, and tried again.
    let id = "ab".repeat(32);
    let lost = hb.root.join("containers").join(&id);
    std::fs::create_dir_all(lost.join("upper")).unwrap();
    let runtime_name = format!("hb-test-runtime-{}", std::process::id());
    let runtime = hb.path(&runtime_name);
    let calls = hb.path("runtime-calls");
    std::fs::write(&runtime, format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", calls.display())).unwrap();
    std::fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let runtime_state = std::path::Path::new("/run").join(&runtime_name).join(&id);
    std::fs::create_dir_all(&runtime_state).unwrap();
    let state = serde_json::json!({
        "id": id, "name": "lost", "image": image, "command": ["true"], "created": 1, "started": 1,
        "finished": null, "status": "running", "exit_code": null, "error": null,
        "monitor": [999_999_999, 1], "runtime": runtime, "rm": true, "detached": false,
        "handed_over": true
    });
    std::fs::write(lost.join("state.json"), state.to_string()).unwrap();
    assert!(ok(&hb, &["ps", "-a"]).contains("lost"));
    wait_for("the daemon to try to delete the lost container", || {
        std::fs::read_to_string(&calls).is_ok_and(|c| c.lines().count() >= 2)
    });
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().next(), Some(format!("delete --force {id}").as_str()));
    std::thread::sleep(Duration::from_millis(500));
    assert!(lost.join("state.json").exists(), "a container its runtime could not delete was removed");
    std::fs::remove_dir_all(runtime_state.parent().unwrap()).unwrap();
    wait_for("the lost hand-over's cleanup", || !lost.exists() && containers_gone(&hb, &[]));
    d.stop();
    unmount_all(&hb);
    hb.fsck_clean();
}

#[test]
fn the_daemon_keeps_a_spare_container_folder_ready_and_never_leaves_one_behind() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    ok(&hb, &["pull", &image]);
    assert_eq!(ok(&hb, &["run", "--rm", &image, "true"]), "");
    // After a container of the image, the next one's folder is made ahead: overlay mounted, the
    // runtime's mount points in the upper dir (this image has no /proc, /dev, /sys, /etc/hosts,
    // /etc/resolv.conf), no state: not a container (not listed, not counted).
    wait_for("a spare folder", || spares(&hb).len() == 1 && container_mounts(&hb).len() == 1);
    let spare = spares(&hb).remove(0);
    assert_eq!(container_mounts(&hb), vec![spare.join("rootfs").to_string_lossy().into_owned()]);
    for p in ["proc", "dev", "sys", "etc/hosts", "etc/resolv.conf"] {
        assert!(spare.join("upper").join(p).exists(), "{p} is not made ahead");
    }
    let etc = |dir: &std::path::Path| {
        let m = std::fs::metadata(dir.join("etc")).unwrap();
        (std::os::unix::fs::MetadataExt::mode(&m), std::os::unix::fs::MetadataExt::uid(&m))
    };
    let image_mount = std::fs::read_dir(hb.root.join("images")).unwrap().flatten().find(|e| e.path().is_dir()).unwrap();
    assert_eq!(etc(&spare.join("upper")), etc(&image_mount.path()), "/etc copied up with its mode and owner");
    assert_eq!(ok(&hb, &["ps", "-a", "-q"]), "");
    assert_eq!(metric(&d.get("/metrics").unwrap(), "hb_containers_on_mounts"), 0.0);
    // The next container is that folder (its hostname is its short id); a new spare follows.
    let id = spare.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(ok(&hb, &["run", "--rm", &image, "hostname"]), format!("{}\n", &id[..12]));
    wait_for("the next spare", || spares(&hb).first().is_some_and(|s| *s != spare) && spares(&hb).len() == 1);
    // A container that binds fewer mount points does not see the spare's extra ones.
    assert_eq!(ok(&hb, &["run", "--rm", "--network", "none", &image, "ls", "/etc"]), "group\npasswd\n");
    wait_for("the next spare", || spares(&hb).len() == 1 && containers_gone(&hb, &[]));
    // A spare goes with its image mount: unmounting is not refused for it.
    let mounts: serde_json::Value = serde_json::from_str(&d.get("/v1/mounts").unwrap()).unwrap();
    assert_eq!(mounts[0]["users"], 0, "{mounts}");
    let digest = mounts[0]["digest"].as_str().unwrap().to_string();
    assert!(curl(&hb, "DELETE", &format!("/v1/mounts/{digest}")).is_some(), "unmounting refused");
    assert!(spares(&hb).is_empty() && container_mounts(&hb).is_empty(), "the spare outlived its image mount");
    // A daemon killed with -9 leaves its spare; the next daemon removes it.
    assert_eq!(ok(&hb, &["run", "--rm", &image, "true"]), "");
    wait_for("a spare folder", || spares(&hb).len() == 1 && container_mounts(&hb).len() == 1);
    let left = spares(&hb).remove(0);
    d.kill9();
    assert!(left.exists());
    let mut d = Daemon::start(&hb);
    assert!(!left.exists() && container_mounts(&hb).is_empty(), "a spare of the killed daemon was left");
    // A daemon stopped as usual takes its spare with it.
    assert_eq!(ok(&hb, &["run", "--rm", &image, "true"]), "");
    wait_for("a spare folder", || spares(&hb).len() == 1);
    d.stop();
    assert!(folders(&hb).is_empty() && container_mounts(&hb).is_empty(), "the stopped daemon left a spare");
    unmount_all(&hb);
    hb.fsck_clean();
}

/// The daemon's advertisements of spares (`<store>/containers/.ready/*.json`).
fn adverts(hb: &Hb) -> Vec<serde_json::Value> {
    std::fs::read_dir(hb.root.join("containers").join(".ready")).map_or(Vec::new(), |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect()
    })
}

/// `n` of `hb run --rm IMAGE hostname` started at once: what each printed (each must succeed).
fn hostnames_at_once(hb: &Hb, image: &str, n: usize) -> Vec<String> {
    let args = with_socket(hb, &["run", "--rm", image, "hostname"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let children: Vec<Child> =
        (0..n).map(|_| hb.command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()).collect();
    children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout).unwrap()
        })
        .collect()
}

fn mount_requests(d: &Daemon) -> usize {
    let m = d.get("/metrics").unwrap();
    m.lines()
        .filter(|l| l.starts_with("hb_api_requests_total{path=\"/v1/images/mount\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
        .sum()
}

#[test]
fn a_foreground_rm_run_claims_the_spare_the_daemon_advertised_without_asking_it() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    ok(&hb, &["pull", &image]);
    assert_eq!(ok(&hb, &["run", "--rm", &image, "true"]), "");
    // The next spare is advertised for this image reference, by this daemon.
    // (Waited for until the only folder without a state is the one it names: the listing may
    // briefly hold another, seen once under CI load and not explained, see the closing notes.)
    wait_for("an advertised spare", || {
        let ads = adverts(&hb);
        ads.len() == 1
            && spares(&hb).iter().map(|p| p.to_str()).collect::<Vec<_>>() == [ads[0]["mount"]["spare"].as_str()]
    });
    let ad = adverts(&hb).remove(0);
    let spare = std::path::PathBuf::from(ad["mount"]["spare"].as_str().unwrap());
    assert_eq!(ad["daemon"].as_u64(), Some(d.child.as_ref().unwrap().id() as u64), "{ad}");
    assert!(spare.join("rootfs").join("bin").exists(), "the advertised spare's overlay is not mounted");
    // `hb run --rm` takes it without a mount request; the daemon learns it from the hand-over
    // and advertises the next one.
    let asked = mount_requests(&d);
    let id = spare.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(ok(&hb, &["run", "--rm", &image, "hostname"]), format!("{}\n", &id[..12]));
    assert_eq!(mount_requests(&d), asked, "the claimed run asked the daemon anyway");
    wait_for("the next advertised spare", || {
        adverts(&hb).len() == 1
            && adverts(&hb)[0]["mount"]["spare"].as_str() != spare.to_str()
            && containers_gone(&hb, &[])
    });
    // Runs at once: each its own container, whoever gets the advertised one; all cleaned up.
    let mut names = hostnames_at_once(&hb, &image, 4);
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4, "two runs shared a container: {names:?}");
    wait_for("the concurrent runs' cleanup and the next spare", || {
        containers_gone(&hb, &[]) && adverts(&hb).len() == 1 && spares(&hb).len() == 1
    });
    // A pull may point the reference at another image: nothing stays advertised; the spare is
    // handed out through the API then.
    ok(&hb, &["pull", &image]);
    assert!(adverts(&hb).is_empty(), "an advertisement outlived a pull");
    wait_for("one spare", || spares(&hb).len() == 1);
    let spare = spares(&hb).remove(0);
    let asked = mount_requests(&d);
    let id = spare.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(ok(&hb, &["run", "--rm", &image, "hostname"]), format!("{}\n", &id[..12]));
    assert_eq!(mount_requests(&d), asked + 1);
    wait_for("the next advertised spare", || adverts(&hb).len() == 1 && containers_gone(&hb, &[]));
    // A killed daemon's advertisement is not used (hb runs without it, on its own), and the next
    // daemon removes it with the spare.
    let left = std::path::PathBuf::from(adverts(&hb)[0]["mount"]["spare"].as_str().unwrap());
    d.kill9();
    let out = ok(&hb, &["run", "--rm", &image, "hostname"]);
    assert_ne!(out.trim(), &left.file_name().unwrap().to_string_lossy()[..12], "a dead daemon's spare was used");
    assert!(left.join("rootfs").join("bin").exists(), "the dead daemon's spare was touched");
    let mut d = Daemon::start(&hb);
    assert!(adverts(&hb).is_empty() && !left.exists(), "a killed daemon's advertisement or spare was left");
    // Unmounting withdraws them too, and takes the spare along.
    assert_eq!(ok(&hb, &["run", "--rm", &image, "true"]), "");
    wait_for("an advertised spare", || adverts(&hb).len() == 1);
    // A run that claimed it and failed before its hand-over (the command is not there: 127, as
    // docker's) still has the daemon advertise the next (its cleanup tells it).
    let claimed = adverts(&hb)[0]["mount"]["spare"].as_str().unwrap().to_string();
    let err = fails(&hb, &["run", "--rm", &image, "nosuch"], 127);
    assert!(err.contains("exec: \"nosuch\": executable file not found in $PATH"), "{err}");
    wait_for("the next advertised spare after a failed claim", || {
        let ads = adverts(&hb);
        ads.len() == 1 && ads[0]["mount"]["spare"].as_str() != Some(&claimed) && container_ids(&hb).is_empty()
    });
    let mounts: serde_json::Value = serde_json::from_str(&d.get("/v1/mounts").unwrap()).unwrap();
    let digest = mounts[0]["digest"].as_str().unwrap().to_string();
    assert!(curl(&hb, "DELETE", &format!("/v1/mounts/{digest}")).is_some(), "unmounting refused");
    assert!(adverts(&hb).is_empty() && spares(&hb).is_empty(), "an advertisement outlived its image mount");
    d.stop();
    unmount_all(&hb);
    hb.fsck_clean();
}

#[test]
fn concurrent_first_runs_of_an_image_all_start() {
    // Regression: the first opens of a file by several containers at once each set up a
    // passthrough backing file of their own; the kernel refuses all but one per inode, and a
    // container's exec failed with EIO.
    let image = format!("{}/busybox:latest", open_registry());
    for _ in 0..3 {
        let hb = Hb::new();
        let mut d = Daemon::start(&hb);
        ok(&hb, &["pull", &image]);
        for name in hostnames_at_once(&hb, &image, 6) {
            assert_eq!(name.len(), 13, "{name:?}");
        }
        wait_for("the runs' cleanup", || containers_gone(&hb, &[]));
        d.stop();
        unmount_all(&hb);
        hb.fsck_clean();
    }
}

#[test]
fn a_lazy_image_through_the_daemon_keeps_what_its_mount_fetched() {
    let image = format!("{}/debian-app:v1", open_registry());
    let lazy = super::lazy::convert(&image, "daemon");
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    assert_eq!(ok(&hb, &["run", "--rm", &lazy, "python3", "-c", "print(6*7)"]), "42\n");
    wait_for("the cold run's fetches in the metrics", || {
        metric(&d.get("/metrics").unwrap(), "hb_chunk_lookups_total{result=\"miss\"}") > 0.0
    });
    let m = d.get("/metrics").unwrap();
    let fetched = metric(&m, "hb_chunk_lookups_total{result=\"miss\"}");
    assert!(fetched > 0.0, "the cold run fetched chunks:\n{m}");
    assert_eq!(metric(&m, "hb_errors_total{kind=\"store_fill\"}"), 0.0);
    // A new mount of the image (the old one removed) finds them in the store.
    let mounts: serde_json::Value = serde_json::from_str(&d.get("/v1/mounts").unwrap()).unwrap();
    let digest = mounts[0]["digest"].as_str().unwrap().to_string();
    // Handed over as the zstd frames they came in (kept as they are, not compressed again).
    wait_for("the fills to reach the daemon", || {
        let m = d.get("/metrics").unwrap();
        m.lines().filter(|l| l.starts_with("hb_api_requests_total{path=\"/v1/chunks/fill-frames\"")).count() > 0
    });
    assert!(curl(&hb, "DELETE", &format!("/v1/mounts/{digest}")).is_some());
    assert_eq!(ok(&hb, &["run", "--rm", &lazy, "python3", "-c", "print(6*7)"]), "42\n");
    // The mount server writes its figures every half second.
    wait_for("the new mount's reads in the metrics", || {
        metric(&d.get("/metrics").unwrap(), "hb_chunk_lookups_total{result=\"hit\"}") > 0.0
    });
    let m = d.get("/metrics").unwrap();
    assert_eq!(metric(&m, "hb_chunk_lookups_total{result=\"miss\"}"), 0.0, "nothing fetched again:\n{m}");
    d.stop();
    unmount_all(&hb);
    hb.fsck_clean();
}

#[test]
fn a_daemon_whose_binary_was_replaced_still_starts_mount_servers() {
    // Regression: after an upgrade replaced the file, the daemon's own path named nothing and
    // every image mount failed with "No such file or directory".
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    // The daemon is `hb-engine` (`hb daemon` execs it).
    let copy = hb.path("hb-engine-old");
    std::fs::copy(hb_bin().with_file_name("hb-engine"), &copy).unwrap();
    let cmd = hb.command(&["--socket", &socket(&hb), "daemon", "--snapshotter-socket", &snapshotter_socket(&hb)]);
    let args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_os_string()).collect();
    let envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> =
        cmd.get_envs().map(|(k, v)| (k.to_os_string(), v.map(|v| v.to_os_string()))).collect();
    let mut old = Command::new(&copy);
    old.args(&args).stdout(Stdio::null()).stderr(Stdio::null());
    for (k, v) in envs {
        match v {
            Some(v) => old.env(k, v),
            None => old.env_remove(k),
        };
    }
    let child = old.spawn().unwrap();
    let mut d = Daemon { hb: &hb, child: Some(child) };
    wait_for("the daemon's socket to answer", || d.get("/v1/health").is_some());
    std::fs::remove_file(&copy).unwrap();
    assert_eq!(ok(&hb, &["run", "--rm", &image, "echo", "still", "works"]), "still works\n");
    // The container was handed to the daemon, which removes it once it has ended: stopping the
    // daemon before then left its folder and overlay behind (seen once in a full run).
    wait_for("the daemon to remove the handed-over container", || containers_gone(&hb, &[]));
    d.stop();
    unmount_all(&hb);
    hb.fsck_clean();
    assert!(container_mounts(&hb).is_empty(), "an overlay of this test is left: {:?}", container_mounts(&hb));
}

/// `daemon.metrics_address`: `/metrics` and `/healthz` over TCP, nothing of the API;
/// `daemon.gc_above`: the daemon collects garbage by itself once the store passes the size.
#[test]
fn the_daemon_serves_metrics_over_tcp_and_collects_garbage_above_its_size() {
    let image = format!("{}/busybox:latest", open_registry());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hb = hb_for_daemon(&format!("metrics_address = \"127.0.0.1:{port}\"\ngc_above = \"1k\"\n"));
    let mut d = Daemon::start(&hb);
    let get = |path: &str| {
        let o = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", &format!("http://127.0.0.1:{port}{path}")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_string(), body.to_string())
    };
    let (code, metrics) = get("/metrics");
    assert_eq!(code, "200");
    assert_exposition(&metrics, "hb daemon");
    assert_eq!(get("/healthz"), ("200".into(), "ok\n".into()));
    let (code, body) = get("/v1/health");
    assert_eq!(code, "404", "the API is not on the TCP address: {body}");
    // Above gc_above with the image named: its data stays; once it is removed, the daemon frees it.
    hb.ok(&["-q", "pull", &image]);
    std::thread::sleep(Duration::from_secs(6)); // one reaper round at least
    assert!(hb.json(&["du"])["live_pack_bytes"].as_u64().unwrap() > 0, "a named image's data is kept");
    hb.ok(&["rmi", &image]);
    wait_for("the automatic gc to free the removed image's data", || {
        hb.json(&["du"])["pack_bytes"].as_u64() == Some(0)
    });
    d.stop();
    hb.fsck_clean();
}

/// The status pages: the daemon's (on its socket and its metrics address) and the mirror's,
/// server-rendered HTML, rendered by headless Chromium into a screenshot of the expected size.
#[test]
fn status_pages_of_the_daemon_and_the_proxy_render_in_chromium() {
    let image = format!("{}/busybox:latest", open_registry());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hb = hb_for_daemon(&format!("metrics_address = \"127.0.0.1:{port}\"\n"));
    let mut d = Daemon::start(&hb);
    hb.ok(&["-q", "run", "-d", "--name", "shown", &image, "sleep", "600"]);
    let page = curl(&hb, "GET", "/status").expect("the daemon answers /status on its socket");
    for part in ["<title>hb daemon on", "Bytes by source", "store (local)", "Image mounts", "shown", &image] {
        assert!(page.contains(part), "{part:?} missing from:\n{page}");
    }
    let url = format!("http://127.0.0.1:{port}/status");
    let dom = chromium_dom(&url);
    assert!(dom.contains("hit ratio") && dom.contains("shown") && !dom.contains("sleep 600"), "no commands: {dom}");
    let (w, h, size) = chromium_screenshot(&url, &hb.path("daemon.png"), 1280, 900);
    assert_eq!((w, h), (1280, 900));
    assert!(size > 20_000, "a page with tables and bars, not a blank one: {size} bytes");
    hb.ok(&["rm", "-f", "shown"]);
    d.stop();
    unmount_all(&hb);

    let up = super::proxy::Upstream::start();
    up.seed("busybox:latest");
    let proxy =
        super::proxy::Proxy::start(&format!("[proxy]\n[[proxy.upstream]]\nhost = \"{}\"\nalias = \"up\"\n", up.addr));
    let (code, _) = super::proxy::curl(&[&format!("http://{}/v2/up/busybox/manifests/latest", proxy.addr)]);
    assert_eq!(code, 200);
    let url = format!("http://{}/status", proxy.addr);
    let dom = chromium_dom(&url);
    assert!(dom.contains("hb proxy") && dom.contains(&up.addr) && dom.contains("hit ratio"), "{dom}");
    let (w, h, size) = chromium_screenshot(&url, &hb.path("proxy.png"), 1280, 900);
    assert_eq!((w, h), (1280, 900));
    assert!(size > 10_000, "{size} bytes");
}
