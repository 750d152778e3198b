//! What `hb run` hands an OCI runtime: a runtime spec built from the image's config and
//! docker-style options (entrypoint and cmd, env, workdir, user, volumes, limits, read-only root,
//! network), with runc-style defaults for mounts, masked and read-only paths, docker's default
//! capabilities and docker's default seccomp profile (an allow list).
//!
//! No I/O here: the caller reads the image's /etc/passwd and /etc/group for [`resolve_user`]
//! and runs the runtime; [`exec_process`] derives `hb exec`'s process from a running container's.

mod error;
mod options;
mod seccomp;
mod spec;

pub use seccomp::default_seccomp;

pub use spec::{
    build_spec, capabilities, default_capabilities, exec_process, parse_cpus, parse_memory, process_args, resolve_user,
    ExecOptions, ImageConfig, MountArg, Network, RunOptions, SpecError, Tmpfs, UserIds, Volume, DEFAULT_PATH,
    INIT_PATH,
};
