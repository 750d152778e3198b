//! `hb-engine`'s command line (clap): every command; the container commands come from
//! `hb_cli::args`, shared with the lean `hb`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use hb_cli::{ContainerCmd, Global};

#[derive(Parser)]
#[command(name = "hb", version, about = "HyperBox: content-addressed image storage with chunk-level dedup")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Pull an image from a registry into the store (layers deduplicated by chunk)
    Pull {
        /// Image reference, as docker takes it (busybox, ghcr.io/org/app:v1, host:5000/app@sha256:...)
        reference: String,
        /// Platform to select from a multi-platform image [default: this machine's]
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        /// Use plain HTTP for this registry (loopback registries use it without asking)
        #[arg(long)]
        plain_http: bool,
        /// Registry credentials [default: from docker's config.json]
        #[arg(long, value_name = "USER:PASSWORD")]
        creds: Option<String>,
        /// Show which layers a pull would download given what is stored; download nothing
        #[arg(long)]
        plan: bool,
        /// Fetch only the image's indexes (from its accelerated form, see `hb convert`); file data
        /// comes on first read through `hb mount`. Without an accelerated form, pull it whole.
        #[arg(long, conflicts_with = "plan")]
        lazy: bool,
    },
    /// Mount an image's rootfs read-only at DIR; lazily pulled data is fetched on first read
    Mount {
        image: String,
        dir: PathBuf,
        /// Background fetching after mount: the recorded start-up order, everything, or nothing
        #[arg(long, default_value = "startup", value_name = "none|startup|all")]
        prefetch: hb_fuse::Prefetch,
        /// Cap on background fetching, e.g. 10M (bytes per second; K, M, G suffixes)
        #[arg(long, value_name = "RATE")]
        bandwidth: Option<String>,
        /// Never serve local files by FUSE passthrough
        #[arg(long)]
        no_passthrough: bool,
        /// FUSE worker threads
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Return once mounted, serving from a background process (`hb umount` ends it)
        #[arg(short = 'd', long)]
        background: bool,
        /// Use plain HTTP for the image's registry (for pulling it and reading its chunks)
        #[arg(long)]
        plain_http: bool,
        /// Mount only the image's first N layers merged
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
        /// Platform to pull when the store lacks the image (or holds another platform's)
        /// [default: this machine's]
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
    },
    /// A mount process the daemon starts ahead of need: reads the arguments of the `hb mount` it
    /// is to be as one JSON line on stdin (a list of strings), then is that mount
    #[command(hide = true)]
    MountStandby,
    #[command(flatten)]
    Container(ContainerCmd),
    /// Own the store and serve the API on a Unix socket (docs/api.md); image mounts it starts
    /// outlive it
    Daemon {
        /// Unmount an image mount no container has used for this many seconds [default: the
        /// config's daemon.mount_idle_seconds, else 600]
        #[arg(long, value_name = "SECONDS")]
        mount_idle: Option<u64>,
        /// containerd's snapshotter API socket [default: the config's daemon.snapshotter_socket,
        /// else /run/hb/snapshotter.sock]
        #[arg(long, value_name = "PATH")]
        snapshotter_socket: Option<PathBuf>,
        /// Also serve /metrics and /healthz over TCP at ADDR, for Prometheus [default: the
        /// config's daemon.metrics_address, else none]
        #[arg(long, value_name = "ADDR")]
        metrics_address: Option<String>,
    },
    /// Serve a pull-through registry mirror for CI farms and teams: each blob crosses the
    /// upstream link once, is kept deduplicated in the store, and is served to every client
    Proxy(ProxyCli),
    /// Show the effective configuration
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print a shell completion script: `hb completion bash > /etc/bash_completion.d/hb`
    /// (the Debian package installs them)
    Completion {
        #[arg(value_name = "bash|zsh|fish|elvish|powershell")]
        shell: clap_complete::Shell,
    },
    /// Write man pages (hb.1 and one per command) into DIR (the package build uses it)
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Unmount what `hb mount` mounted at DIR (also detaches a stale mount of a dead process)
    Umount { dir: PathBuf },
    /// Write an accelerated (lazy-pullable) form of SRC to DST in any OCI registry, bound to the
    /// original in an OCI index so other clients still pull the original
    Convert {
        src: String,
        dst: String,
        #[arg(long)]
        plain_http: bool,
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        /// zstd level of the published chunk data (1-22; 0 copies the store's own encoding). Higher
        /// levels cost the conversion CPU once and save every client bytes: 9 is ~6 % smaller
        /// than the store's 3 and ~3x slower to write; 19 another ~6 % and ~20x slower
        #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(i32).range(0..=22))]
        zstd_level: i32,
    },
    /// Record which chunks an image reads at start-up (running its entrypoint or CMD from a lazy
    /// mount) and store that order in its accelerated form
    Optimize {
        /// An accelerated image in a registry (as `hb convert` wrote it)
        reference: String,
        /// Command to run instead of the image's entrypoint + cmd
        #[arg(last = true)]
        command: Vec<String>,
        /// How long to let the command run
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long)]
        plain_http: bool,
    },
    /// Check credentials with a registry and save them in docker's config.json
    Login {
        /// Registry host[:port] (docker.io when omitted)
        registry: Option<String>,
        /// The user name [default: asked for on the terminal]
        #[arg(short, long)]
        username: Option<String>,
        /// The password (visible to other users in the process list: prefer --password-stdin)
        #[arg(short, long, conflicts_with = "password_stdin")]
        password: Option<String>,
        /// Read the password from stdin [default: HB_PASSWORD, else asked for on the terminal]
        #[arg(long)]
        password_stdin: bool,
        #[arg(long)]
        plain_http: bool,
    },
    /// Remove saved credentials for a registry
    Logout { registry: Option<String> },
    /// List images: name, digest, size, bytes only this image uses vs bytes shared with others.
    /// `-q` prints digests only
    Images {
        /// `json` (one object per line) or a template such as '{{.Name}}\t{{.UniqueBytes}}'
        #[arg(long, value_name = "json|TEMPLATE")]
        format: Option<String>,
    },
    /// Print a container's state (as `hb container inspect`), else an image's manifest and config
    Inspect {
        /// A container (id, name or id prefix) or an image
        #[arg(value_name = "CONTAINER|IMAGE")]
        image: String,
        /// `hb image inspect`: an image only, never a container of that name or id prefix
        #[arg(skip)]
        image_only: bool,
    },
    /// Remove image names; `hb gc` then frees what no other image uses
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Manage images: ls, rm, prune, inspect (as `docker image`)
    #[command(subcommand)]
    Image(ImageCmd),
    /// Disk use by images, containers and the store; prune what nothing uses (as `docker system`)
    #[command(subcommand)]
    System(SystemCmd),
    /// Materialise an image's rootfs (layers merged, whiteouts applied) into DIR
    Export { image: String, dir: PathBuf },
    /// Import, export, list and remove layers
    #[command(subcommand)]
    Layer(LayerCmd),
    /// Show what changed from A to B and what B needs beyond A (images or layers)
    Diff {
        /// An image name, or a layer (blob digest or diff_id, or an unambiguous prefix)
        a: String,
        /// The same for B
        b: String,
    },
    /// Check what this machine gives hb (kernel, FUSE, runtimes, store, daemon, containerd) and,
    /// with IMAGE, whether hb can reach it and start it lazily; each problem with its fix.
    /// Exit code 1 when a check fails. `--json`: one object (docs/operators.md)
    Doctor {
        /// An image to check: its hosts.toml, credentials, the registry's answer, a lazy start
        image: Option<String>,
    },
    /// LAN peers of the daemon's node: who is connected, what they hold, bytes exchanged, bans
    Peers {
        #[command(subcommand)]
        cmd: Option<PeersCmd>,
    },
    /// Logical vs stored bytes and the dedup ratio
    Du,
    /// Free layers nothing pins and chunks no layer uses; compact pack files
    Gc,
    /// Verify every chunk, index, reference and passthrough backing file; exit 0 only when the
    /// store is clean
    Fsck {
        /// Mend what can be mended without loss (damaged backing files are removed: they are
        /// written again from verified chunks when next used), then check again
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ProxyCli {
    #[command(subcommand)]
    pub cmd: Option<ProxyCmd>,
    /// Address to listen on [default: the config's proxy.listen, else 127.0.0.1:5000]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// An upstream registry, as clients name it (docker.io, ghcr.io, 10.0.0.5:5000), optionally
    /// with its URL (HOST=https://...); repeatable, added to the config's [[proxy.upstream]]
    #[arg(long, value_name = "HOST[=URL]")]
    pub upstream: Vec<String>,
    /// Keep at most this much (e.g. 50G); least recently used blobs go above it
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<String>,
    /// The upstream for names without a registry host (Docker's registry-mirrors)
    /// [default: docker.io when configured, else the first]
    #[arg(long, value_name = "HOST")]
    pub default_upstream: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM)
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// List images (as `hb images`)
    #[command(visible_alias = "list")]
    Ls {
        /// `json` (one object per line) or a template such as '{{.Name}}\t{{.UniqueBytes}}'
        #[arg(long, value_name = "json|TEMPLATE")]
        format: Option<String>,
    },
    /// Remove image names (as `hb rmi`)
    #[command(visible_alias = "remove")]
    Rm {
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
    /// Free the store's unreferenced data; with -a also remove every image no container uses
    Prune {
        /// Remove every image no container uses, not only unreferenced data
        #[arg(short, long)]
        all: bool,
        /// Do not ask for confirmation
        #[arg(short, long)]
        force: bool,
    },
    /// Print an image's manifest and config
    Inspect { image: String },
}

#[derive(Subcommand)]
pub enum SystemCmd {
    /// Space used by images, containers and the store, and how much a prune would free
    Df,
    /// Remove stopped containers and unreferenced data; with -a also every image no container uses
    Prune {
        /// Also remove every image no container uses
        #[arg(short, long)]
        all: bool,
        /// Do not ask for confirmation
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum ProxyCmd {
    /// Print a bcrypt hash of a password (from stdin, or asked on the terminal) for
    /// `[[proxy.user]]`'s `password`
    HashPassword,
    /// Hit ratio and bytes from upstream vs served, per upstream, of a running hb proxy
    Stats {
        /// The proxy's base URL
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        url: String,
    },
}

#[derive(Subcommand)]
pub enum PeersCmd {
    /// List the peers (the default)
    Ls,
    /// Write a new pre-shared key for a team's network (give every member the same file)
    Keygen {
        file: PathBuf,
        /// Replace an existing file
        #[arg(long)]
        force: bool,
    },
    /// Stop fetching from and serving to peers (connections stay; `on` resumes)
    Off,
    /// Fetch from and serve to peers again
    On,
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Print the configuration in effect (file values and defaults) as TOML
    Show,
}

#[derive(Subcommand)]
pub enum LayerCmd {
    /// Import layer blobs (tar, tar+gzip, tar+zstd; `-` reads stdin)
    Import {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Export one layer as a tar (-o), or layers merged bottom-first into a rootfs (--dir)
    Export {
        #[arg(required = true, value_name = "DIGEST")]
        layers: Vec<String>,
        /// Write the layer as an uncompressed tar to FILE (`-` for stdout)
        #[arg(short, long, value_name = "FILE", conflicts_with = "dir", required_unless_present = "dir")]
        output: Option<PathBuf>,
        /// Materialise the merged rootfs into DIR (missing or empty)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// List stored layers
    Ls,
    /// Unpin layers; `hb gc` then frees what only they used
    Rm {
        #[arg(required = true, value_name = "DIGEST")]
        layers: Vec<String>,
    },
}
