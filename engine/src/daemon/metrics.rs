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
    const ROUTES: [&str; 10] = [
        "/metrics",
        "/v1/health",
        "/v1/mounts",
        "/v1/chunks/fill",
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

impl Daemon {
    /// Prometheus text format.
    pub(super) fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(t, "{name}{labels} {v}");
            }
        };
        let mounts = self.list_mounts();
        metric("hb_image_mounts", "gauge", "Image mounts served.", vec![(String::new(), mounts.len() as f64)]);
        metric(
            "hb_containers_on_mounts",
            "gauge",
            "Containers whose root filesystem sits on an image mount.",
            vec![(String::new(), mounts.iter().map(|m| m.users).sum::<usize>() as f64)],
        );
        // What the mount servers report (each writes its figures beside its pid file).
        let mut sum = hb_images::mount::MountStats::default();
        let mut hist = [0f64; hb_fuse::LATENCY_BUCKETS_MS.len() + 1];
        let mut hist_sum = 0f64;
        // Chunks by tier name (the daemon, mirrors, registries): a bounded set, one per configured host.
        let mut by_source: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
        for m in &mounts {
            let Ok(raw) = std::fs::read(crate::mount::run_file(&self.root, &m.path, "stats.json")) else { continue };
            let Ok(v) = serde_json::from_slice::<hb_images::mount::MountStats>(&raw) else { continue };
            sum.local_chunks += v.local_chunks;
            sum.remote_chunks += v.remote_chunks;
            sum.remote_bytes += v.remote_bytes;
            sum.local_bytes += v.local_bytes;
            sum.wire_bytes += v.wire_bytes;
            sum.errors += v.errors;
            sum.fill_errors += v.fill_errors;
            for (h, x) in hist.iter_mut().zip(&v.fetch_latency_ms) {
                *h += *x as f64;
            }
            hist_sum += v.fetch_latency_sum_ms as f64 / 1000.0;
            for t in &v.sources {
                let e = by_source.entry(t.name.clone()).or_default();
                e.0 += t.chunks;
                e.1 += t.bytes;
                e.2 += t.errors + t.corrupt;
            }
        }
        metric(
            "hb_fetched_bytes_total",
            "counter",
            "File data bytes read by image mounts, by source.",
            vec![
                ("{source=\"local\"}".into(), sum.local_bytes as f64),
                ("{source=\"remote\"}".into(), sum.remote_bytes as f64),
                ("{source=\"wire\"}".into(), sum.wire_bytes as f64),
            ],
        );
        metric(
            "hb_chunk_lookups_total",
            "counter",
            "Chunks image mounts needed: hits in the store, misses fetched remotely.",
            vec![
                ("{result=\"hit\"}".into(), sum.local_chunks as f64),
                ("{result=\"miss\"}".into(), sum.remote_chunks as f64),
            ],
        );
        let label = |name: &str| format!("{{tier=\"{}\"}}", name.replace(['"', '\\', '\n'], "_"));
        metric(
            "hb_tier_chunks_total",
            "counter",
            "Chunks image mounts fetched, by remote tier (daemon, mirror, registry).",
            by_source.iter().map(|(n, v)| (label(n), v.0 as f64)).collect(),
        );
        metric(
            "hb_tier_bytes_total",
            "counter",
            "Uncompressed bytes image mounts fetched, by remote tier.",
            by_source.iter().map(|(n, v)| (label(n), v.1 as f64)).collect(),
        );
        metric(
            "hb_tier_errors_total",
            "counter",
            "Failed requests and corrupt chunks, by remote tier.",
            by_source.iter().map(|(n, v)| (label(n), v.2 as f64)).collect(),
        );
        let mut cumulative = 0.0;
        let mut samples = Vec::new();
        for (i, le) in hb_fuse::LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += hist[i];
            samples.push((format!("_bucket{{le=\"{}\"}}", *le as f64 / 1000.0), cumulative));
        }
        cumulative += hist[hist.len() - 1];
        samples.push(("_bucket{le=\"+Inf\"}".into(), cumulative));
        samples.push(("_sum".into(), hist_sum));
        samples.push(("_count".into(), cumulative));
        let _ = writeln!(
            t,
            "# HELP hb_remote_fetch_seconds Latency of remote chunk fetches by image mounts.\n# TYPE hb_remote_fetch_seconds histogram"
        );
        for (suffix, v) in samples {
            let _ = writeln!(t, "hb_remote_fetch_seconds{suffix} {v}");
        }
        let mut errors: Vec<(String, f64)> = vec![
            ("{kind=\"fetch\"}".into(), sum.errors as f64),
            ("{kind=\"store_fill\"}".into(), sum.fill_errors as f64),
        ];
        for (k, v) in self.metrics.errors.lock().expect("metrics lock").iter() {
            errors.push((format!("{{kind=\"{k}\"}}"), *v as f64));
        }
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(t, "{name}{labels} {v}");
            }
        };
        metric("hb_errors_total", "counter", "Errors by kind.", errors);
        metric(
            "hb_pulls_total",
            "counter",
            "Image pulls the daemon made.",
            vec![(String::new(), self.metrics.pulls.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "hb_pulled_bytes_total",
            "counter",
            "Bytes pulls downloaded.",
            vec![(String::new(), self.metrics.pulled_bytes.load(Ordering::Relaxed) as f64)],
        );
        let reqs: Vec<(String, f64)> = self
            .metrics
            .requests
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|((p, c), n)| (format!("{{path=\"{p}\",code=\"{c}\"}}"), *n as f64))
            .collect();
        metric("hb_api_requests_total", "counter", "API requests by path and status.", reqs);
        let (buckets, sum_us) = *self.metrics.latency.lock().expect("metrics lock");
        let _ =
            writeln!(t, "# HELP hb_api_request_seconds API request latency.\n# TYPE hb_api_request_seconds histogram");
        let mut c = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            c += buckets[i];
            let _ = writeln!(t, "hb_api_request_seconds_bucket{{le=\"{le}\"}} {c}");
        }
        c += buckets[BUCKETS.len()];
        let _ = writeln!(t, "hb_api_request_seconds_bucket{{le=\"+Inf\"}} {c}");
        let _ = writeln!(t, "hb_api_request_seconds_sum {}", sum_us as f64 / 1e6);
        let _ = writeln!(t, "hb_api_request_seconds_count {c}");
        t
    }
}
