//! Helpers for HyperBox's end-to-end tests: run the real `hb` binary, make scratch stores on
//! tmpfs, craft tars, and fingerprint directory trees and tar streams so two can be compared
//! entry by entry (type, mode, owner, size, mtime, link target, xattrs, device, content).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `hb` binary under test: `HB_BIN`, or the workspace's debug `hb`, (re)built once per test
/// process so a test never runs a stale binary (this crate cannot depend on a binary crate).
/// Both binaries are built (`hb` of hb-cli, `hb-engine` of hb-engine): `hb` hands most commands
/// to `hb-engine` beside it.
pub fn hb_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HB_BIN") {
            return PathBuf::from(p);
        }
        let workspace = workspace();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--quiet", "-p", "hb-cli", "-p", "hb-engine", "--bins", "--manifest-path"])
            .arg(workspace.join("Cargo.toml"))
            .output()
            .expect("running cargo build");
        assert!(out.status.success(), "building hb failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let exe = std::env::current_exe().expect("current exe");
        let bin = exe.parent().and_then(|d| d.parent()).expect("target dir").join("hb");
        assert!(bin.exists(), "hb binary not found at {}", bin.display());
        bin
    })
    .clone()
}

/// The workspace under test. Read at run time (`cargo test` sets `CARGO_MANIFEST_DIR` for the
/// test process): a test binary built from another clone sharing the target dir (cargo reuses it,
/// its hash holds no absolute path) would otherwise carry that clone's path.
pub fn workspace() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).filter(|d| d.join("Cargo.toml").exists());
    let dir = dir.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent().expect("workspace").to_path_buf()
}

/// Where offline test material lives (built by scripts/testdata.sh).
pub fn testdata(name: &str) -> PathBuf {
    let dir = std::env::var_os("HB_TESTDATA").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/hb-testdata".into());
    let p = dir.join(name);
    assert!(p.exists(), "test material {} is missing: run scripts/testdata.sh (scripts/test.sh does)", p.display());
    p
}

/// A scratch directory, on tmpfs when there is one (deleting big trees on ext4 here is slow).
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("HB_TEST_TMP").map(PathBuf::from).unwrap_or_else(|| {
        if Path::new("/dev/shm").is_dir() {
            "/dev/shm".into()
        } else {
            std::env::temp_dir()
        }
    });
    tempfile::Builder::new().prefix("hb-test-").tempdir_in(base).expect("scratch dir")
}

/// A store in a scratch directory plus the command to drive it.
pub struct Hb {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub config: Option<PathBuf>,
}

impl Default for Hb {
    fn default() -> Self {
        Self::new()
    }
}

impl Hb {
    pub fn new() -> Self {
        let dir = scratch();
        let root = dir.path().join("store");
        Hb { dir, root, config: None }
    }

    /// A store whose config file holds `toml` (a `version = 1` header is added).
    pub fn with_config(toml: &str) -> Self {
        let mut hb = Self::new();
        let p = hb.dir.path().join("hb.toml");
        std::fs::write(&p, format!("version = 1\n{toml}")).unwrap();
        hb.config = Some(p);
        hb
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `hb` on this store, isolated from the machine's own settings: no /etc/hb/hb.toml (a
    /// minimal config unless the test gave one), no docker or podman credentials, no hosts.toml
    /// folders.
    /// A test that wants them sets `DOCKER_CONFIG`, `--hosts-dir` or a config itself.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_via(&[], args)
    }

    /// [`Hb::command`] run by `wrapper` (`["nsenter", "--net=/run/netns/x"]`: hb in a network
    /// namespace), which gets hb's path and arguments after its own.
    pub fn command_via(&self, wrapper: &[&str], args: &[&str]) -> Command {
        let mut c = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(hb_bin());
                c
            }
            None => Command::new(hb_bin()),
        };
        c.arg("--root").arg(&self.root);
        let cfg = self.config.clone().unwrap_or_else(|| {
            let p = self.dir.path().join("hb-default.toml");
            if !p.exists() {
                std::fs::write(&p, "version = 1\n").unwrap();
            }
            p
        });
        c.arg("--config").arg(cfg);
        let empty = self.dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        c.args(args)
            .env_remove("HB_ROOT")
            .env_remove("HB_CONFIG")
            .env_remove("HB_SOCKET")
            .env("DOCKER_CONFIG", &empty)
            // podman's credentials: none (a test sets REGISTRY_AUTH_FILE itself).
            .env("REGISTRY_AUTH_FILE", empty.join("auth.json"))
            .env("HB_HOSTS_DIR", &empty);
        c
    }

    /// Runs hb and returns its output, whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running hb")
    }

    /// Runs hb, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "hb {args:?} failed ({}):\n{}", o.status, String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).expect("utf-8 stdout")
    }

    /// Runs hb, asserts it failed with exit code `code`, returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "hb {args:?}: stdout {}\nstderr {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stderr).expect("utf-8 stderr")
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("json output")
    }

    /// Imports a layer file and returns the import report.
    pub fn import(&self, file: &Path) -> serde_json::Value {
        let v = self.json(&["layer", "import", file.to_str().unwrap()]);
        v[0].clone()
    }

    /// Asserts `hb fsck` passes.
    pub fn fsck_clean(&self) {
        let o = self.run(&["--json", "fsck"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|_| panic!("hb fsck printed no report: {}", String::from_utf8_lossy(&o.stderr)));
        assert_eq!(v["issues"], serde_json::json!([]), "fsck found problems: {v:#}");
        assert!(o.status.success(), "fsck failed: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Everything observable about the store's state, to assert it did not change.
    pub fn state(&self) -> String {
        let mut u = self.json(&["du"]);
        // The metadata database's size moves with RocksDB's own logs; it is not store content.
        u.as_object_mut().unwrap().remove("metadata_bytes");
        u.as_object_mut().unwrap().remove("total_ratio");
        let layers = self.json(&["layer", "ls"]);
        let mut packs = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.root.join("packs")) {
            for e in rd.flatten() {
                packs.push(format!("{} {}", e.file_name().to_string_lossy(), e.metadata().unwrap().len()));
            }
        }
        packs.sort();
        format!("{u}\n{layers}\n{packs:?}")
    }
}

/// Everything compared about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub link: Option<Vec<u8>>,
    pub dev: Option<(u32, u32)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub content: Option<blake3::Hash>,
    /// For hard-linked files: every name of the inode.
    pub links: Option<BTreeSet<Vec<u8>>>,
}

/// Fingerprints every entry below `root` (not following symlinks). Paths are relative, root is "".
pub fn fingerprint_dir(root: &Path, skip: &[&str]) -> BTreeMap<Vec<u8>, Fp> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), BTreeSet<Vec<u8>>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
        if skip.iter().any(|s| rel == s.as_bytes()) {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        let mut xattrs = BTreeMap::new();
        let mut names = vec![0u8; 65536];
        if let Ok(n) = rustix::fs::llistxattr(&p, &mut names[..]) {
            for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
                let mut val = vec![0u8; 65536];
                let n = rustix::fs::lgetxattr(&p, name, &mut val[..]).unwrap();
                xattrs.insert(name.to_vec(), val[..n].to_vec());
            }
        }
        if ft.is_file() && m.nlink() > 1 {
            inodes.entry((m.dev(), m.ino())).or_default().insert(rel.clone());
        }
        let fp = Fp {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: if ft.is_file() { m.len() } else { 0 },
            mtime: (m.mtime(), m.mtime_nsec() as u32),
            link: ft.is_symlink().then(|| std::fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
            dev: (ft.is_char_device() || ft.is_block_device())
                .then(|| (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()))),
            xattrs,
            content: ft.is_file().then(|| blake3::hash(&std::fs::read(&p).unwrap())),
            links: None,
        };
        out.insert(rel, fp);
    }
    for group in inodes.into_values() {
        for name in &group {
            out.get_mut(name).unwrap().links = Some(group.clone());
        }
    }
    out
}

/// Fingerprints a tar stream (any compression). Names are normalised (no `./`, no trailing `/`;
/// the root is ""); hard links take their target's content and share a group.
pub fn fingerprint_tar(data: &[u8]) -> BTreeMap<Vec<u8>, Fp> {
    let reader: Box<dyn Read + '_> = if data.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(data))
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::new(data).unwrap())
    } else {
        Box::new(data)
    };
    let norm = |p: &[u8]| -> Vec<u8> {
        let s: Vec<&[u8]> = p.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").collect();
        s.join(&b'/')
    };
    let mut out: BTreeMap<Vec<u8>, Fp> = BTreeMap::new();
    let mut links: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut ar = tar::Archive::new(reader);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = norm(&e.path_bytes());
        let mut xattrs = BTreeMap::new();
        let mut mtime = (h.mtime().unwrap() as i64, 0u32);
        let (mut uid, mut gid) = (h.uid().unwrap() as u32, h.gid().unwrap() as u32);
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if let Some(k) = x.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.insert(k.to_vec(), x.value_bytes().to_vec());
                } else if x.key_bytes() == b"mtime" {
                    let s = std::str::from_utf8(x.value_bytes()).unwrap();
                    let (a, b) = s.split_once('.').unwrap_or((s, ""));
                    let mut secs: i64 = a.parse().unwrap();
                    let mut ns: u32 = if b.is_empty() { 0 } else { format!("{b:0<9}")[..9].parse().unwrap() };
                    if s.starts_with('-') && ns > 0 {
                        secs -= 1;
                        ns = 1_000_000_000 - ns;
                    }
                    mtime = (secs, ns);
                } else if x.key_bytes() == b"uid" {
                    uid = std::str::from_utf8(x.value_bytes()).unwrap().parse().unwrap();
                } else if x.key_bytes() == b"gid" {
                    gid = std::str::from_utf8(x.value_bytes()).unwrap().parse().unwrap();
                }
            }
        }
        let t = h.entry_type();
        let kind = match t {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Link => "file",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            tar::EntryType::XGlobalHeader => continue,
            _ => "other",
        };
        let mut content = None;
        let mut size = 0;
        if matches!(t, tar::EntryType::Regular | tar::EntryType::Continuous) {
            let mut buf = Vec::new();
            e.read_to_end(&mut buf).unwrap();
            size = buf.len() as u64;
            content = Some(blake3::hash(&buf));
        }
        let link_name = e.link_name_bytes().map(|l| l.to_vec());
        if t == tar::EntryType::Link {
            links.push((path.clone(), norm(link_name.as_deref().unwrap())));
        }
        let fp = Fp {
            kind,
            mode: h.mode().unwrap() & 0o7777,
            uid,
            gid,
            size,
            mtime,
            link: if t == tar::EntryType::Symlink { link_name } else { None },
            dev: matches!(t, tar::EntryType::Char | tar::EntryType::Block)
                .then(|| (h.device_major().unwrap().unwrap(), h.device_minor().unwrap().unwrap())),
            xattrs,
            content,
            links: None,
        };
        out.insert(path, fp);
    }
    // Hard links: the same content and one group of names, whichever name the tar stored first.
    let mut groups: BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for (name, target) in &links {
        let mut root = target.clone();
        while let Some((_, t)) = links.iter().find(|(n, _)| *n == root) {
            root = t.clone();
        }
        let g = groups.entry(root.clone()).or_default();
        g.insert(root);
        g.insert(name.clone());
    }
    // An extractor gives every name the target's inode, so its metadata too.
    for (root, names) in groups {
        let base = out[&root].clone();
        for n in &names {
            *out.get_mut(n).unwrap() = Fp { links: Some(names.clone()), ..base.clone() };
        }
    }
    out
}

/// Asserts two fingerprints agree, listing every difference (not just the first).
pub fn assert_same_tree(what: &str, want: &BTreeMap<Vec<u8>, Fp>, got: &BTreeMap<Vec<u8>, Fp>, ignore_dir_size: bool) {
    let mut diffs = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => diffs.push(format!("missing {:?}", String::from_utf8_lossy(p))),
            Some(g) => {
                let mut g = g.clone();
                if ignore_dir_size && g.kind == "dir" {
                    g.size = w.size;
                }
                if *w != g {
                    diffs.push(format!("{:?}:\n  want {w:?}\n  got  {g:?}", String::from_utf8_lossy(p)));
                }
            }
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        diffs.push(format!("unexpected {:?}", String::from_utf8_lossy(p)));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(!want.is_empty(), "{what}: nothing compared");
}

/// A GNU tar header for a regular file with every numeric field set, as real tar writers do.
pub fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A small xorshift generator for tests that pick at random (seeded and printed, so a failure
/// can be replayed).
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Headless Chromium (Debian's, installed by scripts/setup.sh) with the flags that keep it off
/// the network and out of a sandbox root cannot have.
fn chromium(args: &[&str]) -> Output {
    let profile = scratch();
    let o = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("running chromium (scripts/setup.sh installs it)");
    assert!(o.status.success(), "chromium {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// The page at `url` as Chromium rendered it (its DOM, serialised).
pub fn chromium_dom(url: &str) -> String {
    String::from_utf8_lossy(&chromium(&["--dump-dom", url]).stdout).into_owned()
}

/// A `width`x`height` screenshot of `url` into `png`; returns the PNG's own width and height (its
/// IHDR) and its size in bytes.
pub fn chromium_screenshot(url: &str, png: &Path, width: u32, height: u32) -> (u32, u32, u64) {
    chromium(&[&format!("--screenshot={}", png.display()), &format!("--window-size={width},{height}"), url]);
    let bytes = std::fs::read(png).expect("the screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20), bytes.len() as u64)
}
