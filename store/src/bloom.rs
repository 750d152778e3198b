//! The Bloom filter that answers "do we have this chunk?" before RocksDB is asked.
//!
//! Persisted as `bloom.bin` (docs/formats/store.md): `HBBF` | u32 version | u64 RocksDB sequence
//! number it matches | u64 capacity | u64 items | filter bytes. It is valid only when its sequence
//! number equals the database's; otherwise (a crash, an older file) it is rebuilt from the chunks.

use std::path::Path;

use bloomfilter::Bloom;
use hb_core::ChunkId;

/// Target false-positive rate.
pub const FP_RATE: f64 = 0.01;
/// Smallest capacity a filter is made with.
pub const MIN_CAPACITY: u64 = 1 << 20;
const MAGIC: &[u8; 4] = b"HBBF";
const VERSION: u32 = 1;

pub struct ChunkFilter {
    bloom: Bloom<[u8; 32]>,
    capacity: u64,
    items: u64,
    /// Answers "maybe" for every chunk: a read-only view's, which asks RocksDB each time rather
    /// than reading every chunk key of the store when it opens.
    pass_through: bool,
    /// The database sequence number of the `bloom.bin` this filter is, unchanged: saving it
    /// again at that number would write the same bytes.
    on_disk_at: Option<u64>,
}

impl ChunkFilter {
    /// An empty filter sized for `expected` chunks (at least [`MIN_CAPACITY`], with headroom
    /// for growth before the next rebuild).
    pub fn with_capacity(expected: u64, seed: &[u8; 32]) -> Self {
        Self::exact(expected.saturating_mul(2).max(MIN_CAPACITY), seed)
    }

    /// An empty filter that reaches [`FP_RATE`] at exactly `capacity` chunks.
    pub fn exact(capacity: u64, seed: &[u8; 32]) -> Self {
        // The crate derives its k hashes from two SipHash keys, the seed's halves: equal halves
        // would make every hash a multiple of one and the false-positive rate several times worse.
        let mut seed = *seed;
        if seed[..16] == seed[16..] {
            seed = *blake3::hash(&seed).as_bytes();
        }
        let mut bloom = Bloom::new_for_fp_rate_with_seed(capacity.max(1) as usize, FP_RATE, &seed)
            .expect("capacity and rate are in range");
        // Written once now, while nothing else does: the zeroed bit array comes from the kernel
        // untouched, and a lookup (a read) maps each page to the shared zero page; the first
        // insert into it (a write) is then a copy-on-write fault whose TLB flush interrupts every
        // other core running this process, tens of microseconds each on a VM (in a profile of a
        // fresh store's first lazy pull, ~190 samples at 20 kHz: a 1.2 MB filter is 300 pages).
        // Written first, each page is faulted in once, cheaply.
        bloom.clear();
        ChunkFilter { bloom, capacity, items: 0, pass_through: false, on_disk_at: None }
    }

    /// A filter that filters nothing: every lookup goes to the database.
    pub fn pass_through() -> Self {
        ChunkFilter { pass_through: true, ..Self::exact(1, &[1; 32]) }
    }

    pub fn insert(&mut self, id: &ChunkId) {
        self.on_disk_at = None;
        self.bloom.set(id.as_bytes());
        self.items += 1;
    }

    /// False means certainly absent; true means ask the database.
    pub fn maybe_contains(&self, id: &ChunkId) -> bool {
        self.pass_through || self.bloom.check(id.as_bytes())
    }

    /// True when more items were added than the filter was sized for (its error rate grows).
    pub fn overfull(&self) -> bool {
        self.items > self.capacity
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Size of the bit array in bytes.
    pub fn bitmap_bytes(&self) -> u64 {
        self.bloom.len() / 8
    }

    /// True when the file this filter was loaded from already holds it at sequence number
    /// `seq` (nothing inserted since, no write to the database): saving would rewrite it as is.
    pub fn saved_at(&self, seq: u64) -> bool {
        self.on_disk_at == Some(seq)
    }

    pub fn save(&self, path: &Path, seq: u64) -> std::io::Result<()> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&self.capacity.to_le_bytes());
        out.extend_from_slice(&self.items.to_le_bytes());
        out.extend_from_slice(&self.bloom.to_bytes());
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &out)?;
        std::fs::rename(&tmp, path)
    }

    /// Loads the filter saved at `path` if it matches database sequence number `seq`.
    pub fn load(path: &Path, seq: u64) -> Option<Self> {
        let b = std::fs::read(path).ok()?;
        if b.len() < 32 || &b[..4] != MAGIC || b[4..8] != VERSION.to_le_bytes() {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u64_at(8) != seq {
            return None;
        }
        let bloom = Bloom::from_bytes(b[32..].to_vec()).ok()?;
        Some(ChunkFilter { bloom, capacity: u64_at(16), items: u64_at(24), pass_through: false, on_disk_at: Some(seq) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn false_positive_rate_is_what_it_is_sized_for() {
        for seed in [[7u8; 32], *blake3::hash(b"seed").as_bytes()] {
            let mut f = ChunkFilter::exact(100_000, &seed);
            (0..100_000u32).for_each(|i| f.insert(&ChunkId::of(&i.to_le_bytes())));
            let fp = (100_000..200_000u32).filter(|i| f.maybe_contains(&ChunkId::of(&i.to_le_bytes()))).count();
            // 1 % expected; 1.5 % leaves room for chance (the spread is about 0.03 %).
            assert!(fp < 1_500, "{fp} false positives in 100000 with seed {:?}", &seed[..4]);
            assert!(f.bitmap_bytes() <= 120_000, "{} bytes for 100000 chunks", f.bitmap_bytes());
        }
    }

    #[test]
    fn a_pass_through_filter_says_maybe_to_everything() {
        let f = ChunkFilter::pass_through();
        assert!((0..1000u32).all(|i| f.maybe_contains(&ChunkId::of(&i.to_le_bytes()))));
        assert!(!ChunkFilter::exact(1000, &[7; 32]).maybe_contains(&ChunkId::of(b"x")));
    }

    #[test]
    fn no_false_negatives_and_persistence_checks_sequence() {
        let mut f = ChunkFilter::with_capacity(1000, &[7; 32]);
        let ids: Vec<ChunkId> = (0..1000u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        ids.iter().for_each(|id| f.insert(id));
        assert!(ids.iter().all(|id| f.maybe_contains(id)));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bloom.bin");
        f.save(&p, 42).unwrap();
        let g = ChunkFilter::load(&p, 42).expect("same sequence loads");
        assert!(ids.iter().all(|id| g.maybe_contains(id)));
        assert!(ChunkFilter::load(&p, 43).is_none(), "stale filter is refused");
    }
}
