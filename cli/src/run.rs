//! `hb run`: a container straight from an image's mount. The image is mounted by this process
//! (lazily when it was pulled lazily, pulling it first when missing), an overlayfs with a
//! per-container upper dir goes on top, and an OCI runtime (runc) runs the spec `hb-runtime`
//! builds. In the foreground: the container's exit code is hb's; everything is unmounted and
//! removed when it ends.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use hb_runtime::{ImageConfig, RunOptions};
use hb_store::Store;

use crate::mount::MountArgs;
use crate::output::Out;
use crate::Global;

/// Where containers' bundles live.
const RUN_DIR: &str = "/run/hb/containers";

/// `hb run` as asked.
pub struct RunArgs {
    pub image: String,
    pub opts: RunOptions,
    pub name: Option<String>,
    pub runtime: Option<String>,
    pub plain_http: bool,
    /// Keep stdin attached (`-i`); otherwise the container reads /dev/null.
    pub interactive: bool,
}

/// An OCI runtime this machine can use, found by probing.
pub fn detect_runtime(wanted: Option<&str>) -> anyhow::Result<PathBuf> {
    let candidates: Vec<&str> = match wanted {
        Some(w) => vec![w],
        None => vec!["runc", "crun", "youki"],
    };
    let mut why = Vec::new();
    for c in candidates {
        let Some(path) = find_in_path(c) else {
            why.push(format!("{c}: not installed"));
            continue;
        };
        if !probe_cached(&path) {
            match std::process::Command::new(&path).arg("--version").output() {
                Ok(o) if o.status.success() => remember_probe(&path),
                _ => {
                    why.push(format!("{c}: `{} --version` failed", path.display()));
                    continue;
                }
            }
        }
        // crun refuses hybrid cgroup hierarchies (v1 controllers plus cgroup2 at .../unified).
        if c == "crun" && Path::new("/sys/fs/cgroup/unified").is_dir() {
            why.push("crun: does not support this machine's hybrid cgroups".into());
            continue;
        }
        return Ok(path);
    }
    bail!("no usable OCI runtime ({}); scripts/setup.sh installs runc", why.join("; "))
}

/// A runtime binary that answered the probe, by path, size and mtime (so an upgrade is probed
/// again). Kept in /run: a reboot forgets it.
fn probe_key(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    use std::os::unix::fs::MetadataExt;
    Some(format!("{} {} {}\n", path.display(), m.len(), m.mtime()))
}

const PROBE_CACHE: &str = "/run/hb/runtimes";

fn probe_cached(path: &Path) -> bool {
    let (Some(key), Ok(cache)) = (probe_key(path), std::fs::read_to_string(PROBE_CACHE)) else { return false };
    cache.lines().any(|l| format!("{l}\n") == key)
}

fn remember_probe(path: &Path) {
    if let Some(key) = probe_key(path) {
        let _ = std::fs::create_dir_all("/run/hb");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(PROBE_CACHE)
            .and_then(|mut f| std::io::Write::write_all(&mut f, key.as_bytes()));
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn container_id(name: Option<&str>) -> String {
    let seed = format!("{:?}{}{:?}", std::time::SystemTime::now(), std::process::id(), name);
    blake3::hash(seed.as_bytes()).to_hex()[..12].to_string()
}

/// Runs a container in the foreground and returns its exit code (128 + signal when killed).
pub fn run(
    g: &Global,
    rt: &tokio::runtime::Runtime,
    store: Arc<Store>,
    args: RunArgs,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let runtime = detect_runtime(args.runtime.as_deref())?;
    let id = container_id(args.name.as_deref());
    let name = args.name.clone().unwrap_or_else(|| id.clone());
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        bail!("invalid container name {name:?} (letters, digits, _ . -)");
    }
    let dir = PathBuf::from(RUN_DIR).join(&id);
    let (lower, upper, work, rootfs) = (dir.join("lower"), dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&lower, &upper, &work, &rootfs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cleanup = |dir: &Path| {
        let _ = rustix::mount::unmount(dir.join("rootfs"), rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir_all(dir);
    };
    let margs = MountArgs {
        image: args.image.clone(),
        dir: lower.clone(),
        prefetch: hb_fuse::Prefetch::Startup,
        bandwidth: None,
        passthrough: true,
        threads: 8,
        plain_http: args.plain_http,
    };
    let m = match crate::mount::mount_image(g, rt, store.clone(), &margs, out) {
        Ok(m) => m,
        Err(e) => {
            cleanup(&dir);
            return Err(e);
        }
    };
    let result = (|| -> anyhow::Result<ExitCode> {
        let (_, _, rec) = crate::require_image(&store, &args.image)?;
        let image = ImageConfig::from_json(rec.config.as_bytes())?;
        rustix::mount::mount(
            "overlay",
            &rootfs,
            "overlay",
            rustix::mount::MountFlags::empty(),
            Some(
                std::ffi::CString::new(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                ))?
                .as_c_str(),
            ),
        )
        .with_context(|| format!("mounting overlayfs at {}", rootfs.display()))?;
        let read = |p: &str| std::fs::read_to_string(lower.join(p)).ok();
        let user_spec = args.opts.user.clone().or_else(|| image.user.clone());
        let user = hb_runtime::resolve_user(
            user_spec.as_deref(),
            read("etc/passwd").as_deref(),
            read("etc/group").as_deref(),
        )?;
        let hostname = args.name.clone().unwrap_or_else(|| id.clone());
        let spec = hb_runtime::build_spec(&image, &args.opts, &user, &rootfs, &hostname, Some(&format!("/hb/{id}")))?;
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
        tracing::info!(id, runtime = %runtime.display(), "starting container");
        // The runtime forwards the signals it gets to the container; hb must not die of a Ctrl-C
        // (the terminal sends it to both), and passes a SIGTERM meant for it on.
        let (rt_path, cid) = (runtime.clone(), id.clone());
        let forwarder = rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {
                        let _ = tokio::process::Command::new(&rt_path).args(["kill", &cid, "TERM"]).status().await;
                    }
                }
            }
        });
        let status = std::process::Command::new(&runtime)
            .args(["run", "--bundle"])
            .arg(&dir)
            .arg(&id)
            .stdin(if args.interactive { std::process::Stdio::inherit() } else { std::process::Stdio::null() })
            .status()
            .with_context(|| format!("running {}", runtime.display()));
        forwarder.abort();
        let status = status?;
        use std::os::unix::process::ExitStatusExt;
        let code = match (status.code(), status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => 1,
        };
        Ok(ExitCode::from(code.clamp(0, 255) as u8))
    })();
    // Whatever happened: the runtime's state (`run` deletes it when the container ends normally),
    // the overlay, the image mount, the bundle.
    if result.is_err() {
        let _ = std::process::Command::new(&runtime).args(["delete", "--force", &id]).output();
    }
    let _ = rustix::mount::unmount(&rootfs, rustix::mount::UnmountFlags::DETACH);
    let _ = hb_fuse::unmount(&lower);
    let waited = m.mounted.wait();
    cleanup(&dir);
    if let Err(e) = waited {
        tracing::warn!(error = %e, "the image mount ended with an error");
    }
    result
}
