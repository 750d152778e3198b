//! The default seccomp profile: docker's (moby `profiles/seccomp/default.json`, v27.5.1), an allow
//! list. Anything not listed fails with EPERM, so a syscall the kernel adds later is refused until
//! the profile names it, as with docker; `io_uring_*` is refused (docker since 25.0); `clone` may not
//! make namespaces and `clone3` answers ENOSYS (so libc falls back to `clone`) unless the container
//! holds CAP_SYS_ADMIN; syscalls tied to a capability are allowed only when the bounding set has it.
//!
//! Pure: the caller says which architecture and capabilities the container has.

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use crate::error::{oci, SpecError};

/// Syscalls every container may make (docker's unconditional list, in its order).
pub const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// EPERM, the answer to a syscall the profile does not allow.
const EPERM: u32 = 1;
/// ENOSYS, `clone3`'s answer without CAP_SYS_ADMIN (libc then uses `clone`, which is checked).
const ENOSYS: u32 = 38;
/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
/// CLONE_NEWNET`: the flags `clone` may not carry without CAP_SYS_ADMIN.
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7e02_0000;
const AF_VSOCK: u64 = 40;

/// Syscalls allowed only when the container's bounding set holds a capability (docker's lists).
const BY_CAPABILITY: &[(Capability, &[&str])] = &[
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (Capability::SysModule, &["delete_module", "init_module", "finit_module"]),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace"],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (Capability::SysTime, &["settimeofday", "stime", "clock_settime", "clock_settime64"]),
    (Capability::SysTtyConfig, &["vhangup"]),
    (Capability::SysNice, &["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"]),
    (Capability::Syslog, &["syslog"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

/// The seccomp architectures of a container on `arch` (Rust's `std::env::consts::ARCH` names)
/// and the syscalls only that architecture has.
fn arch_rules(arch: &str) -> (Vec<Arch>, &'static [&'static str]) {
    match arch {
        "x86_64" => (vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32], &["arch_prctl", "modify_ldt"]),
        "x86" => (vec![Arch::ScmpArchX86], &["modify_ldt"]),
        "aarch64" => (
            vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
            &["arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush", "set_tls"],
        ),
        "riscv64" => (vec![Arch::ScmpArchRiscv64], &["riscv_flush_icache"]),
        "powerpc64" => (vec![Arch::ScmpArchPpc64le], &["sync_file_range2", "swapcontext"]),
        "s390x" => (
            vec![Arch::ScmpArchS390x, Arch::ScmpArchS390],
            &["s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"],
        ),
        _ => (Vec::new(), &[]),
    }
}

fn rule(
    names: &[&str],
    action: LinuxSeccompAction,
    errno: Option<u32>,
    arg: Option<(usize, u64, LinuxSeccompOperator)>,
) -> Result<LinuxSyscall, SpecError> {
    let mut b =
        LinuxSyscallBuilder::default().names(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).action(action);
    if let Some(e) = errno {
        b = b.errno_ret(e);
    }
    if let Some((index, value, op)) = arg {
        let a =
            LinuxSeccompArgBuilder::default().index(index).value(value).value_two(0u64).op(op).build().map_err(oci)?;
        b = b.args(vec![a]);
    }
    b.build().map_err(oci)
}

/// Docker's default profile for a container on `arch` whose bounding set is `caps`.
pub fn default_seccomp(arch: &str, caps: &[Capability]) -> Result<LinuxSeccomp, SpecError> {
    use LinuxSeccompAction::{ScmpActAllow as Allow, ScmpActErrno as Errno};
    use LinuxSeccompOperator::{ScmpCmpEq as Eq, ScmpCmpMaskedEq as MaskedEq, ScmpCmpNe as Ne};
    let (arches, arch_only) = arch_rules(arch);
    let has = |c: Capability| caps.contains(&c);
    let mut rules = vec![
        rule(ALLOWED, Allow, None, None)?,
        rule(&["process_vm_readv", "process_vm_writev", "ptrace"], Allow, None, None)?,
        rule(&["socket"], Allow, None, Some((0, AF_VSOCK, Ne)))?,
    ];
    // PER_LINUX, PER_LINUX32, UNAME26, UNAME26 | PER_LINUX32, and the query of the current one.
    for persona in [0u64, 0x8, 0x20000, 0x20008, 0xffff_ffff] {
        rules.push(rule(&["personality"], Allow, None, Some((0, persona, Eq)))?);
    }
    if !arch_only.is_empty() {
        rules.push(rule(arch_only, Allow, None, None)?);
    }
    for (cap, names) in BY_CAPABILITY {
        if has(*cap) {
            rules.push(rule(names, Allow, None, None)?);
        }
    }
    if !has(Capability::SysAdmin) {
        // s390 passes clone's flags second.
        let flags_arg = if arch == "s390x" { 1 } else { 0 };
        rules.push(rule(&["clone"], Allow, None, Some((flags_arg, CLONE_NAMESPACE_FLAGS, MaskedEq)))?);
        rules.push(rule(&["clone3"], Errno, Some(ENOSYS), None)?);
    }
    let mut b = LinuxSeccompBuilder::default().default_action(Errno).default_errno_ret(EPERM).syscalls(rules);
    if !arches.is_empty() {
        b = b.architectures(arches);
    }
    b.build().map_err(oci)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the profile does with `name` called with first argument `arg0`: the action and errno
    /// of the first rule that matches, as libseccomp evaluates (an allow wins over an errno).
    fn verdict(p: &LinuxSeccomp, name: &str, arg0: u64) -> (LinuxSeccompAction, Option<u32>) {
        let mut errno = None;
        for r in p.syscalls().as_ref().unwrap() {
            if !r.names().iter().any(|n| n == name) {
                continue;
            }
            let matches = r.args().as_ref().is_none_or(|args| {
                args.iter().all(|a| match a.op() {
                    LinuxSeccompOperator::ScmpCmpEq => arg0 == a.value(),
                    LinuxSeccompOperator::ScmpCmpNe => arg0 != a.value(),
                    LinuxSeccompOperator::ScmpCmpMaskedEq => arg0 & a.value() == a.value_two().unwrap_or(0),
                    _ => false,
                })
            });
            if matches {
                match r.action() {
                    LinuxSeccompAction::ScmpActAllow => return (LinuxSeccompAction::ScmpActAllow, None),
                    a => errno = Some((a, r.errno_ret())),
                }
            }
        }
        errno.unwrap_or((p.default_action(), p.default_errno_ret()))
    }

    #[test]
    fn docker_default_allows_ordinary_calls_and_refuses_the_rest() {
        let caps = crate::default_capabilities();
        let p = default_seccomp("x86_64", &caps).unwrap();
        let allow = (LinuxSeccompAction::ScmpActAllow, None);
        let eperm = (LinuxSeccompAction::ScmpActErrno, Some(EPERM));
        for ok in ["read", "openat", "execve", "arch_prctl", "chroot", "ptrace"] {
            assert_eq!(verdict(&p, ok, 0), allow, "{ok}");
        }
        // A thread or fork: no namespace flags.
        assert_eq!(verdict(&p, "clone", 0x3d0f00), allow);
        for (flag, name) in [(0x20000u64, "CLONE_NEWNS"), (0x10000000, "CLONE_NEWUSER"), (0x40000000, "CLONE_NEWNET")] {
            assert_eq!(verdict(&p, "clone", 0x3d0f00 | flag), eperm, "clone with {name}");
        }
        assert_eq!(verdict(&p, "clone3", 0), (LinuxSeccompAction::ScmpActErrno, Some(ENOSYS)));
        for denied in [
            "io_uring_setup",
            "io_uring_enter",
            "unshare",
            "mount",
            "setns",
            "kexec_load",
            "bpf",
            "reboot",
            "init_module",
            "keyctl",
            "add_key",
            "userfaultfd",
            "perf_event_open",
        ] {
            assert_eq!(verdict(&p, denied, 0), eperm, "{denied}");
        }
        assert_eq!(verdict(&p, "socket", 2), allow, "AF_INET");
        assert_eq!(verdict(&p, "socket", AF_VSOCK), eperm, "AF_VSOCK");
        assert_eq!(verdict(&p, "personality", 0xffff_ffff), allow);
        assert_eq!(verdict(&p, "personality", 0x0040000), eperm, "ADDR_NO_RANDOMIZE");
        assert!(p.architectures().as_ref().unwrap().contains(&Arch::ScmpArchX86_64));
    }

    #[test]
    fn capabilities_open_their_syscalls() {
        let mut caps = crate::default_capabilities();
        caps.push(Capability::SysAdmin);
        caps.push(Capability::SysPtrace);
        let p = default_seccomp("aarch64", &caps).unwrap();
        let allow = (LinuxSeccompAction::ScmpActAllow, None);
        for name in ["mount", "unshare", "setns", "clone3", "kcmp", "cacheflush"] {
            assert_eq!(verdict(&p, name, 0), allow, "{name}");
        }
        assert_eq!(verdict(&p, "clone", 0x7e020000), allow, "namespaces with CAP_SYS_ADMIN");
        assert_eq!(verdict(&p, "arch_prctl", 0).0, LinuxSeccompAction::ScmpActErrno, "x86 only");
    }
}
