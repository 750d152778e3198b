//! Who holds what: this node's summary of the chunks it holds (a Bloom filter, with a log of
//! recent additions so peers refresh by delta), and the copies of its peers' summaries.

use std::collections::VecDeque;

use bloomfilter::Bloom;
use hb_core::ChunkId;

use crate::codec::{SummaryBody, MAX_DELTA, MAX_SUMMARY};

/// False-positive rate of a summary: one lookup in a hundred asks a peer that lacks the chunk.
const FP_RATE: f64 = 0.01;
/// Smallest capacity a summary is made with (about 80 KiB).
const MIN_CAPACITY: usize = 65_536;
/// Most hash functions a peer's filter may use (ours use 7): more would make lookups slow.
const MAX_HASHES: u32 = 32;
/// Largest capacity a summary is made with: its encoded filter stays under [`MAX_SUMMARY`]
/// (about 1.2 bytes a chunk at 1 %); a store beyond it shares a filter with more false positives.
const MAX_CAPACITY: usize = 13_000_000;
/// A peer's filter with more than this share of its bits set claims (nearly) everything.
const MAX_FILL: f64 = 0.6;

/// This node's summary: a filter over the chunks it holds, its epoch (new at every rebuild, so a
/// peer with an older copy takes the whole filter) and generation (one per batch of additions).
pub struct Local {
    epoch: u64,
    generation: u64,
    bloom: Bloom<[u8; 32]>,
    capacity: usize,
    items: usize,
    /// Ids added, with the generation that added them (the last [`MAX_DELTA`]).
    log: VecDeque<(u64, ChunkId)>,
    /// The newest generation some of whose ids fell out of the log (deltas from before it are
    /// incomplete).
    trimmed: u64,
    /// The encoded filter of the current generation, made once however many peers ask.
    encoded: Option<(u64, std::sync::Arc<[u8]>)>,
}

impl Local {
    /// A summary of `held`; `epoch` should differ from any earlier summary's.
    pub fn build(epoch: u64, held: &[ChunkId]) -> Local {
        let capacity = held.len().saturating_mul(2).clamp(MIN_CAPACITY, MAX_CAPACITY);
        let seed = *blake3::hash(&epoch.to_le_bytes()).as_bytes();
        let mut bloom = Bloom::new_for_fp_rate_with_seed(capacity, FP_RATE, &seed).expect("capacity and rate in range");
        held.iter().for_each(|id| bloom.set(id.as_bytes()));
        Local {
            epoch,
            generation: 1,
            bloom,
            capacity,
            items: held.len(),
            log: VecDeque::new(),
            trimmed: 0,
            encoded: None,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn items(&self) -> usize {
        self.items
    }

    /// Adds what is held now; returns how many ids were new to the filter.
    pub fn add(&mut self, ids: &[ChunkId]) -> usize {
        let fresh: Vec<ChunkId> = ids.iter().filter(|id| !self.bloom.check(id.as_bytes())).copied().collect();
        if fresh.is_empty() {
            return 0;
        }
        self.generation += 1;
        for id in &fresh {
            self.bloom.set(id.as_bytes());
            self.log.push_back((self.generation, *id));
        }
        while self.log.len() > MAX_DELTA {
            if let Some((g, _)) = self.log.pop_front() {
                self.trimmed = self.trimmed.max(g);
            }
        }
        self.items += fresh.len();
        fresh.len()
    }

    /// More ids than the filter was sized for: time to rebuild it (with a new epoch), unless it
    /// is at its largest already.
    pub fn overfull(&self) -> bool {
        self.items > self.capacity && self.capacity < MAX_CAPACITY
    }

    /// What a peer whose copy is at (`epoch`, `generation`) needs to be current.
    pub fn since(&mut self, epoch: u64, generation: u64) -> SummaryBody {
        if epoch == self.epoch && generation == self.generation {
            return SummaryBody::Unchanged;
        }
        // A delta only when the log still holds every id added after the peer's generation.
        if epoch == self.epoch && generation > 0 && generation < self.generation && generation >= self.trimmed {
            return SummaryBody::Delta(self.log.iter().filter(|(g, _)| *g > generation).map(|(_, id)| *id).collect());
        }
        let current = self.generation;
        let bytes = match &self.encoded {
            Some((g, b)) if *g == current => b.clone(),
            _ => {
                let b: std::sync::Arc<[u8]> = self.bloom.to_bytes().into();
                self.encoded = Some((current, b.clone()));
                b
            }
        };
        SummaryBody::Full(bytes)
    }
}

/// A peer's summary as this node knows it.
pub struct Remote {
    pub epoch: u64,
    pub generation: u64,
    bloom: Bloom<[u8; 32]>,
}

/// Why a peer's summary was refused.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error("a summary delta for epoch {got}, but the copy here is of epoch {have}")]
    WrongEpoch { got: u64, have: u64 },
    #[error("a summary delta with no copy to apply it to")]
    NoCopy,
    #[error("the summary's filter is malformed: {0}")]
    Malformed(String),
}

impl Remote {
    /// Applies a peer's answer to the copy `have` (none yet: only a whole filter will do).
    pub fn apply(have: Option<Remote>, epoch: u64, generation: u64, body: SummaryBody) -> Result<Remote, SummaryError> {
        match body {
            SummaryBody::Full(bytes) => {
                if bytes.len() > MAX_SUMMARY {
                    return Err(SummaryError::Malformed(format!("{} bytes", bytes.len())));
                }
                let bloom = Bloom::from_bytes(bytes.to_vec()).map_err(|e| SummaryError::Malformed(e.into()))?;
                let k = bloom.number_of_hash_functions();
                if k == 0 || k > MAX_HASHES || bloom.len() < 8 {
                    return Err(SummaryError::Malformed(format!("{k} hash functions over {} bits", bloom.len())));
                }
                let r = Remote { epoch, generation, bloom };
                // A filter that claims nearly every chunk would draw every lookup to that peer.
                if r.fill() > MAX_FILL {
                    return Err(SummaryError::Malformed(format!("{:.0} % of its bits set", r.fill() * 100.0)));
                }
                Ok(r)
            }
            SummaryBody::Unchanged => have.ok_or(SummaryError::NoCopy),
            SummaryBody::Delta(ids) => {
                let mut r = have.ok_or(SummaryError::NoCopy)?;
                if r.epoch != epoch {
                    return Err(SummaryError::WrongEpoch { got: epoch, have: r.epoch });
                }
                ids.iter().for_each(|id| r.bloom.set(id.as_bytes()));
                r.generation = generation;
                Ok(r)
            }
        }
    }

    pub fn may_hold(&self, id: &ChunkId) -> bool {
        self.bloom.check(id.as_bytes())
    }

    /// The share of the filter's bits that are set.
    fn fill(&self) -> f64 {
        // The serialised form is a header, then the bits.
        let raw = self.bloom.as_slice();
        let header = raw.len().saturating_sub((self.bloom.len() / 8) as usize);
        let set: u64 = raw[header..].iter().map(|b| b.count_ones() as u64).sum();
        set as f64 / self.bloom.len() as f64
    }

    /// About how many chunks the peer holds (from the bits set).
    pub fn estimate(&self) -> u64 {
        let bits = self.bloom.len() as f64;
        let k = self.bloom.number_of_hash_functions() as f64;
        let fill = self.fill().min(0.999_999);
        (-(bits / k) * (1.0 - fill).ln()).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(from: u32, n: u32) -> Vec<ChunkId> {
        (from..from + n).map(|i| ChunkId::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn a_peer_follows_by_deltas_and_falls_back_to_the_whole_filter() {
        let mut local = Local::build(1, &ids(0, 100));
        let SummaryBody::Full(b) = local.since(0, 0) else { panic!("a first copy is whole") };
        let mut copy = Remote::apply(None, local.epoch(), local.generation(), SummaryBody::Full(b)).unwrap();
        assert!(ids(0, 100).iter().all(|id| copy.may_hold(id)));
        assert!(matches!(local.since(copy.epoch, copy.generation), SummaryBody::Unchanged));

        assert_eq!(local.add(&ids(100, 10)), 10);
        assert_eq!(local.add(&ids(100, 10)), 0, "ids already held are not new");
        let body = local.since(copy.epoch, copy.generation);
        let SummaryBody::Delta(d) = &body else { panic!("a delta after a small addition: {body:?}") };
        assert_eq!(d.len(), 10);
        copy = Remote::apply(Some(copy), local.epoch(), local.generation(), body).unwrap();
        assert!(ids(100, 10).iter().all(|id| copy.may_hold(id)));
        let absent = ids(10_000, 1000).iter().filter(|id| copy.may_hold(id)).count();
        assert!(absent < 50, "{absent} of 1000 absent ids look held");
        let est = copy.estimate();
        assert!((100..=120).contains(&est), "estimate {est}");

        // Another epoch (a rebuild): the whole filter again; a delta of the wrong epoch is refused.
        let mut rebuilt = Local::build(2, &ids(0, 110));
        assert!(matches!(rebuilt.since(copy.epoch, copy.generation), SummaryBody::Full(_)));
        assert!(matches!(
            Remote::apply(Some(copy), 2, 5, SummaryBody::Delta(vec![])),
            Err(SummaryError::WrongEpoch { .. })
        ));
        assert!(matches!(Remote::apply(None, 2, 5, SummaryBody::Unchanged), Err(SummaryError::NoCopy)));
    }

    #[test]
    fn a_hostile_filter_is_refused() {
        assert!(Remote::apply(None, 1, 1, SummaryBody::Full(vec![1u8, 2, 3].into())).is_err());
        // A well-formed filter whose header asks for a billion hash functions per lookup
        // (bloomfilter 3's header: version u8, length u64, k u32 little endian, seed).
        let SummaryBody::Full(b) = Local::build(1, &[]).since(0, 0) else { panic!("a whole filter") };
        assert!(Remote::apply(None, 1, 1, SummaryBody::Full(b.clone())).is_ok());
        let mut bad = b.to_vec();
        bad[9..13].copy_from_slice(&1_000_000_000u32.to_le_bytes());
        let e = Remote::apply(None, 1, 1, SummaryBody::Full(bad.into())).err().expect("refused");
        assert!(e.to_string().contains("1000000000 hash functions"), "{e}");
        // Every bit set: it would claim every chunk.
        let mut full = b.to_vec();
        let bits_from = full.len() - Bloom::<[u8; 32]>::compute_bitmap_size(MIN_CAPACITY, FP_RATE);
        full[bits_from..].iter_mut().for_each(|x| *x = 0xff);
        let e = Remote::apply(None, 1, 1, SummaryBody::Full(full.into())).err().expect("refused");
        assert!(e.to_string().contains("bits set"), "{e}");
    }

    #[test]
    fn a_delta_is_sent_only_while_the_log_holds_all_of_it() {
        let mut local = Local::build(1, &[]);
        let g = local.generation();
        // One addition larger than the log: a peer at `g` must get the whole filter.
        local.add(&ids(0, (MAX_DELTA + 10) as u32));
        assert!(matches!(local.since(1, g), SummaryBody::Full(_)));
        // A small addition after it: a peer at the newest generation gets a delta.
        let g2 = local.generation();
        local.add(&ids(1_000_000, 3));
        let SummaryBody::Delta(d) = local.since(1, g2) else { panic!("a delta") };
        assert_eq!(d.len(), 3);
    }
}
