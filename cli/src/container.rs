//! Containers' recorded state and the lifecycle commands that act on it: `hb ps`, `hb stop`,
//! `hb kill`, `hb rm`, `hb wait`, `hb container prune|inspect`, `hb exec` (`hb logs`: `logs.rs`).
//!
//! Each container has a folder `<store root>/containers/<id>/` holding `state.json` (written
//! atomically: temp file + rename), the runtime bundle (`config.json`, `rootfs/`, the overlay's
//! `upper/` and `work/`, the image mount `lower/` when this container's monitor serves it) and
//! `log.json` (docker's json-file format: one `{"log","stream","time"}` object per line). The
//! process that waits on the runtime (the "monitor": `hb run` itself in the foreground, a detached
//! `hb container-monitor` with `-d`) records the start, the exit code and the end; any later hb
//! process reads the folder. A monitor that died without recording an end shows as `Dead`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Containers' folders, under the store root.
pub fn containers_dir(root: &Path) -> PathBuf {
    root.join("containers")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Running,
    Exited,
}

/// `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// 64 hex digits; shown as its first 12.
    pub id: String,
    pub name: String,
    /// The image as asked for.
    pub image: String,
    pub command: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    pub started: Option<u64>,
    pub finished: Option<u64>,
    pub status: Status,
    pub exit_code: Option<i32>,
    /// Why the container could not start.
    pub error: Option<String>,
    /// The monitor process: pid and its start time (clock ticks after boot), so a reused pid is
    /// not mistaken for it.
    pub monitor: Option<(u32, u64)>,
    pub runtime: PathBuf,
    pub rm: bool,
    pub detached: bool,
    /// `hb run --rm` handed the container to the daemon and became the runtime: the daemon
    /// cleans up when the monitor (the runtime) exits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_over: bool,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Start time of process `pid` (field 22 of /proc/pid/stat), None when it is gone or a zombie.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// This process, as a monitor.
pub fn this_monitor() -> Option<(u32, u64)> {
    static ME: std::sync::OnceLock<Option<(u32, u64)>> = std::sync::OnceLock::new();
    *ME.get_or_init(|| {
        let pid = std::process::id();
        process_start(pid).map(|s| (pid, s))
    })
}

impl State {
    pub fn load(dir: &Path) -> anyhow::Result<State> {
        let p = dir.join("state.json");
        let raw = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&raw).with_context(|| format!("parsing {}", p.display()))
    }

    /// Atomically replaces `dir/state.json`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join(format!(".state.json.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join("state.json")).with_context(|| format!("saving state in {}", dir.display()))
    }

    /// The container's first save: written into a spare folder's placeholder when there is one
    /// (see [`make_spare_files`]: no new file on the store's file system while the container
    /// starts), else as [`State::save`].
    pub fn save_first(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join(SPARE_STATE);
        match std::fs::OpenOptions::new().write(true).truncate(true).open(&tmp) {
            Ok(mut f) => {
                f.write_all(&serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
                drop(f);
                std::fs::rename(&tmp, dir.join("state.json"))
                    .with_context(|| format!("saving state in {}", dir.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.save(dir),
            Err(e) => Err(e).with_context(|| format!("opening {}", tmp.display())),
        }
    }

    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// True while the monitor that owns the container is alive.
    pub fn monitor_alive(&self) -> bool {
        self.monitor.is_some_and(|(pid, start)| process_start(pid) == Some(start))
    }

    /// Whether the container may be running: recorded as created or running by a live monitor.
    pub fn is_running(&self) -> bool {
        matches!(self.status, Status::Created | Status::Running) && self.monitor_alive()
    }

    /// Docker's STATUS column.
    pub fn status_text(&self, now: u64) -> String {
        match self.status {
            _ if matches!(self.status, Status::Created | Status::Running) && !self.monitor_alive() => {
                "Dead (its hb monitor died)".into()
            }
            Status::Created => "Created".into(),
            Status::Running => {
                format!("Up {}", human_duration(now.saturating_sub(self.started.unwrap_or(self.created))))
            }
            Status::Exited => match (&self.error, self.exit_code) {
                (Some(_), _) => "Failed to start".into(),
                (None, code) => format!(
                    "Exited ({}) {} ago",
                    code.map_or("?".into(), |c| c.to_string()),
                    human_duration(now.saturating_sub(self.finished.unwrap_or(now)))
                ),
            },
        }
    }
}

/// "3 seconds", "About a minute", "5 minutes", "2 hours", "3 days", as docker words them.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        s if s < 60 => format!("{s} seconds"),
        s if s < 120 => "About a minute".into(),
        s if s < 3600 => format!("{} minutes", s / 60),
        s if s < 7200 => "About an hour".into(),
        s if s < 48 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86400),
    }
}

/// Every container's folder and state, newest first. Folders without a readable state (being
/// created this instant, or damaged) are skipped.
pub fn list(root: &Path) -> anyhow::Result<Vec<(PathBuf, State)>> {
    let dir = containers_dir(root);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    // Dot names are hb's own (`.lock`, `.removing`); a folder without a readable state is
    // skipped quietly, without building an error for it (with RUST_BACKTRACE set, every
    // `anyhow` error captures a backtrace: a tenth of a millisecond per entry).
    for e in entries.flatten().filter(|e| !e.file_name().as_encoded_bytes().starts_with(b".")) {
        let p = e.path();
        let state: Option<State> =
            std::fs::read(p.join("state.json")).ok().and_then(|raw| serde_json::from_slice(&raw).ok());
        if let Some(s) = state {
            out.push((p, s));
        }
    }
    out.sort_by(|a, b| b.1.created.cmp(&a.1.created).then_with(|| a.1.id.cmp(&b.1.id)));
    Ok(out)
}

/// A container by full id, name, or unique id prefix (docker's rules).
pub fn find(root: &Path, q: &str) -> anyhow::Result<(PathBuf, State)> {
    let all = list(root)?;
    if let Some(hit) = all.iter().find(|(_, s)| s.id == q || s.name == q) {
        return Ok(hit.clone());
    }
    let prefixed: Vec<_> = all.iter().filter(|(_, s)| !q.is_empty() && s.id.starts_with(q)).collect();
    match prefixed.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("no such container: {q}"),
        many => bail!("{q:?} matches {} containers; give more of the id", many.len()),
    }
}

/// A name not used by any container: `--name` when given (refused if taken), else a generated one.
pub fn unique_name(root: &Path, wanted: Option<&str>, id: &str) -> anyhow::Result<String> {
    let taken: Vec<(String, String)> = list(root)?.into_iter().map(|(_, s)| (s.name, s.id)).collect();
    if let Some(w) = wanted {
        if w.is_empty() || !w.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            bail!("invalid container name {w:?}: only letters, digits, _ . - are allowed");
        }
        if let Some((_, other)) = taken.iter().find(|(n, _)| n == w) {
            bail!(
                "the container name {w:?} is already in use by container {}; remove it (`hb rm {w}`) or pick another name",
                &other[..12]
            );
        }
        return Ok(w.to_string());
    }
    const ADJ: [&str; 16] = [
        "brave", "calm", "eager", "fond", "gentle", "happy", "keen", "lucid", "merry", "nimble", "proud", "quick",
        "sharp", "tender", "vivid", "witty",
    ];
    const NAMES: [&str; 16] = [
        "babbage", "curie", "dijkstra", "euler", "fermat", "gauss", "hopper", "knuth", "lamport", "liskov", "noether",
        "pascal", "ritchie", "shannon", "thompson", "turing",
    ];
    let b = hex_bytes(id);
    let base = format!("{}_{}", ADJ[b[0] as usize % 16], NAMES[b[1] as usize % 16]);
    let mut name = base.clone();
    let mut n = 1;
    while taken.iter().any(|(t, _)| *t == name) {
        n += 1;
        name = format!("{base}{n}");
    }
    Ok(name)
}

fn hex_bytes(id: &str) -> [u8; 2] {
    let byte = |i: usize| u8::from_str_radix(id.get(i..i + 2).unwrap_or("00"), 16).unwrap_or(0);
    [byte(0), byte(2)]
}

/// A fresh 64-hex container id: 32 random bytes from the kernel, as docker's.
/// A spare container folder's placeholder for its first state ([`State::save_first`]).
const SPARE_STATE: &str = ".state.json.spare";

/// The empty files a container's start writes (its first state, `config.json`), made ahead in a
/// spare folder: written then, they take no new inode on the store's file system (allocating one
/// costs tens of microseconds where many were freed recently).
pub fn make_spare_files(dir: &Path) -> std::io::Result<()> {
    for f in [SPARE_STATE, "config.json"] {
        std::fs::File::create(dir.join(f))?;
    }
    Ok(())
}

/// Whether `s` has the form of a container id ([`new_id`]: 64 lowercase hex digits).
pub fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn new_id() -> String {
    let mut bytes = [0u8; 32];
    let filled = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).unwrap_or(0);
    if filled < bytes.len() {
        // getrandom(2) failed (not on the kernels hb needs): time, pid and thread still differ.
        let seed = format!("{:?}{}{:?}", SystemTime::now(), std::process::id(), std::thread::current().id());
        return blake3::hash(seed.as_bytes()).to_hex().to_string();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `hb ps`.
pub fn ps(
    root: &Path,
    all: bool,
    quiet: bool,
    no_trunc: bool,
    json: bool,
    format: Option<&crate::output::Format>,
) -> anyhow::Result<()> {
    let rows: Vec<State> = list(root)?.into_iter().map(|(_, s)| s).filter(|s| all || s.is_running()).collect();
    let mut stdout = std::io::stdout().lock();
    if json || (format.is_some() && !quiet) {
        let now = now();
        let v: Vec<_> = rows
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s).expect("state serializes");
                v["state"] = serde_json::Value::String(s.status_text(now));
                v["running"] = serde_json::Value::Bool(s.is_running());
                v
            })
            .collect();
        if let Some(f) = format.filter(|_| !json) {
            for row in &v {
                writeln!(stdout, "{}", f.line(row)?)?;
            }
            return Ok(());
        }
        serde_json::to_writer_pretty(&mut stdout, &v)?;
        writeln!(stdout)?;
        return Ok(());
    }
    if quiet {
        for s in &rows {
            writeln!(stdout, "{}", if no_trunc { &s.id } else { s.short_id() })?;
        }
        return Ok(());
    }
    let now = now();
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|s| {
            let mut cmd = format!("\"{}\"", s.command.join(" "));
            if !no_trunc && cmd.chars().count() > 22 {
                cmd = format!("{}…\"", cmd.chars().take(20).collect::<String>());
            }
            [
                if no_trunc { s.id.clone() } else { s.short_id().to_string() },
                s.image.clone(),
                cmd,
                format!("{} ago", human_duration(now.saturating_sub(s.created))),
                s.status_text(now),
                s.name.clone(),
            ]
        })
        .collect();
    let head = ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"].map(String::from);
    let mut widths = head.clone().map(|h| h.chars().count());
    for r in &table {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in std::iter::once(&head).chain(&table) {
        let line: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        writeln!(stdout, "{}", line.join("   ").trim_end())?;
    }
    Ok(())
}

/// Sends `signal` (a name like TERM or KILL, or a number) to a running container through its runtime.
pub fn kill(dir: &Path, s: &State, signal: &str) -> anyhow::Result<()> {
    if !s.is_running() {
        bail!("container {} is not running", s.name);
    }
    if !wait_started(dir, s, Duration::from_secs(10)) {
        return Ok(()); // it ended before the runtime started it
    }
    let o = std::process::Command::new(&s.runtime)
        .args(["kill", &s.id, signal])
        .output()
        .with_context(|| format!("running {}", s.runtime.display()))?;
    if !o.status.success() {
        // It may have ended between the check and the kill.
        if State::load(dir).is_ok_and(|now| !now.is_running()) {
            return Ok(());
        }
        bail!("{} kill {} {signal}: {}", s.runtime.display(), s.short_id(), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

/// The container's status as its runtime reports it (`runtime state ID`: `creating`,
/// `created`, `running`, `stopped`); `None` while the runtime does not know it (yet).
fn runtime_status(s: &State) -> Option<String> {
    let o = std::process::Command::new(&s.runtime)
        .args(["state", &s.id])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    Some(v.get("status")?.as_str()?.to_string())
}

/// Waits (at most `limit`) until the runtime has started the container. hb records a container
/// as running when it starts the runtime, which then takes milliseconds to create and start it:
/// a signal sent before would find no container ("container does not exist"), or kill it
/// before its start (the runtime would then fail with exit code 1, not the signal's). False when
/// the container ended meanwhile.
fn wait_started(dir: &Path, s: &State, limit: Duration) -> bool {
    let started = Instant::now();
    loop {
        if runtime_status(s).is_some_and(|st| st != "creating" && st != "created") {
            return true;
        }
        if !State::load(dir).is_ok_and(|now| now.is_running()) {
            return false;
        }
        if started.elapsed() >= limit {
            return true; // let the signal say what is wrong
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the container's monitor recorded its end (or died), for at most `limit`. A
/// container whose folder went (an `--rm` container, cleaned up when it ended) has ended: its
/// state as last seen (`known` at first), marked exited.
pub fn wait_exit(dir: &Path, known: &State, limit: Duration) -> anyhow::Result<State> {
    let started = Instant::now();
    let mut last = known.clone();
    loop {
        let s = match State::load(dir) {
            Ok(s) => s,
            Err(_) if last.rm && !dir.join("state.json").exists() => {
                last.status = Status::Exited;
                return Ok(last);
            }
            Err(e) => return Err(e),
        };
        if !s.is_running() || started.elapsed() >= limit {
            return Ok(s);
        }
        last = s;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `hb stop`: SIGTERM, then SIGKILL after `timeout`, as docker does. Returns once it has ended.
pub fn stop(dir: &Path, s: &State, timeout: Duration) -> anyhow::Result<()> {
    if !s.is_running() {
        return Ok(());
    }
    kill(dir, s, "TERM")?;
    let after = wait_exit(dir, s, timeout)?;
    if after.is_running() {
        tracing::info!(container = %s.name, "did not stop on SIGTERM; sending SIGKILL");
        kill(dir, &after, "KILL")?;
        let end = wait_exit(dir, &after, Duration::from_secs(30))?;
        if end.is_running() {
            bail!("container {} is still running 30 s after SIGKILL", s.name);
        }
    }
    Ok(())
}

/// Tears down what a container left mounted and the runtime's record of it, then its folder.
/// For a container whose monitor is gone (exited, or died).
pub fn remove(dir: &Path, s: &State) -> anyhow::Result<()> {
    let _ = std::process::Command::new(&s.runtime).args(["delete", "--force", &s.id]).output();
    // Detached whatever state they are in (a FUSE mount whose server died included); a folder
    // that is no mount's root is refused (EINVAL) and left as it is.
    for m in ["rootfs", "lower"] {
        let _ = rustix::mount::unmount(dir.join(m), rustix::mount::UnmountFlags::DETACH);
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// `hb rm [-f]`.
pub fn rm(dir: &Path, s: &State, force: bool) -> anyhow::Result<()> {
    if s.is_running() {
        if !force {
            bail!("container {} is running: stop it first (`hb stop {}`) or remove it with -f", s.name, s.name);
        }
        kill(dir, s, "KILL")?;
        let end = wait_exit(dir, s, Duration::from_secs(30))?;
        if end.is_running() {
            bail!("container {} is still running 30 s after SIGKILL", s.name);
        }
        // A --rm container's monitor removes the folder itself.
        if !dir.exists() {
            return Ok(());
        }
    }
    remove(dir, s)
}

/// Where removed containers' folders wait for their cleanup, under the containers folder (a dot
/// name: never listed).
pub const REMOVING: &str = ".removing";

/// Where an `--rm` container's exit code is kept for a minute after its folder `dir` went (for
/// `hb wait`): `<containers>/.removing/<id>.exit`.
pub fn exit_record(dir: &Path) -> PathBuf {
    let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.parent().unwrap_or(dir).join(REMOVING).join(format!("{id}.exit"))
}

/// `hb wait`: blocks until each container has stopped, printing its exit code (one per line, in
/// the order given, as docker does); exit code 1 when any could not be waited for.
pub fn wait(root: &Path, names: &[String]) -> anyhow::Result<std::process::ExitCode> {
    let mut failed = false;
    for n in names {
        let code = find(root, n).and_then(|(dir, s)| {
            let end = wait_exit(&dir, &s, Duration::MAX)?;
            // An `--rm` container's folder goes as it ends; its exit record stays a minute.
            let recorded = || {
                let started = Instant::now();
                loop {
                    if let Some(code) =
                        std::fs::read_to_string(exit_record(&dir)).ok().and_then(|t| t.trim().parse().ok())
                    {
                        return Some(code);
                    }
                    if started.elapsed() > Duration::from_secs(5) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            let exit_code = end.exit_code.or_else(|| if end.rm && !dir.exists() { recorded() } else { None });
            match (exit_code, end.error) {
                (Some(code), _) => Ok(code),
                (None, Some(e)) => bail!("container {} failed to start: {e}", end.name),
                (None, None) if end.rm => {
                    bail!("container {} ended and was removed (--rm) before its exit code was read", end.name)
                }
                (None, None) => bail!("container {}'s hb monitor died: its exit code is unknown", end.name),
            }
        });
        match code {
            Ok(code) => println!("{code}"),
            Err(e) => {
                eprintln!("hb: error: {e:#}");
                failed = true;
            }
        }
    }
    Ok(if failed { std::process::ExitCode::from(1) } else { std::process::ExitCode::SUCCESS })
}

/// Bytes a container holds of its own: its writable layer and log (files under its folder, not
/// crossing into the mounts of a running one).
pub fn size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn walk(p: &Path, dev: u64) -> u64 {
        let Ok(entries) = std::fs::read_dir(p) else { return 0 };
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok().map(|m| (e.path(), m)))
            .filter(|(_, m)| m.dev() == dev)
            .map(|(p, m)| if m.is_dir() { walk(&p, dev) } else { m.len() })
            .sum()
    }
    std::fs::metadata(dir).map_or(0, |m| walk(dir, m.dev()))
}

/// `hb container prune`: removes every container that is not running; their full ids and the
/// bytes freed. A container that cannot be removed is reported on stderr and kept.
pub fn prune(root: &Path) -> anyhow::Result<(Vec<String>, u64)> {
    let mut removed = Vec::new();
    let mut freed = 0;
    // A container being started (its detached monitor may still be pulling, not recorded yet)
    // is not stopped: only those that ended, or whose monitor died a while after their start.
    let now = now();
    let stopped = |s: &State| !s.is_running() && (s.status == Status::Exited || now.saturating_sub(s.created) > 600);
    for (dir, s) in list(root)?.into_iter().filter(|(_, s)| stopped(s)) {
        let bytes = size(&dir);
        match rm(&dir, &s, false) {
            Ok(()) => {
                removed.push(s.id);
                freed += bytes;
            }
            Err(e) => eprintln!("hb: error: removing container {}: {e:#}", s.name),
        }
    }
    Ok((removed, freed))
}

/// Docker's `State.Status`: created, running, exited, or dead (its monitor died).
pub fn docker_status(s: &State) -> &'static str {
    match s.status {
        Status::Created | Status::Running if !s.monitor_alive() => "dead",
        Status::Created => "created",
        Status::Running => "running",
        Status::Exited => "exited",
    }
}

/// A container as `docker inspect` shows one (the fields hb has, docker's names and zero values).
pub fn inspect(dir: &Path, s: &State) -> serde_json::Value {
    let time = |t: Option<u64>| {
        t.and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
            .map_or("0001-01-01T00:00:00Z".to_string(), |d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    let spec: Option<oci_spec::runtime::Spec> =
        std::fs::read(dir.join("config.json")).ok().and_then(|raw| serde_json::from_slice(&raw).ok());
    let process = spec.as_ref().and_then(|s| s.process().clone());
    let status = docker_status(s);
    serde_json::json!({
        "Id": s.id,
        "Name": format!("/{}", s.name),
        "Created": time(Some(s.created)),
        "Path": s.command.first().cloned().unwrap_or_default(),
        "Args": s.command.get(1..).unwrap_or_default(),
        "State": {
            "Status": status,
            "Running": s.is_running(),
            "Paused": false,
            "Dead": status == "dead",
            "ExitCode": s.exit_code.unwrap_or(0),
            "Error": s.error.clone().unwrap_or_default(),
            "StartedAt": time(s.started),
            "FinishedAt": time(s.finished),
        },
        "Image": s.image,
        "Config": {
            "Image": s.image,
            "Cmd": s.command,
            "Env": process.as_ref().and_then(|p| p.env().clone()).unwrap_or_default(),
            "WorkingDir": process.as_ref().map(|p| p.cwd().display().to_string()).unwrap_or_default(),
            "Hostname": spec.as_ref().and_then(|s| s.hostname().clone()).unwrap_or_default(),
            "Tty": process.as_ref().and_then(|p| p.terminal()).unwrap_or(false),
        },
        "HostConfig": {
            "AutoRemove": s.rm,
            "Runtime": s.runtime,
            "ReadonlyRootfs": spec.as_ref().and_then(|s| s.root().as_ref().and_then(|r| r.readonly())).unwrap_or(false),
        },
        "GraphDriver": {
            "Name": "overlay",
            "Data": {
                "MergedDir": dir.join("rootfs"),
                "UpperDir": dir.join("upper"),
                "WorkDir": dir.join("work"),
            },
        },
        "LogPath": if dir.join("log.json").exists() { dir.join("log.json").display().to_string() } else { String::new() },
        "SizeRw": size(dir),
    })
}

/// `hb exec`: runs `opts` in the running container; returns its exit code.
pub fn exec(
    dir: &Path,
    s: &State,
    mut opts: hb_runtime::ExecOptions,
    user: Option<&str>,
    interactive: bool,
) -> anyhow::Result<i32> {
    if !s.is_running() {
        bail!("container {} is not running", s.name);
    }
    let spec: oci_spec::runtime::Spec = serde_json::from_slice(
        &std::fs::read(dir.join("config.json")).with_context(|| format!("reading {}/config.json", dir.display()))?,
    )
    .context("parsing the container's config.json")?;
    let base = spec.process().clone().context("the container's spec has no process")?;
    if let Some(u) = user {
        let read = |p: &str| std::fs::read_to_string(dir.join("rootfs").join(p)).ok();
        opts.user =
            Some(hb_runtime::resolve_user(Some(u), read("etc/passwd").as_deref(), read("etc/group").as_deref())?);
    }
    let process = hb_runtime::exec_process(&base, &opts)?;
    let mut file = tempfile::Builder::new().prefix(".exec-").suffix(".json").tempfile_in(dir)?;
    serde_json::to_writer(&mut file, &process)?;
    file.flush()?;
    let mut cmd = std::process::Command::new(&s.runtime);
    cmd.args(["exec", "--process"]).arg(file.path());
    if opts.tty {
        cmd.arg("--tty");
    }
    cmd.arg(&s.id);
    cmd.stdin(if interactive { std::process::Stdio::inherit() } else { std::process::Stdio::null() });
    let status = cmd.status().with_context(|| format!("running {}", s.runtime.display()))?;
    Ok(exit_code(status))
}

/// A child's exit code as a shell reports it: 128 + signal when killed.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str, name: &str, created: u64) -> State {
        State {
            id: id.repeat(64 / id.len()),
            name: name.into(),
            image: "img".into(),
            command: vec!["sh".into()],
            created,
            started: None,
            finished: None,
            status: Status::Exited,
            exit_code: Some(0),
            error: None,
            monitor: None,
            runtime: "/bin/false".into(),
            rm: false,
            detached: true,
            handed_over: false,
        }
    }

    #[test]
    fn containers_are_found_by_id_name_or_unique_prefix() {
        let root = tempfile::tempdir().unwrap();
        for s in [state("ab", "one", 1), state("ac", "two", 2)] {
            let d = containers_dir(root.path()).join(&s.id);
            std::fs::create_dir_all(&d).unwrap();
            s.save(&d).unwrap();
        }
        assert_eq!(find(root.path(), "one").unwrap().1.name, "one");
        assert_eq!(find(root.path(), "abab").unwrap().1.name, "one");
        assert_eq!(find(root.path(), &"ac".repeat(32)).unwrap().1.name, "two");
        assert!(find(root.path(), "a").unwrap_err().to_string().contains("matches 2"));
        assert!(find(root.path(), "zz").unwrap_err().to_string().contains("no such container"));
        assert_eq!(list(root.path()).unwrap()[0].1.name, "two", "newest first");
        let taken = unique_name(root.path(), Some("one"), "00").unwrap_err().to_string();
        assert!(taken.contains("already in use by container abababababab"), "{taken}");
        assert!(unique_name(root.path(), Some("a/b"), "00").is_err());
        let g = unique_name(root.path(), None, "0001").unwrap();
        assert_eq!(g, "brave_curie");
    }

    #[test]
    fn a_container_whose_monitor_died_is_dead_not_running() {
        let mut s = state("ab", "x", 1);
        s.status = Status::Running;
        s.monitor = this_monitor();
        assert!(s.is_running());
        assert!(s.status_text(100).starts_with("Up"));
        s.monitor = Some((std::process::id(), 1)); // same pid, other start time: a reused pid
        assert!(!s.is_running());
        assert!(s.status_text(100).starts_with("Dead"));
        s.status = Status::Exited;
        s.finished = Some(40);
        assert_eq!(s.status_text(100), "Exited (0) About a minute ago");
    }
}
