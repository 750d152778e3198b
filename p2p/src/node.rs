//! The node: a libp2p swarm (TCP, pre-shared key, noise, yamux; identify, mDNS when asked,
//! connection limits, a block list) driven by one task, and the handle the daemon uses to fetch
//! chunks from peers and to report on them.
//!
//! Fetching: which peers may hold a chunk is answered here, from copies of their summaries (no
//! network); each chunk goes to one likely holder (spread by rendezvous hashing), a slow answer
//! is hedged to the next holder, an answer is checked chunk by chunk, and a peer that sends one
//! wrong chunk is banned. A peer that does not answer is set aside for a while, so a dead peer
//! costs one short wait, not one per chunk.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hb_core::ChunkId;
use libp2p::core::transport::upgrade::Version;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, identify, mdns, noise, ping, pnet, request_response, tcp, yamux, Multiaddr,
    PeerId, StreamProtocol, Swarm, Transport,
};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{Codec, Request, Response, MAX_RESPONSE, PROTOCOL};
use crate::summary::{Local, Remote};
use crate::{Config, LocalChunks, NodeReport, NodeStats, P2pError, PeerInfo};

/// Ids asked of one peer in one request.
const BATCH: usize = 128;
/// How long a peer may take to answer before it is given up for this fetch and set aside:
/// five times its usual answer time, within these bounds (a partitioned peer costs one such wait).
const DEADLINE_MIN: Duration = Duration::from_millis(250);
const DEADLINE_MAX: Duration = Duration::from_secs(2);
/// The deadline of a peer with no answer time known yet.
const DEADLINE_FIRST: Duration = Duration::from_millis(500);
/// How long an owner may take to fetch chunks from its own sources for a peer (plus 20 ms a chunk).
const THROUGH_DEADLINE: Duration = Duration::from_secs(10);
/// How long a peer whose request failed (its connection gone) is set aside.
const DOWN_FOR: Duration = Duration::from_secs(30);
/// How long a peer that answered too slowly is set aside.
const SLOW_FOR: Duration = Duration::from_secs(5);
/// Hedge bounds: ask the next holder after 3x the peer's usual answer time, within these.
const HEDGE_MIN: Duration = Duration::from_millis(30);
const HEDGE_MAX: Duration = Duration::from_millis(500);
/// How often each connection is pinged (and how long a ping may take before it is closed).
const PING_EVERY: Duration = Duration::from_secs(1);
/// How often summaries are refreshed and static peers redialled.
const TICK: Duration = Duration::from_millis(500);
const REDIAL: Duration = Duration::from_secs(2);
/// How often the local summary is checked against what the store holds.
const RESCAN: Duration = Duration::from_secs(15);
/// Lookup times kept for the p99.
const LOOKUP_SAMPLES: usize = 2048;

/// Whom a fetch asks: likely holders (with the next holder to hedge to), and owners of chunks
/// nobody holds (None: this node).
struct Plan {
    holders: Vec<(PeerId, Option<PeerId>, Vec<ChunkId>)>,
    owners: Vec<(Option<PeerId>, Vec<ChunkId>)>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    chunks: request_response::Behaviour<Codec>,
}

enum Cmd {
    Ask { peer: PeerId, req: Request, reply: oneshot::Sender<Result<Response, String>> },
    Respond { channel: request_response::ResponseChannel<Response>, res: Response },
    Ban { peer: PeerId },
}

#[derive(Default)]
struct Peer {
    addrs: Vec<Multiaddr>,
    connected: bool,
    summary: Option<Remote>,
    summary_pending: bool,
    down_until: Option<Instant>,
    banned_until: Option<Instant>,
    ban_reason: Option<String>,
    /// Usual answer time of a chunk request (exponentially weighted), for the hedge delay.
    rtt: Option<Duration>,
    agent: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
    chunks_in: u64,
    chunks_out: u64,
    /// Rendezvous weight base of this peer (from its id).
    weight: u64,
}

impl Peer {
    fn usable(&self, now: Instant) -> bool {
        self.connected
            && self.summary.is_some()
            && self.banned_until.is_none_or(|t| t <= now)
            && self.down_until.is_none_or(|t| t <= now)
    }
}

#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    lookups_with_holder: AtomicU64,
    chunks_in: AtomicU64,
    bytes_in: AtomicU64,
    chunks_out: AtomicU64,
    bytes_out: AtomicU64,
    asked: AtomicU64,
    hedges: AtomicU64,
    through: AtomicU64,
    bans: AtomicU64,
    corrupt: AtomicU64,
    timeouts: AtomicU64,
}

struct Inner {
    peer_id: PeerId,
    cfg: Config,
    local: Arc<dyn LocalChunks>,
    handle: tokio::runtime::Handle,
    cmds: mpsc::UnboundedSender<Cmd>,
    enabled: AtomicBool,
    peers: Mutex<HashMap<PeerId, Peer>>,
    summary: Mutex<Local>,
    listening: Mutex<Vec<Multiaddr>>,
    counters: Counters,
    lookup_us: Mutex<VecDeque<u64>>,
    /// When the serving link is next free (the serving bandwidth cap).
    serve_free_at: Mutex<Instant>,
    /// Chunks being fetched from this node's own sources now, and a signal when a fetch ends:
    /// concurrent asks for one chunk (this host's and peers') make one fetch.
    through: Mutex<std::collections::HashSet<ChunkId>>,
    through_done: std::sync::Condvar,
}

/// A running node (cheap to clone). Dropping the last handle does not stop it: [`Node::stop`].
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

fn epoch_now(peer: &PeerId) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let h = blake3::hash(&[peer.to_bytes(), nanos.to_le_bytes().to_vec()].concat());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

fn weight(peer: &PeerId) -> u64 {
    u64::from_le_bytes(blake3::hash(&peer.to_bytes()).as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Longest run of chunks one owner is given (see `plan`).
const MAX_RUN: usize = 64;

/// Whether `id` starts a run of chunks with one owner: one id in 16.
fn is_anchor(id: &ChunkId) -> bool {
    id.as_bytes()[31] & 0x0f == 0
}

/// Rendezvous score of chunk `id` at a peer of weight `w`: every node ranks holders alike, and
/// chunks spread evenly over them.
fn score(id: &ChunkId, w: u64) -> u64 {
    let x = u64::from_le_bytes(id.as_bytes()[..8].try_into().expect("8 bytes")) ^ w;
    // splitmix64's finaliser.
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Node {
    /// Starts a node on `handle`'s runtime: listens, dials the static peers, starts mDNS when
    /// asked. Call from outside the runtime.
    pub fn start(cfg: Config, local: Arc<dyn LocalChunks>, handle: tokio::runtime::Handle) -> Result<Node, P2pError> {
        let keypair = libp2p::identity::Keypair::from_protobuf_encoding(&cfg.identity)
            .map_err(|e| P2pError::Identity(e.to_string()))?;
        let peer_id = keypair.public().to_peer_id();
        let held = local.held();
        let summary = Local::build(epoch_now(&peer_id), &held);
        let (cmds, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            peer_id,
            cfg,
            local,
            handle: handle.clone(),
            cmds,
            enabled: AtomicBool::new(true),
            peers: Mutex::new(HashMap::new()),
            summary: Mutex::new(summary),
            listening: Mutex::new(Vec::new()),
            counters: Counters::default(),
            lookup_us: Mutex::new(VecDeque::new()),
            serve_free_at: Mutex::new(Instant::now()),
            through: Mutex::new(Default::default()),
            through_done: std::sync::Condvar::new(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let i = inner.clone();
        handle.spawn(async move {
            match build_swarm(&i, keypair) {
                Ok(swarm) => {
                    let _ = ready_tx.send(Ok(()));
                    drive(i, swarm, rx).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        ready_rx.recv().map_err(|_| P2pError::Start("the node's task ended while starting".into()))??;
        tracing::info!(peer = %peer_id, chunks = held.len(), "p2p node started");
        Ok(Node { inner })
    }

    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// Switches fetching from and serving to peers on or off (connections stay).
    pub fn set_enabled(&self, on: bool) {
        self.inner.enabled.store(on, Ordering::SeqCst);
        tracing::info!(on, "p2p switched");
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
        let mut s = self.inner.summary.lock().expect("summary lock");
        s.add(ids);
        if s.overfull() {
            drop(s);
            self.rebuild_summary();
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

    fn rebuild_summary(&self) {
        let held = self.inner.local.held();
        *self.inner.summary.lock().expect("summary lock") = Local::build(epoch_now(&self.inner.peer_id), &held);
    }

    /// Fetches what peers hold of `ids`: each returned chunk hashed to its id. Ids no peer is
    /// known to hold cost no network.
    pub async fn fetch(&self, ids: &[ChunkId]) -> Vec<(ChunkId, Vec<u8>)> {
        if !self.enabled() || ids.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut want: Vec<ChunkId> = ids.to_vec();
        let mut asked: HashMap<ChunkId, Vec<PeerId>> = HashMap::new();
        // Round one asks holders, and owners for what nobody holds; round two asks the next
        // holder for what the first one lacked (a Bloom false positive).
        for round in 0..2 {
            let plan = self.plan(&want, &asked, round == 0);
            if plan.holders.is_empty() && plan.owners.is_empty() {
                break;
            }
            let asks = plan
                .holders
                .into_iter()
                .flat_map(|(peer, alt, ids)| ids.chunks(BATCH).map(|b| (peer, alt, b.to_vec())).collect::<Vec<_>>());
            let holders = futures::future::join_all(asks.map(|(peer, alt, batch)| {
                for id in &batch {
                    asked.entry(*id).or_default().push(peer);
                }
                self.ask_hedged(peer, alt, batch)
            }));
            let owned = plan
                .owners
                .into_iter()
                .flat_map(|(owner, ids)| ids.chunks(BATCH).map(|b| (owner, b.to_vec())).collect::<Vec<_>>());
            let owners = futures::future::join_all(owned.map(|(owner, batch)| self.through(owner, batch)));
            let (held, owned) = futures::join!(holders, owners);
            for got in held.into_iter().chain(owned) {
                out.extend(got);
            }
            let have: std::collections::HashSet<ChunkId> = out.iter().map(|(i, _)| *i).collect();
            want.retain(|id| !have.contains(id));
            if want.is_empty() {
                break;
            }
        }
        out
    }

    /// For each likely holder: the ids to ask it, and the next holder to hedge to; then, for ids
    /// nobody holds, each one's owner (rendezvous over the usable peers and this node; None is
    /// this node) when `owners` is set and some peer is usable.
    fn plan(&self, ids: &[ChunkId], asked: &HashMap<ChunkId, Vec<PeerId>>, owners: bool) -> Plan {
        let started = Instant::now();
        let now = Instant::now();
        let peers = self.inner.peers.lock().expect("peers lock");
        let usable: Vec<(&PeerId, &Peer)> = peers.iter().filter(|(_, p)| p.usable(now)).collect();
        let mut by_peer: HashMap<(PeerId, Option<PeerId>), Vec<ChunkId>> = HashMap::new();
        let mut by_owner: HashMap<Option<PeerId>, Vec<ChunkId>> = HashMap::new();
        let own_weight = weight(&self.inner.peer_id);
        let (mut anchor, mut run): (Option<Option<PeerId>>, usize) = (None, 0);
        let mut with_holder = 0u64;
        for id in ids {
            let tried = asked.get(id);
            let mut best: [Option<(u64, PeerId)>; 2] = [None, None];
            for (pid, p) in &usable {
                if tried.is_some_and(|t| t.contains(pid)) {
                    continue;
                }
                if !p.summary.as_ref().is_some_and(|s| s.may_hold(id)) {
                    continue;
                }
                let s = score(id, p.weight);
                if best[0].is_none_or(|(b, _)| s > b) {
                    best[1] = best[0];
                    best[0] = Some((s, **pid));
                } else if best[1].is_none_or(|(b, _)| s > b) {
                    best[1] = Some((s, **pid));
                }
            }
            if let Some((_, first)) = best[0] {
                with_holder += 1;
                by_peer.entry((first, best[1].map(|(_, p)| p))).or_default().push(*id);
            } else if owners && !usable.is_empty() && tried.is_none() {
                // Runs of chunks share an owner, so it fetches them as one range: a run starts
                // at an anchor (an id whose low bits are zero: content-defined, so hosts reading
                // one blob in order agree on the runs) and its owner is the anchor's.
                if anchor.is_none() || is_anchor(id) || run >= MAX_RUN {
                    let mut owner = (score(id, own_weight), None);
                    for (pid, p) in &usable {
                        let s = score(id, p.weight);
                        if s > owner.0 {
                            owner = (s, Some(**pid));
                        }
                    }
                    anchor = Some(owner.1);
                    run = 0;
                }
                run += 1;
                by_owner.entry(anchor.expect("set above")).or_default().push(*id);
            }
        }
        drop(peers);
        let c = &self.inner.counters;
        c.lookups.fetch_add(ids.len() as u64, Ordering::Relaxed);
        c.lookups_with_holder.fetch_add(with_holder, Ordering::Relaxed);
        let mut samples = self.inner.lookup_us.lock().expect("lookup lock");
        samples.push_back(started.elapsed().as_micros() as u64);
        if samples.len() > LOOKUP_SAMPLES {
            samples.pop_front();
        }
        Plan {
            holders: by_peer.into_iter().map(|((p, alt), ids)| (p, alt, ids)).collect(),
            owners: by_owner.into_iter().collect(),
        }
    }

    fn rtt(&self, peer: &PeerId) -> Option<Duration> {
        self.inner.peers.lock().expect("peers lock").get(peer).and_then(|p| p.rtt)
    }

    fn hedge_after(&self, peer: &PeerId) -> Duration {
        self.rtt(peer).map_or(Duration::from_millis(100), |r| (r * 3).clamp(HEDGE_MIN, HEDGE_MAX))
    }

    /// How long `peer` may take over `n` chunks: ten times its usual answer time, plus 10 ms a
    /// chunk (a 64 KiB chunk at ~6 MB/s: a slow LAN, a holder reading cold disks) so a large
    /// batch is not taken for silence. (A peer that stops answering loses its connection to the
    /// pings sooner.)
    fn deadline(&self, peer: &PeerId, n: usize) -> Duration {
        let base = self.rtt(peer).map_or(DEADLINE_FIRST, |r| (r * 10).clamp(DEADLINE_MIN, DEADLINE_MAX));
        base + Duration::from_millis(10) * n as u32
    }

    /// Asks `peer` for `ids`; when it is slow, asks `alt` too and takes the first good answer.
    async fn ask_hedged(&self, peer: PeerId, alt: Option<PeerId>, ids: Vec<ChunkId>) -> Vec<(ChunkId, Vec<u8>)> {
        let first = self.ask(peer, ids.clone());
        tokio::pin!(first);
        let Some(alt) = alt else { return first.await.unwrap_or_default() };
        match tokio::time::timeout(self.hedge_after(&peer), &mut first).await {
            Ok(Some(got)) => return got,
            Ok(None) => {}
            Err(_) => {
                self.inner.counters.hedges.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, %alt, chunks = ids.len(), "hedging a slow peer");
                let second = self.ask(alt, ids.clone());
                tokio::pin!(second);
                return tokio::select! {
                    Some(got) = &mut first => got,
                    Some(got) = &mut second => got,
                    else => Vec::new(),
                };
            }
        }
        // The first holder failed at once: the second, without waiting.
        self.ask(alt, ids).await.unwrap_or_default()
    }

    /// Chunks nobody holds, from their owner: this node (its own sources, on a blocking thread)
    /// or a peer (which fetches them from its sources if it knows them).
    async fn through(&self, owner: Option<PeerId>, ids: Vec<ChunkId>) -> Vec<(ChunkId, Vec<u8>)> {
        match owner {
            Some(peer) => self.request(peer, ids, true).await.unwrap_or_default(),
            None => {
                let n = self.clone();
                tokio::task::spawn_blocking(move || n.fetch_through_here(&ids)).await.unwrap_or_default()
            }
        }
    }

    /// This node's own sources, for chunks it owns; what comes is kept and announced. One
    /// fetch per chunk at a time: a second ask waits for the first (bounded), then reads the store.
    fn fetch_through_here(&self, ids: &[ChunkId]) -> Vec<(ChunkId, Vec<u8>)> {
        let inner = &self.inner;
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        {
            let mut inflight = inner.through.lock().expect("through lock");
            for id in ids {
                if inflight.insert(*id) {
                    mine.push(*id);
                } else {
                    theirs.push(*id);
                }
            }
        }
        let mut out = Vec::new();
        // A fetch that ended between the caller's look at the store and the claim above has
        // kept its chunks by now (fetches keep before they release): those are read, not fetched.
        mine.retain(|id| match inner.local.chunk(id) {
            Some(b) => {
                out.push((*id, b));
                false
            }
            None => true,
        });
        let released: Vec<ChunkId> = out.iter().map(|(id, _)| *id).collect();
        if !released.is_empty() {
            let mut inflight = inner.through.lock().expect("through lock");
            released.iter().for_each(|id| {
                inflight.remove(id);
            });
            inner.through_done.notify_all();
        }
        if !mine.is_empty() {
            let got = inner.local.fetch_through(&mine);
            let got: Vec<(ChunkId, Vec<u8>)> = got.into_iter().filter(|(id, b)| ChunkId::of(b) == *id).collect();
            if !got.is_empty() {
                inner.counters.through.fetch_add(got.len() as u64, Ordering::Relaxed);
                self.announce(&got.iter().map(|(id, _)| *id).collect::<Vec<_>>());
            }
            let mut inflight = inner.through.lock().expect("through lock");
            mine.iter().for_each(|id| {
                inflight.remove(id);
            });
            inner.through_done.notify_all();
            out.extend(got);
        }
        if !theirs.is_empty() {
            let deadline = Instant::now() + THROUGH_DEADLINE;
            let mut inflight = inner.through.lock().expect("through lock");
            while theirs.iter().any(|id| inflight.contains(id)) && Instant::now() < deadline {
                inflight =
                    inner.through_done.wait_timeout(inflight, Duration::from_millis(50)).expect("through lock").0;
            }
            drop(inflight);
            out.extend(theirs.iter().filter_map(|id| inner.local.chunk(id).map(|b| (*id, b))));
        }
        out
    }

    /// One request to one peer, checked: None when it failed or sent a wrong chunk.
    async fn ask(&self, peer: PeerId, ids: Vec<ChunkId>) -> Option<Vec<(ChunkId, Vec<u8>)>> {
        self.request(peer, ids, false).await
    }

    /// A Get (or, `through`, a Fetch: the owner may first fetch from its own sources, so it is
    /// given longer) to one peer, checked: None when it failed or sent a wrong chunk.
    async fn request(&self, peer: PeerId, ids: Vec<ChunkId>, through: bool) -> Option<Vec<(ChunkId, Vec<u8>)>> {
        let (reply, rx) = oneshot::channel();
        let started = Instant::now();
        self.inner.counters.asked.fetch_add(ids.len() as u64, Ordering::Relaxed);
        let req = if through { Request::Fetch(ids.clone()) } else { Request::Get(ids.clone()) };
        self.inner.cmds.send(Cmd::Ask { peer, req, reply }).ok()?;
        let deadline = if through {
            THROUGH_DEADLINE + Duration::from_millis(20) * ids.len() as u32
        } else {
            self.deadline(&peer, ids.len())
        };
        let answer = match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(Ok(r))) => r,
            Ok(Ok(Err(e))) => {
                self.set_down(&peer, &e, DOWN_FOR);
                return None;
            }
            Ok(Err(_)) => return None,
            Err(_) => {
                self.inner.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                self.set_down(&peer, "no answer in time", SLOW_FOR);
                return None;
            }
        };
        let Response::Chunks(chunks) = answer else {
            self.ban(&peer, "answered a chunk request with a summary");
            return None;
        };
        let asked: std::collections::HashSet<&ChunkId> = ids.iter().collect();
        for (id, bytes) in &chunks {
            if !asked.contains(id) {
                self.ban(&peer, &format!("sent chunk {id} that was not asked for"));
                return None;
            }
            if ChunkId::of(bytes) != *id {
                self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                self.ban(&peer, &format!("sent wrong bytes for chunk {id}"));
                return None;
            }
        }
        let bytes: u64 = chunks.iter().map(|(_, b)| b.len() as u64).sum();
        let c = &self.inner.counters;
        c.chunks_in.fetch_add(chunks.len() as u64, Ordering::Relaxed);
        c.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        if let Some(p) = self.inner.peers.lock().expect("peers lock").get_mut(&peer) {
            p.bytes_in += bytes;
            p.chunks_in += chunks.len() as u64;
            let took = started.elapsed();
            if !through {
                p.rtt = Some(p.rtt.map_or(took, |r| (r * 3 + took) / 4));
            }
        }
        Some(chunks)
    }

    fn set_down(&self, peer: &PeerId, why: &str, for_: Duration) {
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
        let (p99, max) = {
            let mut s: Vec<u64> = self.inner.lookup_us.lock().expect("lookup lock").iter().copied().collect();
            s.sort_unstable();
            let p99 = s.get((s.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or(0);
            (p99, s.last().copied().unwrap_or(0))
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
                hedges: load(&c.hedges),
                fetched_through: load(&c.through),
                bans: load(&c.bans),
                corrupt_chunks: load(&c.corrupt),
                timeouts: load(&c.timeouts),
                lookup_p99_us: p99,
                lookup_max_us: max,
            },
        }
    }

    /// How long to wait before sending `bytes` under the serving cap (none: at once).
    fn serve_wait(&self, bytes: usize) -> Duration {
        let Some(rate) = self.inner.cfg.serve_rate.filter(|r| *r > 0) else { return Duration::ZERO };
        let mut free = self.inner.serve_free_at.lock().expect("serve lock");
        let now = Instant::now();
        let start = (*free).max(now);
        *free = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        start - now
    }

    /// Reads what a peer asked for (on a blocking thread: the store is RocksDB and files); for a
    /// Fetch (`through`), what this node lacks is fetched from its own sources first.
    fn serve(&self, peer: PeerId, ids: Vec<ChunkId>, through: bool) -> Response {
        if !self.enabled() {
            return Response::Chunks(Vec::new());
        }
        let mut fetched: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        if through {
            let lacking: Vec<ChunkId> = ids.iter().filter(|id| self.inner.local.chunk(id).is_none()).copied().collect();
            if !lacking.is_empty() {
                fetched = self.fetch_through_here(&lacking).into_iter().collect();
            }
        }
        let mut out = Vec::new();
        let mut size = 0;
        for id in ids {
            let Some(mut b) = fetched.remove(&id).or_else(|| self.inner.local.chunk(&id)) else { continue };
            if size + b.len() + 36 > MAX_RESPONSE {
                break;
            }
            size += b.len() + 36;
            if self.inner.cfg.fault_corrupt_serving && !b.is_empty() {
                b[0] ^= 0xff;
            }
            out.push((id, b));
        }
        let bytes: u64 = out.iter().map(|(_, b)| b.len() as u64).sum();
        let c = &self.inner.counters;
        c.chunks_out.fetch_add(out.len() as u64, Ordering::Relaxed);
        c.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        if let Some(p) = self.inner.peers.lock().expect("peers lock").get_mut(&peer) {
            p.bytes_out += bytes;
            p.chunks_out += out.len() as u64;
        }
        let wait = self.serve_wait(size);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        Response::Chunks(out)
    }

    /// The blocking form of [`Node::fetch`], for threads outside the runtime.
    pub fn fetch_blocking(&self, ids: &[ChunkId]) -> Vec<(ChunkId, Vec<u8>)> {
        self.inner.handle.block_on(self.fetch(ids))
    }
}

impl hb_core::ChunkSource for Node {
    fn fetch(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, hb_core::SourceError> {
        Ok(self.fetch_blocking(std::slice::from_ref(id)).into_iter().next().map(|(_, b)| b))
    }

    fn fetch_many(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, hb_core::SourceError> {
        Ok(self.fetch_blocking(ids))
    }
}

fn build_swarm(inner: &Arc<Inner>, keypair: libp2p::identity::Keypair) -> Result<Swarm<Behaviour>, P2pError> {
    let psk = pnet::PreSharedKey::new(inner.cfg.psk);
    let mdns_on = inner.cfg.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(move |key| {
            let noise = noise::Config::new(key).map_err(Box::new)?;
            let base = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            // The pre-shared key first: a node without it cannot even start noise.
            let private = base.and_then(move |socket, _| pnet::PnetConfig::new(psk).handshake(socket));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                private
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .timeout(Duration::from_secs(10)),
            )
        })
        .map_err(|e| P2pError::Start(e.to_string()))?
        .with_behaviour(|key| {
            let mdns = if mdns_on {
                let cfg = mdns::Config {
                    ttl: Duration::from_secs(30),
                    query_interval: Duration::from_millis(500),
                    enable_ipv6: false,
                };
                Some(mdns::tokio::Behaviour::new(cfg, key.public().to_peer_id())?)
            } else {
                None
            };
            Ok(Behaviour {
                blocked: Default::default(),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(256))
                        .with_max_established_per_peer(Some(2))
                        .with_max_pending_incoming(Some(64)),
                ),
                identify: identify::Behaviour::new(
                    identify::Config::new("/hb/1".into(), key.public())
                        .with_agent_version(format!("hb/{}", env!("CARGO_PKG_VERSION"))),
                ),
                // Liveness: a peer that stops answering (a partition, a hung host) loses its
                // connection within about two seconds, and what waited on it fails at once.
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_EVERY).with_timeout(PING_EVERY)),
                mdns: Toggle::from(mdns),
                chunks: request_response::Behaviour::new(
                    [(StreamProtocol::new(PROTOCOL), request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(DEADLINE_MAX + Duration::from_secs(5))
                        .with_max_concurrent_streams(64),
                ),
            })
        })
        .map_err(|e| P2pError::Start(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for addr in &inner.cfg.listen {
        swarm.listen_on(addr.clone()).map_err(|e| P2pError::Listen(addr.to_string(), e.to_string()))?;
    }
    for addr in &inner.cfg.static_peers {
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, error = %e, "dialling a static peer failed");
        }
    }
    Ok(swarm)
}

/// The swarm's task: commands from handles, events from the network, the refresh tick.
async fn drive(inner: Arc<Inner>, mut swarm: Swarm<Behaviour>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let node = Node { inner: inner.clone() };
    let mut pending: HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Response, String>>> =
        HashMap::new();
    let mut summaries: HashMap<request_response::OutboundRequestId, PeerId> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    let mut last_redial = Instant::now();
    let mut last_rescan = Instant::now();
    let mut rescanning: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Cmd::Ask { peer, req, reply }) => {
                    let id = swarm.behaviour_mut().chunks.send_request(&peer, req);
                    pending.insert(id, reply);
                }
                Some(Cmd::Respond { channel, res }) => {
                    let _ = swarm.behaviour_mut().chunks.send_response(channel, res);
                }
                Some(Cmd::Ban { peer }) => {
                    swarm.behaviour_mut().blocked.block_peer(peer);
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                // Bans that ran out.
                let expired: Vec<PeerId> = inner.peers.lock().expect("peers lock").iter_mut()
                    .filter(|(_, p)| p.banned_until.is_some_and(|t| t <= now))
                    .map(|(id, p)| { p.banned_until = None; *id })
                    .collect();
                for p in expired {
                    swarm.behaviour_mut().blocked.unblock_peer(p);
                }
                // Summaries: ask each connected peer what changed.
                let ask: Vec<(PeerId, u64, u64)> = inner.peers.lock().expect("peers lock").iter_mut()
                    .filter(|(_, p)| p.connected && !p.summary_pending && p.banned_until.is_none())
                    .map(|(id, p)| {
                        p.summary_pending = true;
                        let (e, g) = p.summary.as_ref().map_or((0, 0), |s| (s.epoch, s.generation));
                        (*id, e, g)
                    })
                    .collect();
                for (peer, epoch, generation) in ask {
                    let id = swarm.behaviour_mut().chunks.send_request(&peer, Request::Summary { epoch, generation });
                    summaries.insert(id, peer);
                }
                if now - last_redial >= REDIAL {
                    last_redial = now;
                    // Peers found by mDNS that are not connected (and not banned).
                    let again: Vec<(PeerId, Vec<Multiaddr>)> = inner.peers.lock().expect("peers lock").iter()
                        .filter(|(_, p)| !p.connected && !p.addrs.is_empty() && p.banned_until.is_none())
                        .map(|(id, p)| (*id, p.addrs.clone()))
                        .collect();
                    for (peer, addrs) in again {
                        let _ = swarm.dial(libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addrs).build());
                    }
                    for addr in &inner.cfg.static_peers {
                        let connected = inner.peers.lock().expect("peers lock").values()
                            .any(|p| p.connected && p.addrs.iter().any(|a| a == addr));
                        if !connected {
                            let _ = swarm.dial(addr.clone());
                        }
                    }
                }
                if now - last_rescan >= RESCAN && rescanning.as_ref().is_none_or(|h| h.is_finished()) {
                    last_rescan = now;
                    let n = node.clone();
                    rescanning = Some(tokio::task::spawn_blocking(move || {
                        let held = n.inner.local.held();
                        n.announce(&held);
                    }));
                }
            }
            ev = swarm.select_next_some() => handle_event(&node, &mut swarm, ev, &mut pending, &mut summaries),
        }
    }
}

fn handle_event(
    node: &Node,
    swarm: &mut Swarm<Behaviour>,
    ev: SwarmEvent<BehaviourEvent>,
    pending: &mut HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Response, String>>>,
    summaries: &mut HashMap<request_response::OutboundRequestId, PeerId>,
) {
    let inner = &node.inner;
    match ev {
        SwarmEvent::NewListenAddr { address, .. } => {
            tracing::info!(%address, "p2p listening");
            inner.listening.lock().expect("listen lock").push(address);
        }
        SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
            let mut peers = inner.peers.lock().expect("peers lock");
            let p = peers.entry(peer_id).or_insert_with(|| Peer { weight: weight(&peer_id), ..Default::default() });
            p.connected = true;
            p.down_until = None;
            let addr = endpoint.get_remote_address().clone();
            if endpoint.is_dialer() && !p.addrs.contains(&addr) {
                p.addrs.push(addr);
            }
            tracing::info!(peer = %peer_id, "peer connected");
        }
        SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
            if let Some(p) = inner.peers.lock().expect("peers lock").get_mut(&peer_id) {
                p.connected = false;
                p.summary_pending = false;
            }
            tracing::info!(peer = %peer_id, "peer disconnected");
        }
        SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
            for (peer, addr) in found {
                if peer == inner.peer_id {
                    continue;
                }
                tracing::debug!(%peer, %addr, "discovered by mDNS");
                let mut peers = inner.peers.lock().expect("peers lock");
                let p = peers.entry(peer).or_insert_with(|| Peer { weight: weight(&peer), ..Default::default() });
                if !p.addrs.contains(&addr) {
                    p.addrs.push(addr);
                }
                // Dialled now, and again at each redial while not connected (a first dial can
                // fail: the peer still starting, a stale address of the same host).
                if p.banned_until.is_none() && !p.connected {
                    let addrs = p.addrs.clone();
                    drop(peers);
                    let _ = swarm.dial(libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addrs).build());
                }
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
            let mut peers = inner.peers.lock().expect("peers lock");
            for (peer, addr) in gone {
                if let Some(p) = peers.get_mut(&peer) {
                    p.addrs.retain(|a| *a != addr);
                }
                if peers.get(&peer).is_some_and(|p| p.addrs.is_empty() && !p.connected && p.banned_until.is_none()) {
                    peers.remove(&peer);
                }
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(e) })) => {
            tracing::warn!(%peer, error = %e, "a peer stopped answering; closing its connection");
            swarm.close_connection(connection);
        }
        SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
            tracing::debug!(peer = ?peer_id, %error, "dialling a peer failed");
        }
        SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
            tracing::debug!(from = %send_back_addr, %error, "a connection from a peer failed (another key?)");
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
            if let Some(p) = inner.peers.lock().expect("peers lock").get_mut(&peer_id) {
                p.agent = Some(info.agent_version);
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Chunks(ev)) => match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => match request {
                    Request::Summary { epoch, generation } => {
                        let s = inner.summary.lock().expect("summary lock");
                        let res = Response::Summary {
                            epoch: s.epoch(),
                            generation: s.generation(),
                            body: s.since(epoch, generation),
                        };
                        drop(s);
                        let _ = swarm.behaviour_mut().chunks.send_response(channel, res);
                    }
                    Request::Get(ids) => {
                        let n = node.clone();
                        inner.handle.spawn_blocking(move || {
                            let res = n.serve(peer, ids, false);
                            let _ = n.inner.cmds.send(Cmd::Respond { channel, res });
                        });
                    }
                    Request::Fetch(ids) => {
                        let n = node.clone();
                        inner.handle.spawn_blocking(move || {
                            let res = n.serve(peer, ids, true);
                            let _ = n.inner.cmds.send(Cmd::Respond { channel, res });
                        });
                    }
                },
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    } else if let Some(peer) = summaries.remove(&request_id) {
                        take_summary(node, peer, response);
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some(reply) = pending.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                } else if summaries.remove(&request_id).is_some() {
                    if let Some(p) = inner.peers.lock().expect("peers lock").get_mut(&peer) {
                        p.summary_pending = false;
                    }
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "a peer's request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        },
        _ => {}
    }
}

fn take_summary(node: &Node, peer: PeerId, response: Response) {
    let mut peers = node.inner.peers.lock().expect("peers lock");
    let Some(p) = peers.get_mut(&peer) else { return };
    p.summary_pending = false;
    let Response::Summary { epoch, generation, body } = response else {
        drop(peers);
        node.ban(&peer, "answered a summary request with chunks");
        return;
    };
    match Remote::apply(p.summary.take(), epoch, generation, body) {
        Ok(s) => p.summary = Some(s),
        Err(e) => tracing::warn!(%peer, error = %e, "a peer's summary was refused; asking for the whole of it"),
    }
}
