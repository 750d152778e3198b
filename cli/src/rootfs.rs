//! A container's root filesystem: an overlayfs with a fresh upper directory over the image's
//! mount, and the mount points the runtime needs, made in the upper directory before the overlay
//! is mounted (docker's "init layer", in the upper layer).
//!
//! Without them the runtime creates `/proc`, `/dev`, `/sys` and the `/etc/hosts` and
//! `/etc/resolv.conf` bind targets itself, through the overlay, whenever the image lacks them:
//! each a temporary file in the work directory renamed into place, and `/etc` copied up first
//! (which asks the image mount for the directory's flags). Made here, in the plain upper
//! directory, they cost a `mkdir` or `open` each, and for a spare container (prepared by the
//! daemon ahead of time, `daemon.rs`) nothing at all when the container starts.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Mount points of hb's spec (`hb_runtime::build_spec`) at the top of the rootfs, and whether
/// each is a directory (else a file, the target of a file bind mount). Mounts nested in these
/// (`/dev/pts`, `/sys/fs/cgroup`, ...) land on the runtime's own tmpfs or sysfs.
pub const MOUNT_POINTS: [(&str, bool); 5] =
    [("proc", true), ("dev", true), ("sys", true), ("etc/hosts", false), ("etc/resolv.conf", false)];

/// The mount points a spec with these options uses: the bind targets only with the host's
/// network (the only case hb binds them).
pub fn mount_points(host_network: bool) -> Vec<(&'static str, bool)> {
    MOUNT_POINTS.into_iter().filter(|(p, dir)| *dir || host_network || !p.starts_with("etc/")).collect()
}

/// Makes in `upper` each of `points` the image (`lower`) lacks, as the runtime would in the
/// merged rootfs: directories 0755, files empty and 0755 (runc's modes), owned by root; a parent
/// directory the image has (`/etc`) copied up by hand: same mode, owner and times (as overlayfs
/// copies up; making the mount point in it then sets its modification time). Best effort:
/// a point whose path the image makes unusual (a symlink or a file on the way, extended
/// attributes on a parent to carry over) is left to the runtime, and so is one that fails here.
pub fn make_mount_points(lower: &Path, upper: &Path, points: &[(&str, bool)]) {
    for (p, is_dir) in points {
        if let Err(e) = make_one(lower, upper, Path::new(p), *is_dir) {
            tracing::debug!(point = p, error = %e, "mount point left to the runtime");
        }
    }
}

fn make_one(lower: &Path, upper: &Path, rel: &Path, is_dir: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    if lower.join(rel).symlink_metadata().is_ok() || upper.join(rel).symlink_metadata().is_ok() {
        return Ok(());
    }
    let mut at = PathBuf::new();
    for c in rel.parent().into_iter().flat_map(|p| p.components()) {
        at.push(c);
        let up = upper.join(&at);
        if up.symlink_metadata().is_ok() {
            continue;
        }
        match lower.join(&at).symlink_metadata() {
            Ok(m) if m.is_dir() => {
                anyhow::ensure!(!has_xattrs(&lower.join(&at)), "{} has extended attributes", at.display());
                std::fs::DirBuilder::new().mode(0o700).create(&up)?;
                let copied = (|| {
                    std::os::unix::fs::chown(&up, Some(m.uid()), Some(m.gid()))?;
                    std::fs::set_permissions(&up, std::os::unix::fs::PermissionsExt::from_mode(m.mode() & 0o7777))?;
                    let ts = |s: i64, ns: i64| rustix::fs::Timespec { tv_sec: s, tv_nsec: ns as _ };
                    let times = rustix::fs::Timestamps {
                        last_access: ts(m.atime(), m.atime_nsec()),
                        last_modification: ts(m.mtime(), m.mtime_nsec()),
                    };
                    rustix::fs::utimensat(rustix::fs::CWD, &up, &times, rustix::fs::AtFlags::empty())?;
                    anyhow::Ok(())
                })();
                if let Err(e) = copied {
                    let _ = std::fs::remove_dir(&up);
                    return Err(e.context(format!("copying up {}", at.display())));
                }
            }
            Ok(_) => anyhow::bail!("{} is not a directory in the image", at.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(0o755).create(&up)?;
                std::fs::set_permissions(&up, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let target = upper.join(rel);
    if is_dir {
        std::fs::DirBuilder::new().mode(0o755).create(&target)?;
    } else {
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o755).open(&target)?;
    }
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(())
}

/// Whether `path` carries any extended attribute (a file system without them: no).
fn has_xattrs(path: &Path) -> bool {
    let mut buf = [0u8; 1];
    match rustix::fs::llistxattr(path, &mut buf[..0]) {
        Ok(n) => n > 0,
        Err(_) => false,
    }
}

/// Removes, through the mounted overlay at `rootfs`, the mount points of `points` the image
/// (`lower`) lacks: for a spare prepared with every mount point, used by a container whose spec
/// binds fewer (`--network none`).
pub fn drop_mount_points(lower: &Path, rootfs: &Path, points: &[(&str, bool)]) {
    for (p, is_dir) in points {
        if lower.join(p).symlink_metadata().is_ok() {
            continue;
        }
        let _ = if *is_dir { std::fs::remove_dir(rootfs.join(p)) } else { std::fs::remove_file(rootfs.join(p)) };
    }
}

/// Mounts an overlayfs at `rootfs`: `lower` (read-only) under `upper` (`work` beside it).
pub fn overlay(lower: &Path, upper: &Path, work: &Path, rootfs: &Path) -> anyhow::Result<()> {
    let opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    rustix::mount::mount(
        "overlay",
        rootfs,
        "overlay",
        rustix::mount::MountFlags::empty(),
        Some(std::ffi::CString::new(opts)?.as_c_str()),
    )
    .with_context(|| format!("mounting overlayfs at {}", rootfs.display()))
}

/// A container folder's rootfs, ready for a runtime: `upper/` with the mount points of
/// `points`, `work/`, and the overlay mounted at `rootfs/`.
pub fn prepare(lower: &Path, dir: &Path, points: &[(&str, bool)]) -> anyhow::Result<()> {
    let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &rootfs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    make_mount_points(lower, &upper, points);
    overlay(lower, &upper, &work, &rootfs)
}

/// Lowers the calling thread's priority to the least (nice 19): for housekeeping (cleaning up
/// after containers, preparing spares) that should not take a CPU from a starting container.
pub fn background_priority() {
    let _ = rustix::process::setpriority_process(None, 19);
}

/// Why a container's command cannot start, found before the runtime runs, with the exit code
/// `docker run` gives it: 127 when there is no such command, 126 when it cannot be run.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: u8,
    pub message: String,
}

impl CommandError {
    fn not_found(program: &str) -> Self {
        let message = if program.contains('/') {
            format!("exec: {program:?}: no such file or directory")
        } else {
            format!("exec: {program:?}: executable file not found in $PATH")
        };
        CommandError { code: 127, message }
    }

    fn not_runnable(program: &str, why: &str) -> Self {
        CommandError { code: 126, message: format!("exec: {program:?}: permission denied ({why})") }
    }
}

/// What a path in the rootfs is, for running it.
#[derive(Debug, PartialEq)]
enum Found {
    /// A regular file with an execute bit, its mode and owner.
    Runnable {
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// A directory, or a file without an execute bit.
    NotRunnable(&'static str),
    Missing,
    /// Under a mount, or the lookup failed otherwise: for the runtime to find out.
    Unknown,
}

/// Looks the container's command up in `rootfs` as the runtime will: a name with a `/` as is
/// (relative to `cwd`), else in each directory of the `PATH` in `env`, symlinks resolved inside
/// the rootfs. What lies under `mounts` (the spec's mount destinations: `/proc`, `/dev`, ...) is
/// not in the rootfs yet and is not judged; neither is anything when `volumes` were asked for (a
/// symlink in the image may point into one). A file found must be executable by `user` (root:
/// any execute bit, as with docker's default capabilities; else the owner's, group's or others'
/// bit, whichever class the user is in).
pub fn check_command(
    rootfs: &Path,
    program: &str,
    env: &[String],
    cwd: &str,
    mounts: &[PathBuf],
    volumes: bool,
    user: &hb_runtime::UserIds,
) -> Result<(), CommandError> {
    use rustix::fs::{Mode, OFlags};
    if volumes || program.is_empty() {
        return Ok(());
    }
    let Ok(root) = rustix::fs::open(rootfs, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) else {
        return Ok(());
    };
    let look = |path: &Path| -> Found {
        let path = Path::new("/").join(path);
        if mounts.iter().any(|m| path.starts_with(m)) {
            return Found::Unknown;
        }
        let rel = path.strip_prefix("/").unwrap_or(&path);
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let flags = OFlags::PATH | OFlags::CLOEXEC;
        match rustix::fs::openat2(&root, rel, flags, Mode::empty(), rustix::fs::ResolveFlags::IN_ROOT) {
            Ok(fd) => match rustix::fs::fstat(&fd) {
                Ok(st) => match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                    rustix::fs::FileType::RegularFile if st.st_mode & 0o111 != 0 => {
                        Found::Runnable { mode: st.st_mode, uid: st.st_uid, gid: st.st_gid }
                    }
                    rustix::fs::FileType::RegularFile => Found::NotRunnable("not executable"),
                    rustix::fs::FileType::Directory => Found::NotRunnable("a directory"),
                    _ => Found::NotRunnable("not a regular file"),
                },
                Err(_) => Found::Unknown,
            },
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Found::Missing,
            // ENOSYS (a kernel before 5.6), ELOOP, EIO, ...
            Err(_) => Found::Unknown,
        }
    };
    // The runtime picks a file with any execute bit (Go's `exec.LookPath`); the kernel then
    // checks the user's.
    let runnable = |mode: u32, uid: u32, gid: u32| {
        let bit = if user.uid == 0 {
            0o111
        } else if uid == user.uid {
            0o100
        } else if gid == user.gid || user.additional_gids.contains(&gid) {
            0o010
        } else {
            0o001
        };
        if mode & bit != 0 {
            Ok(())
        } else {
            Err(CommandError::not_runnable(program, &format!("not executable by uid {}", user.uid)))
        }
    };
    let cwd = Path::new(cwd);
    let found = if program.contains('/') {
        look(&cwd.join(program))
    } else {
        let path = env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
        // An empty entry is the working directory (as Go's `exec.LookPath` reads it, in runc).
        let dirs = path.split(':').map(|d| if d.is_empty() { cwd } else { Path::new(d) });
        dirs.map(|d| look(&cwd.join(d).join(program)))
            .find(|f| matches!(f, Found::Runnable { .. } | Found::Unknown))
            .unwrap_or(Found::Missing)
    };
    match found {
        Found::Runnable { mode, uid, gid } => runnable(mode, uid, gid),
        Found::Unknown => Ok(()),
        Found::Missing => Err(CommandError::not_found(program)),
        Found::NotRunnable(why) => Err(CommandError::not_runnable(program, why)),
    }
}

/// The `PATH` docker gives a container whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn mount_points_are_made_where_the_image_lacks_them_and_copy_the_parents_it_has() {
        let t = std::env::temp_dir().join(format!("hb-rootfs-test-{}", std::process::id()));
        let (lower, upper) = (t.join("lower"), t.join("upper"));
        for d in [lower.join("etc"), lower.join("proc"), upper.clone()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::set_permissions(lower.join("etc"), std::fs::Permissions::from_mode(0o751)).unwrap();
        let old = rustix::fs::Timespec { tv_sec: 1_000_000, tv_nsec: 5 };
        let times = rustix::fs::Timestamps { last_access: old, last_modification: old };
        rustix::fs::utimensat(rustix::fs::CWD, lower.join("etc"), &times, rustix::fs::AtFlags::empty()).unwrap();
        std::fs::write(lower.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        // /sys is a symlink in this image: left alone (the runtime resolves it).
        std::os::unix::fs::symlink("proc", lower.join("sys")).unwrap();
        make_mount_points(&lower, &upper, &mount_points(true));
        let etc = std::fs::metadata(upper.join("etc")).unwrap();
        assert_eq!(etc.mode() & 0o7777, 0o751, "the copied-up parent keeps the image's mode");
        // Its access time is the image's (its modification time is now's: a file was made in it,
        // as after a copy-up).
        assert_eq!((etc.atime(), etc.atime_nsec()), (1_000_000, 5), "and its times");
        let mut made: Vec<String> = walk(&upper);
        made.sort();
        assert_eq!(made, ["dev", "etc", "etc/resolv.conf"], "only what the image lacks");
        assert_eq!(std::fs::metadata(upper.join("dev")).unwrap().mode() & 0o7777, 0o755);
        let f = std::fs::metadata(upper.join("etc/resolv.conf")).unwrap();
        assert!(f.is_file() && f.len() == 0 && f.mode() & 0o7777 == 0o755);
        // Without the host's network the bind targets are not made.
        let upper2 = t.join("upper2");
        std::fs::create_dir_all(&upper2).unwrap();
        std::fs::remove_file(lower.join("etc/hosts")).unwrap();
        make_mount_points(&lower, &upper2, &mount_points(false));
        assert_eq!(walk(&upper2), ["dev"]);
        std::fs::remove_dir_all(&t).unwrap();
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = vec![];
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()).into_iter().map(|s| format!("{name}/{s}")));
            }
            out.push(name);
        }
        out
    }

    #[test]
    fn commands_are_looked_up_as_the_runtime_will() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        for d in ["bin", "usr/bin", "app", "proc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let file = |p: &str, mode: u32| {
            std::fs::write(root.join(p), b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        };
        file("bin/busybox", 0o755);
        file("usr/bin/notes", 0o644);
        file("app/run.sh", 0o700);
        // Absolute symlinks resolve inside the rootfs, not on the host.
        symlink("/bin/busybox", root.join("bin/sh")).unwrap();
        symlink("/nowhere/at/all", root.join("bin/dangling")).unwrap();
        let env = vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_string()];
        let mounts = vec![PathBuf::from("/proc"), PathBuf::from("/dev")];
        let root_user = hb_runtime::UserIds::default();
        let check = |program: &str, cwd: &str| {
            check_command(root, program, &env, cwd, &mounts, false, &root_user).map_err(|e| e.code)
        };
        assert_eq!(check("sh", "/"), Ok(()));
        assert_eq!(check("/bin/sh", "/"), Ok(()));
        assert_eq!(check("./run.sh", "/app"), Ok(()));
        assert_eq!(check("../bin/busybox", "/app"), Ok(()));
        assert_eq!(check("nosuch", "/"), Err(127));
        assert_eq!(check("/bin/nosuch", "/"), Err(127));
        assert_eq!(check("/bin/dangling", "/"), Err(127));
        assert_eq!(check("/bin/busybox/x", "/"), Err(127), "a file on the way");
        // Found, but not runnable: 126 for a path; in PATH it is skipped (not found: 127).
        assert_eq!(check("/usr/bin/notes", "/"), Err(126));
        assert_eq!(check("/app", "/"), Err(126));
        assert_eq!(check("notes", "/"), Err(127));
        // Not judged: under a mount, or with volumes.
        assert_eq!(check("/proc/self/exe", "/"), Ok(()));
        assert_eq!(check_command(root, "nosuch", &env, "/", &mounts, true, &root_user).map_err(|e| e.code), Ok(()));
        // The messages say which command, as docker does.
        let e = check_command(root, "nosuch", &env, "/", &mounts, false, &root_user).unwrap_err();
        assert_eq!(e.to_string(), "exec: \"nosuch\": executable file not found in $PATH");
        // Without a PATH, docker's default.
        assert_eq!(check_command(root, "busybox", &[], "/", &mounts, false, &root_user).map_err(|e| e.code), Ok(()));
        // Another user needs the bit of their class: the owner's, the group's, else others'.
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(root.join("app/run.sh")).unwrap();
        let (file_uid, file_gid) = (owner.uid(), owner.gid());
        let as_user = |uid: u32, gid: u32, additional_gids: Vec<u32>| {
            let u = hb_runtime::UserIds { uid, gid, additional_gids };
            check_command(root, "/app/run.sh", &env, "/", &mounts, false, &u).map_err(|e| e.to_string())
        };
        assert_eq!(as_user(file_uid, file_gid, vec![]), Ok(()), "the owner may run a 0700 file");
        assert_eq!(
            as_user(4242, 4242, vec![]),
            Err("exec: \"/app/run.sh\": permission denied (not executable by uid 4242)".into())
        );
        std::fs::set_permissions(root.join("app/run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(as_user(4242, 4242, vec![file_gid]), Ok(()), "a supplementary group's bit counts");
        assert!(as_user(4242, 4242, vec![]).is_err());
    }
}
