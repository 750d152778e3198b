//! The OCI runtime spec of a container, from its image config and docker-style options.

use std::collections::BTreeMap;
use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder,
    RootBuilder, Spec, UserBuilder,
};

use crate::error::oci;
pub use crate::error::SpecError;
pub use crate::options::{MountArg, Network, Tmpfs, Volume};

/// The parts of an OCI image config a container starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl ImageConfig {
    /// Reads the `config` object of an OCI (or Docker) image config.
    pub fn from_json(raw: &[u8]) -> Result<Self, SpecError> {
        let v: serde_json::Value = serde_json::from_slice(raw).map_err(|e| SpecError::BadConfig(e.to_string()))?;
        let c = &v["config"];
        let strings = |x: &serde_json::Value| -> Vec<String> {
            x.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
        };
        let text = |x: &serde_json::Value| x.as_str().filter(|s| !s.is_empty()).map(String::from);
        Ok(ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: text(&c["WorkingDir"]),
            user: text(&c["User"]),
        })
    }
}

/// Every capability the kernel has, by the names `--cap-add`/`--cap-drop` take.
const ALL_CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A capability as docker takes it: `NET_ADMIN`, `CAP_NET_ADMIN` or `net_admin`.
fn capability(name: &str) -> Result<Capability, SpecError> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    bare.parse().map_err(|_| SpecError::BadValue {
        flag: "--cap-add/--cap-drop",
        value: name.into(),
        why: "not a Linux capability (e.g. NET_ADMIN, SYS_PTRACE, ALL)",
    })
}

/// As docker: `--cap-add ALL` is every capability but those dropped; otherwise the defaults,
/// less `--cap-drop` (ALL: every one), plus `--cap-add`.
pub fn capabilities(opts: &RunOptions) -> Result<Vec<Capability>, SpecError> {
    let is_all = |n: &String| n.eq_ignore_ascii_case("ALL") || n.eq_ignore_ascii_case("CAP_ALL");
    let drops = opts.cap_drop.iter().filter(|n| !is_all(n)).map(|n| capability(n)).collect::<Result<Vec<_>, _>>()?;
    let adds = opts.cap_add.iter().filter(|n| !is_all(n)).map(|n| capability(n)).collect::<Result<Vec<_>, _>>()?;
    let mut caps = if opts.cap_add.iter().any(is_all) {
        // A name this oci-spec does not know is skipped within ALL.
        ALL_CAPABILITIES.iter().filter_map(|n| n.parse().ok()).collect()
    } else if opts.cap_drop.iter().any(is_all) {
        Vec::new()
    } else {
        default_capabilities()
    };
    caps.retain(|c| !drops.contains(c));
    if !opts.cap_add.iter().any(is_all) {
        for c in adds {
            if !caps.contains(&c) {
                caps.push(c);
            }
        }
    }
    Ok(caps)
}

/// What `hb run` was asked for beyond the image.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunOptions {
    /// `--entrypoint` (replaces the image's entrypoint and drops its cmd, as docker does).
    pub entrypoint: Option<String>,
    /// Arguments after the image name (replace the image's cmd).
    pub cmd: Vec<String>,
    /// `-e KEY=VALUE` (later wins over the image's).
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `-u user[:group]`, names or ids.
    pub user: Option<String>,
    pub volumes: Vec<Volume>,
    pub read_only: bool,
    pub network: Network,
    pub tty: bool,
    /// Bytes.
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub hostname: Option<String>,
    /// Open-file limit (soft and hard); at most what the caller may set [default: 1024].
    pub nofile: Option<u64>,
    /// `--tmpfs` and `--mount type=tmpfs`.
    #[serde(default)]
    pub tmpfs: Vec<Tmpfs>,
    /// `--cap-add`, `--cap-drop`: names (`NET_ADMIN`, `CAP_SYS_PTRACE`) or `ALL`.
    #[serde(default)]
    pub cap_add: Vec<String>,
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// `--init`: this host file (a static init such as tini) runs as the container's pid 1,
    /// mounted read-only at [`INIT_PATH`], with the command under it.
    #[serde(default)]
    pub init: Option<PathBuf>,
}

/// Where `--init`'s program appears in the container (docker's place for it).
pub const INIT_PATH: &str = "/sbin/docker-init";

/// The process's arguments, docker's way: entrypoint + cmd, where arguments replace the image's
/// cmd and `--entrypoint` replaces its entrypoint and drops its cmd.
pub fn process_args(image: &ImageConfig, opts: &RunOptions) -> Result<Vec<String>, SpecError> {
    let (entrypoint, default_cmd) = match &opts.entrypoint {
        Some(e) if e.is_empty() => (vec![], vec![]),
        Some(e) => (vec![e.clone()], vec![]),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let cmd = if opts.cmd.is_empty() { default_cmd } else { opts.cmd.clone() };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// The environment: the image's, then `-e` (same key: the later wins), PATH if neither set one,
/// HOSTNAME, and TERM for a terminal.
/// The `PATH` a container gets when neither the image nor `-e` sets one (docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn environment(image: &ImageConfig, opts: &RunOptions, hostname: &str) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut put = |kv: &str| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if env.insert(k.to_string(), v.to_string()).is_none() {
            order.push(k.to_string());
        }
    };
    put(&format!("PATH={DEFAULT_PATH}"));
    put(&format!("HOSTNAME={hostname}"));
    if opts.tty {
        put("TERM=xterm");
    }
    image.env.iter().for_each(|e| put(e));
    opts.env.iter().for_each(|e| put(e));
    order.into_iter().map(|k| format!("{k}={}", env[&k])).collect()
}

/// What `hb exec` changes in a running container's process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub args: Vec<String>,
    /// `-e KEY=VALUE`, over the container's environment.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `-u`, resolved by the caller against the container's /etc/passwd.
    pub user: Option<UserIds>,
    pub tty: bool,
}

/// The process `hb exec` hands the runtime: the container's own process (`base`, from its spec:
/// capabilities, rlimits, environment, cwd, user) with the command, additions and overrides asked for.
pub fn exec_process(
    base: &oci_spec::runtime::Process,
    opts: &ExecOptions,
) -> Result<oci_spec::runtime::Process, SpecError> {
    if opts.args.is_empty() {
        return Err(SpecError::BadValue { flag: "exec", value: String::new(), why: "no command given" });
    }
    let mut p = base.clone();
    p.set_args(Some(opts.args.clone()));
    p.set_terminal(Some(opts.tty));
    if let Some(cwd) = &opts.workdir {
        if !cwd.starts_with('/') {
            return Err(SpecError::BadValue { flag: "--workdir", value: cwd.clone(), why: "must be an absolute path" });
        }
        p.set_cwd(cwd.into());
    }
    let mut env: Vec<String> = p.env().clone().unwrap_or_default();
    for kv in &opts.env {
        let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
        env.push(kv.clone());
    }
    if opts.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    p.set_env(Some(env));
    if let Some(u) = &opts.user {
        p.set_user(
            UserBuilder::default()
                .uid(u.uid)
                .gid(u.gid)
                .additional_gids(u.additional_gids.clone())
                .build()
                .map_err(oci)?,
        );
    }
    Ok(p)
}

/// Numeric ids of a container's user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Resolves `user[:group]` (names or numbers) against the image's /etc/passwd and /etc/group
/// contents, as docker does: a known user name gives its uid and primary gid; a bare number is
/// a uid (gid from passwd if listed, else 0); supplementary groups come from /etc/group.
pub fn resolve_user(spec: Option<&str>, passwd: Option<&str>, group: Option<&str>) -> Result<UserIds, SpecError> {
    let spec = spec.unwrap_or("").trim();
    if spec.is_empty() {
        return Ok(UserIds::default());
    }
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd_entries: Vec<Vec<&str>> =
        passwd.unwrap_or("").lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 4).collect();
    let group_entries: Vec<Vec<&str>> =
        group.unwrap_or("").lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 3).collect();
    let (uid, mut gid, name) = match user.parse::<u32>() {
        Ok(uid) => {
            let found = passwd_entries.iter().find(|f| f[2].parse() == Ok(uid));
            (uid, found.and_then(|f| f[3].parse().ok()).unwrap_or(0), found.map(|f| f[0].to_string()))
        }
        Err(_) => {
            let f = passwd_entries.iter().find(|f| f[0] == user).ok_or_else(|| SpecError::UnknownUser(user.into()))?;
            let uid = f[2].parse().map_err(|_| SpecError::UnknownUser(user.into()))?;
            (uid, f[3].parse().unwrap_or(0), Some(user.to_string()))
        }
    };
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_entries
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| SpecError::UnknownGroup(g.into()))?,
        };
    }
    let mut additional_gids = Vec::new();
    if let Some(name) = name {
        for f in &group_entries {
            if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                if let Ok(g) = f[2].parse::<u32>() {
                    if g != gid && !additional_gids.contains(&g) {
                        additional_gids.push(g);
                    }
                }
            }
        }
    }
    Ok(UserIds { uid, gid, additional_gids })
}

/// `--memory` values: bytes, or with a suffix (binary, as docker: `512m`, `1.5g`;
/// [`hb_core::parse_size`]); at least 6 MiB, as docker.
pub fn parse_memory(s: &str) -> Result<u64, SpecError> {
    let bad = |why| SpecError::BadValue { flag: "--memory", value: s.to_string(), why };
    let bytes = hb_core::parse_size(s).map_err(|e| match e {
        hb_core::SizeError::TooLarge(_) => bad("too large"),
        hb_core::SizeError::Malformed(_) => bad("a number with an optional b, k, m or g suffix"),
    })?;
    if bytes < 6 << 20 {
        return Err(bad("the minimum is 6m"));
    }
    Ok(bytes)
}

/// `--cpus` values: a positive number of CPUs, fractions allowed.
pub fn parse_cpus(s: &str) -> Result<f64, SpecError> {
    match s.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(n),
        _ => Err(SpecError::BadValue { flag: "--cpus", value: s.to_string(), why: "a positive number such as 1.5" }),
    }
}

/// Docker's default capabilities for a container's root user.
pub fn default_capabilities() -> Vec<Capability> {
    use Capability::*;
    vec![
        Chown,
        DacOverride,
        Fsetid,
        Fowner,
        Mknod,
        NetRaw,
        Setgid,
        Setuid,
        Setfcap,
        Setpcap,
        NetBindService,
        SysChroot,
        Kill,
        AuditWrite,
    ]
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(oci)
}

/// The runtime spec: `rootfs` as the root (read-only with `--read-only`), the process from
/// [`process_args`], [`environment`] and `user`, runc's default mounts plus volumes, runc's masked
/// and read-only paths, docker's default capabilities, docker's default seccomp profile, limits, namespaces
/// (no network namespace with `--network host`), cgroup `cgroups_path`.
pub fn build_spec(
    image: &ImageConfig,
    opts: &RunOptions,
    user: &UserIds,
    rootfs: &std::path::Path,
    hostname: &str,
    cgroups_path: Option<&str>,
) -> Result<Spec, SpecError> {
    let mut args = process_args(image, opts)?;
    if opts.init.is_some() {
        args.splice(0..0, [INIT_PATH.to_string(), "--".to_string()]);
    }
    let cwd = opts.workdir.clone().or_else(|| image.working_dir.clone()).unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(SpecError::BadValue { flag: "--workdir", value: cwd, why: "must be an absolute path" });
    }
    let caps = capabilities(opts)?;
    let caps_set: std::collections::HashSet<Capability> = caps.iter().copied().collect();
    // Inheritable and ambient stay empty, as docker's since CVE-2022-24769 (oci-spec's default
    // would give both AUDIT_WRITE, KILL and NET_BIND_SERVICE: raised ambient caps for every
    // process, and a runtime that refuses the start once one of them is dropped).
    let capabilities = LinuxCapabilitiesBuilder::default()
        .inheritable(std::collections::HashSet::new())
        .ambient(std::collections::HashSet::new())
        .bounding(caps_set.clone())
        .effective(if user.uid == 0 { caps_set.clone() } else { Default::default() })
        .permitted(if user.uid == 0 { caps_set.clone() } else { Default::default() })
        .build()
        .map_err(oci)?;
    let process = ProcessBuilder::default()
        .terminal(opts.tty)
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .additional_gids(user.additional_gids.clone())
                .build()
                .map_err(oci)?,
        )
        .args(args)
        .env(environment(image, opts, hostname))
        .cwd(cwd)
        .capabilities(capabilities)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(opts.nofile.unwrap_or(1024))
            .soft(opts.nofile.unwrap_or(1024))
            .build()
            .map_err(oci)?])
        .no_new_privileges(false)
        .build()
        .map_err(oci)?;

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"])?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        )?,
        mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"])?,
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"])?,
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"])?,
        mount("/sys/fs/cgroup", "cgroup", "cgroup", &["nosuid", "noexec", "nodev", "relatime", "ro"])?,
    ];
    if opts.network == Network::Host {
        for f in ["/etc/resolv.conf", "/etc/hosts"] {
            mounts.push(mount(f, "bind", f, &["rbind", "ro", "nosuid", "nodev"])?);
        }
    }
    for v in &opts.volumes {
        let mode = if v.read_only { "ro" } else { "rw" };
        mounts.push(mount(&v.container, "bind", &v.host.to_string_lossy(), &["rbind", mode])?);
    }
    if let Some(init) = &opts.init {
        mounts.push(mount(INIT_PATH, "bind", &init.to_string_lossy(), &["bind", "ro"])?);
    }
    for t in &opts.tmpfs {
        // Docker's defaults first; what was asked for comes later and wins (`exec` over `noexec`).
        let mut options = vec!["noexec", "nosuid", "nodev"];
        options.extend(t.options.iter().map(String::as_str));
        mounts.push(mount(&t.container, "tmpfs", "tmpfs", &options)?);
    }

    let mut resources = LinuxResourcesBuilder::default();
    if let Some(m) = opts.memory {
        // memory+swap equal to memory: no swap on top (docker would allow as much swap again).
        resources =
            resources.memory(LinuxMemoryBuilder::default().limit(m as i64).swap(m as i64).build().map_err(oci)?);
    }
    if let Some(c) = opts.cpus {
        let period = 100_000u64;
        resources = resources
            .cpu(LinuxCpuBuilder::default().period(period).quota((c * period as f64) as i64).build().map_err(oci)?);
    }
    if let Some(p) = opts.pids_limit {
        resources = resources.pids(LinuxPidsBuilder::default().limit(p).build().map_err(oci)?);
    }
    let defaults = oci_spec::runtime::Linux::default();
    let namespaces: Vec<_> = defaults
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !(opts.network == Network::Host && n.typ() == LinuxNamespaceType::Network))
        .collect();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .resources(resources.build().map_err(oci)?)
        .seccomp(crate::seccomp::default_seccomp(std::env::consts::ARCH, &caps)?);
    if let Some(cg) = cgroups_path {
        linux = linux.cgroups_path(cg);
    }
    let mut spec = Spec::default();
    spec.set_hostname(Some(hostname.to_string()));
    spec.set_process(Some(process));
    spec.set_root(Some(RootBuilder::default().path(rootfs).readonly(opts.read_only).build().map_err(oci)?));
    spec.set_mounts(Some(mounts));
    spec.set_linux(Some(linux.build().map_err(oci)?));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig::from_json(
            br#"{"config":{"Entrypoint":["/bin/ep"],"Cmd":["run","--fast"],"Env":["PATH=/opt/bin:/bin","A=1"],"WorkingDir":"/app","User":"app"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn arguments_follow_docker() {
        let img = image();
        let o = |cmd: &[&str], ep: Option<&str>| RunOptions {
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            entrypoint: ep.map(String::from),
            ..Default::default()
        };
        assert_eq!(process_args(&img, &o(&[], None)).unwrap(), ["/bin/ep", "run", "--fast"]);
        assert_eq!(process_args(&img, &o(&["x"], None)).unwrap(), ["/bin/ep", "x"]);
        assert_eq!(process_args(&img, &o(&[], Some("/bin/sh"))).unwrap(), ["/bin/sh"], "--entrypoint drops the cmd");
        assert_eq!(process_args(&img, &o(&["-c", "true"], Some("/bin/sh"))).unwrap(), ["/bin/sh", "-c", "true"]);
        assert_eq!(process_args(&ImageConfig::default(), &o(&[], None)), Err(SpecError::NoCommand));
    }

    #[test]
    fn environment_later_wins_and_keeps_order() {
        let opts = RunOptions { env: vec!["A=2".into(), "B=3".into()], tty: true, ..Default::default() };
        let env = environment(&image(), &opts, "h1");
        assert_eq!(env, ["PATH=/opt/bin:/bin", "HOSTNAME=h1", "TERM=xterm", "A=2", "B=3"]);
    }

    #[test]
    fn exec_keeps_the_containers_process_and_applies_overrides() {
        let opts = RunOptions { env: vec!["A=1".into(), "B=2".into()], ..Default::default() };
        let spec = build_spec(
            &image(),
            &opts,
            &UserIds { uid: 7, gid: 8, additional_gids: vec![] },
            std::path::Path::new("/r"),
            "h",
            None,
        )
        .unwrap();
        let base = spec.process().clone().unwrap();
        let e = ExecOptions { args: vec!["sh".into()], env: vec!["B=3".into(), "C=4".into()], ..Default::default() };
        let p = exec_process(&base, &e).unwrap();
        assert_eq!(p.args().clone().unwrap(), ["sh"]);
        let env = p.env().clone().unwrap();
        assert!(
            env.contains(&"A=1".to_string()) && env.contains(&"B=3".to_string()) && env.contains(&"C=4".to_string())
        );
        assert!(!env.contains(&"B=2".to_string()), "-e replaces the container's value");
        assert_eq!(p.user().uid(), 7, "the container's user by default");
        assert_eq!(p.cwd(), base.cwd());
        assert_eq!(p.capabilities(), base.capabilities());
        let root = ExecOptions {
            args: vec!["id".into()],
            user: Some(UserIds::default()),
            workdir: Some("/tmp".into()),
            tty: true,
            ..Default::default()
        };
        let p = exec_process(&base, &root).unwrap();
        assert_eq!((p.user().uid(), p.cwd().to_str().unwrap(), p.terminal()), (0, "/tmp", Some(true)));
        assert!(exec_process(&base, &ExecOptions::default()).is_err(), "no command");
        let rel = ExecOptions { args: vec!["x".into()], workdir: Some("tmp".into()), ..Default::default() };
        assert!(exec_process(&base, &rel).is_err(), "relative workdir");
    }

    #[test]
    fn users_resolve_like_docker() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
        let group = "root:x:0:\napp:x:1000:\nwheel:x:10:app,other\nstaff:x:50:\n";
        let r = |s| resolve_user(Some(s), Some(passwd), Some(group));
        assert_eq!(r("app").unwrap(), UserIds { uid: 1000, gid: 1000, additional_gids: vec![10] });
        assert_eq!(r("1000:50").unwrap(), UserIds { uid: 1000, gid: 50, additional_gids: vec![10] });
        assert_eq!(r("4242").unwrap(), UserIds { uid: 4242, gid: 0, additional_gids: vec![] });
        assert_eq!(r("app:staff").unwrap().gid, 50);
        assert_eq!(r("nobody"), Err(SpecError::UnknownUser("nobody".into())));
        assert_eq!(r("app:nogroup"), Err(SpecError::UnknownGroup("nogroup".into())));
        assert_eq!(resolve_user(None, None, None).unwrap(), UserIds::default());
    }

    #[test]
    fn values_parse_or_say_why() {
        assert_eq!(parse_memory("512m").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert!(parse_memory("1k").is_err(), "below docker's 6m minimum");
        assert!(parse_memory("lots").is_err());
        assert_eq!(parse_cpus("1.5").unwrap(), 1.5);
        assert!(parse_cpus("0").is_err() && parse_cpus("x").is_err());
    }

    #[test]
    fn capabilities_add_and_drop_as_docker_does() {
        let caps = |add: &[&str], drop: &[&str]| {
            capabilities(&RunOptions {
                cap_add: add.iter().map(|s| s.to_string()).collect(),
                cap_drop: drop.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
        };
        let c = caps(&["NET_ADMIN", "cap_sys_ptrace"], &["CHOWN"]).unwrap();
        assert!(c.contains(&Capability::NetAdmin) && c.contains(&Capability::SysPtrace));
        assert!(!c.contains(&Capability::Chown) && c.contains(&Capability::Kill));
        assert_eq!(caps(&["KILL"], &["ALL"]).unwrap(), [Capability::Kill]);
        assert!(caps(&["ALL"], &[]).unwrap().len() >= 40);
        // Regression (review): `--cap-add ALL --cap-drop X` kept X.
        let all_but = caps(&["ALL"], &["SYS_ADMIN"]).unwrap();
        assert!(!all_but.contains(&Capability::SysAdmin) && all_but.contains(&Capability::NetAdmin));
        // Regression: the spec's inheritable and ambient sets were oci-spec's defaults (KILL,
        // AUDIT_WRITE, NET_BIND_SERVICE), so dropping one of those failed the start.
        let opts = RunOptions { cap_drop: vec!["KILL".into()], ..Default::default() };
        let spec = build_spec(&image(), &opts, &UserIds::default(), std::path::Path::new("/r"), "h", None).unwrap();
        let c = spec.process().as_ref().unwrap().capabilities().clone().unwrap();
        assert_eq!((c.inheritable().clone().unwrap().len(), c.ambient().clone().unwrap().len()), (0, 0));
        assert!(!c.bounding().clone().unwrap().contains(&Capability::Kill));
        let e = caps(&["NET_MAGIC"], &[]).unwrap_err().to_string();
        assert!(e.contains("NET_MAGIC"), "{e}");
    }

    #[test]
    fn init_runs_first_with_the_command_under_it() {
        let opts = RunOptions { init: Some("/usr/bin/tini-static".into()), ..Default::default() };
        let spec = build_spec(&image(), &opts, &UserIds::default(), std::path::Path::new("/r"), "h", None).unwrap();
        let args = spec.process().as_ref().unwrap().args().clone().unwrap();
        assert_eq!(args, [INIT_PATH, "--", "/bin/ep", "run", "--fast"]);
        let m = spec.mounts().as_ref().unwrap().iter().find(|m| m.destination().to_str() == Some(INIT_PATH)).unwrap();
        assert_eq!(m.source().as_ref().unwrap().to_str(), Some("/usr/bin/tini-static"));
        assert!(m.options().as_ref().unwrap().contains(&"ro".to_string()));
    }

    #[test]
    fn the_spec_carries_limits_defaults_and_options() {
        let opts = RunOptions {
            memory: Some(64 << 20),
            cpus: Some(0.5),
            pids_limit: Some(32),
            read_only: true,
            network: Network::None,
            volumes: vec!["/srv:/data".parse().unwrap()],
            ..Default::default()
        };
        let user = UserIds { uid: 1000, gid: 1000, additional_gids: vec![] };
        let spec = build_spec(&image(), &opts, &user, std::path::Path::new("/r"), "c1", Some("/hb/c1")).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["root"]["readonly"], true);
        assert_eq!(json["process"]["cwd"], "/app");
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(json["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(json["linux"]["resources"]["pids"]["limit"], 32);
        assert_eq!(json["linux"]["cgroupsPath"], "/hb/c1");
        let ns: Vec<&str> =
            json["linux"]["namespaces"].as_array().unwrap().iter().map(|n| n["type"].as_str().unwrap()).collect();
        assert!(ns.contains(&"network") && ns.contains(&"pid") && ns.contains(&"mount"), "{ns:?}");
        assert!(json["linux"]["maskedPaths"].as_array().unwrap().iter().any(|p| p == "/proc/kcore"));
        assert!(json["linux"]["readonlyPaths"].as_array().unwrap().iter().any(|p| p == "/proc/sys"));
        let mounts = json["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/data" && m["source"] == "/srv"));
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO", "an allow list");
        assert!(json["linux"]["seccomp"]["syscalls"][0]["names"].as_array().unwrap().iter().any(|n| n == "execve"));
        // A non-root user gets no effective capabilities; root gets docker's set.
        assert!(json["process"]["capabilities"]["effective"].as_array().is_none_or(|a| a.is_empty()));
        let host = RunOptions { network: Network::Host, ..Default::default() };
        let spec = build_spec(&image(), &host, &UserIds::default(), std::path::Path::new("/r"), "c2", None).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let ns: Vec<&str> =
            json["linux"]["namespaces"].as_array().unwrap().iter().map(|n| n["type"].as_str().unwrap()).collect();
        assert!(!ns.contains(&"network"), "--network host shares the host's namespace");
        assert_eq!(json["process"]["capabilities"]["effective"].as_array().unwrap().len(), 14);
    }
}
