//! `hb doctor [IMAGE]`: what this machine gives hb and what it lacks, each finding with its fix.
//!
//! Checks: the kernel (FUSE, passthrough, overlayfs, EROFS, cgroups), `/dev/fuse`, the OCI
//! runtimes (a real container start each, as `hb run` probes them), the store (where, on what,
//! who holds it, free space), the daemon (health, version), containerd (is hb a healthy
//! snapshotter there, the CRI settings it needs); with IMAGE: its hosts.toml, credentials, the
//! registry's answer, and whether it would start lazily, or why not. Every check is read-only.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Global;

/// Findings from worst to fine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// hb cannot do its work here until this is fixed.
    Fail,
    /// hb works, slower or with less than it could.
    Warn,
    Ok,
    /// Neither good nor bad: what is there.
    Info,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// `hb doctor --json`: this shape, `version` 1.
#[derive(Debug, Serialize)]
pub struct Report {
    pub version: u32,
    pub hb_version: String,
    /// No finding is `fail`.
    pub ok: bool,
    pub findings: Vec<Finding>,
}

#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn add(&mut self, check: &str, status: Status, detail: impl Into<String>, fix: Option<&str>) {
        self.0.push(Finding { check: check.into(), status, detail: detail.into(), fix: fix.map(String::from) });
    }
}

/// Runs every check (those of `image` too, when given).
pub fn run(g: &Global, image: Option<&str>, open_store: &dyn Fn() -> anyhow::Result<hb_store::Store>) -> Report {
    let mut f = Findings::default();
    kernel(&mut f);
    runtimes(&mut f);
    store(g, &mut f, open_store);
    daemon(g, &mut f);
    containerd(g, &mut f);
    if let Some(image) = image {
        image_checks(g, image, &mut f);
    }
    let ok = f.0.iter().all(|x| x.status != Status::Fail);
    Report { version: 1, hb_version: env!("CARGO_PKG_VERSION").into(), ok, findings: f.0 }
}

/// The report for people: one line per finding, its fix under it.
pub fn render(r: &Report) -> String {
    let width = r.findings.iter().map(|x| x.check.len()).max().unwrap_or(0);
    let mut s = String::new();
    for x in &r.findings {
        let tag = match x.status {
            Status::Fail => "FAIL",
            Status::Warn => "warn",
            Status::Ok => "ok",
            Status::Info => "info",
        };
        s.push_str(&format!("{tag:<4}  {:<width$}  {}\n", x.check, x.detail));
        if let Some(fix) = &x.fix {
            s.push_str(&format!("{:<4}  {:<width$}  fix: {fix}\n", "", ""));
        }
    }
    let (fails, warns) = (
        r.findings.iter().filter(|x| x.status == Status::Fail).count(),
        r.findings.iter().filter(|x| x.status == Status::Warn).count(),
    );
    s.push_str(&match (fails, warns) {
        (0, 0) => "all checks passed\n".to_string(),
        (0, w) => format!("hb works here; {w} warning(s) above\n"),
        (f, _) => format!("{f} check(s) failed: hb cannot work fully here until they are fixed\n"),
    });
    s
}

/// The kernel's release as numbers (6.1.0-18-amd64 is (6, 1)).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

fn filesystems() -> String {
    std::fs::read_to_string("/proc/filesystems").unwrap_or_default()
}

/// Whether the kernel has filesystem `name` now, or can load its module.
fn has_fs(listed: &str, name: &str, release: &str) -> (bool, &'static str) {
    if listed.lines().any(|l| l.split_whitespace().last() == Some(name)) {
        return (true, "in the kernel");
    }
    let module = Path::new("/lib/modules").join(release).join("kernel/fs").join(name);
    if module.exists() {
        return (true, "as a module (loaded on first mount)");
    }
    (false, "")
}

fn kernel(f: &mut Findings) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    f.add("kernel", Status::Info, format!("Linux {release}"), None);
    let listed = filesystems();
    match has_fs(&listed, "fuse", &release) {
        (true, how) => f.add("FUSE", Status::Ok, format!("fuse filesystem {how}"), None),
        (false, _) => f.add(
            "FUSE",
            Status::Fail,
            "the kernel has no fuse filesystem: lazy mounts cannot work",
            Some("modprobe fuse (a kernel built with CONFIG_FUSE_FS)"),
        ),
    }
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => f.add("/dev/fuse", Status::Ok, "opened read-write", None),
        Err(e) => f.add(
            "/dev/fuse",
            Status::Fail,
            format!("cannot open /dev/fuse: {e}"),
            Some("modprobe fuse; in a container: --device /dev/fuse --cap-add SYS_ADMIN"),
        ),
    }
    match kernel_version(&release) {
        Some(v) if v >= (6, 9) => {
            f.add("FUSE passthrough", Status::Ok, "the kernel reads stored files itself (6.9 or newer)", None)
        }
        _ => f.add(
            "FUSE passthrough",
            Status::Warn,
            format!("kernel {release} has none: reads of complete files go through FUSE (slower)"),
            Some("a kernel 6.9 or newer"),
        ),
    }
    match has_fs(&listed, "overlay", &release) {
        (true, how) => f.add("overlayfs", Status::Ok, format!("overlay {how}"), None),
        (false, _) => f.add(
            "overlayfs",
            Status::Fail,
            "no overlay filesystem: containers cannot get a writable layer",
            Some("modprobe overlay"),
        ),
    }
    match has_fs(&listed, "erofs", &release) {
        (true, how) => f.add("EROFS", Status::Ok, format!("erofs {how}"), None),
        (false, _) => f.add(
            "EROFS",
            Status::Info,
            "no erofs filesystem: hb uses FUSE mounts only",
            Some("modprobe erofs (a kernel built with CONFIG_EROFS_FS)"),
        ),
    }
    let cg = Path::new("/sys/fs/cgroup");
    if cg.join("cgroup.controllers").exists() {
        let controllers = std::fs::read_to_string(cg.join("cgroup.controllers")).unwrap_or_default();
        f.add("cgroups", Status::Ok, format!("v2, unified (controllers: {})", controllers.trim()), None);
    } else if cg.join("unified").exists() {
        f.add(
            "cgroups",
            Status::Warn,
            "hybrid v1/v2 hierarchy: crun refuses it (runc works); limits use v1",
            Some("boot with systemd.unified_cgroup_hierarchy=1"),
        );
    } else {
        f.add("cgroups", Status::Warn, "v1 only: limits use v1", Some("boot with systemd.unified_cgroup_hierarchy=1"));
    }
}

fn runtimes(f: &mut Findings) {
    let found: Vec<&str> =
        ["runc", "crun", "youki"].into_iter().filter(|r| hb_cli::probe::find_in_path(r).is_some()).collect();
    if found.is_empty() {
        f.add(
            "OCI runtime",
            Status::Fail,
            "none of runc, crun, youki is installed: hb run cannot start containers",
            Some("apt install runc"),
        );
        return;
    }
    let mut usable = 0;
    for r in found {
        match hb_cli::probe::detect_runtime(Some(r)) {
            Ok(path) => {
                usable += 1;
                f.add(&format!("runtime {r}"), Status::Ok, format!("{} runs a test container", path.display()), None)
            }
            Err(e) => f.add(&format!("runtime {r}"), Status::Warn, hb_cli::error_chain(&e), None),
        }
    }
    if usable == 0 {
        f.add(
            "OCI runtime",
            Status::Fail,
            "no installed runtime runs a container here (see above)",
            Some("apt install runc (crun refuses hybrid cgroups)"),
        );
    }
}

/// The filesystem type of the mount holding `path` (the longest mount point above it).
fn fs_type(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let path = std::fs::canonicalize(path).ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (_, at, ty) = (it.next()?, it.next()?, it.next()?);
            let at = at.replace("\\040", " ");
            path.starts_with(&at).then(|| (at.len(), ty.to_string()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, ty)| ty)
}

fn store(g: &Global, f: &mut Findings, open_store: &dyn Fn() -> anyhow::Result<hb_store::Store>) {
    let root = match hb_cli::store_root(g) {
        Ok(r) => r,
        Err(e) => return f.add("store", Status::Fail, hb_cli::error_chain(&e), Some("fix the config file or --root")),
    };
    if !root.join("db").exists() && !root.exists() {
        return f.add(
            "store",
            Status::Info,
            format!("{} does not exist yet: the first pull creates it", root.display()),
            None,
        );
    }
    let holder = match open_store() {
        Ok(_) => "no process holds it".to_string(),
        Err(e) if matches!(e.downcast_ref::<hb_store::StoreError>(), Some(hb_store::StoreError::Locked(_))) => {
            match hb_cli::daemon_client(g)
                .and_then(|c| c.call::<hb_cli::api::Health>("GET", "/v1/health", None::<&()>).ok())
            {
                Some(h) => format!("owned by the hb daemon (pid {})", h.pid),
                None => "held by another hb process (a mount or a container's monitor)".to_string(),
            }
        }
        Err(e) => {
            return f.add(
                "store",
                Status::Fail,
                format!("{}: {}", root.display(), hb_cli::error_chain(&e)),
                Some("hb fsck --repair, or move the folder away"),
            )
        }
    };
    let ty = fs_type(&root).unwrap_or_else(|| "unknown".into());
    f.add("store", Status::Ok, format!("{} on {ty}, {holder}", root.display()), None);
    if ty == "tmpfs" {
        f.add(
            "store filesystem",
            Status::Warn,
            "the store is on tmpfs: it is lost at reboot and takes memory",
            Some("--root (or [store] root) on a disk-backed filesystem"),
        );
    }
    if let Ok(v) = rustix::fs::statvfs(&root) {
        let free = v.f_bavail.saturating_mul(v.f_frsize);
        let total = v.f_blocks.saturating_mul(v.f_frsize).max(1);
        let human = indicatif::HumanBytes(free);
        if free < 1 << 30 || free * 20 < total {
            f.add(
                "store space",
                Status::Warn,
                format!("{human} free: pulls stop with a clear error when the disk fills"),
                Some("hb gc frees chunks no image needs; hb rmi removes images"),
            );
        } else {
            f.add("store space", Status::Ok, format!("{human} free"), None);
        }
    }
}

fn daemon(g: &Global, f: &mut Findings) {
    let socket = hb_cli::socket_path(g).unwrap_or_else(|_| PathBuf::from(hb_cli::config::DEFAULT_SOCKET));
    let health =
        hb_cli::daemon_client(g).and_then(|c| c.call::<hb_cli::api::Health>("GET", "/v1/health", None::<&()>).ok());
    match health {
        Some(h) if h.version != env!("CARGO_PKG_VERSION") => f.add(
            "daemon",
            Status::Warn,
            format!(
                "hb daemon {} (pid {}) on {}, but this hb is {}",
                h.version,
                h.pid,
                socket.display(),
                env!("CARGO_PKG_VERSION")
            ),
            Some("restart the daemon (systemctl restart hb) so both are one version"),
        ),
        Some(h) => f.add(
            "daemon",
            Status::Ok,
            format!(
                "hb daemon {} (pid {}) on {}: up {} s, {} image mounts, LAN peers {}",
                h.version,
                h.pid,
                socket.display(),
                h.uptime_seconds,
                h.image_mounts,
                if h.peers { "on" } else { "off" }
            ),
            None,
        ),
        None if socket.exists() => f.add(
            "daemon",
            Status::Warn,
            format!("{} exists but no hb daemon for this store answers on it", socket.display()),
            Some("start the daemon (hb daemon, or systemctl start hb); a daemon of another store is not used"),
        ),
        None => f.add(
            "daemon",
            Status::Info,
            "not running: hb works without it (containerd's snapshotter and shared mounts need it)",
            Some("hb daemon (or systemctl start hb)"),
        ),
    }
}

/// containerd's socket: `$CONTAINERD_ADDRESS`, else the default.
fn containerd_socket() -> PathBuf {
    std::env::var_os("CONTAINERD_ADDRESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/run/containerd/containerd.sock".into())
}

fn containerd(g: &Global, f: &mut Findings) {
    let sock = containerd_socket();
    if !sock.exists() {
        return f.add("containerd", Status::Info, format!("no containerd at {}", sock.display()), None);
    }
    let ours = hb_cli::file_config(g)
        .ok()
        .and_then(|c| c.daemon.snapshotter_socket.clone())
        .unwrap_or_else(|| "/run/hb/snapshotter.sock".into());
    let snippet = format!(
        "in /etc/containerd/config.toml: [proxy_plugins.hb] type = \"snapshot\" address = \"{}\", then restart containerd",
        ours.display()
    );
    if hb_cli::probe::find_in_path("ctr").is_none() {
        return f.add(
            "containerd",
            Status::Info,
            format!("containerd at {}; ctr is not installed, so hb cannot ask it for its plugins", sock.display()),
            None,
        );
    }
    let listed = std::process::Command::new("ctr").arg("--address").arg(&sock).args(["plugins", "ls"]).output();
    let text = match listed {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return f.add(
                "containerd",
                Status::Warn,
                format!("ctr plugins ls failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
                None,
            )
        }
        Err(e) => return f.add("containerd", Status::Warn, format!("running ctr: {e}"), None),
    };
    let hb = text.lines().find(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.first() == Some(&"io.containerd.snapshotter.v1") && cols.get(1) == Some(&"hb")
    });
    match hb.map(|l| l.split_whitespace().last().unwrap_or("").to_string()) {
        Some(status) if status == "ok" => {
            f.add("containerd", Status::Ok, format!("{}: snapshotter hb is ok", sock.display()), None)
        }
        Some(status) => f.add(
            "containerd",
            Status::Fail,
            format!("{}: snapshotter hb is {status} (containerd could not reach {})", sock.display(), ours.display()),
            Some("start the hb daemon, then restart containerd"),
        ),
        None => f.add(
            "containerd",
            Status::Info,
            format!("{}: hb is not one of its snapshotters", sock.display()),
            Some(snippet.as_str()),
        ),
    }
    // What the CRI plugin needs to hand lazy images to hb (Kubernetes).
    if let Ok(cfg) = std::fs::read_to_string("/etc/containerd/config.toml") {
        let compact: String = cfg.split_whitespace().collect();
        if hb.is_some() && !compact.contains("snapshotter=\"hb\"") {
            f.add(
                "containerd CRI",
                Status::Info,
                "the CRI plugin does not use hb (Kubernetes pods start from overlayfs)",
                Some("[plugins.\"io.containerd.grpc.v1.cri\".containerd] snapshotter = \"hb\" and disable_snapshot_annotations = false"),
            );
        } else if compact.contains("snapshotter=\"hb\"") && !compact.contains("disable_snapshot_annotations=false") {
            f.add(
                "containerd CRI",
                Status::Warn,
                "the CRI plugin uses hb but does not pass image annotations: images are pulled whole, not lazily",
                Some("disable_snapshot_annotations = false in the CRI plugin's containerd section"),
            );
        }
    }
}

fn image_checks(g: &Global, image: &str, f: &mut Findings) {
    use hb_images::Registries;
    let check = format!("image {image}");
    let r = match hb_registry::ImageRef::parse(image) {
        Ok(r) => r,
        Err(e) => return f.add(&check, Status::Fail, format!("not an image reference: {e}"), None),
    };
    let hosts = crate::hosts::Hosts::of(g);
    match hb_cli::config::host_settings(g.hosts_dir.as_deref(), r.registry()) {
        Ok(h) => {
            let from = h.source.as_ref().map_or("no hosts.toml".to_string(), |s| format!("hosts.toml {}", s.display()));
            let mirrors: Vec<&str> = h.mirrors.iter().map(|m| m.host.as_str()).collect();
            let detail = if mirrors.is_empty() {
                format!("{from}; no mirrors: pulls go to {}", r.registry())
            } else {
                format!("{from}; mirrors first: {}, then {}", mirrors.join(", "), r.registry())
            };
            f.add("registry hosts", Status::Info, detail, None);
        }
        Err(e) => {
            return f.add("registry hosts", Status::Fail, hb_cli::error_chain(&e), Some("fix the hosts.toml it names"))
        }
    }
    let creds = match hb_cli::config::docker_credentials(r.registry()) {
        Ok(c) => {
            let detail = match &c {
                Some((u, _)) => format!("for {} as {u}, from docker's config", r.registry()),
                None => format!("none for {}: anonymous", r.registry()),
            };
            f.add("credentials", Status::Info, detail, None);
            c
        }
        Err(e) => {
            f.add(
                "credentials",
                Status::Fail,
                hb_cli::error_chain(&e),
                Some("fix docker's config.json or its credential helper; hb login REGISTRY"),
            );
            None
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return f.add(&check, Status::Fail, format!("starting a runtime: {e}"), None),
    };
    let resolved = hosts
        .endpoints(&r, false, creds, hb_registry::Platform::default())
        .and_then(|eps| hb_images::pull::resolve(&rt, eps));
    let (_, resolved) = match resolved {
        Ok(x) => x,
        Err(e) => {
            let msg = e.to_string();
            let fix = if msg.contains("401") || msg.to_lowercase().contains("unauthorized") {
                "hb login REGISTRY (or docker login)"
            } else if msg.to_lowercase().contains("certificate") || msg.contains("tls") {
                "name its CA in hosts.toml (ca = ...), or --plain-http for an HTTP registry"
            } else {
                "check the name, the registry's address, and hosts.toml"
            };
            return f.add(&check, Status::Fail, format!("cannot resolve it: {msg}"), Some(fix));
        }
    };
    let size: u64 = resolved.layers.iter().map(|l| l.size).sum();
    f.add(
        &check,
        Status::Ok,
        format!(
            "{} for {}: {} layers, {}",
            resolved.manifest_digest,
            resolved.platform,
            resolved.layers.len(),
            indicatif::HumanBytes(size)
        ),
        None,
    );
    match resolved.accelerated {
        Some((d, _)) => f.add(
            "lazy start",
            Status::Ok,
            format!("accelerated form {d}: hb run and hb pull --lazy start it before its data arrives"),
            None,
        ),
        None => f.add(
            "lazy start",
            Status::Warn,
            "no accelerated form: hb pulls it whole before it starts",
            Some("hb convert IMAGE IMAGE (binds a lazy form to the same tag), or pull it through hb proxy"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_and_filesystems_are_read_as_the_kernel_writes_them() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.5"), Some((6, 12)));
        assert_eq!(kernel_version("garbage"), None);
        let listed = "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\tfuse\nnodev\toverlay\n";
        assert!(has_fs(listed, "fuse", "0-none").0 && has_fs(listed, "overlay", "0-none").0);
        assert!(!has_fs(listed, "erofs", "0-none").0);
        assert!(!has_fs(listed, "sys", "0-none").0, "whole names only");
    }

    #[test]
    fn the_report_for_people_shows_fixes_and_says_whether_hb_can_work() {
        let mut f = Findings::default();
        f.add("a", Status::Ok, "fine", None);
        f.add("bb", Status::Fail, "broken", Some("do this"));
        let r = Report { version: 1, hb_version: "x".into(), ok: false, findings: f.0 };
        let text = render(&r);
        assert!(text.contains("FAIL  bb  broken\n") && text.contains("fix: do this"), "{text}");
        assert!(text.ends_with("1 check(s) failed: hb cannot work fully here until they are fixed\n"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["findings"][1]["status"], "fail");
        assert!(json["findings"][0].get("fix").is_none());
    }
}
