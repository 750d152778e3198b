//! Starting a node (its swarm's task on the caller's runtime), and the node as a chunk tier.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hb_core::ChunkId;
use tokio::sync::mpsc;

use crate::state::*;
use crate::summary::Local;
use crate::swarm::{build_swarm, drive};
use crate::{Config, LocalChunks, P2pError};

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
            serving: Default::default(),
            serve_turns: Arc::new(tokio::sync::Semaphore::new(crate::swarm::MAX_SERVING)),
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

impl hb_core::BlobSource for Node {
    fn blob(&self, digest: &hb_core::Digest, size: u64) -> Option<Vec<u8>> {
        self.inner.handle.block_on(self.fetch_blob(digest, size))
    }

    fn kept(&self, digests: &[hb_core::Digest]) {
        self.announce(&digests.iter().map(hb_core::blob_key).collect::<Vec<_>>());
    }
}
