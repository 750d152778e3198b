//! `hb-engine`: every `hb` command, the store's owner. Parses arguments, reads configuration,
//! wires the libraries together and prints: data (and `--json`) on stdout, progress and messages
//! on stderr. `hb` (src/front.rs) execs it for all but the container commands it serves itself;
//! the store-free code both share is the `hb_cli` library (src/lib.rs).
//!
//! Exit codes: 0 success, 1 the operation failed (or `fsck` found problems), 2 usage error.

mod args;
mod daemon;
mod doctor;
mod hosts;
mod mounts;
mod notify;
mod peers;
mod progress;
mod proxy;
mod store_cmds;
mod system;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use hb_core::{ChunkerParams, Digest};
use hb_store::{Limits, Store, StoreOptions};
use indicatif::HumanBytes;

use args::{Cli, Cmd, ConfigCmd, ImageCmd, LayerCmd, PeersCmd, ProxyCli, ProxyCmd, SystemCmd};
use hb_cli::output::{self, Out};
use hb_cli::{
    api, config, container, daemon_client, error_chain, pass_globals, rootfs, run, self_exe, store_root, Global,
};
use hb_images::{convert, find_image, memory, mount, pull, require_image, shutdown};
use hosts::Hosts;
use progress::{Bar, Report};

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
    if matches!(cli.cmd, Cmd::Daemon { .. } | Cmd::Proxy(ProxyCli { cmd: None, .. })) {
        notify::adopt();
    }
    trust_store_bundle();
    let cli = match cli.cmd {
        Cmd::MountStandby => match standby_cli() {
            Ok(Some(c)) => c,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hb: error: {}", error_chain(&e));
                return ExitCode::from(2);
            }
        },
        _ => cli,
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hb: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// A standby mount process (the daemon's, started ahead of need) becomes the `hb mount` its
/// daemon asks for on stdin, parsed as if it had been started as one; None when the daemon went
/// away first.
fn standby_cli() -> anyhow::Result<Option<Cli>> {
    // The trust roots load while it waits.
    std::thread::spawn(hb_registry::preload_trust_roots);
    let Some(args) = mount::standby_job(std::io::stdin().lock())? else { return Ok(None) };
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().take_while(|a| a != "mount-standby").collect();
    argv.push("mount".into());
    argv.extend(args.into_iter().map(Into::into));
    let cli = Cli::try_parse_from(argv)?;
    anyhow::ensure!(matches!(cli.cmd, Cmd::Mount { background: false, .. }), "a standby mount is asked for a mount");
    Ok(Some(cli))
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
    open_store_as(g, read_only_ok, false, out)
}

/// [`open_store_for`] for a process that serves for long (`long_lived`: the mirror).
fn open_store_as(g: &Global, read_only_ok: bool, long_lived: bool, out: &Out) -> anyhow::Result<Store> {
    match open_store(g, long_lived) {
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
            let view = Store::open_read_only(&root, StoreOptions::default())
                .with_context(|| format!("opening store {} read-only", root.display()))?;
            tracing::debug!(target: hb_images::mount::PHASE, "store view opened");
            Ok(view)
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

/// Opens the store for writing; `long_lived` for the daemon and the mirror
/// ([`StoreOptions::long_lived`]).
fn open_store(g: &Global, long_lived: bool) -> anyhow::Result<Store> {
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
        long_lived,
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

/// Asks on the terminal (stderr), without echo for a `secret`; refuses when stdin is no terminal.
fn prompt(label: &str, secret: bool) -> anyhow::Result<String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let stdin = io::stdin();
    if !rustix::termios::isatty(&stdin) {
        bail!("{label}: stdin is not a terminal to ask on: give it with --username, --password-stdin (or HB_PASSWORD)");
    }
    eprint!("{label}: ");
    let saved = if secret {
        let t = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut quiet = t.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        tcsetattr(&stdin, OptionalActions::Now, &quiet).context("turning the terminal's echo off")?;
        Some(t)
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    if let Some(t) = saved {
        let _ = tcsetattr(&stdin, OptionalActions::Now, &t);
        eprintln!();
    }
    read.context("reading the terminal")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    let out = Out::new(g.json, g.quiet);
    // Commands that do not touch the store come first: they must work while another process
    // holds it.
    // `hb image ls|rm|inspect` are `hb images`, `hb rmi`, `hb inspect`.
    let cmd = match cli.cmd {
        Cmd::Image(ImageCmd::Ls { format }) => Cmd::Images { format },
        Cmd::Image(ImageCmd::Rm { images }) => Cmd::Rmi { images },
        Cmd::Image(ImageCmd::Inspect { image }) => Cmd::Inspect { image, image_only: true },
        other => other,
    };
    // The commands that go through a running daemon look it up once.
    let daemon = match &cmd {
        Cmd::Pull { plan: false, .. }
        | Cmd::Rmi { .. }
        | Cmd::Gc
        | Cmd::Image(ImageCmd::Prune { .. })
        | Cmd::System(SystemCmd::Prune { .. }) => daemon_client(g),
        _ => None,
    };
    let cmd = match cmd {
        // As `docker inspect`: a container when one has that name or id, else an image.
        Cmd::Inspect { image, image_only: false } if container::find(&store_root(g)?, &image).is_ok() => {
            return hb_cli::inspect_containers(&store_root(g)?, &[image]);
        }
        Cmd::Image(ImageCmd::Prune { all, force }) => return system::prune(g, daemon, all, force, false, &out),
        Cmd::System(SystemCmd::Prune { all, force }) => return system::prune(g, daemon, all, force, true, &out),
        Cmd::Login { registry, username, password, password_stdin, plain_http } => {
            let registry = registry.unwrap_or_else(|| "docker.io".into());
            let username = match username {
                Some(u) => u,
                None if password_stdin => bail!("--password-stdin needs --username (stdin holds the password)"),
                None => prompt(&format!("Username for {registry}"), false)?,
            };
            let password = if password_stdin {
                let mut p = String::new();
                io::stdin().read_line(&mut p)?;
                p.trim_end_matches(['\r', '\n']).to_string()
            } else if let Some(p) = password {
                out.note("WARNING! Using --password via the command line is insecure. Use --password-stdin.");
                p
            } else if let Ok(p) = std::env::var("HB_PASSWORD") {
                p
            } else {
                prompt("Password", true)?
            };
            if username.is_empty() || password.is_empty() {
                bail!("a user name and a password are needed to log in to {registry}");
            }
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
            let saved = config::docker_login(probe.registry(), &username, &password)?;
            out.note(format!("Login succeeded; credentials saved in {saved}"));
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
        Cmd::Daemon { mount_idle, snapshotter_socket, metrics_address } => {
            let file = config::load(g.config.as_deref())?;
            let socket = api::socket_path(g.socket.as_deref(), &file);
            let idle = mount_idle.or(file.daemon.mount_idle_seconds).unwrap_or(600);
            let snap = snapshotter_socket
                .or(file.daemon.snapshotter_socket.clone())
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_SNAPSHOTTER_SOCKET));
            let metrics = metrics_address
                .or(file.daemon.metrics_address.clone())
                .map(|a| {
                    a.parse::<std::net::SocketAddr>()
                        .with_context(|| format!("metrics address {a:?} (e.g. 127.0.0.1:9110)"))
                })
                .transpose()?;
            daemon::run(g, &socket, &snap, std::time::Duration::from_secs(idle), metrics, &out)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Doctor { image } => {
            let report = doctor::run(g, image.as_deref(), &|| open_store(g, false));
            if out.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", doctor::render(&report));
            }
            return Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Cmd::Peers { cmd: Some(PeersCmd::Keygen { file, force }) } => {
            peers::keygen(&file, force, &out)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Peers { cmd } => {
            let client = daemon_client(g).context("no hb daemon serves this store: LAN peers live in the daemon")?;
            let report: hb_p2p::NodeReport = match cmd {
                Some(PeersCmd::On) | Some(PeersCmd::Off) => client.call(
                    "POST",
                    "/v1/peers/switch",
                    Some(&api::PeersSwitch { on: matches!(cmd, Some(PeersCmd::On)) }),
                )?,
                _ => client.call("GET", "/v1/peers", None::<&()>)?,
            };
            peers::show(&report, &out);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Proxy(ProxyCli { cmd: Some(ProxyCmd::HashPassword), .. }) => {
            println!("{}", proxy::hash_password()?);
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Proxy(ProxyCli { cmd: Some(ProxyCmd::Stats { url }), .. }) => {
            proxy::stats(&url, g.json)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Proxy(p) => {
            // A mirror serves for long with many short-lived requests on a few threads: two
            // arenas, as the daemon and mount servers (the soak's RSS: 80 -> 46 MB at the start).
            memory::limit_malloc_arenas();
            let file = config::load(g.config.as_deref())?;
            let store = open_store_as(g, false, true, &out)?;
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
            let (config_path, root) = (g.config.clone(), store.root().to_path_buf());
            let reload = move || proxy::config(&args, &config::load(config_path.as_deref())?, &root).map(|(_, c)| c);
            proxy::run(store, addr, cfg, tls, reload)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hb", &mut script);
            match io::stdout().write_all(&script) {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e).context("writing the script"),
                _ => return Ok(ExitCode::SUCCESS),
            }
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
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
            out.note(store_cmds::gc_summary(&r));
            out.json_value(&r)?;
            return Ok(ExitCode::SUCCESS);
        }
        other => other,
    };
    // A mount reads; it can serve from a read-only view (what it fetches stays in memory).
    let reads_only = matches!(
        cmd,
        Cmd::Mount { .. }
            | Cmd::Images { .. }
            | Cmd::Inspect { .. }
            | Cmd::Export { .. }
            | Cmd::Diff { .. }
            | Cmd::Du
            | Cmd::System(SystemCmd::Df)
            | Cmd::Layer(LayerCmd::Ls)
            | Cmd::Layer(LayerCmd::Export { .. })
    );
    let mut shutdown = None;
    if matches!(cmd, Cmd::Mount { .. }) {
        // A mount serves for long, mostly waiting (before any thread is started).
        memory::limit_malloc_arenas();
        shutdown = Some(shutdown::Shutdown::install()?);
    }
    if matches!(
        cmd,
        Cmd::Mount { plain_http: false, .. }
            | Cmd::Pull { plain_http: false, .. }
            | Cmd::Convert { plain_http: false, .. }
            | Cmd::Optimize { plain_http: false, .. }
    ) {
        // The system's trust roots (tens of ms of file reads and parsing) load on the other core
        // while the store opens (and a mount's indexes decode): these commands' clients check a
        // certificate soon, unless told the registry speaks plain HTTP (then nothing reads them).
        std::thread::spawn(hb_registry::preload_trust_roots);
    }
    let store = std::sync::Arc::new(open_store_for(g, reads_only, &out)?);
    match cmd {
        Cmd::Login { .. }
        | Cmd::Logout { .. }
        | Cmd::Umount { .. }
        | Cmd::Container(_)
        | Cmd::Daemon { .. }
        | Cmd::Proxy(_)
        | Cmd::Config(_)
        | Cmd::Completion { .. }
        | Cmd::Man { .. }
        | Cmd::Peers { .. }
        | Cmd::Image(_)
        | Cmd::System(SystemCmd::Prune { .. })
        | Cmd::Doctor { .. } => {
            unreachable!("handled before the store is opened")
        }
        Cmd::System(SystemCmd::Df) => return system::df(g, &store, &out),
        Cmd::Mount {
            image,
            dir,
            prefetch,
            bandwidth,
            no_passthrough,
            threads,
            background: _,
            plain_http,
            layers,
            platform,
        } => {
            let args = mount::MountArgs {
                platform: platform.map(|p| p.parse()).transpose().map_err(anyhow::Error::msg)?,
                image,
                dir,
                prefetch,
                bandwidth: bandwidth.as_deref().map(parse_rate).transpose()?,
                passthrough: !no_passthrough,
                threads,
                plain_http,
                layers,
                learn: true,
                command: None,
            };
            let rt = runtime()?;
            let _pid = mount::PidFile::create(store.root(), &args.dir);
            let report = Report::new(&out);
            let (daemon, keeper) = mounts::DaemonSource::roles(g, &store);
            let m = mount::mount_image(
                &Hosts::of(g),
                &rt,
                store.clone(),
                &args,
                daemon,
                keeper,
                shutdown.as_ref(),
                None,
                &report,
            )?;
            mount::serve(&store, m, &report)?;
        }
        Cmd::Convert { src, dst, plain_http, platform, zstd_level } => {
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
                zstd_level,
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
                let p = pull::plan(&rt, &store, &registry, &resolved)?;
                if out.json {
                    out.json_value(&p)?;
                } else {
                    let mut w = io::stdout().lock();
                    for l in &p.fetch {
                        let how = match &l.via {
                            hb_images::delta::Via::Chunks { chunks, of, .. } => {
                                format!("{chunks} of {of} chunks (layer blob {})", HumanBytes(l.size))
                            }
                            hb_images::delta::Via::Whole { reason } => format!("whole layer: {reason}"),
                            hb_images::delta::Via::Present => String::new(),
                        };
                        writeln!(w, "fetch   {} {} {how}", l.digest, HumanBytes(l.bytes))?;
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
                // No node in this process: with peers on, a daemon owns the store and pulls itself.
                let report = pull::pull_lazy(&rt, store.clone(), std::sync::Arc::new(registry), resolved, None)?;
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
                let hosts = Hosts::of(g);
                let origin = hb_images::delta::Origin {
                    registries: &hosts,
                    plain_http,
                    registry: std::sync::Arc::new(registry),
                };
                let report = pull::pull(&rt, store.clone(), origin, resolved, &Report::new(&out))?;
                if out.json {
                    out.json_value(&report)?;
                } else {
                    println!("{}", report.digest);
                    out.note(pull::summary(&report));
                }
            }
        }
        other => return store_cmds::run(other, &store, &out),
    }
    Ok(ExitCode::SUCCESS)
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
