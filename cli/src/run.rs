//! `hb run`: a container straight from an image's mount. The image is mounted (lazily when it was
//! pulled lazily; pulled first when missing), an overlayfs with a per-container upper dir goes on
//! top, and an OCI runtime (runc) runs the spec `hb-runtime` builds.
//!
//! The process that serves the mount and waits on the runtime is the container's *monitor*: `hb run`
//! itself in the foreground (the container's exit code is hb's), or, with `-d`, a detached
//! `hb container-monitor` that outlives the `hb run` that started it. The monitor records the
//! container's state (see `container.rs`), writes its output to `log.json` (and, in the
//! foreground, to the terminal), and unmounts everything when the container ends.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hb_runtime::{ImageConfig, RunOptions};
use serde::{Deserialize, Serialize};

use crate::api::ImageMount;
use crate::container::{self, State, Status};
use crate::output::Out;
use crate::teardown::{cleanup, move_to_removing, sweep_removing};
use crate::{Global, Outcome, RunCli};

/// Images served from this process's own store when no daemon serves them: `hb-engine`
/// implements it (it links the store and FUSE); `hb` has none and hands the command over.
pub trait LocalImages {
    /// Makes sure `image` is in the store, pulling it (with progress) when missing.
    fn ensure(
        &self,
        g: &Global,
        image: &str,
        plain_http: bool,
        pull: crate::api::PullPolicy,
        platform: Option<&str>,
        out: &Out,
    ) -> anyhow::Result<()>;
    /// Lets go of the store before another process (a detached monitor) opens it.
    fn release(&self) {}
    /// Serves `image`'s merged rootfs read-only at `dir` from this process: the image's config
    /// (JSON) and the mount. `run` says what the container will run (its `--entrypoint` and
    /// arguments, where not the image's): a first start fetches that program's files first.
    fn mount(
        &self,
        g: &Global,
        image: &str,
        plain_http: bool,
        run: &hb_runtime::RunOptions,
        dir: &Path,
        out: &Out,
    ) -> anyhow::Result<(String, Box<dyn LocalMount>)>;
}

/// A mount [`LocalImages::mount`] made.
pub trait LocalMount {
    /// Unmounts it and waits for its server to end.
    fn unmount(self: Box<Self>);
}

/// `hb run` as asked; kept in the container's folder (`request.json`) for its monitor.
#[derive(Serialize, Deserialize)]
pub struct RunRequest {
    pub image: String,
    pub opts: RunOptions,
    pub name: Option<String>,
    pub runtime: Option<String>,
    pub plain_http: bool,
    /// Keep stdin attached (`-i`); otherwise the container reads /dev/null.
    pub interactive: bool,
    pub rm: bool,
    pub detach: bool,
    /// `--log-opt`: rotation of `log.json`.
    #[serde(default)]
    pub log: crate::logs::LogOptions,
    #[serde(default)]
    pub pull: crate::api::PullPolicy,
    /// `--platform` (os/arch[/variant]): the platform to pull.
    #[serde(default)]
    pub platform: Option<String>,
}

impl RunRequest {
    /// The request `hb run`'s flags make: env files read, `--mount`s checked and sorted into
    /// volumes and tmpfs mounts, `--log-opt`s parsed.
    pub fn from_cli(r: RunCli) -> anyhow::Result<Self> {
        let mut env = Vec::new();
        for f in &r.env_file {
            let text = std::fs::read_to_string(f).with_context(|| format!("--env-file {}", f.display()))?;
            env.extend(parse_env_file(&text).with_context(|| format!("--env-file {}", f.display()))?);
        }
        env.extend(crate::env_values(r.env));
        let (mut volumes, mut tmpfs) = (r.volume, r.tmpfs);
        for m in r.mount {
            match m {
                hb_runtime::MountArg::Bind(v) if !v.host.exists() => {
                    bail!("invalid --mount: bind source path does not exist: {}", v.host.display())
                }
                hb_runtime::MountArg::Bind(v) => volumes.push(v),
                hb_runtime::MountArg::Tmpfs(t) => tmpfs.push(t),
            }
        }
        let opts = RunOptions {
            entrypoint: r.entrypoint,
            cmd: r.command,
            env,
            workdir: r.workdir,
            user: r.user,
            volumes,
            tmpfs,
            cap_add: r.cap_add,
            cap_drop: r.cap_drop,
            init: if r.init { Some(init_program()?) } else { None },
            read_only: r.read_only,
            network: if r.network == "none" { hb_runtime::Network::None } else { hb_runtime::Network::Host },
            tty: r.tty,
            memory: r.memory,
            cpus: r.cpus,
            pids_limit: r.pids_limit,
            hostname: r.hostname,
            // As many open files as hb itself may have (docker gives 1048576 where allowed).
            nofile: rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.map(|m| m.min(1 << 20)),
        };
        Ok(RunRequest {
            image: r.image,
            opts,
            name: r.name,
            runtime: r.runtime,
            plain_http: r.plain_http,
            interactive: r.interactive,
            rm: r.rm,
            detach: r.detach,
            log: crate::logs::LogOptions::parse(&r.log_opt)?,
            pull: r.pull,
            platform: r.platform,
        })
    }
}

/// `--init`'s program on this host: docker's `docker-init` (Debian links it to tini-static), else
/// `tini-static`; statically linked, as it runs inside any image.
fn init_program() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let dirs: Vec<PathBuf> =
        std::env::split_paths(&path).chain([PathBuf::from("/usr/libexec/docker"), PathBuf::from("/usr/bin")]).collect();
    for name in ["docker-init", "tini-static"] {
        if let Some(found) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            return found.canonicalize().with_context(|| format!("--init: {}", found.display()));
        }
    }
    bail!("--init needs docker-init or tini-static on this machine (Debian and Ubuntu: apt install tini)")
}

/// An `--env-file`, as docker reads one: `KEY=VALUE` lines taken as they are (no quotes
/// removed), a bare `KEY` takes hb's value (left out when hb has none), blank lines and `#`
/// comments skipped.
pub fn parse_env_file(text: &str) -> anyhow::Result<Vec<String>> {
    let mut env = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = line.split_once('=').map_or(line, |(k, _)| k);
        if key.is_empty() || key.contains(char::is_whitespace) {
            bail!("line {}: {key:?} is not a variable name (KEY=VALUE, no spaces in KEY)", n + 1);
        }
        if line.contains('=') {
            env.push(line.to_string());
        } else if let Ok(v) = std::env::var(key) {
            env.push(format!("{key}={v}"));
        }
    }
    Ok(env)
}

/// Holds `<containers>/.lock` while a container's name is chosen and its folder made, so two
/// `hb run --name x` at once cannot both take the name.
pub fn lock_containers(root: &Path) -> anyhow::Result<std::fs::File> {
    let dir = container::containers_dir(root);
    let open = || std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(dir.join(".lock"));
    let f = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            open()?
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}/.lock", dir.display())),
    };
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(f)
}

/// `hb run`: makes sure the image is there (the daemon pulls what is missing and serves its
/// mount; without a daemon, `local`'s store, with progress, as docker pulls before it creates a
/// container), creates the container, then runs it here (foreground) or in a detached monitor
/// (`-d`, printing the container id once it runs). Without a daemon or `local`: [`Outcome::Engine`],
/// nothing done.
pub fn run(
    g: &Global,
    root: &Path,
    req: RunRequest,
    out: &Out,
    local: Option<&dyn LocalImages>,
) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    if req.detach && req.opts.tty {
        bail!("-d with -t is not supported: a detached container has no terminal to attach (use -d without -t; `hb exec -it` gives a shell)");
    }
    let runtime = crate::probe::detect_runtime(req.runtime.as_deref())?;
    tracing::debug!(us = t0.elapsed().as_micros() as u64, "runtime found");
    // A detached monitor asks the daemon itself.
    // A foreground `--rm` container takes the spare the daemon advertised for the image, if
    // there is one: no request (its hand-over tells the daemon).
    // `--pull always` asks the daemon (a spare is of the image as it was).
    let claimed = (req.rm && !req.detach && req.pull != crate::api::PullPolicy::Always && req.platform.is_none())
        .then(|| crate::api::claim_ready(root, &req.image, req.plain_http))
        .flatten();
    let shared = match claimed {
        Some(m) => Some(m),
        None if req.detach => None,
        None => daemon_mount(g, &req, out.quiet || out.json)?,
    };
    tracing::debug!(us = t0.elapsed().as_micros() as u64, daemon = shared.is_some(), "image ready");
    if shared.is_none() && !(req.detach && crate::daemon_client(g).is_some()) {
        match local {
            None => return Ok(Outcome::Engine),
            Some(l) => {
                l.ensure(g, &req.image, req.plain_http, req.pull, req.platform.as_deref(), out)?;
                if req.detach {
                    l.release();
                }
            }
        }
    }
    sweep_removing(root);
    // A container folder the daemon made ready (overlay mounted) for this image, if it gave one.
    let spare = shared.as_ref().and_then(|m| m.spare.clone()).filter(|p| {
        p.parent() == Some(container::containers_dir(root).as_path())
            && p.file_name().and_then(|n| n.to_str()).is_some_and(container::is_id)
    });
    let id = match &spare {
        Some(p) => p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string(),
        None => container::new_id(),
    };
    let dir = container::containers_dir(root).join(&id);
    // With the daemon's image mount a foreground `--rm` container is handed over to the daemon
    // as it starts (`become_runtime`): its state says so from the start, written once.
    let hand_over = req.rm && !req.detach && shared.is_some();
    let command = match &shared {
        Some(m) if hand_over => ImageConfig::from_json(m.config.as_bytes())
            .ok()
            .and_then(|image| hb_runtime::process_args(&image, &req.opts).ok())
            .unwrap_or_else(|| req.opts.cmd.clone()),
        _ => req.opts.cmd.clone(),
    };
    let state = {
        let _lock = lock_containers(root)?;
        let name = match container::unique_name(root, req.name.as_deref(), &id) {
            Ok(n) => n,
            Err(e) => {
                if spare.is_some() {
                    cleanup(&dir, true);
                }
                return Err(e);
            }
        };
        if spare.is_none() {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let state = State {
            id: id.clone(),
            name,
            image: req.image.clone(),
            command,
            created: container::now(),
            started: hand_over.then(container::now),
            finished: None,
            status: if hand_over { Status::Running } else { Status::Created },
            exit_code: None,
            error: None,
            monitor: if req.detach { None } else { container::this_monitor() },
            runtime,
            rm: req.rm,
            detached: req.detach,
            handed_over: hand_over,
        };
        let saved = state
            .save_first(&dir)
            // The request, for the detached monitor that runs the container (`hb run` in the
            // foreground has it in memory).
            .and_then(|_| {
                if req.detach {
                    std::fs::write(dir.join("request.json"), serde_json::to_vec_pretty(&req)?)?;
                }
                Ok(())
            });
        if let Err(e) = saved {
            cleanup(&dir, true);
            return Err(e);
        }
        state
    };
    tracing::debug!(us = t0.elapsed().as_micros() as u64, spare = spare.is_some(), "container created");
    if req.detach {
        start_detached(g, root, &dir, &state, out).map(Outcome::Done)
    } else {
        monitor_loaded(g, &dir, shared, local, out, Some((req, state, spare.is_some())))
    }
}

/// The exit code of an `hb run` that failed, as docker's: 127 or 126 when the container's
/// command is not there or cannot be run (`rootfs::CommandError`), 125 when hb itself failed.
pub fn failure_code(e: &anyhow::Error) -> u8 {
    e.chain().find_map(|c| c.downcast_ref::<crate::rootfs::CommandError>()).map_or(125, |c| c.code)
}

/// The daemon's mount of the container's image (it pulls the image first when missing), or
/// `Ok(None)` when no daemon serves this store. Says so when the daemon takes a while.
fn daemon_mount(g: &Global, req: &RunRequest, quiet: bool) -> anyhow::Result<Option<ImageMount>> {
    let Some(client) = crate::api::Client::at(&crate::socket_path(g)?) else { return Ok(None) };
    let root = crate::store_root(g)?;
    let mount = crate::api::MountRequest {
        image: req.image.clone(),
        pull: req.pull,
        platform: req.platform.clone(),
        plain_http: req.plain_http,
        root: Some(root),
        layers: None,
        spare: !req.detach,
    };
    client.image_mount(&mount, || {
        if !quiet {
            eprintln!("waiting for the hb daemon to pull and mount {} ...", req.image);
        }
    })
}

/// Starts `hb container-monitor ID` detached (own session, no terminal) and returns once the
/// container runs (printing its id), or with the reason it could not start.
fn start_detached(g: &Global, root: &Path, dir: &Path, state: &State, out: &Out) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(dir.join("monitor.log"))?;
    let mut cmd = std::process::Command::new(crate::self_exe());
    crate::pass_globals(&mut cmd, g, root);
    cmd.args(["-q", "container-monitor", &state.id]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // A process group of its own: no Ctrl-C from this terminal (and it ignores SIGHUP).
    cmd.process_group(0);
    let mut child = cmd.spawn().context("starting the container's monitor")?;
    let started = Instant::now();
    loop {
        let s = State::load(dir);
        let exited = child.try_wait()?;
        match s {
            Ok(s) if s.error.is_some() && s.started.is_none() => {
                let _ = std::fs::remove_dir_all(dir);
                let message = s.error.unwrap_or_default();
                return Err(match s.exit_code {
                    Some(code @ (126 | 127)) => crate::rootfs::CommandError { code: code as u8, message }.into(),
                    _ => anyhow::anyhow!(message),
                });
            }
            Ok(s) if s.error.is_some() => bail!("{}", s.error.unwrap_or_default()),
            // The runtime gave up before it made the container (no pid file): say why, as
            // `docker run -d` does, instead of printing the id of a container that never ran.
            Ok(s) if s.status == Status::Exited && !dir.join("pid").exists() => {
                let log = std::fs::read_to_string(dir.join("log.json")).unwrap_or_default();
                let why: Vec<String> = log
                    .lines()
                    .filter_map(|l| serde_json::from_str::<crate::logs::LogLine>(l).ok())
                    .map(|l| l.log.trim_end().to_string())
                    .collect();
                bail!(
                    "container {} did not start (exit code {}): {}",
                    s.name,
                    s.exit_code.unwrap_or(-1),
                    why.last().map_or("no output", String::as_str)
                );
            }
            Ok(s) if s.status == Status::Exited || (s.status == Status::Running && dir.join("pid").exists()) => {
                println!("{}", s.id);
                return Ok(ExitCode::SUCCESS);
            }
            Err(_) if exited.is_some() && !dir.exists() => {
                // An --rm container that ended at once: its monitor removed it.
                println!("{}", state.id);
                return Ok(ExitCode::SUCCESS);
            }
            _ => {}
        }
        if let Some(status) = exited {
            let text = std::fs::read_to_string(dir.join("monitor.log")).unwrap_or_default();
            let s = State::load(dir).ok();
            if s.as_ref().is_some_and(|s| s.status == Status::Exited) {
                continue;
            }
            let _ = std::fs::remove_dir_all(dir);
            bail!("the container's monitor exited ({status}) before the container started:\n{}", text.trim_end());
        }
        if started.elapsed() > Duration::from_secs(300) {
            out.note(format!("container {} has not started after 300 s; see `hb ps -a`", state.name));
            bail!("timed out waiting for container {} to start", state.name);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Serves the container in `dir`: has the daemon's mount of its image (`shared`, or asked for
/// here) or mounts it from `local`, builds its bundle, runs the runtime, records its state and
/// output, cleans up. Returns the container's exit code; [`Outcome::Engine`] (nothing done) when
/// neither a daemon nor `local` serves the image.
pub fn monitor(
    g: &Global,
    dir: &Path,
    shared: Option<ImageMount>,
    local: Option<&dyn LocalImages>,
    out: &Out,
) -> anyhow::Result<Outcome> {
    monitor_loaded(g, dir, shared, local, out, None)
}

/// [`monitor`], with the container's request and state as `hb run` just wrote them (`None`: read
/// from the folder), and whether the folder is a spare the daemon prepared (its overlay mounted).
fn monitor_loaded(
    g: &Global,
    dir: &Path,
    shared: Option<ImageMount>,
    local: Option<&dyn LocalImages>,
    out: &Out,
    loaded: Option<(RunRequest, State, bool)>,
) -> anyhow::Result<Outcome> {
    let (req, state, prepared) = match loaded {
        Some((req, state, prepared)) => (req, Some(state), prepared),
        None => {
            let raw = std::fs::read(dir.join("request.json"))
                .with_context(|| format!("reading {}/request.json", dir.display()))?;
            (serde_json::from_slice::<RunRequest>(&raw)?, None, false)
        }
    };
    let shared = match shared {
        Some(m) => Ok(Some(m)),
        None => daemon_mount(g, &req, out.quiet || out.json || req.detach),
    };
    if local.is_none() && matches!(shared, Ok(None)) {
        return Ok(Outcome::Engine);
    }
    let mut state = match state {
        Some(s) => s,
        None => State::load(dir)?,
    };
    let me = container::this_monitor();
    if state.monitor != me {
        // A detached monitor records itself (`hb run` in the foreground already did).
        state.monitor = me;
        state.save(dir)?;
    }
    let (own_lower, upper, work, rootfs) = (dir.join("lower"), dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    let mut mount: Option<Box<dyn LocalMount>> = None;
    let result = (|| -> anyhow::Result<i32> {
        if !prepared {
            for d in [&upper, &work, &rootfs] {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
        }
        let (lower, config) = match (shared?, local) {
            (Some(m), _) => (m.path, m.config),
            (None, Some(local)) => {
                std::fs::create_dir_all(&own_lower)?;
                let (config, m) = local.mount(g, &req.image, req.plain_http, &req.opts, &own_lower, out)?;
                mount = Some(m);
                (own_lower.clone(), config)
            }
            (None, None) => unreachable!("checked above"),
        };
        let image = ImageConfig::from_json(config.as_bytes())?;
        tracing::debug!(lower = %lower.display(), "image mounted");
        let points = crate::rootfs::mount_points(req.opts.network == hb_runtime::Network::Host);
        if prepared {
            // The spare has every mount point; this spec may use fewer.
            if points.len() < crate::rootfs::MOUNT_POINTS.len() {
                let unused: Vec<_> = crate::rootfs::MOUNT_POINTS.into_iter().filter(|p| !points.contains(p)).collect();
                crate::rootfs::drop_mount_points(&lower, &rootfs, &unused);
            }
        } else {
            crate::rootfs::make_mount_points(&lower, &upper, &points);
            crate::rootfs::overlay(&lower, &upper, &work, &rootfs)?;
            tracing::debug!("overlay mounted");
            tracing::debug!(target: "hb::phase", "rootfs ready");
        }
        // The image's passwd and group files, only for a user to resolve (root needs neither).
        let user_spec = req.opts.user.clone().or_else(|| image.user.clone()).filter(|u| !u.trim().is_empty());
        let read = |p: &str| user_spec.as_ref().and_then(|_| std::fs::read_to_string(lower.join(p)).ok());
        let user = hb_runtime::resolve_user(
            user_spec.as_deref(),
            read("etc/passwd").as_deref(),
            read("etc/group").as_deref(),
        )?;
        let hostname = req.opts.hostname.clone().unwrap_or_else(|| state.short_id().to_string());
        let spec =
            hb_runtime::build_spec(&image, &req.opts, &user, &rootfs, &hostname, Some(&format!("/hb/{}", state.id)))?;
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
        state.command = hb_runtime::process_args(&image, &req.opts)?;
        tracing::debug!("bundle written");
        // A command that is not there, or cannot be run, fails as `docker run` reports it (127,
        // 126), not as whatever the runtime makes of it.
        if let Some(p) = spec.process() {
            // With --init the command is the init's argument after `--`.
            let skip = if req.opts.init.is_some() { 2 } else { 0 };
            let program = p.args().as_ref().and_then(|a| a.get(skip)).map_or("", String::as_str);
            let mounts: Vec<PathBuf> = spec.mounts().iter().flatten().map(|m| m.destination().clone()).collect();
            let cwd = p.cwd().to_string_lossy();
            let env = p.env().clone().unwrap_or_default();
            let volumes = !req.opts.volumes.is_empty();
            crate::rootfs::check_command(&rootfs, program, &env, &cwd, &mounts, volumes, &user)?;
            tracing::debug!("command found");
        }
        if req.rm && !req.detach && mount.is_none() {
            // Nothing is left to do here once the container ends but to report its exit code
            // and have it cleaned up: the daemon takes the cleanup, and this process becomes
            // the runtime, whose exit code is the container's.
            if let Some(e) = become_runtime(g, dir, &mut state, &req)? {
                return Err(anyhow::Error::new(e).context(format!("running {}", state.runtime.display())));
            }
        }
        run_runtime(dir, &mut state, &req)
    })();
    // Whatever happened: the runtime's state (`run` deletes it when the container ends normally),
    // the overlay, the image mount.
    if result.is_err() {
        let _ = std::process::Command::new(&state.runtime).args(["delete", "--force", &state.id]).output();
    }
    state.status = Status::Exited;
    state.finished = Some(container::now());
    match &result {
        Ok(code) => state.exit_code = Some(*code),
        Err(e) => {
            state.error = Some(crate::error_chain(e));
            // (Read back by `hb run -d`, which reports it as its own exit code.)
            state.exit_code = e.downcast_ref::<crate::rootfs::CommandError>().map(|c| c.code.into());
        }
    }
    // A container that never started goes; a detached one's folder stays for `hb run` to read
    // the error from (it removes it then).
    let remove = state.rm || (result.is_err() && state.started.is_none() && !state.detached);
    // The exit code outlives a removed folder for a minute, for an `hb wait` of an `--rm`
    // container (`sweep_removing` deletes the record later).
    if let (true, Some(code)) = (remove, state.exit_code) {
        let record = container::exit_record(dir);
        if record.parent().is_some_and(|p| std::fs::create_dir_all(p).is_ok()) {
            let _ = std::fs::write(&record, code.to_string());
        }
    }
    match mount {
        // This process serves the image mount: everything is torn down here, in order.
        Some(m) => {
            let _ = rustix::mount::unmount(&rootfs, rustix::mount::UnmountFlags::DETACH);
            m.unmount();
            let _ = std::fs::remove_dir(&own_lower);
            if !remove {
                state.save(dir)?;
            }
            cleanup(dir, remove);
        }
        // The daemon's mount stays. Unmounting the overlay can wait tens of milliseconds on the
        // kernel (the container's mount namespace is still being torn down): the daemon does it
        // and removes the folder (a detached helper when it cannot), and the exit is reported at
        // once. A removed container leaves the listing at once (its folder moves under
        // `.removing/`).
        None => {
            let target =
                if remove { move_to_removing(dir).unwrap_or_else(|| dir.to_path_buf()) } else { dir.to_path_buf() };
            if !remove {
                state.save(dir)?;
            }
            // One datagram to the daemon; its API when that is refused; else a helper process.
            let socket = crate::socket_path(g)?;
            let req = crate::api::CleanupRequest { dir: target.clone(), remove, when_exits: false };
            let handed = crate::api::send_cleanup(&socket, &req)
                || crate::api::Client::at(&socket).is_some_and(|c| {
                    c.call::<serde_json::Value>("POST", "/v1/containers/cleanup", Some(&req))
                        .map_err(|e| tracing::debug!(error = %e, "the daemon did not take the cleanup"))
                        .is_ok()
                });
            if !handed && !spawn_cleanup(g, &target, remove) {
                cleanup(&target, remove);
            }
        }
    }
    tracing::debug!("cleaned up");
    let code = result?;
    Ok(Outcome::Done(ExitCode::from(code.clamp(0, 255) as u8)))
}

/// Starts `hb container-cleanup` for `dir` in the background; false if it could not start.
fn spawn_cleanup(g: &Global, dir: &Path, remove: bool) -> bool {
    use std::os::unix::process::CommandExt;
    let exe = crate::self_exe();
    let mut cmd = std::process::Command::new(exe);
    if let Ok(root) = crate::store_root(g) {
        crate::pass_globals(&mut cmd, g, &root);
    }
    cmd.arg("container-cleanup").arg(dir);
    if remove {
        cmd.arg("--remove");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn().is_ok()
}

/// `hb run --rm` in the foreground on the daemon's image mount: hands the container over to
/// the daemon (it cleans up when this process exits) and execs `runtime run` in this process.
/// The runtime passes signals on to the container and exits with its exit code, which is what
/// hb would do around it; output goes straight to hb's stdout and stderr (no `log.json`: the
/// container is removed when it ends). Returns only when it did not become the runtime:
/// `Ok(None)` when the daemon did not take the container (the caller runs the runtime as a
/// child then), `Ok(Some(e))` when the exec failed.
fn become_runtime(
    g: &Global,
    dir: &Path,
    state: &mut State,
    req: &RunRequest,
) -> anyhow::Result<Option<std::io::Error>> {
    use std::os::unix::process::CommandExt;
    if !crate::api::hand_over(&crate::socket_path(g)?, dir) {
        tracing::debug!("the daemon did not take the container; monitoring it here");
        if state.handed_over {
            (state.status, state.started, state.handed_over) = (Status::Created, None, false);
            state.save(dir)?;
        }
        return Ok(None);
    }
    // `hb run` wrote the state as handed over when it made the container (one write fewer).
    if !state.handed_over {
        (state.status, state.started, state.handed_over) = (Status::Running, Some(container::now()), true);
        state.save(dir)?;
    }
    tracing::info!(id = %state.id, runtime = %state.runtime.display(), "starting container (handed over to the daemon)");
    Ok(Some(runtime_run(dir, state, req).exec()))
}

/// `runtime run --bundle DIR ID`, stdin the terminal's with `-i`; with `--pid-file DIR/pid` for
/// a detached container, whose `hb run -d` waits for that file (the runtime made the container).
/// Only then: runc writes it with `O_SYNC`, a synchronous disk write per container.
fn runtime_run(dir: &Path, state: &State, req: &RunRequest) -> std::process::Command {
    let mut cmd = std::process::Command::new(&state.runtime);
    cmd.args(["run", "--bundle"]).arg(dir);
    if req.detach {
        cmd.arg("--pid-file").arg(dir.join("pid"));
    }
    cmd.arg(&state.id);
    cmd.stdin(if req.interactive && !req.detach { Stdio::inherit() } else { Stdio::null() });
    cmd
}

/// Cleans up after a container handed over by [`become_runtime`], once that process exited:
/// the runtime's leftovers when it was killed (its state is still there), the overlay, the
/// folder (out of the listing at once).
pub fn finish_handed_over(dir: &Path) {
    if let Ok(state) = State::load(dir) {
        let runtime_state = state.runtime.file_name().map(|n| Path::new("/run").join(n).join(&state.id));
        // runc gives up after 10 s when the container's processes do not die of SIGKILL (one
        // stuck in the kernel): tried again; a container the runtime still has is kept (its
        // processes may run), for the daemon to try again later (`reap_handed_over`).
        let known = || runtime_state.as_ref().is_some_and(|p| p.exists());
        for attempt in 1..=2 {
            if !known() {
                break;
            }
            match std::process::Command::new(&state.runtime).args(["delete", "--force", &state.id]).output() {
                Ok(o) if o.status.success() => break,
                Ok(o) => tracing::warn!(
                    container = %state.id, attempt,
                    error = %String::from_utf8_lossy(&o.stderr).trim(),
                    "the runtime could not delete a finished container"
                ),
                Err(e) => tracing::warn!(container = %state.id, error = %e, "running {}", state.runtime.display()),
            }
        }
        if known() {
            tracing::warn!(container = %state.id, "the runtime still has the container; its folder is kept for now");
            return;
        }
    }
    let target = move_to_removing(dir).unwrap_or_else(|| dir.to_path_buf());
    cleanup(&target, true);
}

/// Runs `runtime run` on the bundle and waits for it, with output to the log (and terminal) and
/// signals passed on. Records the start in `state`.
///
/// One thread does it all: it polls the runtime's stdout and stderr, a wake-up socket the signal
/// handlers write to, and a pidfd of the runtime (threads cost a container start more than the
/// copying does).
fn run_runtime(dir: &Path, state: &mut State, req: &RunRequest) -> anyhow::Result<i32> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut log = crate::logs::LogWriter::open(&dir.join("log.json"), req.log)?;
    let on_terminal = req.opts.tty && !req.detach;
    let mut cmd = runtime_run(dir, state, req);
    if !on_terminal {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    tracing::info!(id = %state.id, runtime = %state.runtime.display(), "starting container");
    // The runtime forwards the signals it gets to the container. In the foreground hb must not die
    // of a Ctrl-C (the terminal sends it to both) and passes a SIGTERM meant for it on; a detached
    // monitor passes SIGTERM and SIGINT on and ignores SIGHUP. Registered before the runtime
    // starts, so none is lost.
    let (wake, wake_w) = std::os::unix::net::UnixStream::pair()?;
    wake.set_nonblocking(true)?;
    let mut handlers = Vec::new();
    let caught: Vec<(i32, Arc<std::sync::atomic::AtomicBool>)> =
        [SIGINT, SIGTERM, SIGHUP].into_iter().map(|s| (s, Default::default())).collect();
    for (sig, flag) in &caught {
        handlers.push(signal_hook::flag::register(*sig, flag.clone()).context("handling signals")?);
        handlers.push(signal_hook::low_level::pipe::register(*sig, wake_w.try_clone()?).context("handling signals")?);
    }
    let result = (|| -> anyhow::Result<i32> {
        let mut child = cmd.spawn().with_context(|| format!("running {}", state.runtime.display()))?;
        state.status = Status::Running;
        state.started = Some(container::now());
        state.save(dir)?;
        tracing::debug!("runtime started");
        tracing::debug!(target: "hb::phase", "runtime started");
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        )?;
        let mut streams: Vec<crate::logs::Stream> = [
            child.stdout.take().map(|o| crate::logs::Stream::new(o.into(), "stdout")),
            child.stderr.take().map(|e| crate::logs::Stream::new(e.into(), "stderr")),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut exited = false;
        while !exited || !streams.is_empty() {
            use rustix::event::{poll, PollFd, PollFlags};
            let mut fds: Vec<PollFd> = streams.iter().map(|s| PollFd::new(&s.fd, PollFlags::IN)).collect();
            fds.push(PollFd::new(&wake, PollFlags::IN));
            if !exited {
                fds.push(PollFd::new(&pidfd, PollFlags::IN));
            }
            match poll(&mut fds, None) {
                Err(rustix::io::Errno::INTR) => continue,
                r => r?,
            };
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            if !exited && ready[streams.len() + 1] {
                exited = true;
            }
            if ready[streams.len()] {
                let mut sink = [0u8; 64];
                while matches!(std::io::Read::read(&mut &wake, &mut sink), Ok(n) if n > 0) {}
                for (sig, flag) in &caught {
                    let forward = *sig == SIGTERM || (*sig == SIGINT && req.detach);
                    if flag.swap(false, std::sync::atomic::Ordering::SeqCst) && forward {
                        let _ = std::process::Command::new(&state.runtime).args(["kill", &state.id, "TERM"]).status();
                    }
                }
            }
            let mut open = Vec::with_capacity(streams.len());
            for (mut s, r) in streams.into_iter().zip(ready) {
                if !r || s.pump(&mut log, !req.detach) {
                    open.push(s);
                } else {
                    s.report(&dir.join("log.json"));
                }
            }
            streams = open;
        }
        tracing::debug!("runtime exited; output drained");
        Ok(container::exit_code(child.wait()?))
    })();
    for h in handlers {
        signal_hook::low_level::unregister(h);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_read_as_docker_reads_them() {
        std::env::set_var("HB_TEST_FROM_HOST", "host value");
        let env = parse_env_file("# a comment\n\nA=1\n  B=\"quoted\"\nC=x=y\nHB_TEST_FROM_HOST\nHB_TEST_UNSET_VAR\n")
            .unwrap();
        assert_eq!(env, ["A=1", "B=\"quoted\"", "C=x=y", "HB_TEST_FROM_HOST=host value"]);
        let e = parse_env_file("OK=1\nBAD KEY=2\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("BAD KEY"), "{e}");
    }
}
