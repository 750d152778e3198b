//! A full filesystem under the store: clear errors naming it, nothing half-visible, fsck clean,
//! and everything works again once there is space.

use std::path::{Path, PathBuf};
use std::process::Command;

use hb_tests::*;

use super::lazy::convert;
use super::pull::open_registry;

/// A tmpfs of `mib` MiB at `dir`, unmounted on drop (before the scratch folder is removed).
struct SmallFs(PathBuf);

impl SmallFs {
    fn new(dir: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(dir).status();
        assert!(ok.unwrap().success(), "mounting a tmpfs at {}", dir.display());
        SmallFs(dir.to_path_buf())
    }

    /// Grows it to `mib` MiB: space comes back.
    fn grow(&self, mib: u64) {
        let ok = Command::new("mount").args(["-o", &format!("remount,size={mib}m")]).arg(&self.0).status();
        assert!(ok.unwrap().success());
    }

    /// Fills what is left of it with a file (removed by `drain`).
    fn fill(&self) {
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 1 << 20];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        let small = vec![0xa5u8; 4096];
        while std::io::Write::write_all(&mut f, &small).is_ok() {}
    }

    fn drain(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills it but for `mib` MiB.
impl SmallFs {
    fn fill_but(&self, mib: u64) {
        let st = rustix_free(&self.0);
        let keep = mib << 20;
        if st > keep {
            let f = std::fs::File::create(self.0.join("filler")).unwrap();
            f.set_len(0).unwrap();
            let ok =
                Command::new("fallocate").args(["-l", &(st - keep).to_string()]).arg(self.0.join("filler")).status();
            assert!(ok.unwrap().success());
        }
    }
}

/// Bytes free on the filesystem of `p` (df).
fn rustix_free(p: &Path) -> u64 {
    let o = Command::new("df").args(["-B1", "--output=avail"]).arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

/// `hb pull IMAGE` fails with exit code 1 and says the store's filesystem (named) is full.
fn pull_fails_for_space(hb: &Hb, image: &str, fs: &SmallFs) {
    let o = hb.run(&["pull", image]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("the filesystem holding the store is full"),
        "{err}"
    );
    assert!(err.contains(&fs.0.display().to_string()), "the error names where: {err}");
}

/// An hb whose store lives on a small filesystem.
fn hb_on(mib: u64) -> (Hb, SmallFs) {
    let mut hb = Hb::new();
    let fs = SmallFs::new(&hb.path("small"), mib);
    hb.root = fs.0.join("store");
    (hb, fs)
}

#[test]
fn a_pull_into_a_full_store_says_so_commits_nothing_and_works_once_there_is_space() {
    let reg = open_registry();
    let image = format!("{reg}/debian-app:v1");
    let (hb, fs) = hb_on(48);
    pull_fails_for_space(&hb, &image, &fs);
    assert_eq!(hb.json(&["images"]).as_array().unwrap().len(), 0, "a half pull is visible");
    hb.fsck_clean();

    fs.grow(1024);
    hb.ok(&["pull", &image]);
    assert_eq!(hb.json(&["images"]).as_array().unwrap().len(), 1);
    hb.fsck_clean();
}

#[test]
fn a_lazy_mount_on_a_full_store_still_serves_verified_bytes_and_keeps_them_once_there_is_space() {
    let reg = open_registry();
    let plain = format!("{reg}/busybox:latest");
    let lazy = convert(&plain, "full-disk");
    let reference = Hb::new();
    reference.ok(&["pull", &plain]);
    let want = {
        let out = reference.path("rootfs");
        reference.ok(&["export", &plain, out.to_str().unwrap()]);
        std::fs::read(out.join("bin/busybox")).unwrap()
    };
    let (hb, fs) = hb_on(32);
    hb.ok(&["pull", "--lazy", &lazy]);
    let absent = hb.json(&["du"])["absent_chunks"].as_u64().unwrap();
    assert!(absent > 0);
    fs.fill();
    let dir = hb.path("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    hb.ok(&["mount", "-d", &lazy, dir.to_str().unwrap()]);
    let got = std::fs::read(dir.join("bin/busybox"));
    hb.ok(&["umount", dir.to_str().unwrap()]);
    assert_eq!(got.unwrap(), want, "a read on a full store returns the image's bytes");
    assert_eq!(hb.json(&["du"])["absent_chunks"].as_u64().unwrap(), absent, "nothing could be kept");
    // What needs to write says why it cannot.
    let o = hb.run(&["fsck"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cannot be opened for writing: its filesystem has"), "{err}");

    fs.drain();
    hb.fsck_clean();
    hb.ok(&["mount", "-d", &lazy, dir.to_str().unwrap()]);
    assert_eq!(std::fs::read(dir.join("bin/busybox")).unwrap(), want);
    hb.ok(&["umount", dir.to_str().unwrap()]);
    assert!(hb.json(&["du"])["absent_chunks"].as_u64().unwrap() < absent, "kept once there was space");
    hb.fsck_clean();
}

/// A plain tar with one pseudo-random file of `mib` MiB.
fn layer_tar(dir: &Path, seed: u64, mib: usize) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    let data = pseudo_random(seed, mib << 20);
    let mut h = file_header(data.len() as u64, 0o644);
    b.append_data(&mut h, format!("data-{seed}"), &data[..]).unwrap();
    let p = dir.join(format!("layer-{seed}.tar"));
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    p
}

#[test]
fn gc_compaction_on_a_full_store_stops_cleanly_and_finishes_once_there_is_space() {
    let (hb, fs) = hb_on(96);
    let keep = layer_tar(&hb.path(""), 60, 12);
    let garbage = layer_tar(&hb.path(""), 61, 30);
    let keep_id = hb.import(&keep)["diff_id"].as_str().unwrap().to_string();
    let gone = hb.import(&garbage)["diff_id"].as_str().unwrap().to_string();
    hb.ok(&["layer", "rm", &gone]);
    // Room to open and to commit, not to copy the kept layer's 12 MiB into a new pack.
    fs.fill_but(12);
    let o = hb.run(&["gc"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device") && err.contains("filesystem holding the store is full"), "{err}");
    hb.fsck_clean();
    fs.drain();
    let r = hb.json(&["gc"]);
    assert!(r["packs_compacted"].as_u64().unwrap() + r["packs_deleted"].as_u64().unwrap() >= 1, "{r}");
    hb.fsck_clean();
    let out = hb.path("keep.tar");
    hb.ok(&["layer", "export", &keep_id, "-o", out.to_str().unwrap()]);
    assert_eq!(fingerprint_tar(&std::fs::read(&out).unwrap()), fingerprint_tar(&std::fs::read(&keep).unwrap()));
}

#[test]
fn hb_run_on_a_full_disk_fails_with_125_and_leaves_no_container() {
    let reg = open_registry();
    let image = format!("{reg}/busybox:latest");
    let (hb, fs) = hb_on(64);
    hb.ok(&["pull", &image]);
    fs.fill();
    let o = hb.run(&["run", "--rm", &image, "echo", "hi"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let left: Vec<_> = std::fs::read_dir(hb.root.join("containers"))
        .map(|d| d.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a container folder was left: {left:?}");
    fs.drain();
    assert_eq!(hb.ok(&["run", "--rm", &image, "echo", "hi"]), "hi\n");
    hb.fsck_clean();
}

#[test]
fn the_mirror_on_a_full_disk_keeps_serving_what_it_has_and_recovers() {
    use super::proxy::{curl, sha256, Fault, Proxy, Scripted};
    let small = Scripted::start(Fault::Clean, 1 << 20);
    let big = Scripted::start(Fault::Clean, 6 << 20);
    let fs_dir = std::sync::Mutex::new(None);
    let toml = format!(
        "[proxy]\n[[proxy.upstream]]\nhost = \"{}\"\n[[proxy.upstream]]\nhost = \"{}\"\n",
        small.addr, big.addr
    );
    let mut proxy = Proxy::start_with(&toml, |hb| {
        let fs = SmallFs::new(&hb.path("small"), 48);
        hb.root = fs.0.join("store");
        *fs_dir.lock().unwrap() = Some(fs);
    });
    let fs = fs_dir.lock().unwrap().take().unwrap();
    let url = |s: &Scripted| format!("http://{}/v2/{}/fake/blobs/{}", proxy.addr, s.addr, s.digest);
    let (code, body) = curl(&[&url(&small)]);
    assert_eq!((code, sha256(&body)), (200, small.digest.clone()));
    fs.fill();
    // The big blob cannot be kept: the client never gets a whole wrong body, the proxy lives on.
    let (code, body) = curl(&["--max-time", "60", &url(&big)]);
    assert!(code != 200 || body.len() < big.blob.len(), "a blob the proxy could not keep was served whole? {code}");
    assert!(code == 0 || code >= 400 || body.len() < big.blob.len());
    let (code, body) = curl(&[&url(&small)]);
    assert_eq!((code, sha256(&body)), (200, small.digest.clone()), "what it has is still served");
    fs.drain();
    let (code, body) = curl(&[&url(&big)]);
    assert_eq!((code, sha256(&body)), (200, big.digest.clone()), "recovered once there is space");
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
    // The proxy stopped, then its small filesystem, then its folder. (Regression: the folder went
    // first, while the filesystem was still mounted in it: its removal stopped there, and every run
    // left a folder behind in /dev/shm.)
    let dir = proxy.hb.dir.path().to_path_buf();
    proxy.kill9();
    drop(fs);
    drop(proxy);
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

/// The daemon's path (issue 16's leftover): a pull the daemon runs on a full store fails with the
/// same clear error, leaves nothing half-visible, and the daemon keeps serving what it has (a
/// container from an image it holds) and pulls again once there is space.
#[test]
fn the_daemon_on_a_full_disk_says_so_keeps_serving_and_recovers() {
    use super::daemon::{hb_for_daemon, Daemon};
    let reg = open_registry();
    let small = format!("{reg}/busybox:latest");
    let big = format!("{reg}/debian-app:v1");
    let mut hb = hb_for_daemon("");
    let fs = SmallFs::new(&hb.path("small"), 48);
    hb.root = fs.0.join("store");
    let mut daemon = Daemon::start(&hb);
    hb.ok(&["pull", &small]);
    pull_fails_for_space(&hb, &big, &fs);
    let names: Vec<String> =
        hb.json(&["images"]).as_array().unwrap().iter().map(|i| i["reference"].to_string()).collect();
    assert_eq!(names.len(), 1, "a half pull is visible: {names:?}");
    assert!(daemon.pid() > 0 && std::path::Path::new(&format!("/proc/{}", daemon.pid())).exists(), "the daemon lives");

    // What it holds is still served: a container runs from it (once a container has room).
    fs.fill_but(8);
    assert_eq!(hb.ok(&["run", "--rm", &small, "echo", "hi"]), "hi\n");
    std::fs::remove_file(fs.0.join("filler")).unwrap();

    fs.grow(1024);
    hb.ok(&["pull", &big]);
    assert_eq!(hb.json(&["images"]).as_array().unwrap().len(), 2);
    daemon.stop();
    hb.fsck_clean();
}
