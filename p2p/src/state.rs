//! The node's state (peers, summaries, counters), the commands its handles send the swarm's
//! task, and what needs no network: switching, announcing, banning, reporting. Fetching builds
//! on it (`fetch.rs`), the swarm on both (`swarm.rs`), starting on all (`node.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hb_core::ChunkId;
use libp2p::{request_response, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{Request, Response};
use crate::summary::{Local, Remote};
use crate::{Config, LocalChunks, NodeReport, NodeStats, PeerInfo};

/// Lookup times kept for the p99.
/// Why a request to a peer failed, and whether the peer is to blame (gone or silent).
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) gone: bool,
}

pub(crate) enum Cmd {
    Ask { peer: PeerId, req: Request, reply: oneshot::Sender<Result<Response, Failure>> },
    Respond { channel: request_response::ResponseChannel<Response>, res: Response },
    Ban { peer: PeerId },
}

/// Lookup times kept for the p99.
pub(crate) const LOOKUP_SAMPLES: usize = 2048;

#[derive(Default)]
pub(crate) struct Peer {
    pub(crate) addrs: Vec<Multiaddr>,
    pub(crate) connected: bool,
    pub(crate) summary: Option<Remote>,
    pub(crate) summary_pending: bool,
    pub(crate) down_until: Option<Instant>,
    pub(crate) banned_until: Option<Instant>,
    pub(crate) ban_reason: Option<String>,
    /// Usual answer time of a chunk request (exponentially weighted), for the hedge delay.
    pub(crate) rtt: Option<Duration>,
    pub(crate) agent: Option<String>,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) chunks_in: u64,
    pub(crate) chunks_out: u64,
    /// Rendezvous weight base of this peer (from its id).
    pub(crate) weight: u64,
    /// Its requests being served now.
    pub(crate) serving: usize,
    /// When its last connection closed.
    pub(crate) left: Option<Instant>,
    /// It serves peers (its last summary said so; off: `hb peers off` there).
    pub(crate) serves: bool,
}

impl Peer {
    pub(crate) fn usable(&self, now: Instant) -> bool {
        self.connected
            && self.summary.is_some()
            && self.banned_until.is_none_or(|t| t <= now)
            && self.down_until.is_none_or(|t| t <= now)
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) lookups: AtomicU64,
    pub(crate) lookups_with_holder: AtomicU64,
    pub(crate) chunks_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) chunks_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) blobs_in: AtomicU64,
    pub(crate) blobs_out: AtomicU64,
    pub(crate) asked: AtomicU64,
    pub(crate) hedges: AtomicU64,
    pub(crate) through: AtomicU64,
    pub(crate) bans: AtomicU64,
    pub(crate) corrupt: AtomicU64,
    pub(crate) timeouts: AtomicU64,
}

pub(crate) struct Inner {
    pub(crate) peer_id: PeerId,
    pub(crate) cfg: Config,
    pub(crate) local: Arc<dyn LocalChunks>,
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) cmds: mpsc::UnboundedSender<Cmd>,
    pub(crate) enabled: AtomicBool,
    pub(crate) peers: Mutex<HashMap<PeerId, Peer>>,
    pub(crate) summary: Mutex<Local>,
    pub(crate) listening: Mutex<Vec<Multiaddr>>,
    pub(crate) counters: Counters,
    /// (wall, on this thread's CPU) microseconds of recent lookups.
    pub(crate) lookup_us: Mutex<VecDeque<(u64, u64)>>,
    /// When the serving link is next free (the serving bandwidth cap).
    pub(crate) serve_free_at: Mutex<Instant>,
    /// Chunks being fetched from this node's own sources now, and a signal when a fetch ends:
    /// concurrent asks for one chunk (this host's and peers') make one fetch.
    pub(crate) through: Mutex<std::collections::HashSet<ChunkId>>,
    pub(crate) through_done: std::sync::Condvar,
    /// Requests waiting or being served now, in all.
    pub(crate) serving: std::sync::atomic::AtomicUsize,
    /// Turns to make an answer (`swarm::MAX_SERVING`).
    pub(crate) serve_turns: Arc<tokio::sync::Semaphore>,
}

/// A running node (cheap to clone). Dropping the last handle does not stop it: [`Node::stop`].
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn epoch_now(peer: &PeerId) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let h = blake3::hash(&[peer.to_bytes(), nanos.to_le_bytes().to_vec()].concat());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

pub(crate) fn weight(peer: &PeerId) -> u64 {
    u64::from_le_bytes(blake3::hash(&peer.to_bytes()).as_bytes()[..8].try_into().expect("8 bytes"))
}

impl Node {
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// Switches fetching from and serving to peers on or off (connections stay).
    pub fn set_enabled(&self, on: bool) {
        let was = self.inner.enabled.swap(on, Ordering::SeqCst);
        tracing::info!(on, "p2p switched");
        if was && !on {
            // An empty summary (a new epoch): peers stop asking at their next refresh.
            *self.inner.summary.lock().expect("summary lock") = Local::build(epoch_now(&self.inner.peer_id), &[]);
        } else if on && !was {
            self.rescan_all();
        }
    }

    /// Rebuilds the summary from what the store holds, in the background.
    fn rescan_all(&self) {
        let n = self.clone();
        self.inner.handle.spawn_blocking(move || n.rebuild_summary());
    }

    pub fn enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::SeqCst)
    }

    /// Peers connected now and not banned.
    pub fn connected_peers(&self) -> usize {
        let now = Instant::now();
        self.inner
            .peers
            .lock()
            .expect("peers lock")
            .values()
            .filter(|p| p.connected && p.banned_until.is_none_or(|t| t <= now))
            .count()
    }

    /// Tells the node the store now holds `ids` (peers learn it at their next refresh).
    pub fn announce(&self, ids: &[ChunkId]) {
        if !self.enabled() {
            return;
        }
        // In slices, so a rescan of millions of ids never holds the summary long (the swarm's
        // task answers peers' summary requests under the same lock).
        for slice in ids.chunks(16_384) {
            let mut s = self.inner.summary.lock().expect("summary lock");
            s.add(slice);
            if s.overfull() {
                drop(s);
                self.rebuild_summary();
                return;
            }
        }
    }

    /// Brings the summary up to what the store holds now, in the background (after a pull).
    pub fn rescan(&self) {
        let n = self.clone();
        self.inner.handle.spawn_blocking(move || {
            let held = n.inner.local.held();
            n.announce(&held);
        });
    }

    pub(crate) fn rebuild_summary(&self) {
        let held = self.inner.local.held();
        *self.inner.summary.lock().expect("summary lock") = Local::build(epoch_now(&self.inner.peer_id), &held);
    }
}

impl Node {
    pub(crate) fn set_down(&self, peer: &PeerId, why: &str, for_: Duration) {
        tracing::warn!(%peer, reason = why, "peer set aside for {}s", for_.as_secs());
        if let Some(p) = self.inner.peers.lock().expect("peers lock").get_mut(peer) {
            p.down_until = Some(Instant::now() + for_);
        }
    }

    /// Bans `peer` for the configured time: it is disconnected and refused until then.
    pub fn ban(&self, peer: &PeerId, why: &str) {
        tracing::warn!(%peer, reason = why, "banning peer for {}s", self.inner.cfg.ban_for.as_secs());
        self.inner.counters.bans.fetch_add(1, Ordering::Relaxed);
        let mut peers = self.inner.peers.lock().expect("peers lock");
        let p = peers.entry(*peer).or_insert_with(|| Peer { weight: weight(peer), ..Default::default() });
        p.banned_until = Some(Instant::now() + self.inner.cfg.ban_for);
        p.ban_reason = Some(why.to_string());
        p.summary = None;
        drop(peers);
        let _ = self.inner.cmds.send(Cmd::Ban { peer: *peer });
    }

    /// What `hb peers` shows.
    pub fn report(&self) -> NodeReport {
        let now = Instant::now();
        let secs_left = |t: Option<Instant>| t.filter(|t| *t > now).map(|t| (t - now).as_secs().max(1));
        let mut peers: Vec<PeerInfo> = self
            .inner
            .peers
            .lock()
            .expect("peers lock")
            .iter()
            .map(|(id, p)| PeerInfo {
                id: id.to_string(),
                addresses: p.addrs.iter().map(|a| a.to_string()).collect(),
                connected: p.connected,
                agent: p.agent.clone(),
                chunks_held_estimate: p.summary.as_ref().map(|s| s.estimate()),
                summary_generation: p.summary.as_ref().map(|s| s.generation),
                rtt_ms: p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                bytes_received: p.bytes_in,
                bytes_sent: p.bytes_out,
                chunks_received: p.chunks_in,
                chunks_sent: p.chunks_out,
                banned_for_seconds: secs_left(p.banned_until),
                ban_reason: p.banned_until.filter(|t| *t > now).and(p.ban_reason.clone()),
                set_aside_for_seconds: secs_left(p.down_until),
            })
            .collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (p99, max, cpu_p99) = {
            let samples = self.inner.lookup_us.lock().expect("lookup lock");
            let p99 = |mut s: Vec<u64>| {
                s.sort_unstable();
                let at = (s.len() * 99).div_ceil(100).saturating_sub(1);
                (s.get(at).copied().unwrap_or(0), s.last().copied().unwrap_or(0))
            };
            let (wall, max) = p99(samples.iter().map(|(w, _)| *w).collect());
            (wall, max, p99(samples.iter().map(|(_, c)| *c).collect()).0)
        };
        let summary = self.inner.summary.lock().expect("summary lock");
        NodeReport {
            peer_id: self.inner.peer_id.to_string(),
            enabled: self.enabled(),
            listening: self.inner.listening.lock().expect("listen lock").iter().map(|a| a.to_string()).collect(),
            chunks_held: summary.items() as u64,
            summary_generation: summary.generation(),
            peers,
            stats: NodeStats {
                lookups: load(&c.lookups),
                lookups_with_holder: load(&c.lookups_with_holder),
                chunks_asked: load(&c.asked),
                chunks_received: load(&c.chunks_in),
                bytes_received: load(&c.bytes_in),
                chunks_sent: load(&c.chunks_out),
                bytes_sent: load(&c.bytes_out),
                blobs_received: load(&c.blobs_in),
                blobs_sent: load(&c.blobs_out),
                hedges: load(&c.hedges),
                fetched_through: load(&c.through),
                bans: load(&c.bans),
                corrupt_chunks: load(&c.corrupt),
                timeouts: load(&c.timeouts),
                lookup_p99_us: p99,
                lookup_max_us: max,
                lookup_cpu_p99_us: cpu_p99,
            },
        }
    }
}
