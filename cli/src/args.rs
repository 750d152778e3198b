//! The command line both binaries share: the global flags and the container commands (`hb run`,
//! `ps`, `stop`, `kill`, `rm`, `logs`, `exec` and the hidden helpers), which `hb` serves itself.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::config;

#[derive(Args, Clone)]
pub struct Global {
    /// Store directory [default: /var/lib/hb as root, else ~/.local/share/hb]
    #[arg(long, global = true, env = config::env::ROOT, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Config file [default: /etc/hb/hb.toml when present]
    #[arg(long, global = true, env = config::env::CONFIG, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Folder of per-registry `<host>/hosts.toml` files, containerd's format (scheme, ca, skip_verify)
    /// [default: /etc/hb/certs.d, then /etc/containerd/certs.d]
    #[arg(long, global = true, env = config::env::HOSTS_DIR, value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
    /// The daemon's socket [default: the config's daemon.socket, else /run/hb/hb.sock]
    #[arg(long, global = true, env = config::env::SOCKET, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print machine-readable JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars or summaries on stderr
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More log output on stderr (once: info, twice: debug); HB_LOG takes tracing filter syntax.
    /// Long form only: `-v` is `hb run`'s volume flag, as in docker.
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The container commands: what `hb` does without `hb-engine` (given a daemon to serve images).
#[derive(Subcommand)]
pub enum ContainerCmd {
    /// Run a command in a new container from an image (pulled, lazily when it can be, if missing)
    Run(Box<RunCli>),
    /// List containers (running ones; -a: all). `-q` prints ids only
    Ps(PsArgs),
    /// Stop running containers: SIGTERM, then SIGKILL after a grace period
    Stop {
        #[arg(required = true, value_name = "CONTAINER")]
        containers: Vec<String>,
        /// Seconds to wait before SIGKILL
        #[arg(short, long, default_value_t = 10)]
        time: u64,
    },
    /// Send a signal to running containers
    Kill {
        #[arg(required = true, value_name = "CONTAINER")]
        containers: Vec<String>,
        /// Signal name (TERM, SIGHUP, ...) or number
        #[arg(short, long, default_value = "KILL")]
        signal: String,
    },
    /// Remove containers (their writable layer and logs)
    Rm(RmArgs),
    /// Block until containers stop, then print their exit codes (one per line)
    Wait {
        #[arg(required = true, value_name = "CONTAINER")]
        containers: Vec<String>,
    },
    /// Manage containers: ls, rm, prune, inspect (as `docker container`)
    Container {
        #[command(subcommand)]
        cmd: ContainerSub,
    },
    /// Print a container's output (stdout to stdout, stderr to stderr)
    Logs {
        container: String,
        /// Keep printing new output until the container ends
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
        /// Prefix each line with its time (RFC 3339)
        #[arg(short, long)]
        timestamps: bool,
        /// Only output since this time: RFC 3339 (2026-12-06T10:00:00Z), Unix seconds, or a
        /// duration before now (10m, 1h30m, 42s)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
    /// Run a command in a running container
    Exec {
        container: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        /// Keep stdin open
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a pseudo-terminal
        #[arg(short, long)]
        tty: bool,
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(short, long)]
        workdir: Option<String>,
        /// User (name|uid[:group|gid]) [default: the container's]
        #[arg(short, long)]
        user: Option<String>,
    },
    /// Unmounts and removes what a finished container left (started by its monitor)
    #[command(hide = true)]
    ContainerCleanup {
        dir: PathBuf,
        #[arg(long)]
        remove: bool,
    },
    /// Serves one detached container (started by `hb run -d`)
    #[command(hide = true)]
    ContainerMonitor { id: String },
}

/// `hb ps` and `hb container ls`.
#[derive(Args)]
pub struct PsArgs {
    /// Show all containers, not only running ones
    #[arg(short, long)]
    pub all: bool,
    /// Full ids and commands
    #[arg(long)]
    pub no_trunc: bool,
    /// `json` (one object per line) or a template such as '{{.ID}}\t{{.Status}}'
    #[arg(long, value_name = "json|TEMPLATE")]
    pub format: Option<String>,
}

/// `hb rm` and `hb container rm`.
#[derive(Args)]
pub struct RmArgs {
    #[arg(required = true, value_name = "CONTAINER")]
    pub containers: Vec<String>,
    /// Kill and remove a running container
    #[arg(short, long)]
    pub force: bool,
}

/// `hb container ...`: docker's management commands for containers.
#[derive(Subcommand)]
pub enum ContainerSub {
    /// List containers (as `hb ps`)
    #[command(visible_alias = "list", alias = "ps")]
    Ls(PsArgs),
    /// Remove containers (as `hb rm`)
    #[command(visible_alias = "remove")]
    Rm(RmArgs),
    /// Remove every container that is not running
    Prune {
        /// Do not ask for confirmation
        #[arg(short, long)]
        force: bool,
    },
    /// Print containers' state as a JSON array (docker's field names)
    Inspect {
        #[arg(required = true, value_name = "CONTAINER")]
        containers: Vec<String>,
    },
}

/// `hb run`'s flags, as docker's.
#[derive(Args)]
pub struct RunCli {
    pub image: String,
    /// Command and arguments (replace the image's CMD)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// Set environment variables (KEY=VALUE, or KEY to take it from hb's environment)
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines; # comments; -e wins over it)
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the container
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// User (name|uid[:group|gid])
    #[arg(short, long)]
    pub user: Option<String>,
    /// Bind mount a volume (HOST:CONTAINER[:ro|rw])
    #[arg(short, long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    pub volume: Vec<hb_runtime::Volume>,
    /// Mount a tmpfs (PATH[:OPTIONS], e.g. /run:size=64m,exec)
    #[arg(long, value_name = "PATH[:OPTIONS]")]
    pub tmpfs: Vec<hb_runtime::Tmpfs>,
    /// Mount, docker's long form: type=bind,source=/a,target=/b[,readonly] or
    /// type=tmpfs,target=/c[,tmpfs-size=64m][,tmpfs-mode=1777]
    #[arg(long, value_name = "type=bind|tmpfs,...")]
    pub mount: Vec<hb_runtime::MountArg>,
    /// Add a Linux capability (NET_ADMIN, SYS_PTRACE, ... or ALL)
    #[arg(long, value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a Linux capability (CHOWN, ... or ALL)
    #[arg(long, value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// Log rotation, as docker's json-file driver: max-size=10m, max-file=3
    #[arg(long, value_name = "KEY=VALUE")]
    pub log_opt: Vec<String>,
    /// Platform to pull (os/arch[/variant], e.g. linux/arm64); an image stored for another
    /// platform is pulled again [default: this machine's]
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = check_platform)]
    pub platform: Option<String>,
    /// Pull the image before running: when missing from the store, always, or never
    #[arg(long, value_enum, default_value_t = crate::api::PullPolicy::Missing)]
    pub pull: crate::api::PullPolicy,
    /// Run an init (docker-init, i.e. tini) as pid 1: it forwards signals and reaps zombies
    #[arg(long)]
    pub init: bool,
    /// Remove the container when it exits
    #[arg(long)]
    pub rm: bool,
    /// Run in the background and print the container's id
    #[arg(short, long)]
    pub detach: bool,
    /// Name the container (unique)
    #[arg(long)]
    pub name: Option<String>,
    /// Container host name [default: the short container id]
    #[arg(long)]
    pub hostname: Option<String>,
    /// Overwrite the image's ENTRYPOINT (drops its CMD, as docker does)
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Allocate a pseudo-terminal
    #[arg(short, long)]
    pub tty: bool,
    /// Keep stdin open
    #[arg(short, long)]
    pub interactive: bool,
    /// Memory limit (e.g. 512m, 1g)
    #[arg(short, long, value_parser = hb_runtime::parse_memory)]
    pub memory: Option<u64>,
    /// CPUs (e.g. 1.5)
    #[arg(long, value_parser = hb_runtime::parse_cpus)]
    pub cpus: Option<f64>,
    /// Maximum number of processes
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Mount the container's root filesystem read-only
    #[arg(long)]
    pub read_only: bool,
    /// Network: host (share the host's) or none (loopback only)
    #[arg(long, default_value = "host", value_parser = ["host", "none"])]
    pub network: String,
    /// OCI runtime (runc, crun, youki or a path) [default: the first that works here]
    #[arg(long)]
    pub runtime: Option<String>,
    #[arg(long)]
    pub plain_http: bool,
}

/// `--platform` checked as hb-registry parses it (os/arch[/variant]), without linking it here:
/// kept as written, parsed where it is used.
fn check_platform(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts[..] {
        [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() && parts.iter().all(|p| !p.is_empty()) => {
            Ok(s.to_string())
        }
        _ => Err(format!("invalid platform {s:?}: expected os/arch[/variant], e.g. linux/amd64")),
    }
}
