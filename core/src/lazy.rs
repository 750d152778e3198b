//! The accelerated ("lazy") image format: what `hb convert` writes next to an image in a plain
//! OCI registry so that `hb pull --lazy` can fetch indexes only and read chunks by byte range.
//!
//! Per layer three blobs: the layer index ([`crate::LayerIndex`] encoding), a chunk table
//! ([`ChunkTable`]) and a data blob (the chunks' stored bytes back to back, in table order).
//! Optionally one start-up order ([`StartupOrder`]) for the whole image. An [`AccelConfig`] (the
//! accelerated manifest's config blob) binds them to the original image. Byte layouts are in
//! `docs/formats/lazy-image.md`.

use crate::digest::{ChunkId, Digest};
use crate::index::put_varint;

pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.hyperbox.image.config.v1+json";
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.hyperbox.layer.index.v1";
pub const MEDIA_TYPE_TABLE: &str = "application/vnd.hyperbox.chunk.table.v1";
pub const MEDIA_TYPE_DATA: &str = "application/vnd.hyperbox.chunk.data.v1";
pub const MEDIA_TYPE_STARTUP: &str = "application/vnd.hyperbox.startup.v1";
/// The path under `/v2/<name>/` where an hb mirror takes a learned start-up order
/// (`PUT .../_hyperbox/startup/<image manifest digest>`, an OCI distribution extension path).
pub const STARTUP_PATH: &str = "_hyperbox/startup";
pub const ARTIFACT_TYPE: &str = "application/vnd.hyperbox.image.v1";
/// Annotation (value `"v1"`) on the accelerated manifest's descriptor in the image index.
pub const ANNOTATION: &str = "io.hyperbox.accelerated";
/// Annotation on that descriptor: the digest of the original manifest it accelerates (hb binds by
/// it, not by platform).
pub const ANNOTATION_MANIFEST: &str = "io.hyperbox.manifest";
/// The platform variant of that descriptor: no real platform has it, so other clients' platform
/// matchers pass it over (containerd 1.6's `ctr images pull` fetches every manifest that matches
/// the platform, and would download the accelerated blobs beside the original layers).
pub const FOREIGN_VARIANT: &str = "hyperbox.v1";

const TABLE_MAGIC: &[u8; 4] = b"HBCT";
const STARTUP_MAGIC: &[u8; 4] = b"HBSO";
const SOURCE_MAGIC: &[u8; 4] = b"HBLS";
const VERSION: u16 = 1;
/// The chunk table's compact form: lengths only, ids and raw lengths from the layer's index.
const TABLE_COMPACT_VERSION: u16 = 2;
const TABLE_ENTRY_LEN: usize = 32 + 4 + 4 + 1;
/// Largest chunk a table may describe (the chunker's maximum is far below).
pub const MAX_CHUNK: u32 = 16 << 20;

/// Why a lazy-format blob could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LazyFormatError {
    #[error("not a {0} (bad magic)")]
    BadMagic(&'static str),
    #[error("{what} format version {version} is not supported (this build reads {reads})")]
    Version { what: &'static str, version: u16, reads: String },
    #[error("{0} is truncated")]
    Truncated(&'static str),
    #[error("{0} checksum does not match its content")]
    Checksum(&'static str),
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// Where one chunk is in a layer's data blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableEntry {
    pub id: ChunkId,
    /// Offset of the chunk's stored bytes in the data blob (derived: the sum of earlier lengths).
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    /// Stored as one zstd frame (else raw).
    pub zstd: bool,
}

/// The chunks of one data blob in blob order, back to back from offset 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkTable {
    pub entries: Vec<TableEntry>,
}

impl ChunkTable {
    /// Appends a chunk at the current end of the blob.
    pub fn push(&mut self, id: ChunkId, stored_len: u32, raw_len: u32, zstd: bool) {
        let offset = self.data_size();
        self.entries.push(TableEntry { id, offset, stored_len, raw_len, zstd });
    }

    /// Size of the data blob the table describes.
    pub fn data_size(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.offset + e.stored_len as u64)
    }

    /// Checks that the table holds every chunk `index` names, at the length the index gives it
    /// (a table that does not describe its layer is refused before anything is stored).
    pub fn check_covers(&self, index: &crate::LayerIndex) -> Result<(), LazyFormatError> {
        let lens: std::collections::HashMap<ChunkId, u32> = self.entries.iter().map(|e| (e.id, e.raw_len)).collect();
        for c in &index.chunks {
            match lens.get(&c.id) {
                Some(&len) if len == c.len => {}
                Some(&len) => {
                    return Err(invalid(
                        "chunk table",
                        format!(
                            "chunk {} of layer {} is {} bytes in the index, {len} in the table",
                            c.id, index.diff_id, c.len
                        ),
                    ))
                }
                None => {
                    return Err(invalid(
                        "chunk table",
                        format!("chunk {} of layer {} is not in the table", c.id, index.diff_id),
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * TABLE_ENTRY_LEN);
        out.extend_from_slice(TABLE_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        put_varint(&mut out, self.entries.len() as u64);
        for e in &self.entries {
            out.extend_from_slice(e.id.as_bytes());
            out.extend_from_slice(&e.stored_len.to_le_bytes());
            out.extend_from_slice(&e.raw_len.to_le_bytes());
            out.push(e.zstd as u8);
        }
        seal(out)
    }

    /// Decodes the self-contained form (version 1: ids, both lengths, compression), the one the
    /// store keeps. The compact form a registry carries needs its index: [`ChunkTable::decode_for`].
    pub fn decode(data: &[u8]) -> Result<Self, LazyFormatError> {
        const WHAT: &str = "chunk table";
        let (r, version) = Reader::open_versions(data, TABLE_MAGIC, WHAT, &[VERSION, TABLE_COMPACT_VERSION])?;
        if version == TABLE_COMPACT_VERSION {
            return Err(invalid(WHAT, "a version 2 (compact) table is read with its layer's index".into()));
        }
        Self::read_self_contained(r)
    }

    /// The entries of a version 1 table, after its header.
    fn read_self_contained(mut r: Reader<'_>) -> Result<Self, LazyFormatError> {
        const WHAT: &str = "chunk table";
        let n = r.varint()?;
        if n > (r.rest.len() / TABLE_ENTRY_LEN) as u64 {
            return Err(LazyFormatError::Truncated(WHAT));
        }
        let mut t = ChunkTable { entries: Vec::with_capacity(n as usize) };
        for _ in 0..n {
            let id = ChunkId(r.take(32)?.try_into().expect("32 bytes"));
            let stored_len = r.u32()?;
            let raw_len = r.u32()?;
            let zstd = match r.take(1)?[0] {
                0 => false,
                1 => true,
                f => return Err(invalid(WHAT, format!("unknown compression {f} of chunk {id}"))),
            };
            if raw_len == 0 || raw_len > MAX_CHUNK || stored_len == 0 || stored_len > MAX_CHUNK {
                return Err(invalid(WHAT, format!("chunk {id} has impossible lengths {stored_len}/{raw_len}")));
            }
            if !zstd && stored_len != raw_len {
                return Err(invalid(WHAT, format!("raw chunk {id} has stored {stored_len} != {raw_len} bytes")));
            }
            t.push(id, stored_len, raw_len, zstd);
        }
        r.finish()?;
        Ok(t)
    }

    /// The compact form (version 2) that travels beside the layer's index in a registry: per chunk
    /// of `index`, in the index's chunk order, only `stored length << 1 | zstd` as a varint. The
    /// ids and raw lengths are the index's, so a table is ~3 bytes a chunk instead of 41. Refused
    /// when the table is not in the index's chunk order (the order the store's `layer_data` makes).
    pub fn encode_compact(&self, index: &crate::LayerIndex) -> Result<Vec<u8>, LazyFormatError> {
        if self.entries.len() != index.chunks.len() {
            return Err(invalid(
                "chunk table",
                format!(
                    "{} entries for the {} chunks of layer {}",
                    self.entries.len(),
                    index.chunks.len(),
                    index.diff_id
                ),
            ));
        }
        let mut out = Vec::with_capacity(16 + self.entries.len() * 3);
        out.extend_from_slice(TABLE_MAGIC);
        out.extend_from_slice(&TABLE_COMPACT_VERSION.to_le_bytes());
        put_varint(&mut out, self.entries.len() as u64);
        for (e, c) in self.entries.iter().zip(&index.chunks) {
            if e.id != c.id || e.raw_len != c.len {
                return Err(invalid(
                    "chunk table",
                    format!(
                        "entry {} is not chunk {} of layer {} (the table is not in index order)",
                        e.id, c.id, index.diff_id
                    ),
                ));
            }
            put_varint(&mut out, (e.stored_len as u64) << 1 | e.zstd as u64);
        }
        Ok(seal(out))
    }

    /// Decodes a table fetched beside `index`: the compact form (version 2), completed with the
    /// index's ids and raw lengths, or a self-contained one (version 1, written by older builds;
    /// the caller checks it covers the index, [`ChunkTable::check_covers`]).
    pub fn decode_for(data: &[u8], index: &crate::LayerIndex) -> Result<Self, LazyFormatError> {
        const WHAT: &str = "chunk table";
        let (mut r, version) = Reader::open_versions(data, TABLE_MAGIC, WHAT, &[VERSION, TABLE_COMPACT_VERSION])?;
        if version == VERSION {
            return Self::read_self_contained(r);
        }
        let n = r.varint()?;
        if n != index.chunks.len() as u64 {
            return Err(invalid(
                WHAT,
                format!("{n} entries for the {} chunks of layer {}", index.chunks.len(), index.diff_id),
            ));
        }
        let mut t = ChunkTable { entries: Vec::with_capacity(index.chunks.len()) };
        for c in &index.chunks {
            let v = r.varint()?;
            let (stored_len, zstd) = (v >> 1, v & 1 == 1);
            if stored_len == 0 || stored_len > MAX_CHUNK as u64 || c.len == 0 || c.len > MAX_CHUNK {
                return Err(invalid(WHAT, format!("chunk {} has impossible lengths {stored_len}/{}", c.id, c.len)));
            }
            if !zstd && stored_len != c.len as u64 {
                return Err(invalid(WHAT, format!("raw chunk {} has stored {stored_len} != {} bytes", c.id, c.len)));
            }
            t.push(c.id, stored_len as u32, c.len, zstd);
        }
        r.finish()?;
        Ok(t)
    }
}

/// The order in which an image's start-up read chunks (recorded by `hb optimize`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartupOrder {
    pub chunks: Vec<ChunkId>,
}

impl StartupOrder {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.chunks.len() * 32);
        out.extend_from_slice(STARTUP_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        put_varint(&mut out, self.chunks.len() as u64);
        for c in &self.chunks {
            out.extend_from_slice(c.as_bytes());
        }
        seal(out)
    }

    /// Checks that every chunk the order names is one of `layers`' (an order comes from a learner,
    /// a proxy or a publisher: a mount or a keeper trusts none of them to name only the image's own).
    pub fn check_within<'a>(
        &self,
        layers: impl IntoIterator<Item = &'a crate::LayerIndex>,
    ) -> Result<(), LazyFormatError> {
        self.check_known(&layers.into_iter().flat_map(|l| l.chunks.iter().map(|c| c.id)).collect())
    }

    /// [`StartupOrder::check_within`] against the image's chunk ids, gathered by the caller.
    pub fn check_known(&self, known: &std::collections::HashSet<ChunkId>) -> Result<(), LazyFormatError> {
        match self.chunks.iter().find(|c| !known.contains(*c)) {
            Some(bad) => Err(invalid(
                "start-up order",
                format!(
                    "it names chunk {bad}, which the image does not have ({} of its {} chunks are foreign)",
                    self.chunks.iter().filter(|c| !known.contains(*c)).count(),
                    self.chunks.len()
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn decode(data: &[u8]) -> Result<Self, LazyFormatError> {
        const WHAT: &str = "start-up order";
        let mut r = Reader::open(data, STARTUP_MAGIC, WHAT)?;
        let n = r.varint()?;
        if n > (r.rest.len() / 32) as u64 {
            return Err(LazyFormatError::Truncated(WHAT));
        }
        let chunks =
            (0..n).map(|_| r.take(32).map(|b| ChunkId(b.try_into().expect("32 bytes")))).collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(StartupOrder { chunks })
    }
}

/// One layer of an accelerated image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccelLayer {
    /// The original layer's diff_id (the index names it too).
    pub diff_id: Digest,
    /// The original layer blob's digest.
    pub blob: Digest,
    pub index: Digest,
    pub index_size: u64,
    pub table: Digest,
    pub table_size: u64,
    pub data: Digest,
    pub data_size: u64,
}

/// The accelerated manifest's config: binds the hb blobs to the original image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccelConfig {
    /// Format version, 1.
    pub version: u32,
    /// Digest of the original image's manifest.
    pub manifest: Digest,
    /// Digest of the original image's config.
    pub config: Digest,
    pub layers: Vec<AccelLayer>,
    /// Digest and size of the start-up order blob, when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<(Digest, u64)>,
}

/// What the store keeps for a layer whose chunks are fetched on demand: where its data blob is
/// and the table of that blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LazySource {
    /// Registry and repository holding the data blob (`host[:port]/path`).
    pub repository: String,
    pub data: Digest,
    pub table: ChunkTable,
}

impl LazySource {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(SOURCE_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        put_varint(&mut out, self.repository.len() as u64);
        out.extend_from_slice(self.repository.as_bytes());
        out.extend_from_slice(self.data.as_bytes());
        out.extend_from_slice(&self.table.encode());
        seal(out)
    }

    pub fn decode(data: &[u8]) -> Result<Self, LazyFormatError> {
        const WHAT: &str = "lazy layer source";
        let mut r = Reader::open(data, SOURCE_MAGIC, WHAT)?;
        let n = r.varint()?;
        if n > 4096 {
            return Err(invalid(WHAT, "repository name too long".into()));
        }
        let repository = String::from_utf8(r.take(n as usize)?.to_vec())
            .map_err(|_| invalid(WHAT, "repository is not UTF-8".into()))?;
        let digest = Digest(r.take(32)?.try_into().expect("32 bytes"));
        let table = ChunkTable::decode(r.rest)?;
        Ok(LazySource { repository, data: digest, table })
    }
}

fn invalid(what: &'static str, reason: String) -> LazyFormatError {
    LazyFormatError::Invalid { what, reason }
}

/// Appends the BLAKE3 of everything before it.
fn seal(mut out: Vec<u8>) -> Vec<u8> {
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Checks magic, version and trailer; positions after the version.
    fn open(data: &'a [u8], magic: &[u8; 4], what: &'static str) -> Result<Self, LazyFormatError> {
        Self::open_versions(data, magic, what, &[VERSION]).map(|(r, _)| r)
    }

    /// [`Reader::open`] for a format with several versions: which one it met.
    fn open_versions(
        data: &'a [u8],
        magic: &[u8; 4],
        what: &'static str,
        versions: &[u16],
    ) -> Result<(Self, u16), LazyFormatError> {
        if data.len() < 4 || &data[..4] != magic {
            return Err(LazyFormatError::BadMagic(what));
        }
        if data.len() < 6 + 32 {
            return Err(LazyFormatError::Truncated(what));
        }
        let version = u16::from_le_bytes([data[4], data[5]]);
        if !versions.contains(&version) {
            let reads = versions.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" and ");
            return Err(LazyFormatError::Version { what, version, reads });
        }
        let (body, sum) = data.split_at(data.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(LazyFormatError::Checksum(what));
        }
        Ok((Reader { rest: &body[6..], what }, version))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], LazyFormatError> {
        if self.rest.len() < n {
            return Err(LazyFormatError::Truncated(self.what));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, LazyFormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn varint(&mut self) -> Result<u64, LazyFormatError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(invalid(self.what, "varint too long".into()))
    }

    fn finish(self) -> Result<(), LazyFormatError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(invalid(self.what, format!("{} trailing bytes", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ChunkTable {
        let mut t = ChunkTable::default();
        t.push(ChunkId::of(b"a"), 10, 20, true);
        t.push(ChunkId::of(b"b"), 5, 5, false);
        t
    }

    #[test]
    fn table_round_trips_and_offsets_are_contiguous() {
        let t = table();
        let d = ChunkTable::decode(&t.encode()).unwrap();
        assert_eq!(d, t);
        assert_eq!(d.entries[1].offset, 10);
        assert_eq!(d.data_size(), 15);
    }

    /// A table that does not describe its layer (a missing chunk, a wrong length) is refused
    /// before anything is stored (updates issue: bad input from an accelerated form).
    #[test]
    fn a_table_must_cover_its_layers_chunks_at_their_lengths() {
        use crate::index::{ChunkRef, Meta};
        use crate::tree::{NewEntry, TreeBuilder};
        let index = |len: u32| {
            let mut b = TreeBuilder::new(crate::ChunkerParams::default());
            let chunks = vec![ChunkRef { id: ChunkId::of(b"a"), len }, ChunkRef { id: ChunkId::of(b"b"), len: 5 }];
            b.add(b"f", Meta { mode: 0o644, ..Meta::default() }, NewEntry::File { chunks }).unwrap();
            b.finish(Digest([7; 32]))
        };
        assert_eq!(table().check_covers(&index(20)), Ok(()));
        let wrong_len = table().check_covers(&index(21)).unwrap_err().to_string();
        assert!(wrong_len.contains("21 bytes in the index, 20 in the table"), "{wrong_len}");
        let mut short = table();
        short.entries.pop();
        let missing = short.check_covers(&index(20)).unwrap_err().to_string();
        assert!(missing.contains("is not in the table"), "{missing}");
    }

    fn index_of(chunks: &[(&[u8], u32)]) -> crate::LayerIndex {
        use crate::index::{ChunkRef, Meta};
        use crate::tree::{NewEntry, TreeBuilder};
        let mut b = TreeBuilder::new(crate::ChunkerParams::default());
        let chunks = chunks.iter().map(|(b, len)| ChunkRef { id: ChunkId::of(b), len: *len }).collect();
        b.add(b"f", Meta { mode: 0o644, ..Meta::default() }, NewEntry::File { chunks }).unwrap();
        b.finish(Digest([7; 32]))
    }

    /// Cold-start issue (bytes before the first output): the table a registry carries names no
    /// chunk id (the index has them), ~3 bytes a chunk, and reads back to the same table.
    #[test]
    fn the_compact_table_reads_back_with_its_index_and_not_without() {
        let index = index_of(&[(b"a", 20), (b"b", 5)]);
        let t = table();
        let compact = t.encode_compact(&index).unwrap();
        assert!(compact.len() < 4 + 2 + 1 + 2 * 3 + 32, "{} bytes", compact.len());
        assert!(compact.len() < t.encode().len() / 2);
        assert_eq!(ChunkTable::decode_for(&compact, &index).unwrap(), t);
        // The self-contained form still reads (tables written by older builds).
        assert_eq!(ChunkTable::decode_for(&t.encode(), &index).unwrap(), t);
        let e = ChunkTable::decode(&compact).unwrap_err().to_string();
        assert!(e.contains("with its layer's index"), "{e}");
        // Not the index it was made for: a different chunk count is refused.
        let other = index_of(&[(b"a", 20)]);
        let e = ChunkTable::decode_for(&compact, &other).unwrap_err().to_string();
        assert!(e.contains("2 entries for the 1 chunks"), "{e}");
        // A raw chunk whose stored length is not its raw length (index says 6, table 5).
        let longer = index_of(&[(b"a", 20), (b"b", 6)]);
        let e = ChunkTable::decode_for(&compact, &longer).unwrap_err().to_string();
        assert!(e.contains("stored 5 != 6"), "{e}");
        // A table in another order than the index's is not written compactly.
        let swapped = index_of(&[(b"b", 5), (b"a", 20)]);
        assert!(t.encode_compact(&swapped).unwrap_err().to_string().contains("not in index order"));
        let mut bad = compact.clone();
        bad[8] ^= 1;
        assert_eq!(ChunkTable::decode_for(&bad, &index), Err(LazyFormatError::Checksum("chunk table")));
        let mut v3 = compact;
        v3[4] = 3;
        let e = ChunkTable::decode_for(&v3, &index).unwrap_err().to_string();
        assert!(e.contains("version 3 is not supported (this build reads 1 and 2)"), "{e}");
    }

    /// Cold-start issue: an order naming chunks the image lacks is refused, naming one of them.
    #[test]
    fn an_order_must_name_only_the_images_chunks() {
        use crate::index::{ChunkRef, Meta};
        use crate::tree::{NewEntry, TreeBuilder};
        let mut b = TreeBuilder::new(crate::ChunkerParams::default());
        let chunks = vec![ChunkRef { id: ChunkId::of(b"a"), len: 1 }, ChunkRef { id: ChunkId::of(b"b"), len: 1 }];
        b.add(b"f", Meta { mode: 0o644, ..Meta::default() }, NewEntry::File { chunks }).unwrap();
        let index = b.finish(Digest([7; 32]));
        let own = StartupOrder { chunks: vec![ChunkId::of(b"b"), ChunkId::of(b"a")] };
        assert_eq!(own.check_within([&index]), Ok(()));
        let foreign = StartupOrder { chunks: vec![ChunkId::of(b"a"), ChunkId::of(b"z")] };
        let e = foreign.check_within([&index]).unwrap_err().to_string();
        assert!(e.contains(&ChunkId::of(b"z").to_string()) && e.contains("1 of its 2"), "{e}");
        assert!(foreign.check_within([]).is_err(), "no layers: every chunk is foreign");
    }

    #[test]
    fn corrupt_blobs_are_refused() {
        let mut b = table().encode();
        b[10] ^= 1;
        assert_eq!(ChunkTable::decode(&b), Err(LazyFormatError::Checksum("chunk table")));
        assert_eq!(ChunkTable::decode(b"nope"), Err(LazyFormatError::BadMagic("chunk table")));
        let s = StartupOrder { chunks: vec![ChunkId::of(b"x")] };
        assert_eq!(StartupOrder::decode(&s.encode()).unwrap(), s);
        assert!(StartupOrder::decode(&table().encode()).is_err());
        // A raw chunk whose lengths disagree is refused even with a valid checksum.
        let mut bad = ChunkTable::default();
        bad.push(ChunkId::of(b"c"), 3, 4, false);
        assert!(matches!(ChunkTable::decode(&bad.encode()), Err(LazyFormatError::Invalid { .. })));
    }

    #[test]
    fn lazy_source_round_trips() {
        let s = LazySource { repository: "127.0.0.1:5000/app".into(), data: Digest::of(b"d"), table: table() };
        assert_eq!(LazySource::decode(&s.encode()).unwrap(), s);
    }
}
