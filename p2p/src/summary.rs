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
}

impl Local {
    /// A summary of `held`; `epoch` should differ from any earlier summary's.
    pub fn build(epoch: u64, held: &[ChunkId]) -> Local {
        let capacity = held.len().saturating_mul(2).max(MIN_CAPACITY);
        let seed = *blake3::hash(&epoch.to_le_bytes()).as_bytes();
        let mut bloom = Bloom::new_for_fp_rate_with_seed(capacity, FP_RATE, &seed).expect("capacity and rate in range");
        held.iter().for_each(|id| bloom.set(id.as_bytes()));
        Local { epoch, generation: 1, bloom, capacity, items: held.len(), log: VecDeque::new() }
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
            self.log.pop_front();
        }
        self.items += fresh.len();
        fresh.len()
    }

    /// More ids than the filter was sized for: time to rebuild it (with a new epoch).
    pub fn overfull(&self) -> bool {
        self.items > self.capacity
    }

    /// What a peer whose copy is at (`epoch`, `generation`) needs to be current.
    pub fn since(&self, epoch: u64, generation: u64) -> SummaryBody {
        if epoch == self.epoch && generation == self.generation {
            return SummaryBody::Unchanged;
        }
        let covered = self.log.front().is_some_and(|(g, _)| *g <= generation + 1) || self.log.is_empty();
        if epoch == self.epoch && generation < self.generation && covered && generation > 0 {
            return SummaryBody::Delta(self.log.iter().filter(|(g, _)| *g > generation).map(|(_, id)| *id).collect());
        }
        SummaryBody::Full(self.bloom.to_bytes())
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
                let bloom = Bloom::from_bytes(bytes).map_err(|e| SummaryError::Malformed(e.into()))?;
                let k = bloom.number_of_hash_functions();
                if k == 0 || k > MAX_HASHES || bloom.len() < 8 {
                    return Err(SummaryError::Malformed(format!("{k} hash functions over {} bits", bloom.len())));
                }
                Ok(Remote { epoch, generation, bloom })
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

    /// About how many chunks the peer holds (from the bits set).
    pub fn estimate(&self) -> u64 {
        let bits = self.bloom.len() as f64;
        // The serialised form is a header, then the bits.
        let raw = self.bloom.as_slice();
        let header = raw.len().saturating_sub((self.bloom.len() / 8) as usize);
        let set: u64 = raw[header..].iter().map(|b| b.count_ones() as u64).sum();
        let k = self.bloom.number_of_hash_functions() as f64;
        let fill = (set as f64 / bits).min(0.999_999);
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
        let rebuilt = Local::build(2, &ids(0, 110));
        assert!(matches!(rebuilt.since(copy.epoch, copy.generation), SummaryBody::Full(_)));
        assert!(matches!(
            Remote::apply(Some(copy), 2, 5, SummaryBody::Delta(vec![])),
            Err(SummaryError::WrongEpoch { .. })
        ));
        assert!(matches!(Remote::apply(None, 2, 5, SummaryBody::Unchanged), Err(SummaryError::NoCopy)));
    }

    #[test]
    fn a_hostile_filter_is_refused() {
        assert!(Remote::apply(None, 1, 1, SummaryBody::Full(vec![1, 2, 3])).is_err());
        // A well-formed filter whose header asks for a billion hash functions per lookup
        // (bloomfilter 3's header: version u8, length u64, k u32 little endian, seed).
        let SummaryBody::Full(mut b) = Local::build(1, &[]).since(0, 0) else { panic!("a whole filter") };
        assert!(Remote::apply(None, 1, 1, SummaryBody::Full(b.clone())).is_ok());
        b[9..13].copy_from_slice(&1_000_000_000u32.to_le_bytes());
        let e = Remote::apply(None, 1, 1, SummaryBody::Full(b)).err().expect("refused");
        assert!(e.to_string().contains("1000000000 hash functions"), "{e}");
    }
}
