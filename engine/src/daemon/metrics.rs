//! The daemon's metrics (`/metrics`, Prometheus text): API requests by route and status, latency,
//! errors, pulls, and what the mount servers report (their stats files), by source tier.

use super::*;

/// Upper bounds (seconds) of the API latency histogram's buckets.
pub(super) const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

#[derive(Default)]
pub(super) struct Metrics {
    pub(super) requests: Mutex<HashMap<(String, u16), u64>>,
    /// Count per bucket of [`BUCKETS`] (+Inf last), and the sum in microseconds.
    pub(super) latency: Mutex<([u64; BUCKETS.len() + 1], u64)>,
    pub(super) errors: Mutex<HashMap<&'static str, u64>>,
    pub(super) pulls: AtomicU64,
    pub(super) pulled_bytes: AtomicU64,
}

impl Metrics {
    pub(super) fn error(&self, kind: &'static str) {
        *self.errors.lock().expect("metrics lock").entry(kind).or_default() += 1;
    }
}

/// The `path` label of a request: one of the API's routes, or `other` (a label copied from
/// whatever path a client sent would grow the series without bound).
pub(super) fn metric_path(path: &str) -> &'static str {
    const ROUTES: [&str; 15] = [
        "/metrics",
        "/status",
        "/v1/peers",
        "/v1/peers/chunks",
        "/v1/peers/switch",
        "/v1/health",
        "/v1/mounts",
        "/v1/chunks/fill",
        "/v1/chunks/fill-frames",
        "/v1/chunks/get",
        "/v1/containers/cleanup",
        "/v1/gc",
        "/v1/images/mount",
        "/v1/images/remove",
        "/v1/pull",
    ];
    if path.starts_with("/v1/mounts/") {
        return "/v1/mounts/{digest}";
    }
    ROUTES.iter().find(|r| **r == path).copied().unwrap_or("other")
}

/// What the mount servers report (each writes its figures beside its pid file), summed.
pub(super) struct MountFigures {
    pub(super) sum: hb_images::mount::MountStats,
    /// Remote fetches by latency bucket, and their total in seconds.
    pub(super) hist: [u64; hb_fuse::LATENCY_BUCKETS_MS.len() + 1],
    pub(super) hist_sum: f64,
    /// Chunks, bytes and errors by tier name (the daemon, mirrors, registries): a bounded set,
    /// one per configured host.
    pub(super) by_source: std::collections::BTreeMap<String, (u64, u64, u64)>,
}

impl Daemon {
    pub(super) fn mount_figures(&self, mounts: &[ImageMount]) -> MountFigures {
        let mut f = MountFigures {
            sum: Default::default(),
            hist: [0; hb_fuse::LATENCY_BUCKETS_MS.len() + 1],
            hist_sum: 0.0,
            by_source: Default::default(),
        };
        for m in mounts {
            let Ok(raw) = std::fs::read(crate::mount::run_file(&self.root, &m.path, "stats.json")) else { continue };
            let Ok(v) = serde_json::from_slice::<hb_images::mount::MountStats>(&raw) else { continue };
            f.sum.local_chunks += v.local_chunks;
            f.sum.remote_chunks += v.remote_chunks;
            f.sum.remote_bytes += v.remote_bytes;
            f.sum.local_bytes += v.local_bytes;
            f.sum.wire_bytes += v.wire_bytes;
            f.sum.errors += v.errors;
            f.sum.fill_errors += v.fill_errors;
            for (h, x) in f.hist.iter_mut().zip(&v.fetch_latency_ms) {
                *h += *x;
            }
            f.hist_sum += v.fetch_latency_sum_ms as f64 / 1000.0;
            for t in &v.sources {
                let e = f.by_source.entry(t.name.clone()).or_default();
                e.0 += t.chunks;
                e.1 += t.bytes;
                e.2 += t.errors + t.corrupt;
            }
        }
        f
    }

    /// `/status`: the daemon at a glance, for people (HTML; `/metrics` is for machines).
    pub(super) fn status_page(&self) -> String {
        use hb_core::status::{bytes, percent, Page};
        let mounts = self.list_mounts();
        let MountFigures { sum, by_source, .. } = self.mount_figures(&mounts);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut p = Page::new(
            &format!("hb daemon on {}", host.trim()),
            &format!(
                "version {} · store {} · up {} s · pid {}",
                env!("CARGO_PKG_VERSION"),
                self.root.display(),
                self.started.elapsed().as_secs(),
                std::process::id()
            ),
            5,
        );
        let lookups = sum.local_chunks + sum.remote_chunks;
        p.section("File data read by image mounts");
        p.cards(&[
            (percent(sum.local_chunks, lookups), "hit ratio (chunks in the store)"),
            (bytes(sum.local_bytes), "read from the store"),
            (bytes(sum.remote_bytes), "fetched remotely"),
            (bytes(sum.wire_bytes), "over the wire"),
            (bytes(self.metrics.pulled_bytes.load(Ordering::Relaxed)), "downloaded by hb pull"),
            (self.store.disk_bytes().map(bytes).unwrap_or_else(|_| "?".into()), "store on disk"),
        ]);
        p.section("Bytes by source");
        let mut rows =
            vec![vec!["store (local)".to_string(), bytes(sum.local_bytes), sum.local_chunks.to_string(), "0".into()]];
        let mut shares = vec![sum.local_bytes];
        for (name, (chunks, b, errors)) in &by_source {
            rows.push(vec![name.clone(), bytes(*b), chunks.to_string(), errors.to_string()]);
            shares.push(*b);
        }
        p.table(&["source", "bytes", "chunks", "errors"], &[1, 2, 3], &rows, Some(&shares), "nothing read yet");
        p.section("Image mounts");
        let rows: Vec<Vec<String>> = mounts
            .iter()
            .map(|m| vec![m.image.clone(), m.digest.chars().take(19).collect(), m.users.to_string(), m.pid.to_string()])
            .collect();
        p.table(&["image", "digest", "containers", "server pid"], &[2, 3], &rows, None, "no image mounted");
        p.section("Containers");
        let now = hb_cli::container::now();
        let rows: Vec<Vec<String>> = hb_cli::container::list(&self.root)
            .unwrap_or_default()
            .into_iter()
            // Commands stay off the page: their arguments may hold secrets, and the page may be
            // served over TCP (metrics_address).
            .map(|(_, s)| vec![s.name.clone(), s.image.clone(), s.short_id().to_string(), s.status_text(now)])
            .collect();
        p.table(&["name", "image", "id", "status"], &[], &rows, None, "no containers");
        if let Some(node) = self.peers.get() {
            let r = node.report();
            p.section("LAN peers");
            p.cards(&[
                (bytes(r.stats.bytes_received), "received from peers"),
                (bytes(r.stats.bytes_sent), "sent to peers"),
                (if r.enabled { "on".to_string() } else { "off".to_string() }, "serving and fetching"),
            ]);
            let rows: Vec<Vec<String>> = r
                .peers
                .iter()
                .map(|peer| {
                    vec![
                        peer.id.clone(),
                        if peer.connected { "connected".into() } else { "known".into() },
                        bytes(peer.bytes_received),
                        bytes(peer.bytes_sent),
                    ]
                })
                .collect();
            p.table(&["peer", "state", "received", "sent"], &[2, 3], &rows, None, "no peers");
        }
        p.finish()
    }

    /// Prometheus text format.
    pub(super) fn metrics_text(&self) -> String {
        use hb_core::metrics::{Exposition, Kind};
        let mut e = Exposition::new();
        e.build_info("hb daemon", env!("CARGO_PKG_VERSION"));
        let mounts = self.list_mounts();
        e.single("hb_image_mounts", Kind::Gauge, "Image mounts served.", mounts.len() as f64);
        e.single(
            "hb_containers_on_mounts",
            Kind::Gauge,
            "Containers whose root filesystem sits on an image mount.",
            mounts.iter().map(|m| m.users).sum::<usize>() as f64,
        );
        let MountFigures { sum, hist, hist_sum, by_source } = self.mount_figures(&mounts);
        let by = |key: &'static str, v: &str, x: u64| (vec![(key, v.to_string())], x as f64);
        e.family(
            "hb_fetched_bytes_total",
            Kind::Counter,
            "File data bytes read by image mounts, by source.",
            vec![
                by("source", "local", sum.local_bytes),
                by("source", "remote", sum.remote_bytes),
                by("source", "wire", sum.wire_bytes),
            ],
        );
        e.family(
            "hb_chunk_lookups_total",
            Kind::Counter,
            "Chunks image mounts needed: hits in the store, misses fetched remotely.",
            vec![by("result", "hit", sum.local_chunks), by("result", "miss", sum.remote_chunks)],
        );
        e.family(
            "hb_tier_chunks_total",
            Kind::Counter,
            "Chunks image mounts fetched, by remote tier (daemon, mirror, registry).",
            by_source.iter().map(|(n, v)| by("tier", n, v.0)).collect(),
        );
        e.family(
            "hb_tier_bytes_total",
            Kind::Counter,
            "Uncompressed bytes image mounts fetched, by remote tier.",
            by_source.iter().map(|(n, v)| by("tier", n, v.1)).collect(),
        );
        e.family(
            "hb_tier_errors_total",
            Kind::Counter,
            "Failed requests and corrupt chunks, by remote tier.",
            by_source.iter().map(|(n, v)| by("tier", n, v.2)).collect(),
        );
        let bounds: Vec<f64> = hb_fuse::LATENCY_BUCKETS_MS.iter().map(|ms| *ms as f64 / 1000.0).collect();
        e.histogram(
            "hb_remote_fetch_seconds",
            "Latency of remote chunk fetches by image mounts.",
            &bounds,
            &hist,
            hist_sum,
        );
        let mut errors = vec![by("kind", "fetch", sum.errors), by("kind", "store_fill", sum.fill_errors)];
        for (k, v) in self.metrics.errors.lock().expect("metrics lock").iter() {
            errors.push(by("kind", k, *v));
        }
        e.family("hb_errors_total", Kind::Counter, "Errors by kind.", errors);
        e.single(
            "hb_pulls_total",
            Kind::Counter,
            "Image pulls the daemon made.",
            self.metrics.pulls.load(Ordering::Relaxed) as f64,
        );
        e.single(
            "hb_pulled_bytes_total",
            Kind::Counter,
            "Bytes pulls downloaded.",
            self.metrics.pulled_bytes.load(Ordering::Relaxed) as f64,
        );
        if let Some(node) = self.peers.get() {
            let r = node.report();
            let s = &r.stats;
            e.single(
                "hb_p2p_peers_connected",
                Kind::Gauge,
                "LAN peers connected.",
                r.peers.iter().filter(|p| p.connected).count() as f64,
            );
            let dir = |d: &str, x: u64| (vec![("direction", d.to_string())], x as f64);
            e.family(
                "hb_p2p_bytes_total",
                Kind::Counter,
                "Chunk bytes exchanged with LAN peers.",
                vec![dir("received", s.bytes_received), dir("sent", s.bytes_sent)],
            );
            e.family(
                "hb_p2p_chunks_total",
                Kind::Counter,
                "Chunks exchanged with LAN peers.",
                vec![dir("received", s.chunks_received), dir("sent", s.chunks_sent)],
            );
            e.family(
                "hb_p2p_lookups_total",
                Kind::Counter,
                "Chunk ids looked up in peers' summaries, by whether a peer seemed to hold them.",
                vec![
                    by("result", "holder", s.lookups_with_holder),
                    by("result", "none", s.lookups - s.lookups_with_holder),
                ],
            );
            e.single("hb_p2p_hedges_total", Kind::Counter, "Requests hedged to a second peer.", s.hedges as f64);
            e.single("hb_p2p_timeouts_total", Kind::Counter, "Peer requests that timed out.", s.timeouts as f64);
            e.single("hb_p2p_bans_total", Kind::Counter, "Peers banned.", s.bans as f64);
            e.single("hb_p2p_corrupt_chunks_total", Kind::Counter, "Wrong chunks peers sent.", s.corrupt_chunks as f64);
            e.single(
                "hb_p2p_lookup_p99_seconds",
                Kind::Gauge,
                "p99 time to decide which peer to ask (summaries only).",
                s.lookup_p99_us as f64 / 1e6,
            );
            e.single(
                "hb_p2p_lookup_cpu_p99_seconds",
                Kind::Gauge,
                "p99 of the same lookups' time on their thread's CPU (no waits, not descheduled).",
                s.lookup_cpu_p99_us as f64 / 1e6,
            );
        }
        let reqs = self
            .metrics
            .requests
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|((p, c), n)| (vec![("path", p.clone()), ("code", c.to_string())], *n as f64))
            .collect();
        e.family("hb_api_requests_total", Kind::Counter, "API requests by path and status.", reqs);
        let (buckets, sum_us) = *self.metrics.latency.lock().expect("metrics lock");
        e.histogram("hb_api_request_seconds", "API request latency.", &BUCKETS, &buckets, sum_us as f64 / 1e6);
        e.finish()
    }
}
