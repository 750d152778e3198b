//! Installing hb as operators do: the Debian package (`scripts/package.sh`) installed with apt
//! into a fresh Debian root, and the services' readiness as systemd's `Type=notify` sees it.

use std::io::Read as _;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hb_tests::*;

use super::daemon::{snapshotter_socket, socket};
use super::pull::{open_registry, run};

/// Receives one notification; panics after 60 s.
fn notification(sock: &UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no {what} notification within 60 s: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn sigterm(child: &mut std::process::Child) {
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
}

#[test]
fn the_daemon_and_the_proxy_tell_systemd_they_are_ready_once_they_listen() {
    // The daemon, notifying a socket at a path.
    let hb = Hb::new();
    let notify_path = hb.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (api, snap) = (socket(&hb), snapshotter_socket(&hb));
    let mut daemon = hb
        .command(&["--socket", &api, "daemon", "--snapshotter-socket", &snap])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(hb.path("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let msg = notification(&notify, "READY=1");
    assert!(msg.contains("READY=1\n"), "{msg:?}");
    assert!(msg.contains(&format!("MAINPID={}\n", daemon.id())), "the daemon's own pid: {msg:?}");
    assert!(msg.contains("STATUS=serving store "), "{msg:?}");
    // Ready means both sockets take connections now, not soon.
    UnixStream::connect(&api).expect("the API socket listens when READY=1 is sent");
    UnixStream::connect(&snap).expect("the snapshotter socket listens when READY=1 is sent");
    sigterm(&mut daemon);
    assert!(notification(&notify, "STOPPING=1").contains("STOPPING=1"));
    assert!(daemon.wait().unwrap().success());

    // The proxy, notifying an abstract socket (systemd's own form: `@/org/freedesktop/...`).
    let reg = open_registry();
    let hb = Hb::with_config(&format!("[proxy]\n[[proxy.upstream]]\nhost = \"{reg}\"\n"));
    let name = format!("hb-test-notify-{}", std::process::id());
    let addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
    };
    let notify = UnixDatagram::bind_addr(&addr).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut proxy = hb
        .command(&["proxy", "--listen", &listen])
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(hb.path("proxy.log")).unwrap())
        .spawn()
        .unwrap();
    let msg = notification(&notify, "READY=1");
    assert!(msg.contains("READY=1\n") && msg.contains(&format!("STATUS=serving http://{listen}")), "{msg:?}");
    let health = Command::new("curl").args(["-sf", &format!("http://{listen}/healthz")]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok\n", "the proxy answers when READY=1 is sent");
    sigterm(&mut proxy);
    assert!(notification(&notify, "STOPPING=1").contains("STOPPING=1"));
    assert!(proxy.wait().unwrap().success());
}

/// A fresh Debian root with the host's /proc, /sys and /dev; unmounted on drop.
struct Root {
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl Root {
    /// The minbase root `scripts/testdata.sh` made with debootstrap, unpacked anew.
    fn fresh() -> Root {
        let dir = tempfile::Builder::new().prefix("hb-deb-root").tempdir_in("/var/tmp").unwrap();
        run(Command::new("tar")
            .arg("--numeric-owner")
            .arg("-xzf")
            .arg(testdata("minbase.tar.gz"))
            .arg("-C")
            .arg(dir.path()));
        let mut root = Root { dir, mounts: Vec::new() };
        for (what, args) in
            [("proc", &["-t", "proc", "proc"][..]), ("sys", &["--rbind", "/sys"]), ("dev", &["--rbind", "/dev"])]
        {
            let at = root.path().join(what);
            run(Command::new("mount").args(args).arg(&at));
            if what != "proc" {
                run(Command::new("mount").args(["--make-rslave"]).arg(&at));
            }
            root.mounts.push(at);
        }
        // apt reaches the Debian mirror by name, as on the host.
        std::fs::copy("/etc/resolv.conf", root.path().join("etc/resolv.conf")).unwrap();
        root
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `args` inside the root; its output, or a panic with what it printed.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.chroot(args).output().unwrap();
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{args:?} in the fresh root failed ({}):\n{out}\n{err}", o.status);
        out.into_owned()
    }

    fn chroot(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(self.path()).args(args);
        c.env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8");
        c
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-R").arg(m).status();
            if Command::new("mountpoint").arg("-q").arg(m).status().is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").arg("-lR").arg(m).status();
            }
        }
    }
}

fn deb_field(deb: &Path, field: &str) -> String {
    let o = Command::new("dpkg-deb").arg("-f").arg(deb).arg(field).output().unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn the_debian_package_installs_with_apt_into_a_fresh_debian_root_where_hb_works() {
    // The package of the binaries under test (gzip -1: the layout, dependencies and scripts are
    // what is tested here; the release package is the same script with xz).
    let bin_dir = hb_bin().parent().unwrap().to_path_buf();
    let out = scratch();
    let o = Command::new(workspace().join("scripts/package.sh"))
        .arg("--fast")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "scripts/package.sh failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let deb = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(deb.file_name().unwrap().to_string_lossy().starts_with("hb_"), "{}", deb.display());

    // What it declares: the libraries the executables link (RocksDB, C++'s library and the
    // compression libraries but zstd are linked in), and the programs hb runs.
    let depends = deb_field(&deb, "Depends");
    for dep in ["libc6 (>= ", "libzstd1", "fuse3", "runc | crun", "ca-certificates"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    for linked_in in ["libstdc++6", "libsnappy", "liblz4", "libbz2", "zlib1g", "librocksdb"] {
        assert!(!depends.contains(linked_in), "Depends names {linked_in}, which is linked in: {depends}");
    }
    let listing =
        String::from_utf8_lossy(&Command::new("dpkg-deb").arg("-c").arg(&deb).output().unwrap().stdout).into_owned();
    for file in [
        "./usr/bin/hb",
        "./usr/bin/hb-engine",
        "./usr/lib/systemd/system/hb.service",
        "./usr/lib/systemd/system/hb-proxy.service",
        "./etc/hb/hb.toml",
        "./usr/share/bash-completion/completions/hb",
        "./usr/share/zsh/vendor-completions/_hb",
        "./usr/share/fish/vendor_completions.d/hb.fish",
        "./usr/share/man/man1/hb.1.gz",
        "./usr/share/man/man1/hb-pull.1.gz",
        "./usr/share/man/man1/hb-run.1.gz",
        "./usr/share/doc/hb/copyright",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(file)), "the package lacks {file}:\n{listing}");
    }

    // `apt install ./hb_*.deb` in a Debian root that never saw hb: apt fetches what it declares.
    let root = Root::fresh();
    assert!(!root.path().join("usr/bin/hb").exists());
    std::fs::copy(&deb, root.path().join("tmp/hb.deb")).unwrap();
    root.ok(&["apt-get", "update", "-q"]);
    root.ok(&["apt-get", "install", "-y", "-q", "--no-install-recommends", "/tmp/hb.deb"]);

    let version = root.ok(&["hb", "--version"]);
    assert!(version.starts_with("hb ") && version.contains(&deb_field(&deb, "Version")), "{version}");
    // The commented default config is the one in effect, and it parses.
    let shown = root.ok(&["hb", "config", "show"]);
    assert!(shown.contains("root = \"/var/lib/hb\""), "{shown}");
    let unit = std::fs::read_to_string(root.path().join("usr/lib/systemd/system/hb.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecStart=/usr/bin/hb daemon"), "{unit}");
    assert!(unit.contains("Before=containerd.service"), "{unit}");
    let completion = std::fs::read_to_string(root.path().join("usr/share/bash-completion/completions/hb")).unwrap();
    assert!(completion.contains("complete -F") && completion.contains("pull"), "bash completion: {completion:.300}");
    let mut man = String::new();
    gunzip(&root.path().join("usr/share/man/man1/hb-pull.1.gz"), &mut man);
    assert!(man.contains(".TH hb-pull") && man.contains("plan"), "{man:.300}");

    // doctor runs and reports (the root has no daemon; what the kernel has is the host's).
    let o = root.chroot(&["hb", "--json", "doctor"]).output().unwrap();
    assert!(matches!(o.status.code(), Some(0 | 1)), "hb doctor: {o:?}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["version"], 1, "{r:#}");
    for check in ["kernel", "/dev/fuse", "runtime runc"] {
        assert!(r["findings"].as_array().unwrap().iter().any(|f| f["check"] == check), "no {check} in {r:#}");
    }
    // A pull from the loopback registry into the package's default store.
    let reg = open_registry();
    root.ok(&["hb", "pull", &format!("{reg}/busybox:latest")]);
    let ids = root.ok(&["hb", "images", "-q"]);
    assert_eq!(ids.lines().count(), 1, "{ids}");
    root.ok(&["hb", "fsck"]);

    // Removal takes the executables and keeps the settings (a conffile) until a purge.
    root.ok(&["apt-get", "remove", "-y", "-q", "hb"]);
    assert!(!root.path().join("usr/bin/hb").exists());
    assert!(root.path().join("etc/hb/hb.toml").exists(), "remove keeps the conffile");
    root.ok(&["apt-get", "purge", "-y", "-q", "hb"]);
    assert!(!root.path().join("etc/hb/hb.toml").exists(), "purge removes the conffile");
    assert!(root.path().join("var/lib/hb").exists(), "the store outlives a purge, as docker's does");
}

/// `gzip -dc FILE` into `out`.
fn gunzip(file: &Path, out: &mut String) {
    let mut child = Command::new("gzip").arg("-dc").arg(file).stdout(Stdio::piped()).spawn().unwrap();
    child.stdout.take().unwrap().read_to_string(out).unwrap();
    assert!(child.wait().unwrap().success());
}
