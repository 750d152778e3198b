//! `hb-engine`: every `hb` command, the store's owner. Parses arguments, reads configuration,
//! wires the libraries together and prints: data (and `--json`) on stdout, progress and messages
//! on stderr. `hb` (src/front.rs) execs it for all but the container commands it serves itself;
//! the store-free code both share is the `hb_cli` library (src/lib.rs).
//!
//! Exit codes: 0 success, 1 the operation failed (or `fsck` found problems), 2 usage error.

mod daemon;
mod hosts;
mod mounts;
mod progress;
mod proxy;

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hb_core::{ChunkerParams, Digest};
use hb_store::{Limits, Store, StoreOptions};
use indicatif::HumanBytes;

use hb_cli::output::{self, Out};
use hb_cli::{
    api, config, container, daemon_client, error_chain, pass_globals, rootfs, run, self_exe, store_root, ContainerCmd,
    Global,
};
use hb_images::{convert, find_image, memory, mount, pull, require_image, shutdown, tree_of};
use hosts::Hosts;
use progress::{Bar, Report};

#[derive(Parser)]
#[command(name = "hb", version, about = "HyperBox: content-addressed image storage with chunk-level dedup")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    },
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
    },
    /// Serve a pull-through registry mirror for CI farms and teams: each blob crosses the
    /// upstream link once, is kept deduplicated in the store, and is served to every client
    Proxy(ProxyCli),
    /// Show the effective configuration
    #[command(subcommand)]
    Config(ConfigCmd),
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
        #[arg(short, long)]
        username: String,
        /// Read the password from stdin (otherwise HB_PASSWORD, or a prompt-less error)
        #[arg(long)]
        password_stdin: bool,
        #[arg(long)]
        plain_http: bool,
    },
    /// Remove saved credentials for a registry
    Logout { registry: Option<String> },
    /// List images: name, digest, size, bytes only this image uses vs bytes shared with others
    Images,
    /// Print an image's manifest and config
    Inspect { image: String },
    /// Remove image names; `hb gc` then frees what no other image uses
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
    },
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
struct ProxyCli {
    #[command(subcommand)]
    cmd: Option<ProxyCmd>,
    /// Address to listen on [default: the config's proxy.listen, else 127.0.0.1:5000]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// An upstream registry, as clients name it (docker.io, ghcr.io, 10.0.0.5:5000), optionally
    /// with its URL (HOST=https://...); repeatable, added to the config's [[proxy.upstream]]
    #[arg(long, value_name = "HOST[=URL]")]
    upstream: Vec<String>,
    /// Keep at most this much (e.g. 50G); least recently used blobs go above it
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// The upstream for names without a registry host (Docker's registry-mirrors)
    /// [default: docker.io when configured, else the first]
    #[arg(long, value_name = "HOST")]
    default_upstream: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM)
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ProxyCmd {
    /// Hit ratio and bytes from upstream vs served, per upstream, of a running hb proxy
    Stats {
        /// The proxy's base URL
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        url: String,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the configuration in effect (file values and defaults) as TOML
    Show,
}

#[derive(Subcommand)]
enum LayerCmd {
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::SUCCESS;
            }
            // `hb run`'s usage errors are its own failures: 125, as docker's.
            use clap::CommandFactory;
            let run = Cli::command()
                .ignore_errors(true)
                .try_get_matches_from(std::env::args_os())
                .is_ok_and(|m| m.subcommand_name() == Some("run"));
            return ExitCode::from(if run { 125 } else { 2 });
        }
    };
    output::init_logging(cli.global.verbose);
    trust_store_bundle();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hb: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// TLS roots come from the system store. Without SSL_CERT_FILE/SSL_CERT_DIR, rustls-native-certs
/// reads both Debian's bundle and every file of /etc/ssl/certs, for every client (tens of ms per
/// command); the bundle alone holds the same roots, so point at it when nobody chose otherwise.
fn trust_store_bundle() {
    const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
    if std::env::var_os("SSL_CERT_FILE").is_none()
        && std::env::var_os("SSL_CERT_DIR").is_none()
        && Path::new(BUNDLE).is_file()
    {
        // Still single-threaded: nothing else reads the environment yet.
        std::env::set_var("SSL_CERT_FILE", BUNDLE);
    }
}

/// Opens the store; for a command that only reads (`read_only_ok`), a store another process holds
/// (an `hb mount`) is opened as a read-only view instead of failing.
fn open_store_for(g: &Global, read_only_ok: bool, out: &Out) -> anyhow::Result<Store> {
    match open_store(g) {
        Err(e) if matches!(e.downcast_ref::<hb_store::StoreError>(), Some(hb_store::StoreError::Locked(_))) => {
            let root = store_root(g)?;
            let daemon = daemon_client(g).and_then(|c| c.call::<api::Health>("GET", "/v1/health", None::<&()>).ok());
            if !read_only_ok {
                if let Some(h) = daemon {
                    bail!(
                        "store {} is owned by the hb daemon (pid {}) and this command does not go through it: \
                         stop the daemon first (systemctl stop hb)",
                        root.display(),
                        h.pid
                    );
                }
                return Err(e);
            }
            match daemon {
                // The daemon's store: reading from a view of it is the normal case.
                Some(h) => tracing::info!(pid = h.pid, "the hb daemon owns the store: read-only view"),
                None => out.note(format!(
                    "store {} is held by another hb process (a mount or a container): read-only view",
                    root.display()
                )),
            }
            Store::open_read_only(&root, StoreOptions::default())
                .with_context(|| format!("opening store {} read-only", root.display()))
        }
        Err(e)
            if read_only_ok
                && matches!(e.downcast_ref::<hb_store::StoreError>(), Some(hb_store::StoreError::Full { .. })) =>
        {
            let root = store_root(g)?;
            out.note(format!("{e:#}; reading from a read-only view: what is fetched is not kept"));
            Store::open_read_only(&root, StoreOptions::default())
                .with_context(|| format!("opening store {} read-only", root.display()))
        }
        other => other,
    }
}

fn open_store(g: &Global) -> anyhow::Result<Store> {
    let file = config::load(g.config.as_deref())?;
    let root = config::store_root(g.root.as_deref(), &file)?;
    let defaults = Limits::default();
    let opts = StoreOptions {
        chunker: ChunkerParams::default(),
        zstd_level: file.store.zstd_level.unwrap_or(3),
        limits: Limits {
            max_layer_bytes: file.store.max_layer_bytes.unwrap_or(defaults.max_layer_bytes),
            max_ratio: file.store.max_ratio.unwrap_or(defaults.max_ratio),
            ..defaults
        },
        ..StoreOptions::default()
    };
    Store::open(&root, opts).with_context(|| format!("opening store {}", root.display()))
}

/// Exports `layers` merged into `dir` with a progress bar; on failure leaves no half-written tree
/// behind (the target was missing or empty).
fn export_rootfs(store: &Store, layers: &[Digest], dir: &Path, out: &Out) -> anyhow::Result<hb_store::ExportReport> {
    let bar = Bar::bytes(out, "exporting rootfs", None);
    let existed = dir.exists();
    let r = store.export_rootfs(layers, dir, &bar);
    bar.finish();
    r.map_err(|e| {
        if !matches!(e, hb_store::StoreError::TargetNotEmpty(_)) {
            remove_partial_tree(dir, existed);
        }
        e.into()
    })
}

fn remove_partial_tree(dir: &Path, keep_dir: bool) {
    if !keep_dir {
        let _ = std::fs::remove_dir_all(dir);
    } else if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// `sha256:<12 hex>` labels shortened as docker shows ids; image names as they are.
fn short_label(label: &str) -> &str {
    label.strip_prefix("sha256:").map(|h| &h[..12]).unwrap_or(label)
}

/// A size or rate as people write it (`10M`, `2T`: [`hb_core::parse_size`]); zero is refused.
fn parse_rate(s: &str) -> anyhow::Result<u64> {
    match hb_core::parse_size(s)? {
        0 => bail!("{s:?} must be more than zero"),
        n => Ok(n),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    let out = Out::new(g.json, g.quiet);
    // Commands that do not touch the store come first: they must work while another process
    // holds it.
    // The commands that go through a running daemon look it up once.
    let daemon = match &cli.cmd {
        Cmd::Pull { plan: false, .. } | Cmd::Rmi { .. } | Cmd::Gc => daemon_client(g),
        _ => None,
    };
    let cmd = match cli.cmd {
        Cmd::Login { registry, username, password_stdin, plain_http } => {
            let registry = registry.unwrap_or_else(|| "docker.io".into());
            let password = if password_stdin {
                let mut p = String::new();
                io::stdin().read_line(&mut p)?;
                p.trim_end_matches(['\r', '\n']).to_string()
            } else {
                std::env::var("HB_PASSWORD")
                    .map_err(|_| anyhow::anyhow!("give the password with --password-stdin (or HB_PASSWORD)"))?
            };
            // Any repository will do: the registry answers for the credentials, not the name.
            let probe = hb_registry::ImageRef::parse(&format!("{registry}/hb-login-check/probe:latest"))?;
            let mut opts = hb_images::Registries::options(
                &Hosts::of(g),
                &probe,
                plain_http,
                Some((username.clone(), password.clone())),
                hb_registry::Platform::default(),
            )?;
            opts.attempts = 1;
            let reg = hb_registry::Registry::new(&probe, opts)?;
            runtime()?.block_on(reg.check_credentials(&probe))?;
            let path = config::docker_login(probe.registry(), &username, &password)?;
            out.note(format!("Login succeeded; credentials saved in {}", path.display()));
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Logout { registry } => {
            let registry = registry.unwrap_or_else(|| "docker.io".into());
            if config::docker_logout(&registry)? {
                out.note(format!("Removed login credentials for {registry}"));
            } else {
                out.note(format!("Not logged in to {registry}"));
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Umount { dir } => {
            mount::umount(&store_root(g)?, &dir, &Report::new(&out))?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Mount { background: true, dir, .. } => {
            mounts::background(&store_root(g)?, &dir, &out)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Container(c) => {
            let local = mounts::StoreImages::default();
            return match hb_cli::container_command(g, c, Some(&local))? {
                hb_cli::Outcome::Done(code) => Ok(code),
                hb_cli::Outcome::Engine => unreachable!("the engine serves images itself"),
            };
        }
        Cmd::Daemon { mount_idle, snapshotter_socket } => {
            let file = config::load(g.config.as_deref())?;
            let socket = api::socket_path(g.socket.as_deref(), &file);
            let idle = mount_idle.or(file.daemon.mount_idle_seconds).unwrap_or(600);
            let snap = snapshotter_socket
                .or(file.daemon.snapshotter_socket.clone())
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_SNAPSHOTTER_SOCKET));
            daemon::run(g, &socket, &snap, std::time::Duration::from_secs(idle), &out)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Proxy(ProxyCli { cmd: Some(ProxyCmd::Stats { url }), .. }) => {
            proxy::stats(&url, g.json)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Proxy(p) => {
            let file = config::load(g.config.as_deref())?;
            let store = open_store_for(g, false, &out)?;
            let args = proxy::ProxyArgs {
                listen: p.listen.clone(),
                upstreams: p.upstream.clone(),
                max_size: p.max_size.clone(),
                default_upstream: p.default_upstream.clone(),
                tls_cert: p.tls_cert.clone(),
                tls_key: p.tls_key.clone(),
            };
            let (addr, cfg) = proxy::config(&args, &file, store.root())?;
            let tls = proxy::tls(&args, &file)?;
            proxy::run(store, addr, cfg, tls)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Config(ConfigCmd::Show) => {
            let mut file = config::load(g.config.as_deref())?;
            file.version = Some(config::CONFIG_VERSION);
            file.store.root = Some(store_root(g)?);
            file.store.zstd_level = Some(file.store.zstd_level.unwrap_or(3));
            let limits = Limits::default();
            file.store.max_layer_bytes = Some(file.store.max_layer_bytes.unwrap_or(limits.max_layer_bytes));
            file.store.max_ratio = Some(file.store.max_ratio.unwrap_or(limits.max_ratio));
            file.daemon.socket = Some(api::socket_path(g.socket.as_deref(), &file));
            file.daemon.mount_idle_seconds = Some(file.daemon.mount_idle_seconds.unwrap_or(600));
            file.daemon.snapshotter_socket = Some(
                file.daemon.snapshotter_socket.clone().unwrap_or_else(|| config::DEFAULT_SNAPSHOTTER_SOCKET.into()),
            );
            // Secrets stay in the file.
            for u in &mut file.proxy.upstream {
                if u.password.is_some() {
                    u.password = Some("<hidden>".into());
                }
            }
            for u in &mut file.proxy.user {
                u.password = "<hidden>".into();
            }
            if out.json {
                out.json_value(&file)?;
            } else {
                print!("{}", toml::to_string(&file)?);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Pull { reference, platform, plain_http, creds, plan: false, lazy } if daemon.is_some() => {
            let client = daemon.expect("checked");
            let credentials = match creds {
                Some(c) => {
                    let (u, p) = c.split_once(':').context("--creds takes USER:PASSWORD")?;
                    Some((u.to_string(), p.to_string()))
                }
                None => None,
            };
            out.note(format!("pulling {reference} through the hb daemon"));
            let req = api::PullRequest { reference, lazy, plain_http, platform, credentials };
            let resp: api::PullResponse = client.call("POST", "/v1/pull", Some(&req))?;
            if out.json {
                out.json_value(&resp.report)?;
            } else {
                println!("{}", resp.digest);
                out.note(resp.summary);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Rmi { images } if daemon.is_some() => {
            let lines: Vec<String> =
                daemon.expect("checked").call("POST", "/v1/images/remove", Some(&api::RemoveRequest { images }))?;
            lines.into_iter().for_each(|l| out.note(l));
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Gc if daemon.is_some() => {
            let r: hb_store::GcReport = daemon.expect("checked").call("POST", "/v1/gc", None::<&()>)?;
            out.note(gc_summary(&r));
            out.json_value(&r)?;
            return Ok(ExitCode::SUCCESS);
        }
        other => other,
    };
    // A mount reads; it can serve from a read-only view (what it fetches stays in memory).
    let reads_only = matches!(
        cmd,
        Cmd::Mount { .. }
            | Cmd::Images
            | Cmd::Inspect { .. }
            | Cmd::Export { .. }
            | Cmd::Diff { .. }
            | Cmd::Du
            | Cmd::Layer(LayerCmd::Ls)
            | Cmd::Layer(LayerCmd::Export { .. })
    );
    let mut shutdown = None;
    if matches!(cmd, Cmd::Mount { .. }) {
        // A mount serves for long, mostly waiting (before any thread is started).
        memory::limit_malloc_arenas();
        shutdown = Some(shutdown::Shutdown::install()?);
    }
    let store = std::sync::Arc::new(open_store_for(g, reads_only, &out)?);
    match cmd {
        Cmd::Login { .. }
        | Cmd::Logout { .. }
        | Cmd::Umount { .. }
        | Cmd::Container(_)
        | Cmd::Daemon { .. }
        | Cmd::Proxy(_)
        | Cmd::Config(_) => {
            unreachable!("handled before the store is opened")
        }
        Cmd::Mount { image, dir, prefetch, bandwidth, no_passthrough, threads, background: _, plain_http, layers } => {
            let args = mount::MountArgs {
                image,
                dir,
                prefetch,
                bandwidth: bandwidth.as_deref().map(parse_rate).transpose()?,
                passthrough: !no_passthrough,
                threads,
                plain_http,
                layers,
            };
            let rt = runtime()?;
            let _pid = mount::PidFile::create(store.root(), &args.dir);
            let report = Report::new(&out);
            let daemon = mounts::DaemonSource::for_view(g, &store);
            let m = mount::mount_image(&Hosts::of(g), &rt, store.clone(), &args, daemon, shutdown.as_ref(), &report)?;
            mount::serve(&store, m, &report)?;
        }
        Cmd::Convert { src, dst, plain_http, platform } => {
            let platform = match platform {
                Some(p) => p.parse().map_err(anyhow::Error::msg)?,
                None => hb_registry::Platform::default(),
            };
            let rt = runtime()?;
            let report = convert::convert(
                &Hosts::of(g),
                &rt,
                store.clone(),
                &src,
                &dst,
                plain_http,
                platform,
                &Report::new(&out),
            )?;
            if out.json {
                out.json_value(&report)?;
            } else {
                println!("{}", report.index_digest);
            }
        }
        Cmd::Optimize { reference, command, seconds, plain_http } => {
            let rt = runtime()?;
            let report = convert::optimize(
                &Hosts::of(g),
                &rt,
                store.clone(),
                &reference,
                &command,
                seconds,
                plain_http,
                &Report::new(&out),
            )?;
            out.json_value(&report)?;
        }
        Cmd::Pull { reference, platform, plain_http, creds, plan, lazy } => {
            let r = hb_registry::ImageRef::parse(&reference)?;
            let credentials = match creds {
                Some(c) => {
                    let (u, p) = c.split_once(':').context("--creds takes USER:PASSWORD")?;
                    Some((u.to_string(), p.to_string()))
                }
                None => config::docker_credentials(r.registry())?,
            };
            let platform = match platform {
                Some(p) => p.parse().map_err(anyhow::Error::msg)?,
                None => hb_registry::Platform::default(),
            };
            let rt = runtime()?;
            let eps = hb_images::Registries::endpoints(&Hosts::of(g), &r, plain_http, credentials, platform)?;
            let (registry, resolved) = pull::resolve(&rt, eps)?;
            if plan {
                let p = pull::plan(&store, &resolved)?;
                if out.json {
                    out.json_value(&p)?;
                } else {
                    let mut w = io::stdout().lock();
                    for l in &p.fetch {
                        writeln!(w, "fetch   {} {}", l.digest, HumanBytes(l.size))?;
                    }
                    for l in &p.present {
                        writeln!(w, "present {} {}", l.digest, HumanBytes(l.size))?;
                    }
                    out.note(format!(
                        "{}: would download {} in {} layers; {} already stored",
                        p.name,
                        HumanBytes(p.fetch_bytes),
                        p.fetch.len(),
                        HumanBytes(p.present_bytes)
                    ));
                }
            } else if lazy && resolved.accelerated.is_some() {
                let report = pull::pull_lazy(&rt, store.clone(), std::sync::Arc::new(registry), resolved)?;
                if out.json {
                    out.json_value(&report)?;
                } else {
                    println!("{}", report.digest);
                    out.note(pull::lazy_summary(&report));
                }
            } else {
                if lazy {
                    out.note(format!("{reference} has no accelerated form (`hb convert` makes one); pulling it whole"));
                }
                let report = pull::pull(&rt, store.clone(), registry, resolved, &Report::new(&out))?;
                if out.json {
                    out.json_value(&report)?;
                } else {
                    println!("{}", report.digest);
                    out.note(pull::summary(&report));
                }
            }
        }
        Cmd::Images => {
            let sizes = store.image_sizes()?;
            if out.json {
                out.json_value(&sizes)?;
            } else {
                let mut w = io::stdout().lock();
                writeln!(w, "{:<50} {:<14} {:>10} {:>10} {:>10}", "IMAGE", "DIGEST", "SIZE", "UNIQUE", "SHARED")?;
                for s in sizes {
                    writeln!(
                        w,
                        "{:<50} {:<14} {:>10} {:>10} {:>10}",
                        s.name,
                        s.digest.short(),
                        HumanBytes(s.content_bytes).to_string(),
                        HumanBytes(s.unique_bytes).to_string(),
                        HumanBytes(s.shared_bytes).to_string()
                    )?;
                }
            }
        }
        Cmd::Inspect { image } => {
            let (name, digest, rec) = require_image(&store, &image)?;
            let manifest: serde_json::Value = serde_json::from_str(&rec.manifest)?;
            let config: serde_json::Value = serde_json::from_str(&rec.config)?;
            let v = serde_json::json!({
                "name": name, "digest": digest, "platform": rec.platform,
                "manifestMediaType": rec.manifest_media_type, "manifest": manifest, "config": config,
            });
            serde_json::to_writer_pretty(io::stdout().lock(), &v)?;
            println!();
        }
        Cmd::Rmi { images } => {
            for q in &images {
                let (name, digest, _) = require_image(&store, q)?;
                store.remove_image_name(&name)?;
                out.note(format!("untagged {name} ({}); run `hb gc` to free its space", digest.short()));
            }
        }
        Cmd::Export { image, dir } => {
            let (name, _, rec) = require_image(&store, &image)?;
            let layers: Vec<Digest> = rec.layers.iter().map(|l| l.diff_id).collect();
            let lazy = layers.iter().filter(|l| store.lazy_source(l).ok().flatten().is_some()).count();
            if lazy > 0 {
                bail!(
                    "{name} was pulled lazily ({lazy} layers not fetched yet): `hb pull {name}` fetches it whole, \
                     `hb mount` reads it as it is"
                );
            }
            let r = export_rootfs(&store, &layers, &dir, &out)?;
            out.note(format!("{name}: {} entries, {} into {}", r.entries, HumanBytes(r.bytes), dir.display()));
            out.json_value(&r)?;
        }
        Cmd::Layer(LayerCmd::Import { files }) => {
            let mut reports = Vec::new();
            for f in &files {
                let (input, len): (Box<dyn io::Read>, Option<u64>) = if f == Path::new("-") {
                    (Box::new(io::stdin().lock()), None)
                } else {
                    let file = File::open(f).with_context(|| format!("opening {}", f.display()))?;
                    let len = file.metadata().ok().map(|m| m.len());
                    (Box::new(file), len)
                };
                let bar = Bar::bytes(&out, &format!("importing {}", f.display()), len);
                let r = store.import_layer(input, &bar).with_context(|| format!("importing {}", f.display()))?;
                bar.finish();
                if !out.json {
                    println!("{}", r.digest);
                    out.note(format!(
                        "{}: {} ({}), diff_id {}\n  {} entries, {} content in {} chunks ({} distinct)\n  new: {} in {} chunks, {} on disk; deduplicated: {}{}",
                        f.display(),
                        r.digest.short(),
                        r.compression.label(),
                        r.diff_id.short(),
                        r.entries,
                        HumanBytes(r.content_bytes),
                        r.chunk_refs,
                        r.unique_chunks,
                        HumanBytes(r.new_bytes),
                        r.new_chunks,
                        HumanBytes(r.stored_bytes),
                        HumanBytes(r.deduplicated_bytes),
                        if r.already_present { " (layer already stored)" } else { "" },
                    ));
                }
                reports.push(r);
            }
            out.json_value(&reports)?;
        }
        Cmd::Layer(LayerCmd::Export { layers, output, dir }) => {
            let digests = layers.iter().map(|l| store.resolve_layer(l)).collect::<Result<Vec<_>, _>>()?;
            if let Some(dir) = dir {
                let r = export_rootfs(&store, &digests, &dir, &out)?;
                out.note(format!("{}: {} entries, {}", dir.display(), r.entries, HumanBytes(r.bytes)));
                out.json_value(&r)?;
            } else {
                let output = output.expect("clap requires -o or --dir");
                if digests.len() != 1 {
                    bail!("a tar export takes exactly one layer (use --dir to merge several)");
                }
                if output == Path::new("-") {
                    if io::stdout().is_terminal() {
                        bail!("refusing to write a tar to a terminal; redirect stdout or use -o FILE");
                    }
                    store.export_layer_tar(&digests[0], BufWriter::new(io::stdout().lock()), &Bar::hidden())?;
                } else {
                    // Written beside the target and renamed at the end: a failed export leaves nothing.
                    let tmp = output.with_extension("hb-partial");
                    let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                    let bar = Bar::bytes(&out, "exporting layer", None);
                    let written = (|| -> anyhow::Result<()> {
                        let mut w = BufWriter::new(f);
                        store.export_layer_tar(&digests[0], &mut w, &bar)?;
                        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                        std::fs::rename(&tmp, &output).with_context(|| format!("renaming to {}", output.display()))?;
                        Ok(())
                    })();
                    bar.finish();
                    if written.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    written?;
                    out.note(format!("wrote {}", output.display()));
                }
            }
        }
        Cmd::Layer(LayerCmd::Ls) => {
            let layers = store.list_layers()?;
            if out.json {
                out.json_value(&layers)?;
            } else {
                let mut w = io::stdout().lock();
                writeln!(w, "{:<19} {:<19} {:>8} {:>10} {:>8} PINNED", "DIFF_ID", "BLOB", "ENTRIES", "SIZE", "CHUNKS")?;
                for l in layers {
                    let blob = l.blobs.first().map(|b| b.short()).unwrap_or_else(|| "-".into());
                    writeln!(
                        w,
                        "{:<19} {:<19} {:>8} {:>10} {:>8} {}",
                        l.diff_id.short(),
                        blob,
                        l.entries,
                        HumanBytes(l.content_bytes).to_string(),
                        l.chunks,
                        if l.pinned { "yes" } else { "no" }
                    )?;
                }
            }
        }
        Cmd::Layer(LayerCmd::Rm { layers }) => {
            for l in &layers {
                let d = store.resolve_layer(l)?;
                if store.unpin_layer(&d)? {
                    out.note(format!("unpinned {d}; run `hb gc` to free its space"));
                } else {
                    out.note(format!("{d} was not pinned"));
                }
            }
        }
        Cmd::Diff { a, b } => {
            let ((da, ia), (db, ib)) = (tree_of(&store, &a)?, tree_of(&store, &b)?);
            let d = hb_core::diff(&ia, &ib);
            if out.json {
                let changes: Vec<_> = d
                    .changes
                    .iter()
                    .map(|c| serde_json::json!({"change": c.change, "path": format!("/{}", String::from_utf8_lossy(&c.path))}))
                    .collect();
                out.json_value(&serde_json::json!({
                    "a": da, "b": db, "changes": changes,
                    "needed_chunks": d.needed_chunks.len(), "needed_bytes": d.needed_bytes,
                }))?;
            } else {
                let mut w = io::stdout().lock();
                for c in &d.changes {
                    writeln!(w, "{} /{}", c.change.letter(), String::from_utf8_lossy(&c.path))?;
                }
                out.note(format!(
                    "{} changed paths; {} needs {} chunks ({}) that {} lacks",
                    d.changes.len(),
                    short_label(&db),
                    d.needed_chunks.len(),
                    HumanBytes(d.needed_bytes),
                    short_label(&da)
                ));
            }
        }
        Cmd::Du => {
            let u = store.usage()?;
            if out.json {
                out.json_value(&u)?;
            } else {
                let mut w = io::stdout().lock();
                writeln!(w, "store:        {}", store.root().display())?;
                writeln!(
                    w,
                    "layers:       {} ({} blobs, {} as they came in)",
                    u.layers,
                    u.blobs,
                    HumanBytes(u.blob_bytes)
                )?;
                writeln!(w, "logical:      {}", HumanBytes(u.logical_bytes))?;
                writeln!(
                    w,
                    "unique:       {} in {} chunks (dedup {:.2}x)",
                    HumanBytes(u.unique_bytes),
                    u.chunks,
                    u.dedup_ratio
                )?;
                writeln!(
                    w,
                    "stored:       {} packs ({} live) + {} metadata",
                    HumanBytes(u.pack_bytes),
                    HumanBytes(u.live_pack_bytes),
                    HumanBytes(u.metadata_bytes)
                )?;
                writeln!(
                    w,
                    "backing:      {} in {} passthrough files (`hb gc` frees those no layer needs)",
                    HumanBytes(u.backing_bytes),
                    u.backing_files
                )?;
                writeln!(w, "saving:       {:.2}x logical/stored", u.total_ratio)?;
            }
        }
        Cmd::Gc => {
            let bar = Bar::bytes(&out, "compacting", None);
            let r = store.gc(&bar)?;
            bar.finish();
            out.note(gc_summary(&r));
            out.json_value(&r)?;
        }
        Cmd::Fsck { repair } => {
            let bar = Bar::bytes(&out, "verifying", None);
            let mut r = store.fsck(&bar)?;
            bar.finish();
            if repair && !r.is_clean() {
                let done = store.repair(&r)?;
                out.note(format!("repair: removed {} damaged backing files; checking again", done.backing_removed));
                let bar = Bar::bytes(&out, "verifying", None);
                r = store.fsck(&bar)?;
                bar.finish();
            }
            if out.json {
                out.json_value(&r)?;
            } else {
                for i in &r.issues {
                    println!("{}: {}: {}", i.kind, i.subject, i.detail);
                }
                out.note(format!(
                    "checked {} packs, {} chunks ({} verified), {} layers, {} blobs, {} refs, {} backing files: {}",
                    r.packs,
                    r.chunks,
                    HumanBytes(r.verified_bytes),
                    r.layers,
                    r.blobs,
                    r.refs,
                    r.backing_files,
                    if r.is_clean() { "clean".to_string() } else { format!("{} problems", r.issues.len()) }
                ));
            }
            if !r.is_clean() {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hb gc`'s one-line summary, the same with or without a daemon.
fn gc_summary(r: &hb_store::GcReport) -> String {
    format!(
        "removed {} layers and {} chunks; compacted {} and deleted {} packs; freed {}; removed {} unused backing files ({})",
        r.layers_removed,
        r.chunks_removed,
        r.packs_compacted,
        r.packs_deleted,
        HumanBytes(r.bytes_freed),
        r.backing_removed,
        HumanBytes(r.backing_bytes_freed)
    )
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command's flags are consistent (clap checks this lazily, per command, at run time).
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// Regression (one-house issue): `--max-size 2T` was refused by a rate parser that knew K, M
    /// and G only; sizes and rates now share one parser.
    #[test]
    fn sizes_and_rates_take_every_suffix() {
        assert_eq!(super::parse_rate("2T").unwrap(), 2 << 40);
        assert_eq!(super::parse_rate("10MiB").unwrap(), 10 << 20);
        assert!(super::parse_rate("0").is_err() && super::parse_rate("fast").is_err());
    }
}
