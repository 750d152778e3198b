//! `hb proxy`: the pull-through mirror (`hb_mirror`) over the hb store, and
//! `hb proxy stats`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hb_images::mirror_store::StoreMirror;
use hb_mirror::{self as mirror, MirrorConfig, UpstreamConfig};
use hb_store::Store;

use crate::config::{FileConfig, ProxySection, UpstreamSection};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";

/// Command-line choices, over the config file's `[proxy]`.
pub struct ProxyArgs {
    pub listen: Option<String>,
    /// `HOST` or `HOST=URL`.
    pub upstreams: Vec<String>,
    pub max_size: Option<String>,
    pub default_upstream: Option<String>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
}

/// The TLS configuration, when a certificate and key are given (both or neither).
pub fn tls(args: &ProxyArgs, file: &FileConfig) -> anyhow::Result<Option<Arc<mirror::TlsServerConfig>>> {
    let cert = args.tls_cert.clone().or(file.proxy.tls_cert.clone());
    let key = args.tls_key.clone().or(file.proxy.tls_key.clone());
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => {
            let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            Ok(Some(mirror::tls_config(&read(&c)?, &read(&k)?)?))
        }
        _ => bail!("TLS needs both a certificate and its key (--tls-cert and --tls-key)"),
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

fn upstream(s: &UpstreamSection) -> anyhow::Result<UpstreamConfig> {
    let url = match &s.url {
        Some(u) => u.clone(),
        None if s.host == "docker.io" => "https://registry-1.docker.io".into(),
        None if is_loopback(&s.host) => format!("http://{}", s.host),
        None => format!("https://{}", s.host),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("proxy upstream {}: url {url:?} must start with http:// or https://", s.host);
    }
    let credentials = match (&s.username, &s.password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => crate::config::docker_credentials(&s.host).unwrap_or(None),
        _ => bail!("proxy upstream {}: give both username and password, or neither", s.host),
    };
    let ca_pem = match &s.ca_file {
        Some(f) => vec![std::fs::read(f).with_context(|| format!("reading CA file {}", f.display()))?],
        None => vec![],
    };
    Ok(UpstreamConfig {
        host: s.host.clone(),
        alias: s.alias.clone(),
        url,
        credentials,
        ca_pem,
        skip_verify: s.skip_verify,
        tag_ttls: s.tag_ttl.iter().map(|t| (t.pattern.clone(), Duration::from_secs(t.seconds))).collect(),
        default_tag_ttl: Duration::from_secs(s.tag_ttl_seconds.unwrap_or(300)),
    })
}

/// The mirror's configuration from the flags and the config file.
pub fn config(args: &ProxyArgs, file: &FileConfig, root: &Path) -> anyhow::Result<(SocketAddr, MirrorConfig)> {
    let p: &ProxySection = &file.proxy;
    let mut ups: Vec<UpstreamConfig> = p.upstream.iter().map(upstream).collect::<anyhow::Result<_>>()?;
    for u in &args.upstreams {
        let (host, url) = match u.split_once('=') {
            Some((h, url)) => (h.to_string(), Some(url.to_string())),
            None => (u.clone(), None),
        };
        ups.retain(|x| x.host != host);
        ups.push(upstream(&UpstreamSection { host, url, ..Default::default() })?);
    }
    if ups.is_empty() {
        bail!("no upstream registry: pass --upstream HOST[=URL] or add [[proxy.upstream]] to the config file");
    }
    let default = args.default_upstream.clone().or(p.default_upstream.clone());
    let default_upstream = match default {
        Some(h) => Some(
            ups.iter()
                .position(|u| u.host == h)
                .with_context(|| format!("default upstream {h} is not one of the configured upstreams"))?,
        ),
        None => Some(ups.iter().position(|u| u.host == "docker.io").unwrap_or(0)),
    };
    let listen = args.listen.clone().or(p.listen.clone()).unwrap_or_else(|| DEFAULT_LISTEN.into());
    let addr: SocketAddr =
        listen.parse().with_context(|| format!("bad listen address {listen:?} (e.g. 0.0.0.0:5000)"))?;
    let max_bytes = args.max_size.as_deref().or(p.max_size.as_deref()).map(crate::parse_rate).transpose()?;
    let cache_bytes = p.memory_cache.as_deref().map(crate::parse_rate).transpose()?.unwrap_or(256 << 20) as usize;
    Ok((
        addr,
        MirrorConfig {
            upstreams: ups,
            default_upstream,
            max_bytes,
            spool_dir: root.join("mirror-spool"),
            cache_bytes,
            auth_ttl: Duration::from_secs(p.auth_ttl_seconds.unwrap_or(60)),
            attempts: 5,
            users: p.user.iter().map(|u| (u.name.clone(), u.password.clone())).collect(),
        },
    ))
}

/// Serves until SIGINT or SIGTERM. On SIGHUP `reload` reads the configuration again; the users
/// and the size cap take effect at once, upstream changes at the next start (logged).
pub fn run(
    store: Store,
    addr: SocketAddr,
    cfg: MirrorConfig,
    tls: Option<Arc<mirror::TlsServerConfig>>,
    reload: impl Fn() -> anyhow::Result<MirrorConfig> + Send + 'static,
) -> anyhow::Result<()> {
    let stopped = crate::shutdown::Shutdown::install()?.signalled();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let root = store.root().to_path_buf();
    let store = Arc::new(store);
    let hosts: Vec<String> = cfg.upstreams.iter().map(|u| format!("{} ({})", u.host, u.url)).collect();
    let rt = crate::runtime()?;
    rt.block_on(async move {
        hb_registry::preload_trust_roots();
        let m = mirror::Mirror::new(cfg, Arc::new(StoreMirror(store.clone())))?;
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("handling SIGHUP")?;
        let live = m.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match reload() {
                    Ok(cfg) => {
                        let notes = live.reload(&cfg);
                        let what = if notes.is_empty() { "nothing changed".to_string() } else { notes.join("; ") };
                        eprintln!("hb proxy: configuration reloaded (SIGHUP): {what}");
                    }
                    Err(e) => eprintln!(
                        "hb proxy: configuration not reloaded (SIGHUP), serving as before: {}",
                        hb_cli::error_chain(&e)
                    ),
                }
            }
        });
        let (n, bytes) = m.kept();
        eprintln!(
            "hb proxy: serving the OCI distribution API on {scheme}://{addr} (store {}: {n} objects, {}); upstreams: {}",
            root.display(),
            indicatif::HumanBytes(bytes),
            hosts.join(", ")
        );
        crate::notify::ready(&format!("serving {scheme}://{addr}"));
        mirror::serve(listener, m, tls, stopped).await?;
        crate::notify::stopping();
        store.flush_metadata()?;
        eprintln!("hb proxy: stopped");
        anyhow::Ok(())
    })
}

/// `hb proxy hash-password`: a bcrypt hash for `[[proxy.user]]`'s `password`, of the line on
/// stdin (or asked twice on a terminal).
pub fn hash_password() -> anyhow::Result<String> {
    let password = if rustix::termios::isatty(std::io::stdin()) {
        let p = crate::prompt("Password", true)?;
        if crate::prompt("Again", true)? != p {
            bail!("the two passwords differ");
        }
        p
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        bail!("an empty password cannot be hashed");
    }
    Ok(mirror::hash_password(&password)?)
}

/// `hb proxy stats`: the mirror's figures, from its `/_hb/stats`.
pub fn stats(url: &str, json: bool) -> anyhow::Result<()> {
    let r = crate::runtime()?.block_on(mirror::fetch_stats(url))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{:<28} {:>9} {:>9} {:>7} {:>12} {:>12} {:>6} {:>6}",
        "UPSTREAM", "HITS", "MISSES", "HIT %", "FROM UPSTR.", "SERVED", "STALE", "ERRORS"
    );
    for u in &r.upstreams {
        println!(
            "{:<28} {:>9} {:>9} {:>6.1}% {:>12} {:>12} {:>6} {:>6}",
            u.host,
            u.hits,
            u.misses,
            u.hit_ratio * 100.0,
            indicatif::HumanBytes(u.bytes_from_upstream).to_string(),
            indicatif::HumanBytes(u.bytes_served).to_string(),
            u.stale_served,
            u.errors.values().sum::<u64>()
        );
    }
    let cap = r.max_bytes.map(|m| format!(" of {}", indicatif::HumanBytes(m))).unwrap_or_default();
    println!("kept: {} objects, {}{cap}; evicted: {}", r.objects, indicatif::HumanBytes(r.kept_bytes), r.evictions);
    Ok(())
}
