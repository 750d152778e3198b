//! Lazy starts: `hb mount`, `hb convert`, `hb pull --lazy`, `hb optimize` against the real
//! registry, real FUSE and overlayfs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hb_tests::*;

use super::crafted::{every_entry_type, Tar};
use super::pull::{http_response, open_registry, push_image, push_unique_image, refusing_proxy, relay, run};

/// A mount that is unmounted (and its process waited for) when dropped.
struct Mounted<'a> {
    hb: &'a Hb,
    dir: PathBuf,
}

impl<'a> Mounted<'a> {
    fn new(hb: &'a Hb, image: &str, name: &str, extra: &[&str]) -> Self {
        let dir = hb.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec!["mount", "-d", image, dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        hb.ok(&args);
        Mounted { hb, dir }
    }

    /// Unmounts and returns the mount process's log.
    fn unmount(mut self) -> String {
        let dir = std::mem::take(&mut self.dir);
        self.hb.ok(&["umount", dir.to_str().unwrap()]);
        mount_log(self.hb, &dir)
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = self.hb.run(&["umount", self.dir.to_str().unwrap()]);
        }
    }
}

fn mount_log(hb: &Hb, _dir: &Path) -> String {
    let mut text = String::new();
    for e in std::fs::read_dir(hb.root.join("run")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            text.push_str(&std::fs::read_to_string(e.path()).unwrap());
        }
    }
    text
}

/// Converts `image` into a repository of its own (`lazy-<tag>`), with a store of its own.
pub(crate) fn convert(image: &str, tag: &str) -> String {
    let reg = open_registry();
    let dst = format!("{reg}/lazy-test/{tag}:{}", std::process::id());
    let hb = Hb::new();
    hb.ok(&["convert", image, &dst]);
    dst
}

/// `image` of the loopback registry converted under `tag`, and a fresh store holding it lazily.
pub(crate) fn lazily_pulled(image: &str, tag: &str) -> (Hb, String) {
    let image = convert(&format!("{}/{image}", open_registry()), tag);
    let hb = Hb::new();
    hb.ok(&["pull", "-q", "--lazy", "--plain-http", &image]);
    (hb, image)
}

#[test]
fn mounts_show_exactly_what_export_writes() {
    let reg = open_registry();
    for image in ["busybox:latest", "debian-app:v1", "debian-app:v2-zstd", "multi:latest", "busybox:v2s2"] {
        let image = format!("{reg}/{image}");
        let hb = Hb::new();
        hb.ok(&["pull", &image]);
        let out = hb.path("export");
        hb.ok(&["export", &image, out.to_str().unwrap()]);
        let want = fingerprint_dir(&out, &[]);
        let m = Mounted::new(&hb, &image, "mnt", &[]);
        let got = fingerprint_dir(&m.dir, &[]);
        assert_same_tree(&format!("mount of {image}"), &want, &got, true);
        // Missing names are remembered by the kernel (negative entries): still missing, twice.
        for _ in 0..2 {
            let e = std::fs::symlink_metadata(m.dir.join("bin/no-such-entry")).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{image}: {e}");
        }
        m.unmount();
        hb.fsck_clean();
    }
}

#[test]
fn a_lazy_pull_runs_python_and_gcc_from_a_cold_store_and_matches_the_eager_export() {
    let reg = open_registry();
    let image = format!("{reg}/debian-app:v1");
    let lazy = convert(&image, "app");
    // Unmodified clients still get the original image from the converted tag.
    let plain = Hb::new();
    let p = plain.json(&["pull", &lazy]);
    let eager = Hb::new();
    let e = eager.json(&["pull", &image]);
    assert_eq!(p["digest"], e["digest"], "a plain pull of the converted tag is the original image");

    let hb = Hb::new();
    let r = hb.json(&["pull", "--lazy", &lazy]);
    let compressed: u64 = e["bytes_downloaded"].as_u64().unwrap();
    let indexes = r["bytes_downloaded"].as_u64().unwrap();
    assert!(indexes * 20 < compressed, "a lazy pull downloads indexes only: {indexes} of {compressed}");
    assert_eq!(r["layers_lazy"], 3, "{r}");

    let m = Mounted::new(&hb, &lazy, "mnt", &["--prefetch", "none"]);
    let o = Command::new("chroot").arg(&m.dir).args(["python3", "-c", "print(1)"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "1\n", "{}", String::from_utf8_lossy(&o.stderr));

    // gcc needs somewhere to write: overlayfs with a scratch upper dir over the lazy mount.
    let (upper, work, merged) = (hb.path("upper"), hb.path("work"), hb.path("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={},upperdir={},workdir={}", m.dir.display(), upper.display(), work.display()))
        .arg(&merged));
    std::fs::write(upper.join("hello.c"), "#include <stdio.h>\nint main(void){puts(\"hello from gcc\");return 0;}\n")
        .unwrap();
    let o = Command::new("chroot")
        .arg(&merged)
        .args(["/bin/sh", "-c", "gcc -o /hello /hello.c && /hello"])
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(&merged).status();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello from gcc\n", "{}", String::from_utf8_lossy(&o.stderr));

    // Every path agrees with the eager export: metadata, links, xattrs and content bytes.
    let out = eager.path("export");
    eager.ok(&["export", &image, out.to_str().unwrap()]);
    assert_same_tree("lazy mount", &fingerprint_dir(&out, &[]), &fingerprint_dir(&m.dir, &[]), true);
    let log = m.unmount();
    assert!(log.contains("fetched"), "{log}");
    hb.fsck_clean();
    // Every visible file was read once: the layers whose every chunk is visible are complete
    // now (the base layer has files the upper layers hide); a full pull completes the rest.
    let again = hb.json(&["pull", &lazy]);
    assert!(again["layers_present"].as_u64().unwrap() >= 2, "{again}");
    assert_eq!(hb.json(&["du"])["absent_chunks"], 0);
    hb.fsck_clean();
}

#[test]
fn corrupt_chunk_data_in_the_registry_is_never_served() {
    let reg = open_registry();
    let seed = Hb::new();
    let (image, _, _) = push_unique_image(&seed, &reg, &format!("lazy-corrupt-{}", std::process::id()));
    let lazy = convert(&image, "corrupt");
    // The data blob is the largest blob the accelerated manifest lists.
    let accel = seed.json(&["pull", "--lazy", &lazy]);
    assert_eq!(accel["layers_lazy"], 1);
    let dir = std::env::var("HB_REGISTRY_DIR").unwrap_or_else(|_| "/var/tmp/hb-registry".into());
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{lazy}"))
        .output()
        .unwrap();
    let index: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let accel_digest = index["manifests"][1]["digest"].as_str().unwrap().to_string();
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}@{accel_digest}", lazy.rsplit_once(':').unwrap().0))
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.hyperbox.chunk.data.v1")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let blob = Path::new(&dir).join(format!("open/data/docker/registry/v2/blobs/sha256/{}/{data}/data", &data[..2]));
    let mut bytes = std::fs::read(&blob).unwrap();
    for b in bytes.iter_mut().skip(100).step_by(997) {
        *b ^= 0x5a;
    }
    std::fs::write(&blob, &bytes).unwrap();

    let hb = Hb::new();
    hb.ok(&["pull", "--lazy", &lazy]);
    let m = Mounted::new(&hb, &lazy, "mnt", &["--prefetch", "none"]);
    let err = std::fs::read(m.dir.join("unique.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO, not wrong bytes: {err}");
    let log = m.unmount();
    assert!(log.contains("unique.bin") && log.contains("EIO"), "the log names the file: {log}");
    hb.fsck_clean();
    let du = hb.json(&["du"]);
    assert_eq!(du["unique_bytes"], 0, "no corrupt chunk was stored: {du}");
}

#[test]
fn a_dead_registry_gives_eio_after_bounded_retries_and_a_killed_mount_is_cleaned_up() {
    let reg = open_registry();
    let alive = Arc::new(AtomicBool::new(true));
    let relay = relay(reg.clone(), None, Some(alive.clone()));
    let lazy = convert(&format!("{reg}/busybox:latest"), "dead");
    let via_relay = lazy.replacen(&reg, &relay, 1);
    let hb = Hb::new();
    hb.ok(&["pull", "--lazy", &via_relay]);
    let m = Mounted::new(&hb, &via_relay, "mnt", &["--prefetch", "none"]);
    alive.store(false, Ordering::SeqCst);
    let started = Instant::now();
    let err = std::fs::read(m.dir.join("bin/busybox")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert!(started.elapsed() < Duration::from_secs(110), "bounded: the read returned");
    // Metadata never needs the network.
    assert!(std::fs::symlink_metadata(m.dir.join("bin/sh")).is_ok());

    // kill -9 the mount process: the mount goes stale; `hb mount` again cleans it and works.
    let pid_file = std::fs::read_dir(hb.root.join("run"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .unwrap()
        .path();
    let pid = std::fs::read_to_string(pid_file).unwrap();
    run(Command::new("kill").args(["-9", pid.trim()]));
    let t = Instant::now();
    while rustix::fs::statfs(&m.dir).is_ok() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stale = rustix::fs::statfs(&m.dir).unwrap_err();
    assert!(
        matches!(stale, rustix::io::Errno::NOTCONN | rustix::io::Errno::CONNABORTED),
        "a dead mount fails, it does not hang: {stale}"
    );
    alive.store(true, Ordering::SeqCst);
    let dir = m.dir.clone();
    std::mem::forget(m);
    hb.ok(&["mount", "-d", &via_relay, dir.to_str().unwrap()]);
    let o = Command::new(dir.join("bin/busybox")).arg("true").status().unwrap();
    assert!(o.success());
    hb.ok(&["umount", dir.to_str().unwrap()]);
    hb.fsck_clean();
}

#[test]
fn optimize_records_the_start_up_order_and_lazy_pulls_prefetch_it() {
    let reg = open_registry();
    let lazy = convert(&format!("{reg}/debian-app:v1"), "optimize");
    let hb = Hb::new();
    let r = hb.json(&["optimize", &lazy, "--seconds", "60", "--", "python3", "-c", "print(1)"]);
    assert!(r["startup_chunks"].as_u64().unwrap() > 10, "{r}");
    let fresh = Hb::new();
    let p = fresh.json(&["pull", "--lazy", &lazy]);
    assert_eq!(p["startup_chunks"], r["startup_chunks"], "{p}");
    // With the start-up order prefetched, running the same command fetches nothing on demand.
    let m = Mounted::new(&fresh, &lazy, "mnt", &["--prefetch", "startup"]);
    let t = Instant::now();
    while !mount_log(&fresh, &m.dir).contains("prefetch finished") && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = Command::new("chroot").arg(&m.dir).args(["python3", "-c", "print(1)"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "1\n");
    let log = m.unmount();
    assert!(log.contains("(0 on demand"), "{log}");
    fresh.fsck_clean();
}

/// Regression: `hb optimize` ran the host's `chroot` through the image's PATH (and `/bin/sh` for a
/// working directory), so an image of one static binary failed with "No such file or directory".
#[test]
fn optimize_runs_images_without_a_shell_or_the_hosts_chroot_on_their_path() {
    let reg = open_registry();
    let mut t = Tar::new();
    t.dir("usr/").dir("usr/bin/");
    t.file("usr/bin/busybox", 0o755, &std::fs::read("/bin/busybox").unwrap());
    let seed = Hb::new();
    let (image, _) = push_image(&seed, &reg, &format!("crafted/shell-less:{}", std::process::id()), &[t.finish()]);
    let lazy = convert(&image, "shell-less");
    let hb = Hb::new();
    let r = hb.json(&["optimize", &lazy, "--seconds", "30", "--", "busybox", "true"]);
    assert!(r["startup_chunks"].as_u64().unwrap() > 0, "{r}");
    hb.fsck_clean();
}

/// Regression (cold-start issue): `hb optimize` ran the command on the read-only mount, so a
/// command that writes first (a build step) failed at once and the order held only the shell's
/// reads. It runs over a writable layer now, as in a container: the data the command reads after
/// its write is in the order.
#[test]
fn optimize_records_a_command_that_writes_before_it_reads() {
    let reg = open_registry();
    let mut t = Tar::new();
    t.dir("usr/").dir("usr/bin/");
    t.file("usr/bin/busybox", 0o755, &std::fs::read("/bin/busybox").unwrap());
    t.file("data.bin", 0o644, &pseudo_random(21, 8 << 20));
    let seed = Hb::new();
    let (image, _) = push_image(&seed, &reg, &format!("crafted/writer:{}", std::process::id()), &[t.finish()]);
    let lazy = convert(&image, "writer");
    let hb = Hb::new();
    let script = "busybox echo x > /made && busybox md5sum /data.bin";
    let r = hb.json(&["optimize", &lazy, "--seconds", "30", "--", "busybox", "sh", "-c", script]);
    assert!(r["startup_bytes"].as_u64().unwrap() >= 8 << 20, "the order lacks /data.bin: {r}");
    // A command that cannot start is an error naming it, and leaves nothing mounted either.
    let out = hb.run(&["optimize", &lazy, "--seconds", "30", "--", "no-such-command"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-command"), "{out:?}");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("hb-optimize-"), "{mounts}");
    hb.fsck_clean();
}

/// Every entry type, awkward metadata, unicode names, hard links across directories, a large
/// file that is mostly zeros, thousands of small files, and an upper layer with whiteouts and an
/// opaque directory: the eager export, a local mount and a lazy mount agree on every path.
#[test]
fn crafted_images_mount_exactly_like_their_export_eagerly_and_lazily() {
    let reg = open_registry();
    let mut upper = Tar::new();
    upper.dir("etc/").dir("var/").dir("var/cache/").dir("many/");
    upper.file("etc/.wh.passwd", 0o644, b"").file("var/cache/.wh..wh..opq", 0o644, b"");
    upper.file("var/cache/fresh", 0o644, b"new");
    let mut sparse = vec![0u8; 48 << 20];
    sparse[40 << 20..(40 << 20) + 4096].copy_from_slice(&pseudo_random(3, 4096));
    upper.file("var/sparse.img", 0o644, &sparse);
    for i in 0..3000 {
        upper.file(&format!("many/f{i:05}"), 0o644, format!("small file {i}\n").as_bytes());
    }
    // Hard links across directories within a layer (the lower layer has some too).
    upper.dir("linked/").link(tar::EntryType::Link, "linked/hard", "many/f00007");
    let seed = Hb::new();
    let (image, _) = push_image(
        &seed,
        &reg,
        &format!("crafted/kitchen:{}", std::process::id()),
        &[every_entry_type(), upper.finish()],
    );

    let eager = Hb::new();
    eager.ok(&["pull", &image]);
    let out = eager.path("export");
    eager.ok(&["export", &image, out.to_str().unwrap()]);
    let want = fingerprint_dir(&out, &[]);
    assert!(want.contains_key("ünïcødé/名前.txt".as_bytes()) && want.contains_key(b"var/sparse.img".as_slice()));
    assert!(!want.contains_key(b"etc/passwd".as_slice()), "the whiteout hid it");
    let m = Mounted::new(&eager, &image, "mnt", &[]);
    assert_same_tree("local mount", &want, &fingerprint_dir(&m.dir, &[]), true);
    m.unmount();

    let lazy = convert(&image, "kitchen");
    let hb = Hb::new();
    let m = Mounted::new(&hb, &lazy, "mnt", &["--prefetch", "none"]);
    assert_same_tree("lazy mount", &want, &fingerprint_dir(&m.dir, &[]), true);
    m.unmount();
    hb.fsck_clean();
}

fn mounted_at(dir: &Path) -> bool {
    let canon = std::fs::canonicalize(dir).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

/// A failed test leaves no mount process behind (it would hold the test run's output open):
/// SIGKILL to `pid` if it still runs, and a lazy unmount of the folder.
struct KillOnDrop(u32, PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::path::Path::new(&format!("/proc/{}", self.0)).exists() {
            let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
            let _ = Command::new("umount").arg("-l").arg(&self.1).status();
        }
    }
}

/// Whether process `pid` catches signal `sig` (its `SigCgt` mask in /proc).
fn catches(pid: u32, sig: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

/// Regression (hardening issue): `hb mount` caught SIGTERM only after its mount appeared, so a
/// SIGTERM just then killed it by the signal and left a stale mount ("signal: 15" in a CI run).
/// Now it catches signals before it mounts, and one that comes while it starts (here: while it
/// pulls the image) ends it at once, leaving no mount.
#[test]
fn a_foreground_mount_unmounts_cleanly_on_sigterm() {
    let reg = open_registry();
    let image = format!("{reg}/busybox:latest");
    let hb = Hb::new();
    let dir = hb.path("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    // Several times, at slightly different moments: a signal while the store is being written
    // once crashed the process as it exited (SIGSEGV: RocksDB's static destructors under `exit`).
    for round in 0..4u64 {
        // The image is not pulled: the mount pulls it first. SIGTERM is caught before the mount.
        let mut child = hb.command(&["mount", &image, dir.to_str().unwrap()]).spawn().unwrap();
        let _cleanup = KillOnDrop(child.id(), dir.clone());
        let t = Instant::now();
        loop {
            let mounted = mounted_at(&dir);
            if catches(child.id(), 15) {
                break;
            }
            assert!(!mounted, "the mount appeared before hb mount caught SIGTERM");
            assert!(t.elapsed() < Duration::from_secs(60), "hb mount never caught SIGTERM");
            assert!(child.try_wait().unwrap().is_none(), "hb mount exited early");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(round * 5));
        // A SIGTERM right away (still starting, or just mounted): no mount is left either way.
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let status = child.wait().unwrap();
        assert!(status.code().is_some(), "round {round}: hb mount died by the signal: {status}");
        assert!(!mounted_at(&dir), "round {round}: a SIGTERM while starting left a mount");
        hb.fsck_clean();
    }

    hb.ok(&["pull", &image]);
    let mut child = hb.command(&["mount", &image, dir.to_str().unwrap()]).spawn().unwrap();
    let _cleanup = KillOnDrop(child.id(), dir.clone());
    let t = Instant::now();
    while !mounted_at(&dir) {
        assert!(t.elapsed() < Duration::from_secs(60), "not mounted");
        assert!(child.try_wait().unwrap().is_none(), "hb mount exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dir.join("bin/busybox").exists());
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM ends the mount cleanly: {status}");
    assert!(!mounted_at(&dir), "unmounted");
    hb.fsck_clean();
}

#[test]
fn lazy_pull_without_an_accelerated_form_says_so_and_pulls_whole_and_prefetch_all_completes() {
    let reg = open_registry();
    let plain = format!("{reg}/busybox:latest");
    let hb = Hb::new();
    let o = hb.run(&["pull", "--lazy", &plain]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no accelerated form") && err.contains("pulling it whole"), "{err}");
    assert_eq!(hb.json(&["du"])["absent_chunks"], 0, "pulled whole");

    // --prefetch all fetches every chunk in the background; after it, the image is complete.
    let lazy = convert(&plain, "prefetch-all");
    let cold = Hb::new();
    let m = Mounted::new(&cold, &lazy, "mnt", &["--prefetch", "all", "--bandwidth", "50M"]);
    let t = Instant::now();
    while !mount_log(&cold, &m.dir).contains("prefetch finished") {
        assert!(t.elapsed() < Duration::from_secs(120), "prefetch did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = m.unmount();
    assert!(log.contains("layers now complete"), "{log}");
    assert_eq!(cold.json(&["du"])["absent_chunks"], 0);
    let again = cold.json(&["pull", &lazy]);
    assert_eq!(again["bytes_downloaded"], 0, "nothing left to download: {again}");
    cold.fsck_clean();
}

/// A 401 on a range read (an expired token) makes the mount renew its authorization and retry:
/// the read succeeds with the right bytes.
#[test]
fn a_401_on_a_range_read_is_renewed_and_retried() {
    let reg = open_registry();
    let seed = Hb::new();
    let (image, _, _) = push_unique_image(&seed, &reg, &format!("lazy-401-{}", std::process::id()));
    let lazy = convert(&image, "renew");
    let eager = Hb::new();
    eager.ok(&["pull", &image]);
    let out = eager.path("export");
    eager.ok(&["export", &image, out.to_str().unwrap()]);
    let want = std::fs::read(out.join("unique.bin")).unwrap();

    let expired = http_response(
        "401 Unauthorized",
        "Www-Authenticate: Bearer error=\"invalid_token\"\r\n",
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"token expired"}]}"#,
    );
    // Blob requests of the lazy pull: image config, hb config, index, table; the 5th is a range.
    let (proxy, seen, _) = refusing_proxy(reg.clone(), 5, expired);
    let via = lazy.replacen(&reg, &proxy, 1);
    let hb = Hb::new();
    hb.ok(&["pull", "--lazy", &via]);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 4, "the pull made four blob requests");
    let m = Mounted::new(&hb, &via, "mnt", &["--prefetch", "none"]);
    let got = std::fs::read(m.dir.join("unique.bin")).unwrap();
    assert!(got == want, "the read after a renewal returns the right bytes");
    assert!(seen.load(std::sync::atomic::Ordering::SeqCst) >= 6, "the refused range was asked again");
    m.unmount();
    hb.fsck_clean();
}

#[test]
fn exporting_a_lazily_pulled_image_says_how_to_complete_it() {
    let reg = open_registry();
    let lazy = convert(&format!("{reg}/busybox:latest"), "export");
    let hb = Hb::new();
    hb.ok(&["pull", "--lazy", &lazy]);
    let before = hb.state();
    let err = hb.fails(&["export", &lazy, hb.path("out").to_str().unwrap()], 1);
    assert!(err.contains("pulled lazily") && err.contains("hb pull"), "{err}");
    assert!(!hb.path("out").exists());
    assert_eq!(hb.state(), before);
    hb.ok(&["pull", &lazy]);
    hb.ok(&["export", &lazy, hb.path("out").to_str().unwrap()]);
    assert!(hb.path("out/bin/busybox").exists());
}

#[test]
fn while_a_mount_holds_the_store_reading_commands_get_a_read_only_view() {
    let reg = open_registry();
    let image = format!("{reg}/busybox:latest");
    let hb = Hb::new();
    hb.ok(&["pull", &image]);
    let m = Mounted::new(&hb, &image, "mnt", &[]);
    let o = hb.run(&["images"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("busybox"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("read-only view"));
    assert!(hb.json(&["du"])["chunks"].as_u64().unwrap() > 0);
    let out = hb.path("export");
    hb.ok(&["export", &image, out.to_str().unwrap()]);
    assert_same_tree("export while mounted", &fingerprint_dir(&out, &[]), &fingerprint_dir(&m.dir, &[]), true);
    // Writing commands are refused, naming the reason.
    let err = hb.fails(&["pull", &format!("{reg}/debian-app:v1")], 1);
    assert!(err.contains("in use") && err.contains("hb mount"), "{err}");
    let err = hb.fails(&["gc"], 1);
    assert!(err.contains("in use"), "{err}");
    m.unmount();
    hb.fsck_clean();
}

/// Regression (hardening issue): a passthrough backing file was trusted by its length: 4 bytes
/// overwritten in `<store>/files/`, the image mounted again, and the file read through the mount
/// changed while `hb fsck` said "clean". Now fsck finds it, `--repair` mends it, and a mount
/// checks a backing file before its first use.
#[test]
fn a_damaged_passthrough_backing_file_never_reaches_a_reader() {
    let reg = open_registry();
    let image = format!("{reg}/busybox:latest");
    let hb = Hb::new();
    hb.ok(&["pull", &image]);
    let read = |hb: &Hb| {
        let m = Mounted::new(hb, &image, "mnt", &[]);
        let bytes = std::fs::read(m.dir.join("bin/busybox")).unwrap();
        m.unmount();
        bytes
    };
    let want = read(&hb);
    assert!(want.len() >= 1 << 20, "busybox is large enough for passthrough ({} bytes)", want.len());
    let files: Vec<PathBuf> = std::fs::read_dir(hb.root.join("files")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 1, "one backing file: {files:?}");
    let damage = || {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(&files[0]).unwrap().write_all_at(b"EVIL", 4096).unwrap();
    };
    damage();
    let o = hb.run(&["fsck"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "fsck finds the damage: {text}");
    assert!(text.contains("corrupt-backing"), "{text}");
    assert!(hb.run(&["fsck", "--repair"]).status.success(), "--repair mends it");
    hb.fsck_clean();
    assert_eq!(read(&hb), want);

    // Damaged again, and mounted without a repair: the mount's reader still gets the image's bytes.
    damage();
    assert_eq!(read(&hb), want, "a damaged backing file reached a reader");
    hb.fsck_clean();
    // du counts backing files; gc frees them once no image needs them.
    assert!(hb.json(&["du"])["backing_bytes"].as_u64().unwrap() >= want.len() as u64);
    hb.ok(&["rmi", &image]);
    let gc = hb.json(&["gc"]);
    assert_eq!(gc["backing_removed"], 1, "{gc}");
    assert_eq!(hb.json(&["du"])["backing_files"], 0);
}

#[test]
fn a_mount_nobody_reads_guesses_its_programs_files_but_learns_no_order() {
    // debian-app's command is `python3 /app/main.py`: without an order, a mount fetches python,
    // its loader and libraries at once. Nothing reads them here: nothing is learned.
    let (hb, image) = lazily_pulled("debian-app:v1", "unread");
    let m = Mounted::new(&hb, &image, "mnt", &["--plain-http"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !mount_log(&hb, &m.dir).contains("prefetch finished") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = m.unmount();
    let fetched: u64 = log
        .split("prefetch finished: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prefetch reported: {log}"));
    assert!(fetched >= 40, "{fetched} chunks guessed and fetched: {log}");
    let o = hb.run(&["inspect", &image]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["startupOrder"].is_null(), "a guess nobody read became the image's order: {j}");
    hb.fsck_clean();
}
