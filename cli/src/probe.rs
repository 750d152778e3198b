//! Which OCI runtime runs containers here: runc, crun or youki, found on PATH and probed once
//! per binary (a real container start), the answer remembered.

use std::path::{Path, PathBuf};

use std::process::Stdio;

use anyhow::{bail, Context};
use hb_runtime::{ImageConfig, RunOptions};

/// An OCI runtime this machine can use, found by probing: the runtime really runs a container
/// (`/bin/true` from the host's read-only /usr) here, once per binary (path, size, mtime).
/// crun, for one, refuses a hybrid cgroup hierarchy; runc works on it.
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
            if let Err(e) = probe(&path) {
                why.push(format!("{c}: {}", crate::error_chain(&e)));
                continue;
            }
            remember_probe(&path);
        }
        return Ok(path);
    }
    bail!("no usable OCI runtime ({}); scripts/setup.sh installs runc", why.join("; "))
}

/// Runs `/bin/true` in a throw-away container with `runtime`.
fn probe(runtime: &Path) -> anyhow::Result<()> {
    let id = format!("hb-probe-{}", std::process::id());
    let dir = PathBuf::from("/run/hb").join(&id);
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    let result = (|| -> anyhow::Result<()> {
        let mut volumes = vec![hb_runtime::Volume { host: "/usr".into(), container: "/usr".into(), read_only: true }];
        // Merged /usr (links) or not (folders): the container sees what the host has.
        for d in ["bin", "sbin", "lib", "lib64", "lib32"] {
            let host = Path::new("/").join(d);
            match std::fs::read_link(&host) {
                Ok(target) => std::os::unix::fs::symlink(target, rootfs.join(d))?,
                Err(_) if host.is_dir() => {
                    volumes.push(hb_runtime::Volume { host: host.clone(), container: format!("/{d}"), read_only: true })
                }
                Err(_) => {}
            }
        }
        let image = ImageConfig { cmd: vec!["/bin/true".into()], ..Default::default() };
        let opts = RunOptions { volumes, network: hb_runtime::Network::None, ..Default::default() };
        let spec =
            hb_runtime::build_spec(&image, &opts, &Default::default(), &rootfs, "probe", Some(&format!("/hb/{id}")))?;
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&spec)?)?;
        let o = std::process::Command::new(runtime)
            .args(["run", "--bundle"])
            .arg(&dir)
            .arg(&id)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", runtime.display()))?;
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
            bail!("a test container failed ({}): {}", o.status, last.trim());
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::process::Command::new(runtime).args(["delete", "--force", &id]).output();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
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

/// `name` as a path when it has a slash, else the first executable of that name on PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}
