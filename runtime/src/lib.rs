//! What `hb run` hands an OCI runtime: a runtime spec built from the image's config and
//! docker-style options (entrypoint and cmd, env, workdir, user, volumes, limits, read-only root,
//! network), with runc-style defaults for mounts, masked and read-only paths, docker's default
//! capabilities and a default seccomp profile.
//!
//! Groundwork for `hb run` (issue 7): the spec is built here without I/O; the caller reads the
//! image's /etc/passwd and /etc/group for [`resolve_user`] and runs the runtime.

mod spec;

pub use spec::{
    build_spec, default_capabilities, default_seccomp, parse_cpus, parse_memory, process_args, resolve_user,
    ImageConfig, Network, RunOptions, SpecError, UserIds, Volume,
};
