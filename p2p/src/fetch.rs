//! Fetching from peers: which peers may hold a chunk is answered here, from copies of their
//! summaries (no network); each chunk goes to one likely holder (spread by rendezvous hashing), a
//! slow answer is hedged to the next holder, an answer is checked chunk by chunk, and a peer that
//! sends one wrong chunk is banned. A peer that does not answer is set aside for a while, so a
//! dead peer costs one short wait, not one per chunk. Chunks nobody holds go to their owner,
//! which fetches them once for the team (docs/p2p.md).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::FutureExt;
use hb_core::{blob_key, ChunkId, Digest};
use libp2p::PeerId;
use tokio::sync::oneshot;

use crate::codec::{Request, Response, MAX_RESPONSE};
use crate::state::*;

/// Ids asked of one peer in one request.
pub(crate) const BATCH: usize = 128;
/// Ids asked of a peer alone before it has answered one request right ([`Node::ask_holder`]).
pub(crate) const FIRST_BATCH: usize = 16;
/// How long a peer may take to answer before it is given up for this fetch and set aside:
/// ten times its usual answer time, within these bounds, plus 10 ms a chunk (`Node::deadline`).
pub(crate) const DEADLINE_MIN: Duration = Duration::from_millis(250);
pub(crate) const DEADLINE_MAX: Duration = Duration::from_secs(2);
/// The deadline of a peer with no answer time known yet.
pub(crate) const DEADLINE_FIRST: Duration = Duration::from_millis(500);
/// How long an owner may take to fetch chunks from its own sources for a peer (plus 20 ms a chunk).
pub(crate) const THROUGH_DEADLINE: Duration = Duration::from_secs(10);
/// How long a peer whose request failed (its connection gone) is set aside.
pub(crate) const DOWN_FOR: Duration = Duration::from_secs(30);
/// How long a peer that answered too slowly is set aside.
pub(crate) const SLOW_FOR: Duration = Duration::from_secs(5);
/// Hedge bounds: ask the next holder after 3x the peer's usual answer time, within these.
pub(crate) const HEDGE_MIN: Duration = Duration::from_millis(30);
pub(crate) const HEDGE_MAX: Duration = Duration::from_millis(500);

/// Whom a fetch asks: likely holders (with the next holder to hedge to), and owners of chunks
/// nobody holds (None: this node).
pub(crate) struct Plan {
    pub(crate) holders: Vec<(PeerId, Option<PeerId>, Vec<ChunkId>)>,
    pub(crate) owners: Vec<(Option<PeerId>, Vec<ChunkId>)>,
}

/// Peers asked in turn for a layer-form blob before the registry is.
pub(crate) const BLOB_HOLDERS: usize = 2;

/// Longest run of chunks one owner is given (see `plan`).
pub(crate) const MAX_RUN: usize = 64;

/// Whether `id` starts a run of chunks with one owner: one id in 16.
pub(crate) fn is_anchor(id: &ChunkId) -> bool {
    id.as_bytes()[31] & 0x0f == 0
}

/// A who-has lookup slower than this is logged (debug), with how long it waited for the table.
const SLOW_LOOKUP: Duration = Duration::from_millis(1);

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Rendezvous score of chunk `id` at a peer of weight `w`: every node ranks holders alike, and
/// chunks spread evenly over them.
pub(crate) fn score(id: &ChunkId, w: u64) -> u64 {
    let x = u64::from_le_bytes(id.as_bytes()[..8].try_into().expect("8 bytes")) ^ w;
    // splitmix64's finaliser.
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Node {
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
        // holder (or, when none is left, the owner) for what the first one lacked (a Bloom false
        // positive).
        let mut owner_asked = std::collections::HashSet::new();
        for _round in 0..2 {
            let plan = self.plan(&want, &asked, &owner_asked);
            if plan.holders.is_empty() && plan.owners.is_empty() {
                break;
            }
            owner_asked.extend(plan.owners.iter().flat_map(|(_, ids)| ids.iter().copied()));
            for (peer, _, ids) in &plan.holders {
                for id in ids {
                    asked.entry(*id).or_default().push(*peer);
                }
            }
            let holders = futures::future::join_all(
                plan.holders.into_iter().map(|(peer, alt, ids)| self.ask_holder(peer, alt, ids)),
            );
            let owned = plan
                .owners
                .into_iter()
                .flat_map(|(owner, ids)| ids.chunks(BATCH).map(|b| (owner, b.to_vec())).collect::<Vec<_>>());
            let owners = futures::future::join_all(owned.map(|(owner, batch)| self.through(owner, batch)));
            let (held, owned) = futures::join!(holders, owners);
            for (got, moved) in held {
                // The rest of a batch its holder's first answer failed went to the next holder.
                if let Some((alt, ids)) = moved {
                    ids.iter().for_each(|id| asked.entry(*id).or_default().push(alt));
                }
                out.extend(got);
            }
            for got in owned {
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
    pub(crate) fn plan(
        &self,
        ids: &[ChunkId],
        asked: &HashMap<ChunkId, Vec<PeerId>>,
        owner_asked: &std::collections::HashSet<ChunkId>,
    ) -> Plan {
        let started = Instant::now();
        let cpu_started = thread_cpu();
        let peers = self.inner.peers.lock().expect("peers lock");
        let now = Instant::now();
        let waited = now - started;
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
            } else if usable.iter().any(|(_, p)| p.serves) && !owner_asked.contains(id) {
                // Nobody holds it (or every holder lacked it): its owner fetches it. Runs of
                // chunks share an owner, so it fetches them as one range: a run starts at an
                // anchor (an id whose low bits are zero: content-defined, so hosts reading one
                // blob in order agree on the runs, wherever their batches begin) and its owner
                // is the anchor's; ids before a batch's first anchor are their own owners.
                let owner_of = |id: &ChunkId| {
                    let mut owner = (score(id, own_weight), None);
                    for (pid, p) in usable.iter().filter(|(_, p)| p.serves) {
                        let s = score(id, p.weight);
                        if s > owner.0 {
                            owner = (s, Some(**pid));
                        }
                    }
                    owner.1
                };
                if is_anchor(id) || (anchor.is_some() && run >= MAX_RUN) {
                    anchor = Some(owner_of(id));
                    run = 0;
                }
                let owner = match anchor {
                    Some(a) => {
                        run += 1;
                        a
                    }
                    None => owner_of(id),
                };
                by_owner.entry(owner).or_default().push(*id);
            }
        }
        drop(peers);
        let c = &self.inner.counters;
        c.lookups.fetch_add(ids.len() as u64, Ordering::Relaxed);
        c.lookups_with_holder.fetch_add(with_holder, Ordering::Relaxed);
        // (In this order: the CPU interval lies within the wall one.)
        let on_cpu = thread_cpu().saturating_sub(cpu_started);
        let took = started.elapsed();
        if took > SLOW_LOOKUP {
            tracing::debug!(ids = ids.len(), ?waited, ?on_cpu, ?took, "a slow who-has lookup");
        }
        let mut samples = self.inner.lookup_us.lock().expect("lookup lock");
        samples.push_back((took.as_micros() as u64, on_cpu.as_micros() as u64));
        if samples.len() > LOOKUP_SAMPLES {
            samples.pop_front();
        }
        Plan {
            holders: by_peer.into_iter().map(|((p, alt), ids)| (p, alt, ids)).collect(),
            owners: by_owner.into_iter().collect(),
        }
    }

    /// Asks holder `peer` for `ids` in batches side by side (hedged to `alt`). A peer that has
    /// not yet answered one request right is first asked for [`FIRST_BATCH`] of them alone: a
    /// lying peer is found out (and banned) after one small answer, not after megabytes of wrong
    /// chunks (an answer is checked once it has all come); the rest then goes to `alt`, which is
    /// returned with the ids it was asked.
    pub(crate) async fn ask_holder(
        &self,
        peer: PeerId,
        alt: Option<PeerId>,
        ids: Vec<ChunkId>,
    ) -> (Vec<(ChunkId, Vec<u8>)>, Option<(PeerId, Vec<ChunkId>)>) {
        let mut out = Vec::new();
        let (mut peer, mut alt, mut rest, mut moved) = (peer, alt, &ids[..], None);
        if self.rtt(&peer).is_none() && ids.len() > FIRST_BATCH {
            let (head, tail) = ids.split_at(FIRST_BATCH);
            out = self.ask_hedged(peer, alt, head.to_vec()).await;
            rest = tail;
            if self.rtt(&peer).is_none() {
                // The head failed (a lie, a timeout, a lost connection): the rest to the next
                // holder, if there is one.
                match alt.take() {
                    Some(a) => {
                        peer = a;
                        moved = Some((a, tail.to_vec()));
                    }
                    None => return (out, None),
                }
            }
        }
        let asks = rest.chunks(BATCH).map(|b| self.ask_hedged(peer, alt, b.to_vec()));
        out.extend(futures::future::join_all(asks).await.into_iter().flatten());
        (out, moved)
    }

    pub(crate) fn rtt(&self, peer: &PeerId) -> Option<Duration> {
        self.inner.peers.lock().expect("peers lock").get(peer).and_then(|p| p.rtt)
    }

    /// When to ask the next holder too: three times `peer`'s usual answer time, plus 1 ms a
    /// chunk (a usual answer may have been of fewer chunks).
    pub(crate) fn hedge_after(&self, peer: &PeerId, n: usize) -> Duration {
        let base = self.rtt(peer).map_or(Duration::from_millis(100), |r| (r * 3).clamp(HEDGE_MIN, HEDGE_MAX));
        base + Duration::from_millis(1) * n as u32
    }

    /// How long `peer` may take over `n` chunks: ten times its usual answer time, plus 10 ms a
    /// chunk (a 64 KiB chunk at ~6 MB/s: a slow LAN, a holder reading cold disks) so a large
    /// batch is not taken for silence. (A peer that stops answering loses its connection to the
    /// pings sooner.)
    pub(crate) fn deadline(&self, peer: &PeerId, n: usize) -> Duration {
        let base = self.rtt(peer).map_or(DEADLINE_FIRST, |r| (r * 10).clamp(DEADLINE_MIN, DEADLINE_MAX));
        base + Duration::from_millis(10) * n as u32
    }

    /// Asks `peer` for `ids`; when it is slow, asks `alt` too and takes the first good answer.
    pub(crate) async fn ask_hedged(
        &self,
        peer: PeerId,
        alt: Option<PeerId>,
        ids: Vec<ChunkId>,
    ) -> Vec<(ChunkId, Vec<u8>)> {
        let first = self.ask(peer, ids.clone());
        tokio::pin!(first);
        let Some(alt) = alt else { return first.await.unwrap_or_default() };
        match tokio::time::timeout(self.hedge_after(&peer, ids.len()), &mut first).await {
            Ok(Some(got)) => return got,
            Ok(None) => {}
            Err(_) => {
                self.inner.counters.hedges.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, %alt, chunks = ids.len(), "hedging a slow peer");
                let second = self.ask(alt, ids.clone());
                // The first complete answer wins; a partial one (the next holder may hold only
                // some of the batch) is completed from the other answer when it comes.
                let (got, rest) = match futures::future::select(first, Box::pin(second)).await {
                    futures::future::Either::Left((got, rest)) => (got, rest.left_future()),
                    futures::future::Either::Right((got, rest)) => (got, rest.right_future()),
                };
                let mut got = got.unwrap_or_default();
                if got.len() < ids.len() {
                    let have: std::collections::HashSet<ChunkId> = got.iter().map(|(i, _)| *i).collect();
                    if let Some(more) = rest.await {
                        got.extend(more.into_iter().filter(|(i, _)| !have.contains(i)));
                    }
                }
                return got;
            }
        }
        // The first holder failed at once: the second, without waiting.
        self.ask(alt, ids).await.unwrap_or_default()
    }

    /// Chunks nobody holds, from their owner: this node (its own sources, on a blocking thread)
    /// or a peer (which fetches them from its sources if it knows them).
    pub(crate) async fn through(&self, owner: Option<PeerId>, ids: Vec<ChunkId>) -> Vec<(ChunkId, Vec<u8>)> {
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
    pub(crate) fn fetch_through_here(&self, ids: &[ChunkId]) -> Vec<(ChunkId, Vec<u8>)> {
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
    pub(crate) async fn ask(&self, peer: PeerId, ids: Vec<ChunkId>) -> Option<Vec<(ChunkId, Vec<u8>)>> {
        self.request(peer, ids, false).await
    }

    /// A Get (or, `through`, a Fetch: the owner may first fetch from its own sources, so it is
    /// given longer) to one peer, checked: None when it failed or sent a wrong chunk.
    pub(crate) async fn request(
        &self,
        peer: PeerId,
        ids: Vec<ChunkId>,
        through: bool,
    ) -> Option<Vec<(ChunkId, Vec<u8>)>> {
        let started = Instant::now();
        self.inner.counters.asked.fetch_add(ids.len() as u64, Ordering::Relaxed);
        let req = if through { Request::Fetch(ids.clone()) } else { Request::Get(ids.clone()) };
        let deadline = if through {
            THROUGH_DEADLINE + Duration::from_millis(20) * ids.len() as u32
        } else {
            self.deadline(&peer, ids.len())
        };
        let Response::Chunks(chunks) = self.exchange(peer, req, deadline).await? else {
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

    /// Sends `req` to `peer` and waits up to `deadline` for the answer: None when the request
    /// failed (a lost connection sets the peer aside) or took too long (set aside for a while).
    async fn exchange(&self, peer: PeerId, req: Request, deadline: Duration) -> Option<Response> {
        let (reply, rx) = oneshot::channel();
        self.inner.cmds.send(Cmd::Ask { peer, req, reply }).ok()?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(Ok(r))) => Some(r),
            Ok(Ok(Err(f))) => {
                if f.gone {
                    self.set_down(&peer, &f.reason, DOWN_FOR);
                }
                None
            }
            Ok(Err(_)) => None,
            Err(_) => {
                self.inner.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                self.set_down(&peer, "no answer in time", SLOW_FOR);
                None
            }
        }
    }

    /// Layer-form blob `digest` of `size` bytes from a peer that keeps it: the likely holders
    /// (their summaries list it under [`blob_key`]; at most [`BLOB_HOLDERS`], best rendezvous
    /// score first) asked in turn, each answer checked against the digest (a wrong one bans its
    /// sender). None (no holder, or none answered right): the caller asks the registry.
    pub async fn fetch_blob(&self, digest: &Digest, size: u64) -> Option<Vec<u8>> {
        if !self.enabled() || size > MAX_RESPONSE as u64 {
            return None;
        }
        let key = blob_key(digest);
        let holders: Vec<PeerId> = {
            let now = Instant::now();
            let peers = self.inner.peers.lock().expect("peers lock");
            let mut likely: Vec<(u64, PeerId)> = peers
                .iter()
                .filter(|(_, p)| p.usable(now) && p.serves && p.summary.as_ref().is_some_and(|s| s.may_hold(&key)))
                .map(|(id, p)| (score(&key, p.weight), *id))
                .collect();
            likely.sort_unstable_by_key(|(s, _)| std::cmp::Reverse(*s));
            likely.into_iter().take(BLOB_HOLDERS).map(|(_, id)| id).collect()
        };
        for peer in holders {
            let started = Instant::now();
            let deadline = self.deadline(&peer, (size as usize).div_ceil(64 << 10));
            let answer = self.exchange(peer, Request::Blob(*digest), deadline).await;
            match answer {
                Some(Response::Blob(Some(b))) if Digest::of(&b) != *digest => {
                    self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    self.ban(&peer, &format!("sent wrong bytes for blob {digest}"));
                }
                // The blob itself, but not of the size the caller was told: its manifest is wrong,
                // not the peer (the registry will say so).
                Some(Response::Blob(Some(b))) if b.len() as u64 != size => return None,
                Some(Response::Blob(Some(b))) => {
                    let c = &self.inner.counters;
                    c.blobs_in.fetch_add(1, Ordering::Relaxed);
                    c.bytes_in.fetch_add(size, Ordering::Relaxed);
                    if let Some(p) = self.inner.peers.lock().expect("peers lock").get_mut(&peer) {
                        p.bytes_in += size;
                    }
                    tracing::debug!(%peer, %digest, size, took = ?started.elapsed(), "a layer-form blob from a peer");
                    return Some(b);
                }
                // Not kept there after all (a summary's false positive), or no answer in time.
                Some(Response::Blob(None)) | None => {}
                Some(_) => self.ban(&peer, "answered a blob request with something else"),
            }
        }
        None
    }
}
