//! Where settings come from: flags, then `HB_*` environment variables, then the config file
//! (`/etc/hb/hb.toml` unless `--config`/`HB_CONFIG` says otherwise), then defaults. This is the
//! only module that reads the environment or config files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Environment variables hb reads (all of them).
pub mod env {
    pub const ROOT: &str = "HB_ROOT";
    pub const CONFIG: &str = "HB_CONFIG";
    pub const LOG: &str = "HB_LOG";
    /// `json` for JSON log lines.
    pub const LOG_FORMAT: &str = "HB_LOG_FORMAT";
    /// Docker's own: where config.json (registry credentials) lives.
    pub const DOCKER_CONFIG: &str = "DOCKER_CONFIG";
    /// Where per-registry `hosts.toml` folders live (containerd's certs.d layout).
    pub const HOSTS_DIR: &str = "HB_HOSTS_DIR";
    /// The daemon's socket.
    pub const SOCKET: &str = "HB_SOCKET";
}

/// Folders searched for `<registry>/hosts.toml` when `--hosts-dir` is not given.
pub const DEFAULT_HOSTS_DIRS: [&str; 2] = ["/etc/hb/certs.d", "/etc/containerd/certs.d"];

/// What a containerd-style `hosts.toml` says about one registry.
#[derive(Debug, Default)]
pub struct HostSettings {
    /// From the scheme of `server` (or of the registry's own `[host]` entry).
    pub plain_http: Option<bool>,
    /// PEM bytes of every `ca` file named.
    pub ca_pem: Vec<Vec<u8>>,
    pub skip_verify: bool,
    /// Mirrors (`[host]` entries for other hosts) that may serve pulls, in the file's order:
    /// asked before the registry, as containerd does.
    pub mirrors: Vec<MirrorHost>,
    /// The file read, if any.
    pub source: Option<PathBuf>,
}

/// One mirror of a registry, from a `[host."<url>"]` entry of its hosts.toml.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorHost {
    /// `host[:port]`.
    pub host: String,
    pub plain_http: bool,
    pub ca_pem: Vec<Vec<u8>>,
    pub skip_verify: bool,
    /// Its `capabilities` include `resolve`: tags may be resolved there (else only content by
    /// digest is read there: blobs and lazy reads).
    pub resolve: bool,
}

/// Reads `<dir>/<registry>/hosts.toml` from `dir` (or the default folders).
pub fn host_settings(dir: Option<&Path>, registry: &str) -> anyhow::Result<HostSettings> {
    let dirs: Vec<PathBuf> = match dir {
        Some(d) => vec![d.to_path_buf()],
        None => DEFAULT_HOSTS_DIRS.iter().map(PathBuf::from).collect(),
    };
    let Some(path) = dirs.iter().map(|d| d.join(registry).join("hosts.toml")).find(|p| p.exists()) else {
        return Ok(HostSettings::default());
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let doc: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let base = path.parent().expect("file in a folder");
    let authority = |url: &str| url.split_once("://").map(|(_, rest)| rest.split('/').next().unwrap_or("").to_string());
    let scheme_of = |url: &str| url.split_once("://").map(|(s, _)| s == "http");
    let mut out = HostSettings { source: Some(path.clone()), ..Default::default() };
    if let Some(server) = doc.get("server").and_then(|v| v.as_str()) {
        out.plain_http = scheme_of(server);
    }
    if let Some(hosts) = doc.get("host").and_then(|v| v.as_table()) {
        for (url, entry) in hosts {
            let Some(host) = authority(url).filter(|h| !h.is_empty()) else {
                bail!("{}: host {url:?} is not a URL (http://host[:port] or https://host[:port])", path.display());
            };
            let skip_verify = entry.get("skip_verify").and_then(|v| v.as_bool()).unwrap_or(false);
            let cas: Vec<&str> = match entry.get("ca") {
                Some(toml::Value::String(s)) => vec![s.as_str()],
                Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
                _ => vec![],
            };
            let mut ca_pem = Vec::new();
            for ca in cas {
                let p = base.join(ca);
                let pem = std::fs::read(&p)
                    .with_context(|| format!("reading CA {} named in {}", p.display(), path.display()))?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    bail!("CA {} named in {} holds no PEM certificate", p.display(), path.display());
                }
                ca_pem.push(pem);
            }
            if host == registry {
                out.plain_http = out.plain_http.or(scheme_of(url));
                out.skip_verify = skip_verify;
                out.ca_pem.extend(ca_pem);
                continue;
            }
            // containerd's default: pull, resolve and push.
            let caps: Vec<String> = match entry.get("capabilities") {
                Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
                _ => vec!["pull".into(), "resolve".into(), "push".into()],
            };
            if !caps.iter().any(|c| c == "pull") {
                tracing::debug!(file = %path.display(), mirror = %url, "mirror without the pull capability; not read from");
                continue;
            }
            out.mirrors.push(MirrorHost {
                host,
                plain_http: scheme_of(url) == Some(true),
                ca_pem,
                skip_verify,
                resolve: caps.iter().any(|c| c == "resolve"),
            });
        }
    }
    Ok(out)
}

pub const DEFAULT_CONFIG: &str = "/etc/hb/hb.toml";
pub const DEFAULT_SOCKET: &str = "/run/hb/hb.sock";
pub const DEFAULT_SNAPSHOTTER_SOCKET: &str = "/run/hb/snapshotter.sock";
pub const CONFIG_VERSION: u32 = 1;

/// The config file. Unknown keys are an error, so a typo does not pass silently.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub version: Option<u32>,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub daemon: DaemonSection,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub p2p: P2pSection,
}

/// `[p2p]`: LAN peers (the daemon's libp2p node). Off unless `enabled` and a `psk_file` are set.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct P2pSection {
    /// Fetch chunks from, and serve them to, peers [default: false].
    #[serde(default)]
    pub enabled: bool,
    /// Addresses to listen on, `host:port` or multiaddrs [default: 0.0.0.0:7946].
    #[serde(default)]
    pub listen: Vec<String>,
    /// The team's pre-shared key (`hb peers keygen FILE` writes one; go-libp2p's swarm.key
    /// format). Only nodes with the same key connect.
    pub psk_file: Option<PathBuf>,
    /// Peers to dial (`10.0.0.5:7946`), for networks without multicast.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Find peers by mDNS on this host's interfaces [default: false].
    #[serde(default)]
    pub mdns: bool,
    /// Bandwidth cap for serving peers (`50M` bytes per second) [default: none].
    pub serve_rate: Option<String>,
    /// How long a peer that sent a wrong chunk is refused [default: 3600].
    pub ban_seconds: Option<u64>,
}

/// `[proxy]`: the pull-through mirror (`hb proxy`).
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Address to listen on [default: 127.0.0.1:5000].
    pub listen: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM) and `tls_key`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Size cap of what the mirror keeps (`50G`); least recently used blobs go above it.
    pub max_size: Option<String>,
    /// Decoded chunks kept in memory for hot blobs [default: 256M].
    pub memory_cache: Option<String>,
    /// How long an upstream's "may this client read this repository" is remembered [default: 60].
    pub auth_ttl_seconds: Option<u64>,
    /// The upstream for names without a registry host (Docker's `registry-mirrors`)
    /// [default: docker.io when configured, else the first upstream].
    pub default_upstream: Option<String>,
    #[serde(default)]
    pub upstream: Vec<UpstreamSection>,
    /// Clients must authenticate to the mirror as one of these (Basic); their credentials are
    /// then not passed upstream (the upstreams' configured ones are used).
    #[serde(default)]
    pub user: Vec<ProxyUser>,
}

/// `[[proxy.user]]`.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyUser {
    pub name: String,
    pub password: String,
}

/// `[[proxy.upstream]]`.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// The registry as clients name it (`docker.io`, `ghcr.io`, `10.0.0.5:5000`).
    pub host: String,
    /// A name clients may use instead of the host in path-style names
    /// (`mirror:5000/<alias>/repo:tag`; docker's syntax allows no port there).
    pub alias: Option<String>,
    /// Its base URL [default: https://<host>, https://registry-1.docker.io for docker.io,
    /// http:// for loopback hosts].
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Extra CA certificate (PEM) to trust for it.
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub skip_verify: bool,
    /// Tag freshness [default: 300 s].
    pub tag_ttl_seconds: Option<u64>,
    /// Freshness by `repo:tag` pattern (`*` wildcard), first match wins.
    #[serde(default)]
    pub tag_ttl: Vec<TagTtl>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TagTtl {
    pub pattern: String,
    pub seconds: u64,
}

/// `[daemon]`.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// The API socket [default: /run/hb/hb.sock].
    pub socket: Option<PathBuf>,
    /// An image mount no container has used for this long is unmounted [default: 600].
    pub mount_idle_seconds: Option<u64>,
    /// containerd's snapshotter API [default: /run/hb/snapshotter.sock].
    pub snapshotter_socket: Option<PathBuf>,
    /// Also serve `/metrics`, `/healthz` and `/status` (nothing else) over TCP here, for
    /// Prometheus and browsers (e.g. "127.0.0.1:9110"; the API stays on the Unix socket)
    /// [default: none].
    pub metrics_address: Option<String>,
    /// Run `hb gc` by itself when the store takes more than this on disk (e.g. "50G"); what
    /// named images use stays [default: never].
    pub gc_above: Option<String>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub root: Option<PathBuf>,
    pub zstd_level: Option<i32>,
    pub max_layer_bytes: Option<u64>,
    pub max_ratio: Option<u64>,
}

/// Loads the config file: an explicitly named one must exist; the default one may be absent.
pub fn load(explicit: Option<&Path>) -> anyhow::Result<FileConfig> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(FileConfig::default()),
        Err(e) => return Err(e).with_context(|| format!("reading config file {}", path.display())),
    };
    let cfg: FileConfig = toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?;
    match cfg.version {
        Some(CONFIG_VERSION) => Ok(cfg),
        Some(v) => bail!(
            "config file {}: version {v} is not supported (this hb reads version {CONFIG_VERSION})",
            path.display()
        ),
        None => bail!("config file {}: missing `version = {CONFIG_VERSION}`", path.display()),
    }
}

/// The store root: `--root`/`HB_ROOT` (clap merges those), the config file, then the default:
/// `/var/lib/hb` as root, `$XDG_DATA_HOME/hb` or `~/.local/share/hb` otherwise. Always
/// absolute: a relative one is taken from the working directory, as the paths hb writes for the
/// runtime (the bundle's rootfs) and the daemon (the store it serves) must not depend on it.
pub fn store_root(flag: Option<&Path>, file: &FileConfig) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag.or(file.store.root.as_deref()) {
        return std::path::absolute(p).with_context(|| format!("store folder {}", p.display()));
    }
    if is_root() {
        return Ok(PathBuf::from("/var/lib/hb"));
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("hb"));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/hb")),
        None => bail!("cannot choose a store location: HOME is not set; pass --root DIR or set {}", env::ROOT),
    }
}

fn docker_config_path() -> anyhow::Result<PathBuf> {
    match std::env::var_os(env::DOCKER_CONFIG) {
        Some(d) => Ok(PathBuf::from(d).join("config.json")),
        None => match std::env::var_os("HOME") {
            Some(h) => Ok(PathBuf::from(h).join(".docker/config.json")),
            None => bail!("cannot find docker's config.json: neither DOCKER_CONFIG nor HOME is set"),
        },
    }
}

/// The key docker uses for `registry` in config.json.
fn docker_key(registry: &str) -> String {
    if registry == "docker.io" {
        "https://index.docker.io/v1/".into()
    } else {
        registry.to_string()
    }
}

/// Where `docker login` keeps a registry's credentials, as config.json says.
pub enum Saved {
    /// In config.json's `auths` (base64 of user:password).
    File(PathBuf),
    /// Through a credential helper (`credsStore` or `credHelpers`): `docker-credential-NAME`.
    Helper(String),
}

impl std::fmt::Display for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Saved::File(p) => write!(f, "{}", p.display()),
            Saved::Helper(h) => write!(f, "the credential helper docker-credential-{h}"),
        }
    }
}

/// The credential helper config.json names for `key` (`credHelpers`, else `credsStore`).
fn helper_for(cfg: &serde_json::Map<String, serde_json::Value>, keys: &[String]) -> Option<String> {
    keys.iter()
        .find_map(|k| cfg.get("credHelpers").and_then(|h| h.get(k)).and_then(serde_json::Value::as_str))
        .or_else(|| cfg.get("credsStore").and_then(serde_json::Value::as_str))
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

/// Runs `docker-credential-HELPER ACTION` with `input` on stdin; its stdout, or an error that
/// carries the helper's own message. `Ok(None)` when it has no credentials for the server.
fn run_helper(helper: &str, action: &str, input: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    run_helper_program(&format!("docker-credential-{helper}"), action, input)
}

/// [`run_helper`] of the program `bin` (a name found on PATH, or a path).
fn run_helper_program(bin: &str, action: &str, input: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    use std::io::Write;
    let mut child = std::process::Command::new(bin)
        .arg(action)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running the credential helper {bin} (named in docker's config.json)"))?;
    // A helper that fails at once (a locked keychain) may exit before it reads its input: its
    // exit status and message say more than the broken pipe.
    match child.stdin.take().expect("piped").write_all(input) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(e).with_context(|| format!("writing to the credential helper {bin}"))
        }
        _ => {}
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(Some(out.stdout));
    }
    let said = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    let message = [said(&out.stdout), said(&out.stderr)].into_iter().filter(|m| !m.is_empty()).collect::<Vec<_>>();
    // The protocol's "none here" answer (docker-credential-helpers' ErrCredentialsNotFound).
    if message.iter().any(|m| m.contains("credentials not found")) {
        return Ok(None);
    }
    let message = if message.is_empty() { "it said nothing".to_string() } else { message.join("; ") };
    bail!("credential helper {bin} {action} failed ({}): {message}", out.status)
}

/// Saves credentials as `docker login` does: through the configured credential helper (config.json
/// then holds an empty `auths` entry, never the secret), else in `auths.<registry>.auth` (base64
/// of user:password), keeping everything else in the file; the file is private to its owner.
pub fn docker_login(registry: &str, user: &str, password: &str) -> anyhow::Result<Saved> {
    use base64::Engine;
    let path = docker_config_path()?;
    let mut cfg = read_json_object(&path)?;
    let key = docker_key(registry);
    let helper = helper_for(&cfg, std::slice::from_ref(&key));
    let entry = match &helper {
        Some(h) => {
            let body = serde_json::json!({ "ServerURL": &key, "Username": user, "Secret": password });
            run_helper(h, "store", &serde_json::to_vec(&body)?)?;
            serde_json::json!({})
        }
        None => {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            serde_json::json!({ "auth": auth })
        }
    };
    let auths = cfg.entry("auths").or_insert_with(|| serde_json::json!({}));
    let auths = auths.as_object_mut().with_context(|| format!("{}: `auths` is not an object", path.display()))?;
    auths.insert(key, entry);
    write_json_object(&path, &cfg)?;
    Ok(match helper {
        Some(h) => Saved::Helper(h),
        None => Saved::File(path),
    })
}

/// Removes saved credentials (from the credential helper too); false when there were none.
pub fn docker_logout(registry: &str) -> anyhow::Result<bool> {
    let path = docker_config_path()?;
    if !path.exists() {
        return Ok(false);
    }
    let mut cfg = read_json_object(&path)?;
    let key = docker_key(registry);
    let mut removed = false;
    if let Some(h) = helper_for(&cfg, std::slice::from_ref(&key)) {
        removed |= run_helper(&h, "erase", key.as_bytes())?.is_some();
    }
    if cfg.get_mut("auths").and_then(|a| a.as_object_mut()).and_then(|a| a.remove(&key)).is_some() {
        removed = true;
        write_json_object(&path, &cfg)?;
    }
    Ok(removed)
}

fn read_json_object(path: &Path) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().is_empty() => Ok(Default::default()),
        Ok(t) => match serde_json::from_str(&t).with_context(|| format!("parsing {}", path.display()))? {
            serde_json::Value::Object(m) => Ok(m),
            _ => bail!("{} is not a JSON object", path.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes via a private temporary file and a rename, so a crash never leaves half a file.
fn write_json_object(path: &Path, v: &serde_json::Map<String, serde_json::Value>) -> anyhow::Result<()> {
    let dir = path.parent().context("config path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_private(path, serde_json::to_string_pretty(v)?.as_bytes())
}

/// Writes `bytes` to `path` readable by its owner only (mode 0600), through a temporary file and
/// a rename: a crash never leaves half a file (credentials, keys).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("hb-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Credentials for `registry`, looked up as docker and podman do: docker's config.json
/// (`credHelpers`, `credsStore`, `auths`), then podman's auth file (`$REGISTRY_AUTH_FILE`, else
/// `$XDG_RUNTIME_DIR/containers/auth.json`, `/run/containers/0/auth.json` for root, and
/// `~/.config/containers/auth.json`). A failing credential helper is an error with its message.
pub fn docker_credentials(registry: &str) -> anyhow::Result<Option<(String, String)>> {
    // Docker Hub is stored under its historical key; others sometimes with a scheme.
    let mut keys = vec![docker_key(registry), format!("https://{registry}"), format!("http://{registry}")];
    if registry == "docker.io" {
        keys.extend(["docker.io".to_string(), "index.docker.io".to_string()]);
    }
    let mut files: Vec<(PathBuf, bool)> = docker_config_path().ok().map(|p| (p, true)).into_iter().collect();
    files.extend(podman_auth_files().into_iter().map(|p| (p, false)));
    for (path, docker) in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if text.trim().is_empty() {
            continue;
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if docker {
            if let Some(helper) = cfg.as_object().and_then(|c| helper_for(c, &keys)) {
                if let Some(out) = run_helper(&helper, "get", keys[0].as_bytes())? {
                    let v: serde_json::Value = serde_json::from_slice(&out)
                        .with_context(|| format!("docker-credential-{helper} get answered"))?;
                    if let (Some(u), Some(p)) = (v["Username"].as_str(), v["Secret"].as_str()) {
                        return Ok(Some((u.to_string(), p.to_string())));
                    }
                }
            }
        }
        for k in &keys {
            // An identity token (OAuth2 refresh token, e.g. Azure's) is used as such: the registry
            // client exchanges it at the token service (user `<token>`, as helpers answer).
            if let Some(token) = cfg["auths"][k]["identitytoken"].as_str().filter(|t| !t.is_empty()) {
                return Ok(Some((hb_core::IDENTITY_TOKEN_USER.to_string(), token.to_string())));
            }
            if let Some(auth) = cfg["auths"][k]["auth"].as_str() {
                use base64::Engine;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth)
                    .with_context(|| format!("{}: auths.{k}.auth is not base64", path.display()))?;
                let raw = String::from_utf8(raw).with_context(|| format!("{}: auths.{k}.auth", path.display()))?;
                let (u, p) = raw
                    .split_once(':')
                    .with_context(|| format!("{}: auths.{k}.auth is not user:password", path.display()))?;
                return Ok(Some((u.to_string(), p.to_string())));
            }
        }
    }
    Ok(None)
}

/// podman's (containers/image's) auth files, in the order it reads them.
fn podman_auth_files() -> Vec<PathBuf> {
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        return vec![PathBuf::from(f)];
    }
    let mut files = Vec::new();
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => files.push(PathBuf::from(d).join("containers/auth.json")),
        None if is_root() => files.push(PathBuf::from("/run/containers/0/auth.json")),
        None => {}
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    files.extend(config.map(|c| c.join("containers/auth.json")));
    files
}

fn is_root() -> bool {
    // The only privilege question hb asks; the store library does the real syscalls.
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a helper that failed before reading its input made the write fail with a
    /// bare "Broken pipe", hiding the helper's own message.
    #[test]
    fn a_credential_helper_that_fails_at_once_is_reported_with_its_message() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("docker-credential-locked");
        std::fs::write(&bin, "#!/bin/sh\necho 'the keychain is locked' >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        // More than a pipe holds: the write cannot finish before the helper has exited.
        let input = vec![b'x'; 1 << 20];
        let err = run_helper_program(bin.to_str().unwrap(), "get", &input).unwrap_err().to_string();
        assert!(err.contains("the keychain is locked") && !err.contains("Broken pipe"), "{err}");
        let none = dir.path().join("docker-credential-empty");
        std::fs::write(&none, "#!/bin/sh\ncat >/dev/null\necho 'credentials not found in native keychain'\nexit 1\n")
            .unwrap();
        std::fs::set_permissions(&none, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(run_helper_program(none.to_str().unwrap(), "get", b"host").unwrap(), None);
    }

    /// The commented default the package installs as /etc/hb/hb.toml: valid as shipped, and
    /// still valid with every commented setting uncommented (no stale or misspelt key).
    #[test]
    fn the_shipped_default_config_names_only_real_settings() {
        let text = include_str!("../../dist/hb.toml");
        let shipped: FileConfig = toml::from_str(text).unwrap();
        assert_eq!(shipped.version, Some(CONFIG_VERSION));
        fn setting(l: &str) -> Option<&str> {
            let l = l.strip_prefix("# ")?;
            let is_table = l.starts_with("[[") && l.ends_with("]]");
            let is_key = l
                .split_once(" = ")
                .is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            (is_table || is_key).then_some(l)
        }
        let all: String = text.lines().map(|l| setting(l).unwrap_or(l)).map(|l| format!("{l}\n")).collect();
        let uncommented = text.lines().filter(|l| setting(l).is_some()).count();
        assert!(uncommented > 25, "only {uncommented} commented settings found");
        let full: FileConfig = toml::from_str(&all).unwrap_or_else(|e| panic!("{e}\n{all}"));
        assert_eq!(full.proxy.upstream.len(), 1);
        assert_eq!(full.proxy.user.len(), 1);
        assert_eq!(full.store.root.as_deref(), Some(Path::new("/var/lib/hb")));
        assert!(full.p2p.psk_file.is_some() && full.daemon.snapshotter_socket.is_some());
    }

    #[test]
    fn config_rules() {
        let ok: FileConfig = toml::from_str("version = 1\n[store]\nroot = \"/x\"\n").unwrap();
        assert_eq!(store_root(None, &ok).unwrap(), PathBuf::from("/x"));
        assert_eq!(store_root(Some(Path::new("/flag")), &ok).unwrap(), PathBuf::from("/flag"));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(store_root(Some(Path::new("rel/store")), &ok).unwrap(), cwd.join("rel/store"));
        let relative: FileConfig = toml::from_str("version = 1\n[store]\nroot = \"s\"\n").unwrap();
        assert_eq!(store_root(None, &relative).unwrap(), cwd.join("s"));
        assert!(toml::from_str::<FileConfig>("version = 1\n[store]\nrooot = \"/x\"\n").is_err(), "typos are errors");
        let dir = std::env::temp_dir().join(format!("hb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("hb.toml");
        std::fs::write(&p, "[store]\n").unwrap();
        assert!(load(Some(&p)).unwrap_err().to_string().contains("missing `version"));
        std::fs::write(&p, "version = 9\n").unwrap();
        assert!(load(Some(&p)).unwrap_err().to_string().contains("version 9"));
        assert!(load(Some(&dir.join("absent.toml"))).is_err(), "a named config must exist");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hosts_toml_mirrors_keep_the_files_order_and_capabilities() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry.example:5000");
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::write(
            reg.join("hosts.toml"),
            r#"server = "https://registry.example:5000"

[host."http://zz-mirror:5000"]
capabilities = ["pull", "resolve"]

[host."https://aa-mirror/v2"]
capabilities = ["pull"]
skip_verify = true

[host."https://push-only"]
capabilities = ["push"]

[host."https://registry.example:5000"]
skip_verify = true
"#,
        )
        .unwrap();
        let h = host_settings(Some(dir.path()), "registry.example:5000").unwrap();
        assert_eq!((h.plain_http, h.skip_verify), (Some(false), true));
        let m: Vec<(&str, bool, bool, bool)> =
            h.mirrors.iter().map(|m| (m.host.as_str(), m.plain_http, m.skip_verify, m.resolve)).collect();
        // In the file's order (not sorted), a push-only host left out, the registry not a mirror.
        assert_eq!(m, vec![("zz-mirror:5000", true, false, true), ("aa-mirror", false, true, false)]);
        std::fs::write(reg.join("hosts.toml"), "[host.\"not a url\"]\n").unwrap();
        let e = host_settings(Some(dir.path()), "registry.example:5000").unwrap_err();
        assert!(format!("{e:#}").contains("not a URL"), "{e:#}");
        // No file: no mirrors.
        assert!(host_settings(Some(dir.path()), "other").unwrap().mirrors.is_empty());
    }
}
