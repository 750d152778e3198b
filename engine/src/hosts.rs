//! Where registries are reached, from flags, `hosts.toml` (containerd's certs.d layout) and
//! docker's credentials: the engine's [`hb_images::Registries`].

use std::path::PathBuf;
use std::sync::Arc;

use hb_cli::config;
use hb_core::ChunkSource;
use hb_images::{Endpoint, ImagesError, Registries};
use hb_registry::{ImageRef, Platform, RegistryOptions, Scheme};

use crate::Global;

/// hosts.toml from `--hosts-dir` (or the default folders), credentials from docker's config.
pub struct Hosts {
    dir: Option<PathBuf>,
    peers: Peers,
}

/// Where this process reaches LAN peers.
enum Peers {
    /// Through the daemon that owns the store, when it has peers on (asked on first use).
    ViaDaemon(Box<Global>),
    /// This process's own node (the daemon's), or none.
    Here(Option<hb_p2p::Node>),
}

impl Hosts {
    pub fn of(g: &Global) -> Hosts {
        Hosts { dir: g.hosts_dir.clone(), peers: Peers::ViaDaemon(Box::new(g.clone())) }
    }

    /// For the daemon: its own node (if any) is the peers tier.
    pub fn with_node(g: &Global, node: Option<&hb_p2p::Node>) -> Hosts {
        Hosts { dir: g.hosts_dir.clone(), peers: Peers::Here(node.cloned()) }
    }

    fn settings(&self, r: &ImageRef) -> hb_images::Result<config::HostSettings> {
        config::host_settings(self.dir.as_deref(), r.registry()).map_err(|e| ImagesError::Config(format!("{e:#}")))
    }
}

impl Registries for Hosts {
    fn peers(&self) -> Option<Arc<dyn ChunkSource>> {
        match &self.peers {
            Peers::ViaDaemon(g) => crate::peers::DaemonPeers::find(g),
            Peers::Here(p) => p.clone().map(|n| Arc::new(n) as Arc<dyn ChunkSource>),
        }
    }

    fn blob_peers(&self) -> Option<Arc<dyn hb_core::BlobSource>> {
        match &self.peers {
            Peers::Here(Some(n)) => Some(Arc::new(n.clone())),
            _ => None,
        }
    }

    fn peers_connected(&self) -> bool {
        matches!(&self.peers, Peers::Here(Some(n)) if n.enabled() && n.connected_peers() > 0)
    }

    /// `--plain-http` wins, then the file's scheme, else HTTPS (loopback: HTTPS, then plain HTTP).
    fn options(
        &self,
        r: &ImageRef,
        plain_http: bool,
        credentials: Option<(String, String)>,
        platform: Platform,
    ) -> hb_images::Result<RegistryOptions> {
        let host = self.settings(r)?;
        if let Some(src) = &host.source {
            tracing::info!(file = %src.display(), registry = r.registry(), "using hosts.toml");
        }
        let scheme = match (plain_http, host.plain_http) {
            (true, _) | (false, Some(true)) => Scheme::Http,
            (false, Some(false)) => Scheme::Https,
            (false, None) => Scheme::Auto,
        };
        Ok(RegistryOptions {
            scheme,
            ca_pem: host.ca_pem,
            skip_verify: host.skip_verify,
            credentials,
            platform,
            attempts: 5,
        })
    }

    /// The mirrors `r`'s hosts.toml names, then its registry.
    fn endpoints(
        &self,
        r: &ImageRef,
        plain_http: bool,
        credentials: Option<(String, String)>,
        platform: Platform,
    ) -> hb_images::Result<Vec<Endpoint>> {
        let host = self.settings(r)?;
        let mut out = Vec::with_capacity(host.mirrors.len() + 1);
        for m in &host.mirrors {
            out.push(Endpoint {
                name: format!("mirror {}", m.host),
                reference: r.via_mirror(&m.host),
                opts: RegistryOptions {
                    scheme: if m.plain_http { Scheme::Http } else { Scheme::Https },
                    ca_pem: m.ca_pem.clone(),
                    skip_verify: m.skip_verify,
                    credentials: self.credentials(&m.host)?,
                    platform: platform.clone(),
                    // A mirror that fails is passed over at once: the registry after it retries.
                    attempts: 1,
                },
                resolve: m.resolve,
            });
        }
        out.push(Endpoint {
            name: format!("registry {}", r.registry()),
            reference: r.clone(),
            opts: self.options(r, plain_http, credentials, platform)?,
            resolve: true,
        });
        Ok(out)
    }

    fn credentials(&self, registry: &str) -> hb_images::Result<Option<(String, String)>> {
        config::docker_credentials(registry).map_err(|e| ImagesError::Config(format!("{e:#}")))
    }
}
