//! Real nodes on loopback (TCP, pre-shared key, noise, yamux): chunks and layer-form blobs cross,
//! a node without the key stays out, a peer that sends wrong bytes is banned and nothing it sent
//! is returned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hb_core::{BlobSource, ChunkId, Digest};
use hb_p2p::{Config, LocalChunks, Node};

#[derive(Default)]
struct Mem(Mutex<HashMap<ChunkId, Vec<u8>>>, Option<Arc<Upstream>>, Mutex<HashMap<Digest, Vec<u8>>>);

/// A registry every node can reach: counts what each chunk cost it.
#[derive(Default)]
struct Upstream {
    chunks: HashMap<ChunkId, Vec<u8>>,
    fetched: Mutex<HashMap<ChunkId, usize>>,
}

impl LocalChunks for Mem {
    fn chunk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.0.lock().unwrap().get(id).cloned()
    }
    fn held(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self.0.lock().unwrap().keys().copied().collect();
        ids.extend(self.2.lock().unwrap().keys().map(hb_core::blob_key));
        ids
    }
    fn blob(&self, digest: &Digest) -> Option<Vec<u8>> {
        self.2.lock().unwrap().get(digest).cloned()
    }
    fn fetch_through(&self, ids: &[ChunkId]) -> Vec<(ChunkId, Vec<u8>)> {
        let Some(up) = &self.1 else { return Vec::new() };
        let got: Vec<(ChunkId, Vec<u8>)> =
            ids.iter().filter_map(|id| up.chunks.get(id).map(|b| (*id, b.clone()))).collect();
        for (id, b) in &got {
            *up.fetched.lock().unwrap().entry(*id).or_default() += 1;
            self.0.lock().unwrap().insert(*id, b.clone());
        }
        got
    }
}

fn chunks(seed: u8, n: usize) -> Vec<(ChunkId, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let b: Vec<u8> = (0..70_000 + seed as usize).map(|j| (j as u8) ^ seed ^ (i as u8)).collect();
            (ChunkId::of(&b), b)
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Started {
    node: Node,
    port: u16,
}

fn start(rt: &tokio::runtime::Runtime, psk: u8, peers: &[u16], local: Arc<Mem>, corrupt: bool) -> Started {
    let port = free_port();
    let cfg = Config {
        listen: vec![hb_p2p::parse_addr(&format!("127.0.0.1:{port}")).unwrap()],
        psk: [psk; 32],
        identity: hb_p2p::new_identity(),
        static_peers: peers.iter().map(|p| hb_p2p::parse_addr(&format!("127.0.0.1:{p}")).unwrap()).collect(),
        mdns: false,
        serve_rate: None,
        ban_for: Duration::from_secs(3600),
        fault_corrupt_serving: corrupt,
    };
    Started { node: Node::start(cfg, local, rt.handle().clone()).unwrap(), port }
}

/// Waits until `node` has a summary from `n` connected peers.
fn wait_for_peers(node: &Node, n: usize) -> Duration {
    let t = Instant::now();
    loop {
        let r = node.report();
        if r.peers.iter().filter(|p| p.connected && p.summary_generation.is_some()).count() >= n {
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "peers never appeared: {r:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn chunks_cross_between_members_only_and_a_liar_is_banned() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let data = chunks(1, 40);
    let holder_store = Arc::new(Mem::default());
    holder_store.0.lock().unwrap().extend(data.iter().cloned());
    let holder = start(&rt, 1, &[], holder_store, false);
    // A node of another network, dialling the holder: the key handshake fails.
    let stranger = start(&rt, 2, &[holder.port], Arc::new(Mem::default()), false);
    let asker = start(&rt, 1, &[holder.port], Arc::new(Mem::default()), false);
    let found_in = wait_for_peers(&asker.node, 1);
    assert!(found_in < Duration::from_secs(2), "a static peer took {found_in:?} to be usable");

    let ids: Vec<ChunkId> = data.iter().map(|(i, _)| *i).collect();
    let mut unknown = chunks(9, 3).into_iter().map(|(i, _)| i).collect::<Vec<_>>();
    unknown.extend(&ids);
    let got = asker.node.fetch_blocking(&unknown);
    assert_eq!(got.len(), ids.len(), "every held chunk, none of the unknown ones");
    for (id, b) in &got {
        assert_eq!(ChunkId::of(b), *id);
    }
    let r = asker.node.report();
    assert_eq!(r.stats.chunks_received, 40);
    assert!(r.stats.lookup_p99_us < 2000, "lookup p99 {} us", r.stats.lookup_p99_us);
    // Each lookup's time on its thread's CPU is within its wall time, so their p99s are too.
    assert!(
        r.stats.lookup_cpu_p99_us <= r.stats.lookup_p99_us,
        "on CPU {} us, wall {} us",
        r.stats.lookup_cpu_p99_us,
        r.stats.lookup_p99_us
    );
    assert!(r.stats.lookups_with_holder >= 40 && r.stats.lookups_with_holder <= 43);

    // The stranger never got in, either way.
    std::thread::sleep(Duration::from_millis(600));
    let s = stranger.node.report();
    assert!(s.peers.iter().all(|p| !p.connected), "a node without the key connected: {s:#?}");
    assert!(stranger.node.fetch_blocking(&ids).is_empty());
    assert!(holder.node.report().peers.iter().all(|p| p.id != s.peer_id || !p.connected));

    // A liar holding the same chunks, and a fresh asker that knows only the liar.
    let liar_store = Arc::new(Mem::default());
    liar_store.0.lock().unwrap().extend(data.iter().cloned());
    let liar = start(&rt, 1, &[], liar_store, true);
    let victim = start(&rt, 1, &[liar.port], Arc::new(Mem::default()), false);
    wait_for_peers(&victim.node, 1);
    assert!(victim.node.fetch_blocking(&ids).is_empty(), "nothing from a liar is returned");
    // A peer that has not answered right yet is asked for a few chunks alone first: the liar was
    // found out after those, not after all 40 (an answer is checked once it has all come).
    let sent = liar.node.report().stats.chunks_sent;
    assert!(sent <= 16, "the liar sent {sent} chunks before it was found out");
    let v = victim.node.report();
    assert_eq!(v.stats.bans, 1);
    assert!(v.stats.corrupt_chunks >= 1);
    let banned = v.peers.iter().find(|p| p.id == liar.node.peer_id().to_string()).expect("the liar is listed");
    assert!(banned.banned_for_seconds.unwrap() > 3000, "{banned:#?}");
    assert!(banned.ban_reason.as_deref().unwrap().contains("wrong bytes"));
    // Banned: disconnected, and asked nothing more.
    std::thread::sleep(Duration::from_millis(600));
    assert!(victim.node.fetch_blocking(&ids).is_empty());
    assert_eq!(victim.node.report().stats.bans, 1);
}

#[test]
fn switched_off_a_node_neither_asks_nor_serves() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let data = chunks(3, 5);
    let store = Arc::new(Mem::default());
    store.0.lock().unwrap().extend(data.iter().cloned());
    let holder = start(&rt, 5, &[], store, false);
    let asker = start(&rt, 5, &[holder.port], Arc::new(Mem::default()), false);
    wait_for_peers(&asker.node, 1);
    let ids: Vec<ChunkId> = data.iter().map(|(i, _)| *i).collect();
    holder.node.set_enabled(false);
    assert!(asker.node.fetch_blocking(&ids).is_empty());
    // Once its next summary says so (an empty filter, not serving), it is not even asked.
    std::thread::sleep(Duration::from_millis(1200));
    let asked = asker.node.report().stats.chunks_asked;
    assert!(asker.node.fetch_blocking(&ids).is_empty());
    assert_eq!(asker.node.report().stats.chunks_asked, asked, "a switched-off peer is asked nothing");
    holder.node.set_enabled(true);
    // Back on: its summary is rebuilt and its chunks are found again.
    let t = Instant::now();
    while asker.node.fetch_blocking(&ids[..1]).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "a node switched back on is never asked again");
        std::thread::sleep(Duration::from_millis(50));
    }
    asker.node.set_enabled(false);
    let lookups = asker.node.report().stats.lookups;
    assert!(asker.node.fetch_blocking(&ids).is_empty());
    assert_eq!(asker.node.report().stats.lookups, lookups, "no lookup while off");
    asker.node.set_enabled(true);
    assert_eq!(asker.node.fetch_blocking(&ids).len(), 5);
    // What a node adds is offered to peers at their next refresh (a delta).
    let more = chunks(4, 3);
    let before = asker.node.report().peers[0].summary_generation.unwrap();
    {
        let h = holder.node.clone();
        let ids: Vec<ChunkId> = more.iter().map(|(i, _)| *i).collect();
        // Not in the holder's store: announcing alone must not make them fetchable.
        h.announce(&ids);
        let t = Instant::now();
        while asker.node.report().peers[0].summary_generation.unwrap() == before {
            assert!(t.elapsed() < Duration::from_secs(5), "the delta never arrived");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(asker.node.fetch_blocking(&ids).is_empty(), "a false claim yields a miss, not bytes");
    }
}

#[test]
fn chunks_nobody_holds_are_fetched_once_for_the_team_by_their_owner() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Small chunks, many of them: owners take runs of about 16, so spread shows over hundreds.
    let data: Vec<(ChunkId, Vec<u8>)> = (0..600u32)
        .map(|i| {
            let b: Vec<u8> =
                (0..4096u32).map(|j| (j ^ i.wrapping_mul(2_654_435_761)) as u8).chain(i.to_le_bytes()).collect();
            (ChunkId::of(&b), b)
        })
        .collect();
    let up = Arc::new(Upstream { chunks: data.iter().cloned().collect(), ..Default::default() });
    let stores: Vec<Arc<Mem>> =
        (0..3).map(|_| Arc::new(Mem(Default::default(), Some(up.clone()), Default::default()))).collect();
    let a = start(&rt, 7, &[], stores[0].clone(), false);
    let b = start(&rt, 7, &[a.port], stores[1].clone(), false);
    let c = start(&rt, 7, &[a.port, b.port], stores[2].clone(), false);
    for n in [&a, &b, &c] {
        wait_for_peers(&n.node, 2);
    }
    let ids: Vec<ChunkId> = data.iter().map(|(i, _)| *i).collect();
    // All three want every chunk at once; each chunk's owner fetches it, the others ask it.
    let got: Vec<Vec<(ChunkId, Vec<u8>)>> = std::thread::scope(|s| {
        let hs: Vec<_> = [&a, &b, &c].iter().map(|n| s.spawn(|| n.node.fetch_blocking(&ids))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for g in &got {
        assert_eq!(g.len(), ids.len(), "every chunk, from its owner or from this node's own fetch");
        assert!(g.iter().all(|(id, b)| ChunkId::of(b) == *id));
    }
    let fetched = up.fetched.lock().unwrap();
    let total: usize = fetched.values().sum();
    assert_eq!(fetched.len(), ids.len());
    assert_eq!(total, ids.len(), "each chunk fetched from upstream once for all three: {fetched:?}");
    let owned: Vec<u64> = [&a, &b, &c].iter().map(|n| n.node.report().stats.fetched_through).collect();
    assert!(owned.iter().all(|n| *n > 30), "ownership spreads over the nodes: {owned:?}");
}

/// Layer-form blobs (an accelerated form's index and table) cross like chunks: found through the
/// holder's summary, checked against their digest; a liar's is refused and the liar banned; a
/// blob nobody keeps costs no request.
#[test]
fn layer_form_blobs_cross_checked_and_a_liar_is_banned() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = Digest::of(&blob);
    let size = blob.len() as u64;
    let holder_store = Arc::new(Mem::default());
    holder_store.2.lock().unwrap().insert(digest, blob.clone());
    let holder = start(&rt, 1, &[], holder_store.clone(), false);
    let asker = start(&rt, 1, &[holder.port], Arc::new(Mem::default()), false);
    wait_for_peers(&asker.node, 1);
    assert_eq!(asker.node.blob(&digest, size), Some(blob.clone()));
    // The wrong size asked: refused, although the holder sent the blob (not a lie: no ban).
    assert_eq!(asker.node.blob(&digest, size + 1), None);
    // Nobody lists it: no request at all.
    let before = holder.node.report().stats.blobs_sent;
    assert_eq!(asker.node.blob(&Digest::of(b"nobody keeps this"), 17), None);
    assert_eq!(holder.node.report().stats.blobs_sent, before);
    let a = asker.node.report();
    assert_eq!((a.stats.blobs_received, a.stats.bans), (1, 0), "{:?}", a.stats);
    assert_eq!(holder.node.report().stats.blobs_sent, 2);

    // A blob kept later is announced: a peer finds it at its next summary refresh.
    let later: Vec<u8> = b"kept later".repeat(1000);
    let later_digest = Digest::of(&later);
    holder_store.2.lock().unwrap().insert(later_digest, later.clone());
    holder.node.kept(&[later_digest]);
    let t = Instant::now();
    while asker.node.blob(&later_digest, later.len() as u64).is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "a kept blob was never found");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A liar keeping the same blob, and a fresh asker that knows only the liar.
    let liar_store = Arc::new(Mem::default());
    liar_store.2.lock().unwrap().insert(digest, blob.clone());
    let liar = start(&rt, 1, &[], liar_store, true);
    let victim = start(&rt, 1, &[liar.port], Arc::new(Mem::default()), false);
    wait_for_peers(&victim.node, 1);
    assert_eq!(victim.node.blob(&digest, size), None, "nothing from a liar is returned");
    let v = victim.node.report();
    assert_eq!((v.stats.bans, v.stats.corrupt_chunks), (1, 1), "{:?}", v.stats);
    let banned = v.peers.iter().find(|p| p.id == liar.node.peer_id().to_string()).expect("the liar is listed");
    assert!(banned.ban_reason.as_deref().unwrap().contains("wrong bytes for blob"), "{banned:#?}");
}
