//! The mirror's counters, per upstream: as Prometheus text (`/metrics`) and as JSON
//! (`/_hb/stats`, read by `hb proxy stats`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct UpstreamStats {
    pub host: String,
    pub requests: Counter,
    /// Manifests and blobs answered from what the mirror keeps.
    pub hits: Counter,
    pub misses: Counter,
    pub bytes_upstream: Counter,
    pub bytes_served: Counter,
    /// GET requests for blobs sent upstream (resumptions included).
    pub upstream_gets: Counter,
    pub stale: Counter,
    pub revalidated: Counter,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl UpstreamStats {
    pub fn error(&self, kind: &'static str) {
        *self.errors.lock().expect("errors lock").entry(kind).or_default() += 1;
    }
}

pub struct Stats {
    pub upstreams: Vec<UpstreamStats>,
    pub evictions: Counter,
    /// Accelerated forms made for hb clients.
    pub conversions: Counter,
}

/// One upstream's figures as `hb proxy stats` shows them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpstreamReport {
    pub host: String,
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: f64,
    pub bytes_from_upstream: u64,
    pub bytes_served: u64,
    pub upstream_blob_gets: u64,
    pub stale_served: u64,
    pub revalidated: u64,
    pub errors: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsReport {
    pub upstreams: Vec<UpstreamReport>,
    pub objects: usize,
    pub kept_bytes: u64,
    pub max_bytes: Option<u64>,
    pub evictions: u64,
    pub conversions: u64,
}

impl Stats {
    pub fn new(hosts: Vec<String>) -> Stats {
        Stats {
            upstreams: hosts.into_iter().map(|host| UpstreamStats { host, ..Default::default() }).collect(),
            evictions: Counter::default(),
            conversions: Counter::default(),
        }
    }

    pub fn report(&self, objects: usize, kept_bytes: u64, max_bytes: Option<u64>) -> StatsReport {
        StatsReport {
            upstreams: self
                .upstreams
                .iter()
                .map(|u| {
                    let (hits, misses) = (u.hits.get(), u.misses.get());
                    UpstreamReport {
                        host: u.host.clone(),
                        requests: u.requests.get(),
                        hits,
                        misses,
                        hit_ratio: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
                        bytes_from_upstream: u.bytes_upstream.get(),
                        bytes_served: u.bytes_served.get(),
                        upstream_blob_gets: u.upstream_gets.get(),
                        stale_served: u.stale.get(),
                        revalidated: u.revalidated.get(),
                        errors: u
                            .errors
                            .lock()
                            .expect("errors lock")
                            .iter()
                            .map(|(k, v)| (k.to_string(), *v))
                            .collect(),
                    }
                })
                .collect(),
            objects,
            kept_bytes,
            max_bytes,
            evictions: self.evictions.get(),
            conversions: self.conversions.get(),
        }
    }

    pub fn prometheus(&self, objects: usize, kept_bytes: u64, max_bytes: Option<u64>) -> String {
        use hb_core::metrics::{Exposition, Kind};
        let r = self.report(objects, kept_bytes, max_bytes);
        let mut e = Exposition::new();
        e.build_info("hb proxy", env!("CARGO_PKG_VERSION"));
        type Series = (&'static str, &'static str, fn(&UpstreamReport) -> u64);
        let series: [Series; 8] = [
            ("hb_mirror_requests_total", "Requests by upstream.", |u| u.requests),
            ("hb_mirror_hits_total", "Requests served from what the mirror keeps.", |u| u.hits),
            ("hb_mirror_misses_total", "Requests that went to the upstream.", |u| u.misses),
            ("hb_mirror_upstream_bytes_total", "Bytes received from the upstream.", |u| u.bytes_from_upstream),
            ("hb_mirror_served_bytes_total", "Bytes served to clients.", |u| u.bytes_served),
            ("hb_mirror_upstream_blob_gets_total", "Blob downloads from the upstream.", |u| u.upstream_blob_gets),
            ("hb_mirror_stale_served_total", "Tags served stale while the upstream was down.", |u| u.stale_served),
            ("hb_mirror_revalidated_total", "Tags checked again with the upstream.", |u| u.revalidated),
        ];
        // Upstreams are configured, error kinds a fixed set: the label sets are bounded.
        for (name, help, f) in series {
            let samples = r.upstreams.iter().map(|u| (vec![("upstream", u.host.clone())], f(u) as f64)).collect();
            e.family(name, Kind::Counter, help, samples);
        }
        let errors = r
            .upstreams
            .iter()
            .flat_map(|u| {
                u.errors.iter().map(|(kind, n)| (vec![("upstream", u.host.clone()), ("kind", kind.clone())], *n as f64))
            })
            .collect();
        e.family("hb_mirror_errors_total", Kind::Counter, "Errors by upstream and kind.", errors);
        e.single("hb_mirror_objects", Kind::Gauge, "Objects the mirror keeps.", objects as f64);
        e.single("hb_mirror_kept_bytes", Kind::Gauge, "Bytes of the objects the mirror keeps.", kept_bytes as f64);
        e.single(
            "hb_mirror_evictions_total",
            Kind::Counter,
            "Objects removed to stay under the size cap.",
            r.evictions as f64,
        );
        e.single(
            "hb_mirror_conversions_total",
            Kind::Counter,
            "Accelerated forms made for hb clients.",
            r.conversions as f64,
        );
        e.finish()
    }
}

impl StatsReport {
    /// `/status`: the mirror at a glance, for people (HTML; `/metrics` is for machines).
    pub fn status_page(&self, urls: &[String]) -> String {
        use hb_core::status::{bytes, percent, Page};
        let (hits, misses): (u64, u64) = self.upstreams.iter().fold((0, 0), |(h, m), u| (h + u.hits, m + u.misses));
        let (from, served): (u64, u64) =
            self.upstreams.iter().fold((0, 0), |(f, s), u| (f + u.bytes_from_upstream, s + u.bytes_served));
        let mut p =
            Page::new("hb proxy", &format!("pull-through registry mirror, version {}", env!("CARGO_PKG_VERSION")), 5);
        p.cards(&[
            (percent(hits, hits + misses), "hit ratio"),
            (bytes(served), "served to clients"),
            (bytes(from), "from upstreams"),
            (
                match self.max_bytes {
                    Some(m) => format!("{} of {}", bytes(self.kept_bytes), bytes(m)),
                    None => bytes(self.kept_bytes),
                },
                "kept",
            ),
            (self.objects.to_string(), "objects kept"),
            (self.evictions.to_string(), "evictions"),
        ]);
        p.section("Upstreams");
        let rows: Vec<Vec<String>> = self
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                vec![
                    u.host.clone(),
                    urls.get(i).cloned().unwrap_or_default(),
                    u.requests.to_string(),
                    percent(u.hits, u.hits + u.misses),
                    bytes(u.bytes_from_upstream),
                    bytes(u.bytes_served),
                    u.stale_served.to_string(),
                    u.errors.values().sum::<u64>().to_string(),
                ]
            })
            .collect();
        let shares: Vec<u64> = self.upstreams.iter().map(|u| u.bytes_served).collect();
        p.table(
            &["upstream", "url", "requests", "hit ratio", "from upstream", "served", "stale", "errors"],
            &[2, 3, 4, 5, 6, 7],
            &rows,
            Some(&shares),
            "no upstream configured",
        );
        p.finish()
    }
}
