//! Corruption is detected and never served; the store has one owner; the Bloom filter recovers;
//! the command line's exit codes.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::Stdio;

use hb_tests::*;

fn one_file_layer(hb: &Hb, seed: u64) -> (std::path::PathBuf, String) {
    let mut b = tar::Builder::new(Vec::new());
    let data = pseudo_random(seed, 1 << 20);
    let mut h = file_header(data.len() as u64, 0o644);
    b.append_data(&mut h, "f", &data[..]).unwrap();
    let p = hb.path(&format!("l{seed}.tar"));
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    let d = hb.import(&p)["digest"].as_str().unwrap().to_string();
    (p, d)
}

#[test]
fn a_flipped_byte_in_a_pack_is_found_by_fsck_and_never_exported() {
    let hb = Hb::new();
    let (_, d) = one_file_layer(&hb, 1);
    let pack = std::fs::read_dir(hb.root.join("packs")).unwrap().next().unwrap().unwrap().path();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len / 2).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], len / 2).unwrap();
    drop(f);

    let o = hb.run(&["fsck"]);
    assert_eq!(o.status.code(), Some(1), "fsck must fail on corruption");
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("corrupt-chunk"), "{report}");
    let out = hb.path("out.tar");
    let err = hb.fails(&["layer", "export", &d, "-o", out.to_str().unwrap()], 1);
    assert!(err.contains("is corrupt"), "{err}");
    assert!(!out.exists(), "no output from a failed export");
    assert!(std::fs::read_dir(hb.dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
    let dir = hb.path("rootfs");
    let err = hb.fails(&["layer", "export", &d, "--dir", dir.to_str().unwrap()], 1);
    assert!(err.contains("is corrupt"), "{err}");
}

#[test]
fn a_second_process_is_told_the_store_is_busy() {
    let hb = Hb::new();
    hb.ok(&["du"]);
    // An import reading from a pipe we keep open holds the store.
    let mut holder = hb
        .command(&["layer", "import", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = holder.stdin.take().unwrap();
    stdin.write_all(&[0u8; 512]).unwrap();
    stdin.flush().unwrap();
    // Wait until the holder has the lock, watching /proc/locks (probing with a lock of our own
    // could make the holder's non-blocking lock fail).
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(hb.root.join("LOCK")).unwrap());
    let mut held = false;
    for _ in 0..500 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        if locks.lines().any(|l| l.contains("FLOCK") && l.split_whitespace().any(|f| f.ends_with(&format!(":{ino}")))) {
            held = true;
            break;
        }
        assert!(holder.try_wait().unwrap().is_none(), "the holder exited early");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(held, "the holder never took the lock");
    // Writing commands are told the store is busy; reading ones get a read-only view.
    let err = hb.fails(&["gc"], 1);
    assert!(err.contains("in use by another hb process"), "{err}");
    let o = hb.run(&["du"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains("read-only view"), "{o:?}");
    drop(stdin);
    let _ = holder.wait();
    hb.ok(&["du"]);
}

#[test]
fn a_missing_or_stale_bloom_filter_is_rebuilt() {
    let hb = Hb::new();
    let (p, _) = one_file_layer(&hb, 3);
    let bloom = hb.root.join("bloom.bin");
    assert!(bloom.exists(), "the filter is saved on close");
    std::fs::remove_file(&bloom).unwrap();
    hb.fsck_clean();
    // A filter from another moment (stale sequence number) must not hide stored chunks.
    let saved = std::fs::read(&bloom).unwrap();
    one_file_layer(&hb, 4);
    std::fs::write(&bloom, &saved).unwrap();
    let again = hb.import(&p);
    assert_eq!(again["new_bytes"], 0, "stored chunks found despite a stale filter: {again:#}");
    std::fs::write(&bloom, b"garbage").unwrap();
    hb.fsck_clean();
}

#[test]
fn exit_codes_and_messages() {
    let hb = Hb::new();
    let err = hb.fails(&["layer", "frobnicate"], 2);
    assert!(err.contains("unrecognized subcommand"), "{err}");
    let err = hb.fails(&["layer", "export", "sha256:0123", "-o", "/dev/null"], 1);
    assert!(err.contains("no layer matches \"sha256:0123\""), "{err}");
    let err = hb.fails(&["layer", "import", "/nonexistent/layer.tar"], 1);
    assert!(err.contains("/nonexistent/layer.tar"), "{err}");
    let bad = Hb::with_config("[store]\nrooot = \"/x\"\n");
    let err = bad.fails(&["du"], 1);
    assert!(err.contains("hb.toml") && err.contains("rooot"), "{err}");
    hb.ok(&["fsck"]);
}
