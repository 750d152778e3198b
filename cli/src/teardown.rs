//! A finished container's teardown: its overlay unmounted, its folder moved aside under
//! [`container::REMOVING`] (it leaves the listing at once) and removed, and the sweep that
//! finishes teardowns whose helper died. Used by `hb run`, `hb container-cleanup` and the daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::container;

/// Moves a removed container's folder under [`container::REMOVING`], where it waits for its
/// cleanup (it leaves the listing at once); its new path.
pub(crate) fn move_to_removing(dir: &Path) -> Option<PathBuf> {
    let parent = dir.parent()?.join(container::REMOVING);
    std::fs::create_dir_all(&parent).ok()?;
    let to = parent.join(dir.file_name()?);
    std::fs::rename(dir, &to).ok().map(|_| to)
}

/// Unmounts a finished container's overlay; removes its folder, or only the empty mount point.
pub fn cleanup(dir: &Path, remove: bool) {
    let rootfs = dir.join("rootfs");
    // EINVAL when nothing is mounted there (any more), ENOENT when it is gone.
    match rustix::mount::unmount(&rootfs, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {}
        Err(e) => tracing::warn!(rootfs = %rootfs.display(), error = %e, "unmounting a container's rootfs failed"),
    }
    let removed = if remove { std::fs::remove_dir_all(dir) } else { std::fs::remove_dir(&rootfs) };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a finished container's folder failed")
        }
        _ => {}
    }
}

/// Finishes cleanups whose helper died (folders left under `.removing/` for a minute).
pub fn sweep_removing(root: &Path) {
    let Ok(entries) = std::fs::read_dir(container::containers_dir(root).join(container::REMOVING)) else { return };
    for e in entries.flatten() {
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
        if old.is_some_and(|age| age > Duration::from_secs(60)) {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(e.path()); // an exit record
            } else {
                cleanup(&e.path(), true);
            }
        }
    }
}
