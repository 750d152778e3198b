//! The libp2p swarm (TCP, pre-shared key, noise, yamux; identify, pings, mDNS when asked,
//! connection limits, a block list) and the one task that drives it: commands from handles,
//! events from the network, the refresh tick.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hb_core::{ChunkId, Digest};
use libp2p::core::transport::upgrade::Version;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, identify, mdns, noise, ping, pnet, request_response, tcp, yamux, Multiaddr,
    PeerId, StreamProtocol, Swarm, Transport,
};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{Codec, Request, Response, MAX_RESPONSE, PROTOCOL};
use crate::fetch::*;
use crate::state::*;
use crate::summary::Remote;
use crate::P2pError;

/// Longest an answer is held back by the serving bandwidth cap.
pub(crate) const MAX_SERVE_WAIT: Duration = Duration::from_millis(250);
/// Requests served at once (the others wait their turn), requests waiting or served for one
/// peer, and waiting in all (beyond either, a request is answered with nothing).
pub(crate) const MAX_SERVING: usize = 16;
pub(crate) const MAX_SERVING_PEER: usize = 32;
pub(crate) const MAX_QUEUED: usize = 256;
/// Peers remembered at most, and how long one that left (not banned) is remembered.
pub(crate) const MAX_PEERS: usize = 1024;
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(60);
/// How often each connection is pinged (and how long a ping may take before it is closed).
pub(crate) const PING_EVERY: Duration = Duration::from_secs(1);
/// How often summaries are refreshed and static peers redialled.
pub(crate) const TICK: Duration = Duration::from_millis(500);
pub(crate) const REDIAL: Duration = Duration::from_secs(2);
/// How often the local summary is checked against what the store holds.
pub(crate) const RESCAN: Duration = Duration::from_secs(15);

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) chunks: request_response::Behaviour<Codec>,
}

pub(crate) fn build_swarm(
    inner: &Arc<Inner>,
    keypair: libp2p::identity::Keypair,
) -> Result<Swarm<Behaviour>, P2pError> {
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
                        .with_request_timeout(
                            // The callers' own deadlines bound each request; this only backs them.
                            THROUGH_DEADLINE
                                + Duration::from_millis(20) * crate::codec::MAX_IDS as u32
                                + Duration::from_secs(5),
                        )
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
pub(crate) async fn drive(inner: Arc<Inner>, mut swarm: Swarm<Behaviour>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let node = Node { inner: inner.clone() };
    let mut pending: HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Response, Failure>>> =
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
                // Peers gone a while (not banned: a ban is remembered until it runs out).
                inner.peers.lock().expect("peers lock").retain(|_, p| {
                    p.connected || p.banned_until.is_some() || p.left.is_none_or(|t| now - t < FORGET_AFTER)
                });
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

pub(crate) fn handle_event(
    node: &Node,
    swarm: &mut Swarm<Behaviour>,
    ev: SwarmEvent<BehaviourEvent>,
    pending: &mut HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Response, Failure>>>,
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
                p.summary = None;
                p.left = Some(Instant::now());
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
                if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
                    tracing::warn!(%peer, "too many peers known; ignoring one more found by mDNS");
                    continue;
                }
                let p = peers.entry(peer).or_insert_with(|| Peer {
                    weight: weight(&peer),
                    left: Some(Instant::now()),
                    ..Default::default()
                });
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
                        let mut s = inner.summary.lock().expect("summary lock");
                        let res = Response::Summary {
                            epoch: s.epoch(),
                            generation: s.generation(),
                            serving: inner.enabled.load(std::sync::atomic::Ordering::SeqCst),
                            body: s.since(epoch, generation),
                        };
                        drop(s);
                        let _ = swarm.behaviour_mut().chunks.send_response(channel, res);
                    }
                    Request::Blob(_) if !node.may_serve(&peer) => {
                        // At the serving limits: an empty answer (the asker goes elsewhere).
                        let _ = swarm.behaviour_mut().chunks.send_response(channel, Response::Blob(None));
                    }
                    Request::Get(_) | Request::Fetch(_) if !node.may_serve(&peer) => {
                        let _ = swarm.behaviour_mut().chunks.send_response(channel, Response::Chunks(Vec::new()));
                    }
                    Request::Get(ids) => node
                        .serve_in_turn(peer, channel, Response::Chunks(Vec::new()), move |n| n.serve(peer, ids, false)),
                    Request::Fetch(ids) => node
                        .serve_in_turn(peer, channel, Response::Chunks(Vec::new()), move |n| n.serve(peer, ids, true)),
                    Request::Blob(digest) => {
                        node.serve_in_turn(peer, channel, Response::Blob(None), move |n| n.serve_blob(peer, &digest))
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
                    // Only a peer that is gone or silent is set aside; a local refusal is not its fault.
                    let gone = matches!(
                        error,
                        request_response::OutboundFailure::DialFailure
                            | request_response::OutboundFailure::ConnectionClosed
                            | request_response::OutboundFailure::Timeout
                    );
                    let _ = reply.send(Err(Failure { reason: error.to_string(), gone }));
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

pub(crate) fn take_summary(node: &Node, peer: PeerId, response: Response) {
    let mut peers = node.inner.peers.lock().expect("peers lock");
    let Some(p) = peers.get_mut(&peer) else { return };
    p.summary_pending = false;
    let Response::Summary { epoch, generation, serving, body } = response else {
        drop(peers);
        node.ban(&peer, "answered a summary request with something else");
        return;
    };
    p.serves = serving;
    match Remote::apply(p.summary.take(), epoch, generation, body) {
        Ok(s) => p.summary = Some(s),
        Err(e) => tracing::warn!(%peer, error = %e, "a peer's summary was refused; asking for the whole of it"),
    }
}

impl Node {
    /// Whether a request of `peer` may be queued for serving (within [`MAX_SERVING_PEER`] for
    /// it and [`MAX_QUEUED`] in all); counts it if so ([`Node::served`] when done).
    pub(crate) fn may_serve(&self, peer: &PeerId) -> bool {
        let mut peers = self.inner.peers.lock().expect("peers lock");
        let Some(p) = peers.get_mut(peer) else { return false };
        if p.serving >= MAX_SERVING_PEER || self.inner.serving.load(Ordering::SeqCst) >= MAX_QUEUED {
            return false;
        }
        p.serving += 1;
        self.inner.serving.fetch_add(1, Ordering::SeqCst);
        true
    }

    pub(crate) fn served(&self, peer: &PeerId) {
        if let Some(p) = self.inner.peers.lock().expect("peers lock").get_mut(peer) {
            p.serving = p.serving.saturating_sub(1);
        }
        self.inner.serving.fetch_sub(1, Ordering::SeqCst);
    }

    /// Gives back the cap's time booked for an answer that was not sent.
    fn unbook(&self, bytes: usize) {
        let Some(rate) = self.inner.cfg.serve_rate.filter(|r| *r > 0) else { return };
        let mut free = self.inner.serve_free_at.lock().expect("serve lock");
        *free = free.checked_sub(Duration::from_secs_f64(bytes as f64 / rate as f64)).unwrap_or(*free);
    }

    /// Answers a request of `peer` (`answer`, `empty` should it fail) when its turn comes: at most
    /// [`MAX_SERVING`] answers are made at once (each may hold 16 MiB); the others wait without
    /// buffers.
    fn serve_in_turn(
        &self,
        peer: PeerId,
        channel: request_response::ResponseChannel<Response>,
        empty: Response,
        answer: impl FnOnce(&Node) -> Response + Send + 'static,
    ) {
        let n = self.clone();
        let turns = self.inner.serve_turns.clone();
        self.inner.handle.spawn(async move {
            let turn = turns.acquire_owned().await;
            let m = n.clone();
            let res = tokio::task::spawn_blocking(move || answer(&m)).await.unwrap_or(empty);
            drop(turn);
            n.served(&peer);
            let _ = n.inner.cmds.send(Cmd::Respond { channel, res });
        });
    }

    /// How long to wait before sending `bytes` under the serving cap (none: at once).
    pub(crate) fn serve_wait(&self, bytes: usize) -> Duration {
        let Some(rate) = self.inner.cfg.serve_rate.filter(|r| *r > 0) else { return Duration::ZERO };
        let mut free = self.inner.serve_free_at.lock().expect("serve lock");
        let now = Instant::now();
        let start = (*free).max(now);
        *free = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        start - now
    }

    /// Reads what a peer asked for (on a blocking thread: the store is RocksDB and files); for a
    /// Fetch (`through`), what this node lacks is fetched from its own sources first.
    pub(crate) fn serve(&self, peer: PeerId, ids: Vec<ChunkId>, through: bool) -> Response {
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
        self.inner.counters.chunks_out.fetch_add(out.len() as u64, Ordering::Relaxed);
        if let Some(p) = self.inner.peers.lock().expect("peers lock").get_mut(&peer) {
            p.chunks_out += out.len() as u64;
        }
        match self.paced(&peer, bytes, size) {
            true => Response::Chunks(out),
            false => Response::Chunks(Vec::new()),
        }
    }

    /// Reads layer-form blob `digest` for `peer` (on a blocking thread), if the store keeps it.
    pub(crate) fn serve_blob(&self, peer: PeerId, digest: &Digest) -> Response {
        if !self.enabled() {
            return Response::Blob(None);
        }
        let Some(mut b) = self.inner.local.blob(digest).filter(|b| b.len() <= MAX_RESPONSE) else {
            return Response::Blob(None);
        };
        if self.inner.cfg.fault_corrupt_serving && !b.is_empty() {
            b[0] ^= 0xff;
        }
        if !self.paced(&peer, b.len() as u64, b.len() + 8) {
            return Response::Blob(None);
        }
        self.inner.counters.blobs_out.fetch_add(1, Ordering::Relaxed);
        Response::Blob(Some(b))
    }

    /// Counts `bytes` sent to `peer` and waits for the serving cap to let `size` bytes (with
    /// headers) go; false when that would take longer than an asker waits: nothing is sent then,
    /// rather than too late.
    fn paced(&self, peer: &PeerId, bytes: u64, size: usize) -> bool {
        self.inner.counters.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        if let Some(p) = self.inner.peers.lock().expect("peers lock").get_mut(peer) {
            p.bytes_out += bytes;
        }
        let wait = self.serve_wait(size);
        if wait > MAX_SERVE_WAIT {
            self.unbook(size);
            return false;
        }
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        true
    }
}
