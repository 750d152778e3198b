//! Pinned content-defined chunking parameters.
//!
//! Identical content must always cut identically, so the parameters are recorded in the store and in
//! every layer index; a reader compares them before it trusts that two indexes share chunks.

/// The chunking algorithm. Only one exists today; the tag keeps the format open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ChunkAlgorithm {
    /// FastCDC, 2020 paper, normalization level 1, gear seed 0 (the `fastcdc` crate's `v2020`).
    FastCdc2020 = 1,
}

/// Chunker parameters: algorithm plus minimum, average and maximum chunk size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChunkerParams {
    pub algorithm: ChunkAlgorithm,
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkerParams {
    /// 16 / 64 / 256 KiB, as PuzzleFS and casync use.
    fn default() -> Self {
        ChunkerParams {
            algorithm: ChunkAlgorithm::FastCdc2020,
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
        }
    }
}

impl ChunkerParams {
    /// Bounds the `fastcdc` crate accepts, checked so a corrupt record cannot make it panic.
    pub fn validate(&self) -> Result<(), String> {
        let ok = (64..=1_048_576).contains(&self.min_size)
            && (256..=4_194_304).contains(&self.avg_size)
            && (1024..=16_777_216).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size
            // FastCDC 2020 rolls two bytes at a time: odd sizes shift boundaries (fastcdc 5).
            && [self.min_size, self.avg_size, self.max_size].iter().all(|s| s % 2 == 0);
        if ok {
            Ok(())
        } else {
            Err(format!("chunker sizes {}/{}/{} are out of range or odd", self.min_size, self.avg_size, self.max_size))
        }
    }

    pub(crate) fn algorithm_from_u8(v: u8) -> Option<ChunkAlgorithm> {
        match v {
            1 => Some(ChunkAlgorithm::FastCdc2020),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(ChunkerParams::default().validate().is_ok());
        let odd = ChunkerParams { max_size: 262_143, ..ChunkerParams::default() };
        assert!(odd.validate().unwrap_err().contains("odd"));
        let inverted = ChunkerParams { min_size: 1 << 20, ..ChunkerParams::default() };
        assert!(inverted.validate().is_err());
    }
}
