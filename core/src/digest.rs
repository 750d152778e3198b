//! Content identities: BLAKE3-256 chunk ids and SHA-256 OCI digests.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// Errors from parsing a digest or chunk id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} has no algorithm prefix (expected sha256:<64 hex>)")]
    MissingAlgorithm(String),
    #[error("digest {0:?} uses an unsupported algorithm (only sha256 is supported)")]
    UnsupportedAlgorithm(String),
    #[error("digest {0:?} is not 64 lowercase hex characters")]
    BadHex(String),
}

fn parse_hex32(s: &str, whole: &str) -> Result<[u8; 32], DigestError> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(DigestError::BadHex(whole.to_string()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| DigestError::BadHex(whole.to_string()))?;
    Ok(out)
}

/// Identity of a chunk: BLAKE3-256 of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl FromStr for ChunkId {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s.strip_prefix("blake3:").unwrap_or(s), s).map(ChunkId)
    }
}

/// An OCI content digest (`sha256:<hex>`) of a blob, manifest, config or uncompressed layer (diff_id).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The SHA-256 digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(sha2::Sha256::digest(data).into())
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    /// The first 12 hex characters, as docker shows short ids.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest(sha256:{})", &self.hex()[..16])
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(DigestError::MissingAlgorithm(s.to_string()));
        };
        if alg != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(s.to_string()));
        }
        parse_hex32(hex, s).map(Digest)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Incremental SHA-256, for digests of streams.
#[derive(Default, Clone)]
pub struct DigestHasher(sha2::Sha256);

impl DigestHasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_and_rejects_bad_forms() {
        let d = Digest::of(b"hello");
        assert_eq!(d.to_string(), "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        for (bad, want) in [
            ("2cf24d", DigestError::MissingAlgorithm("2cf24d".into())),
            ("md5:abcd", DigestError::UnsupportedAlgorithm("md5:abcd".into())),
            ("sha256:abcd", DigestError::BadHex("sha256:abcd".into())),
        ] {
            assert_eq!(bad.parse::<Digest>().unwrap_err(), want);
        }
        let upper = format!("sha256:{}", d.hex().to_uppercase());
        assert!(upper.parse::<Digest>().is_err(), "digests are lowercase hex");
    }

    #[test]
    fn streaming_digest_equals_one_shot() {
        let mut h = DigestHasher::new();
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish(), Digest::of(b"hello"));
    }

    #[test]
    fn chunk_id_is_blake3() {
        let id = ChunkId::of(b"abc");
        assert_eq!(id.to_hex(), blake3::hash(b"abc").to_hex().to_string());
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
    }
}
