//! The store-free half of the `hb` command, shared by its two binaries:
//!
//! - `hb` (src/front.rs) links only this crate: no RocksDB, FUSE or registry code, so it starts in
//!   about a millisecond. It serves the container commands itself (`hb run` when a daemon serves
//!   the image; `ps`, `stop`, `kill`, `rm`, `logs`, `exec`) and hands every other command to
//!   `hb-engine` by exec (same process, same arguments).
//! - `hb-engine` (src/main.rs) is every command, the store's owner: pulls, mounts, the daemon, the
//!   proxy, and `hb run` without a daemon (it then serves the image's mount itself).
//!
//! Here: the shared command line ([`args`]), the daemon's API and a blocking client ([`api`]),
//! configuration ([`config`]), containers' state and lifecycle ([`container`]), their logs
//! ([`logs`]), `hb run` and its monitor ([`run`]), and output helpers ([`output`]).

pub mod api;
pub mod args;
pub mod config;
pub mod container;
pub mod logs;
pub mod output;
pub mod probe;
pub mod rootfs;
pub mod run;
pub mod teardown;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use args::{ContainerCmd, ContainerSub, Global, PsArgs, RmArgs, RunCli};
use output::Out;

/// What a container command came to.
pub enum Outcome {
    /// Done here, with this exit code.
    Done(ExitCode),
    /// Needs the store (no daemon serves the image): `hb` runs the same command in `hb-engine`.
    /// Nothing was changed yet.
    Engine,
}

/// Runs a container command. `local` serves images from this process's store when no daemon
/// does (`hb-engine`); without it the command answers [`Outcome::Engine`] instead.
pub fn container_command(
    g: &Global,
    cmd: ContainerCmd,
    local: Option<&dyn run::LocalImages>,
) -> anyhow::Result<Outcome> {
    let out = Out::new(g.json, g.quiet);
    let done = |code| Ok(Outcome::Done(code));
    match cmd {
        // As `docker run`: 125 when hb failed, 126/127 when the container's command cannot be
        // run or is not there; else the container's own exit code.
        ContainerCmd::Run(r) => {
            let req = store_root(g).and_then(|root| Ok((root, run::RunRequest::from_cli(*r)?)));
            match req.and_then(|(root, req)| run::run(g, &root, req, &out, local)) {
                Err(e) => {
                    eprintln!("hb: error: {}", error_chain(&e));
                    done(ExitCode::from(run::failure_code(&e)))
                }
                ok => ok,
            }
        }
        ContainerCmd::ContainerMonitor { id } => {
            let dir = container::containers_dir(&store_root(g)?).join(&id);
            run::monitor(g, &dir, None, local, &out)
        }
        ContainerCmd::ContainerCleanup { dir, remove } => {
            teardown::cleanup(&dir, remove);
            done(ExitCode::SUCCESS)
        }
        ContainerCmd::Ps(args) | ContainerCmd::Container { cmd: ContainerSub::Ls(args) } => {
            let format = args.format.as_deref().map(output::Format::parse);
            container::ps(&store_root(g)?, args.all, g.quiet, args.no_trunc, g.json, format.as_ref())?;
            done(ExitCode::SUCCESS)
        }
        ContainerCmd::Stop { containers, time } => done(each_container(&store_root(g)?, &containers, |dir, s| {
            container::stop(dir, s, std::time::Duration::from_secs(time))
        })?),
        ContainerCmd::Kill { containers, signal } => {
            let signal = signal.trim_start_matches("SIG").to_string();
            done(each_container(&store_root(g)?, &containers, |dir, s| container::kill(dir, s, &signal))?)
        }
        ContainerCmd::Rm(RmArgs { containers, force })
        | ContainerCmd::Container { cmd: ContainerSub::Rm(RmArgs { containers, force }) } => {
            done(each_container(&store_root(g)?, &containers, |dir, s| container::rm(dir, s, force))?)
        }
        ContainerCmd::Wait { containers } => done(container::wait(&store_root(g)?, &containers)?),
        ContainerCmd::Container { cmd: ContainerSub::Prune { force } } => {
            let root = store_root(g)?;
            if !force && !output::confirm(&["all stopped containers"], &out)? {
                return done(ExitCode::SUCCESS);
            }
            let (removed, freed) = container::prune(&root)?;
            print_deleted("Deleted Containers:", &removed);
            println!("Total reclaimed space: {}", output::human_size(freed));
            done(ExitCode::SUCCESS)
        }
        ContainerCmd::Container { cmd: ContainerSub::Inspect { containers } } => {
            done(inspect_containers(&store_root(g)?, &containers)?)
        }
        ContainerCmd::Logs { container: c, follow, tail, timestamps, since } => {
            let since = since.as_deref().map(logs::parse_since).transpose()?;
            let (dir, s) = container::find(&store_root(g)?, &c)?;
            logs::logs(&dir, &s, &logs::LogFilter { follow, tail, timestamps, since })?;
            done(ExitCode::SUCCESS)
        }
        ContainerCmd::Exec { container: c, command, interactive, tty, env, workdir, user } => {
            let (dir, s) = container::find(&store_root(g)?, &c)?;
            let opts = hb_runtime::ExecOptions { args: command, env: env_values(env), workdir, user: None, tty };
            let code = container::exec(&dir, &s, opts, user.as_deref(), interactive)?;
            done(ExitCode::from(code.clamp(0, 255) as u8))
        }
    }
}

/// `hb-engine`, installed beside `hb`.
pub fn engine_exe() -> PathBuf {
    self_exe().with_file_name("hb-engine")
}

/// An error and its causes joined with ": ", skipping a cause whose text the message already
/// holds (library errors often format their source into their own message).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let t = cause.to_string();
        if text.contains(&t) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&t);
    }
    text
}

/// This program, to start helpers with (mount servers, container monitors). After an upgrade
/// replaced the file, a long-running daemon's own path names nothing (or the new version): the
/// kernel's link to the running image still starts this version.
pub fn self_exe() -> PathBuf {
    match std::env::current_exe() {
        Ok(p) if p.exists() => p,
        _ => PathBuf::from("/proc/self/exe"),
    }
}

/// The config file this process runs with, read once (a container start asks for the store
/// root and the daemon's socket several times).
pub fn file_config(g: &Global) -> anyhow::Result<&'static config::FileConfig> {
    static FILE: std::sync::OnceLock<config::FileConfig> = std::sync::OnceLock::new();
    if let Some(f) = FILE.get() {
        return Ok(f);
    }
    let f = config::load(g.config.as_deref())?;
    Ok(FILE.get_or_init(|| f))
}

/// Where this command looks for the daemon.
pub fn socket_path(g: &Global) -> anyhow::Result<PathBuf> {
    Ok(api::socket_path(g.socket.as_deref(), file_config(g)?))
}

/// The running daemon that owns this command's store, if any.
pub fn daemon_client(g: &Global) -> Option<api::Client> {
    api::Client::find(&socket_path(g).ok()?, &store_root(g).ok()?)
}

/// Adds the global flags a child hb process needs to act on the same store and settings.
pub fn pass_globals(cmd: &mut std::process::Command, g: &Global, root: &Path) {
    cmd.arg("--root").arg(root);
    if let Some(c) = &g.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(h) = &g.hosts_dir {
        cmd.arg("--hosts-dir").arg(h);
    }
    if let Some(s) = &g.socket {
        cmd.arg("--socket").arg(s);
    }
    for _ in 0..g.verbose {
        cmd.arg("--verbose");
    }
}

/// The store's root folder (flag, environment, config file, default), without opening it.
pub fn store_root(g: &Global) -> anyhow::Result<PathBuf> {
    config::store_root(g.root.as_deref(), file_config(g)?)
}

/// `-e KEY=VALUE` as given; `-e KEY` takes KEY's value from hb's environment, as docker does.
pub fn env_values(env: Vec<String>) -> Vec<String> {
    env.into_iter()
        .map(|e| match e.split_once('=') {
            Some(_) => e,
            None => format!("{e}={}", std::env::var(&e).unwrap_or_default()),
        })
        .collect()
}

/// Prints what a prune removed, as docker does: a heading and one line per item (nothing when
/// nothing was removed).
pub fn print_deleted(heading: &str, removed: &[String]) {
    if !removed.is_empty() {
        println!("{heading}");
        for r in removed {
            println!("{r}");
        }
        println!();
    }
}

/// `hb container inspect` (and `hb inspect` of containers): one JSON array of every named
/// container's state; exit code 1 when any was not found (the others are still printed).
pub fn inspect_containers(root: &Path, names: &[String]) -> anyhow::Result<ExitCode> {
    let mut found = Vec::new();
    let mut failed = false;
    for n in names {
        match container::find(root, n) {
            Ok((dir, s)) => found.push(container::inspect(&dir, &s)),
            Err(e) => {
                eprintln!("hb: error: {}", error_chain(&e));
                failed = true;
            }
        }
    }
    serde_json::to_writer_pretty(std::io::stdout().lock(), &found)?;
    println!();
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Applies `f` to each named container, printing each name it succeeded on (as docker does) and
/// each failure on stderr; exit code 1 when any failed.
fn each_container(
    root: &Path,
    names: &[String],
    f: impl Fn(&Path, &container::State) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for n in names {
        match container::find(root, n).and_then(|(dir, s)| f(&dir, &s)) {
            Ok(()) => println!("{n}"),
            Err(e) => {
                eprintln!("hb: error: {}", error_chain(&e));
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
