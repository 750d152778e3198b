//! Wide reads on a lazy mount. A cold start is mostly waiting: a program maps its binary and
//! libraries and faults them in a page run at a time, each fault a round trip to the registry.
//! So the first touch of a file fetches, in the background, the window of the file around it
//! ([`WINDOW_BYTES`], aligned; a smaller file whole), in segments on a few parallel requests;
//! later faults in that window find their chunks arrived or on their way. Nothing here is
//! specific to an image or a command: it is how any file is first read.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use hb_core::{ChunkId, ChunkRef};

use crate::fetch::Fetcher;

/// The part of a file fetched together on its first touch (a file this size or smaller: whole).
pub const WINDOW_BYTES: u64 = 4 << 20;
/// Chunks per background request (about 512 KiB at the default chunk size).
const SEGMENT_CHUNKS: usize = 8;
/// Background requests in flight at once.
const WORKERS: usize = 4;

pub(crate) struct Windows {
    /// False on a mount with nothing remote: reads then never touch the locks below.
    enabled: bool,
    tx: Mutex<Option<Sender<Vec<ChunkId>>>>,
    /// (entry, window) pairs already scheduled.
    scheduled: Mutex<HashSet<(u32, u64)>>,
}

impl Windows {
    /// Workers fetching through `fetcher`; none when it has no remote source (all local).
    pub fn new(fetcher: &Arc<Fetcher>) -> Windows {
        if !fetcher.has_remote() {
            return Windows { enabled: false, tx: Mutex::new(None), scheduled: Mutex::new(HashSet::new()) };
        }
        let (tx, rx) = std::sync::mpsc::channel::<Vec<ChunkId>>();
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..WORKERS {
            let (rx, fetcher) = (rx.clone(), fetcher.clone());
            let spawned = std::thread::Builder::new().name(format!("hb-window-{n}")).spawn(move || work(&rx, &fetcher));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no thread for wide reads; reading on demand only");
            }
        }
        Windows { enabled: true, tx: Mutex::new(Some(tx)), scheduled: Mutex::new(HashSet::new()) }
    }

    /// Schedules the window around byte `offset` of file `entry` (its `chunks`, starting at
    /// `starts`), unless it was scheduled before. Chunks that are local or being fetched are
    /// skipped by the fetcher.
    pub fn around(&self, entry: u32, chunks: &[ChunkRef], starts: &[u64], offset: u64) {
        let w = offset / WINDOW_BYTES;
        // Every read asks: the common answer (scheduled before) costs one set lookup.
        if !self.enabled || chunks.is_empty() || !self.scheduled.lock().expect("windows lock").insert((entry, w)) {
            return;
        }
        let Some(tx) = self.tx.lock().expect("windows lock").clone() else { return };
        let (from, to) = (w * WINDOW_BYTES, (w + 1) * WINDOW_BYTES);
        // Chunks that start in the window, and the one the window starts inside.
        let first = starts.partition_point(|&s| s <= from).saturating_sub(1);
        let last = starts.partition_point(|&s| s < to);
        for seg in chunks[first..last].chunks(SEGMENT_CHUNKS) {
            if tx.send(seg.iter().map(|c| c.id).collect()).is_err() {
                return;
            }
        }
    }

    /// Stops scheduling; workers finish their current request and end.
    pub fn close(&self) {
        self.tx.lock().expect("windows lock").take();
    }
}

fn work(rx: &Mutex<Receiver<Vec<ChunkId>>>, fetcher: &Fetcher) {
    loop {
        let job = match rx.lock().expect("windows lock").recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        if let Err(e) = fetcher.prefetch(&job) {
            // The reader that needs these chunks fetches them itself and reports its error.
            tracing::debug!(error = %e, "a wide read failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_scheduled_once_and_covers_the_chunks_it_spans() {
        let (tx, rx) = std::sync::mpsc::channel();
        let w = Windows { enabled: true, tx: Mutex::new(Some(tx)), scheduled: Mutex::new(HashSet::new()) };
        // 100 chunks of 64 KiB: 6.25 MiB, so two windows.
        let chunks: Vec<ChunkRef> =
            (0..100u32).map(|i| ChunkRef { id: ChunkId::of(&i.to_le_bytes()), len: 64 << 10 }).collect();
        let starts: Vec<u64> = (0..100u64).map(|i| i * (64 << 10)).collect();
        w.around(7, &chunks, &starts, 100);
        let got: Vec<ChunkId> = rx.try_iter().flatten().collect();
        assert_eq!(got, chunks[..64].iter().map(|c| c.id).collect::<Vec<_>>(), "the first 4 MiB");
        w.around(7, &chunks, &starts, 3 << 20);
        assert_eq!(rx.try_iter().count(), 0, "scheduled once");
        w.around(7, &chunks, &starts, 5 << 20);
        let got: Vec<ChunkId> = rx.try_iter().flatten().collect();
        assert_eq!(got, chunks[64..].iter().map(|c| c.id).collect::<Vec<_>>(), "the rest");
        w.close();
        w.around(8, &chunks, &starts, 0);
        assert_eq!(rx.try_iter().count(), 0, "nothing after close");
    }
}
