//! Work that can wait: keeping fetched chunks (zstd, pack appends, fsyncs) while a container
//! starts on the same cores. It runs at the lowest CPU priority on the thread doing it, so the reads
//! it keeps up with (a starting container's processes, a mount's readers) come first.

use rustix::process::{getpriority_process, setpriority_process};
use rustix::thread::gettid;

/// Runs `f` at nice 19 on this thread, then restores the thread's priority (the daemon's
/// request threads serve other work after it).
pub fn in_background<T>(f: impl FnOnce() -> T) -> T {
    let tid = Some(gettid());
    let before = getpriority_process(tid).ok();
    if let Err(e) = setpriority_process(tid, 19) {
        tracing::debug!(error = %e, "could not lower a thread's priority");
    }
    let out = f();
    if let Some(p) = before {
        // Raising it back needs CAP_SYS_NICE (root has it); without it, the thread stays low.
        if let Err(e) = setpriority_process(tid, p) {
            tracing::debug!(error = %e, "could not restore a thread's priority");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_priority_is_lowered_for_the_work_and_restored_after() {
        let tid = Some(rustix::thread::gettid());
        let before = rustix::process::getpriority_process(tid).unwrap();
        let during = super::in_background(|| rustix::process::getpriority_process(tid).unwrap());
        assert_eq!(during, 19);
        if rustix::process::geteuid().is_root() {
            assert_eq!(rustix::process::getpriority_process(tid).unwrap(), before);
        }
    }
}
