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
    let o = hb.run(&["pull", &image]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("the filesystem holding the store is full"),
        "{err}"
    );
    assert!(err.contains(&fs.0.display().to_string()), "the error names where: {err}");
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
