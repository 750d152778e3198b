//! Containers handed over to the daemon (`hb run --rm` whose monitor went away): their processes
//! watched through pidfds, cleaned up when they exit, adopted again after a restart.

use super::*;

/// The processes whose exit finishes a handed-over container (`hb run --rm` become the
/// runtime): one thread polls their pidfds (readable once the process exited) and finishes each
/// container on a short thread of its own.
pub(super) struct ExitWatcher {
    pub(super) new: std::sync::mpsc::Sender<(std::os::fd::OwnedFd, PathBuf)>,
    /// A byte here wakes the thread for new processes.
    pub(super) wake: std::os::unix::net::UnixStream,
}

impl ExitWatcher {
    pub(super) fn start() -> std::io::Result<ExitWatcher> {
        use rustix::event::{poll, PollFd, PollFlags};
        let (new, added) = std::sync::mpsc::channel::<(std::os::fd::OwnedFd, PathBuf)>();
        let (woken, wake) = std::os::unix::net::UnixStream::pair()?;
        woken.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        std::thread::Builder::new().name("hb-exits".into()).spawn(move || {
            let mut watched: Vec<(std::os::fd::OwnedFd, PathBuf)> = Vec::new();
            loop {
                let mut fds: Vec<PollFd> = watched.iter().map(|(fd, _)| PollFd::new(fd, PollFlags::IN)).collect();
                fds.push(PollFd::new(&woken, PollFlags::IN));
                if poll(&mut fds, None).is_err() {
                    continue; // EINTR
                }
                let ended: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
                drop(fds);
                let mut sink = [0u8; 64];
                while matches!(std::io::Read::read(&mut &woken, &mut sink), Ok(n) if n > 0) {}
                let mut ended = ended.into_iter();
                watched.retain(|(_, dir)| {
                    let done = ended.next().unwrap_or(false);
                    if done {
                        let dir = dir.clone();
                        housekeeping(move || crate::run::finish_handed_over(&dir));
                    }
                    !done
                });
                watched.extend(added.try_iter());
            }
        })?;
        Ok(ExitWatcher { new, wake })
    }

    pub(super) fn watch(&self, pidfd: std::os::fd::OwnedFd, dir: PathBuf) {
        let _ = self.new.send((pidfd, dir));
        let _ = std::io::Write::write(&mut &self.wake, &[1]);
    }
}

/// One datagram from the cleanup socket, and the descriptors it carried.
pub(super) fn recv_with_fds(
    socket: &tokio::net::UnixDatagram,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got =
        rustix::net::recvmsg(socket, &mut [std::io::IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let fds = control
        .drain()
        .filter_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds.collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    Ok((got.bytes, fds))
}

impl Daemon {
    /// Unmounts a finished container's overlay and removes its folder (when asked) in the
    /// background: only folders of this store's containers, by their canonical path.
    pub(super) fn start_cleanup(&self, c: &api::CleanupRequest) -> Result<(), CleanupRefused> {
        let dir = self.container_folder(&c.dir)?;
        // An advertised spare's `hb run` that failed before its hand-over: claimed all the same.
        self.spare_claimed(&dir);
        let remove = c.remove;
        housekeeping(move || hb_cli::teardown::cleanup(&dir, remove));
        Ok(())
    }

    /// Handed-over containers whose process has been gone for 10 s and that are still there:
    /// their hand-over never reached the daemon (`hb run` killed between writing the state and
    /// sending it), or cleaning up after them failed. Finished now; cleanups left half done
    /// under `.removing/` are finished too.
    pub(super) fn reap_handed_over(&self) {
        use crate::container::Status;
        let Ok(all) = crate::container::list(&self.root) else { return };
        let gone: Vec<PathBuf> = all
            .into_iter()
            .filter(|(_, s)| s.handed_over && s.status == Status::Running && !s.monitor_alive())
            .map(|(dir, _)| dir)
            .collect();
        let mut dead = self.dead_since.lock().expect("dead_since lock");
        dead.retain(|dir, _| gone.contains(dir));
        for dir in gone {
            let since = *dead.entry(dir.clone()).or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(10) {
                dead.remove(&dir);
                tracing::warn!(dir = %dir.display(), "a handed-over container outlived its process; cleaning up");
                housekeeping(move || crate::run::finish_handed_over(&dir));
            }
        }
        hb_cli::teardown::sweep_removing(&self.root);
    }

    /// `dir` by its canonical path, if it is a container folder of this daemon's store.
    pub(super) fn container_folder(&self, dir: &Path) -> Result<PathBuf, CleanupRefused> {
        let containers = crate::container::containers_dir(&self.root);
        match dir.canonicalize() {
            Ok(dir) if dir.starts_with(&containers) && dir != containers => Ok(dir),
            Ok(dir) => Err(CleanupRefused::NotContainer(anyhow::anyhow!(
                "{} is not a container folder of this daemon's store",
                dir.display()
            ))),
            Err(e) => Err(CleanupRefused::Missing(anyhow::anyhow!("{}: {e}", dir.display()))),
        }
    }

    /// A container `hb run --rm` handed over (`api::hand_over`): cleaned up when the process
    /// behind `pidfd` (hb, become the runtime) exits.
    pub(super) fn watch_handed_over(&self, dir: &Path, pidfd: std::os::fd::OwnedFd) -> Result<(), CleanupRefused> {
        let dir = self.container_folder(dir)?;
        use std::os::fd::AsRawFd;
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap_or_default();
        if !fdinfo.lines().any(|l| l.starts_with("Pid:")) {
            return Err(CleanupRefused::NotContainer(anyhow::anyhow!(
                "the hand-over of {} carried no pidfd",
                dir.display()
            )));
        }
        self.spare_claimed(&dir);
        self.exits.watch(pidfd, dir);
        Ok(())
    }

    /// Handed-over containers a previous daemon was watching: watched again while their
    /// process runs, cleaned up now when it is gone.
    pub(super) fn adopt_handed_over(&self) {
        use crate::container::{list, process_start, Status};
        let Ok(all) = list(&self.root) else { return };
        for (dir, state) in all.into_iter().filter(|(_, s)| s.handed_over && s.status == Status::Running) {
            let watched = state.monitor.is_some_and(|(pid, start)| {
                let Some(raw) = rustix::process::Pid::from_raw(pid as i32) else { return false };
                // Opened, then checked: the pidfd is of that very process if it still runs.
                rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
                    .is_ok_and(|fd| process_start(pid) == Some(start) && self.watch_handed_over(&dir, fd).is_ok())
            });
            if !watched {
                tracing::info!(container = %state.id, "a handed-over container ended while no daemon ran; cleaning up");
                housekeeping(move || crate::run::finish_handed_over(&dir));
            }
        }
    }
}
