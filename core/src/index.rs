//! The layer index: a layer's file tree with metadata, each regular file a list of chunk refs.
//!
//! The index says *what* a file is made of, never *where* its bytes live. Entries are kept in
//! pre-order with every directory's children sorted by name, so a parent always precedes its
//! children and a directory's Merkle hash can be computed in one backwards pass. The byte layout is
//! documented in `docs/formats/layer-index.md`; [`LayerIndex::encode`] and [`LayerIndex::decode`] are
//! its only writer and reader.

use std::collections::HashSet;

use crate::chunker::ChunkerParams;
use crate::digest::{ChunkId, Digest};
use crate::path::valid_name;

/// One chunk of file content: its id and uncompressed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// Ownership, permissions, times and extended attributes of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`); the type is in [`Kind`].
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Sub-second part of the modification time (PAX `mtime` only; 0 for ustar).
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by key, keys unique.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// Metadata given to a directory the layer implies but does not list.
    pub fn implicit_dir() -> Meta {
        Meta { mode: 0o755, ..Meta::default() }
    }
}

/// What an entry is, with the data that belongs to its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory; `hash` is its Merkle hash (metadata plus children's names and hashes).
    Dir {
        hash: [u8; 32],
    },
    /// A regular file: its size and the indexes of its chunks in [`LayerIndex::chunks`].
    File {
        size: u64,
        chunks: Vec<u32>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link to an earlier [`Kind::File`] entry of the same index.
    Hardlink {
        target: u32,
    },
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// An OCI whiteout (`.wh.NAME`), kept under its tar name; hides NAME in lower layers.
    Whiteout,
    /// An OCI opaque-directory marker (`.wh..wh..opq`): hides every lower entry of its directory.
    Opaque,
}

impl Kind {
    pub(crate) fn tag(&self) -> u8 {
        match self {
            Kind::Dir { .. } => 1,
            Kind::File { .. } => 2,
            Kind::Symlink { .. } => 3,
            Kind::Hardlink { .. } => 4,
            Kind::CharDev { .. } => 5,
            Kind::BlockDev { .. } => 6,
            Kind::Fifo => 7,
            Kind::Whiteout => 8,
            Kind::Opaque => 9,
        }
    }

    /// A short human name of the type ("dir", "file", ...).
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Dir { .. } => "dir",
            Kind::File { .. } => "file",
            Kind::Symlink { .. } => "symlink",
            Kind::Hardlink { .. } => "hardlink",
            Kind::CharDev { .. } => "char device",
            Kind::BlockDev { .. } => "block device",
            Kind::Fifo => "fifo",
            Kind::Whiteout => "whiteout",
            Kind::Opaque => "opaque marker",
        }
    }
}

/// Prefix of OCI whiteout names.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// One node of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Index of the parent directory; the root (index 0) is its own parent.
    pub parent: u32,
    /// One path component; empty for the root.
    pub name: Vec<u8>,
    /// False for directories the layer implies (a listed `a/b` implies `a/`) but does not list:
    /// they are not written back when the layer is exported as a tar.
    pub explicit: bool,
    pub meta: Meta,
    pub kind: Kind,
}

/// A decoded layer index (or a merged rootfs view built from several).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIndex {
    pub chunker: ChunkerParams,
    /// Digest of the uncompressed layer tar (OCI diff_id); all zero for a merged view.
    pub diff_id: Digest,
    /// Every distinct chunk the layer's files use, in first-use order.
    pub chunks: Vec<ChunkRef>,
    /// The tree, in pre-order with sorted children; entry 0 is the root directory.
    pub entries: Vec<Entry>,
    /// CSR adjacency: children of entry `i` are `child_list[child_start[i]..child_start[i + 1]]`.
    child_start: Vec<u32>,
    child_list: Vec<u32>,
    /// False for a view built to serve a mount ([`crate::merge_layers_to_serve`]): its directory
    /// hashes are zero, so it is never encoded or diffed (both refuse it).
    hashed: bool,
}

/// Why an index could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("not a layer index (bad magic)")]
    BadMagic,
    #[error("layer index version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("layer index checksum mismatch: the index is corrupt")]
    Checksum,
    #[error("layer index is truncated")]
    Truncated,
    #[error("layer index is malformed: {0}")]
    Malformed(String),
}

/// Magic bytes opening every encoded index.
pub const MAGIC: &[u8; 4] = b"HBLI";
/// The index format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

const FLAG_EXPLICIT: u8 = 1;
const FLAG_XATTRS: u8 = 2;

impl LayerIndex {
    /// Assembles an index from entries already in canonical order; computes adjacency and the
    /// Merkle hashes of every directory. Used by the tree builder.
    pub(crate) fn from_parts(
        chunker: ChunkerParams,
        diff_id: Digest,
        chunks: Vec<ChunkRef>,
        entries: Vec<Entry>,
    ) -> Self {
        let mut idx = Self::from_parts_unhashed(chunker, diff_id, chunks, entries);
        idx.compute_merkle();
        idx.hashed = true;
        idx
    }

    /// [`LayerIndex::from_parts`] with every directory hash left zero.
    pub(crate) fn from_parts_unhashed(
        chunker: ChunkerParams,
        diff_id: Digest,
        chunks: Vec<ChunkRef>,
        entries: Vec<Entry>,
    ) -> Self {
        let mut idx = LayerIndex {
            chunker,
            diff_id,
            chunks,
            entries,
            child_start: Vec::new(),
            child_list: Vec::new(),
            hashed: false,
        };
        idx.build_adjacency();
        idx
    }

    /// False for a view built to serve a mount, whose directory hashes are all zero.
    pub fn is_hashed(&self) -> bool {
        self.hashed
    }

    fn build_adjacency(&mut self) {
        let n = self.entries.len();
        let mut counts = vec![0u32; n + 1];
        for e in self.entries.iter().skip(1) {
            counts[e.parent as usize + 1] += 1;
        }
        for i in 1..=n {
            counts[i] += counts[i - 1];
        }
        let mut fill = counts.clone();
        let mut list = vec![0u32; n.saturating_sub(1)];
        // Entries are in pre-order with sorted siblings, so filling in index order keeps each
        // directory's children sorted.
        for (i, e) in self.entries.iter().enumerate().skip(1) {
            let slot = &mut fill[e.parent as usize];
            list[*slot as usize] = i as u32;
            *slot += 1;
        }
        self.child_start = counts;
        self.child_list = list;
    }

    /// Children of entry `i`, sorted by name.
    pub fn children(&self, i: u32) -> &[u32] {
        let (s, e) = (self.child_start[i as usize], self.child_start[i as usize + 1]);
        &self.child_list[s as usize..e as usize]
    }

    /// The root directory's Merkle hash: the identity of the whole tree.
    pub fn root_hash(&self) -> [u8; 32] {
        match self.entries[0].kind {
            Kind::Dir { hash } => hash,
            _ => unreachable!("entry 0 is always a directory"),
        }
    }

    /// The path of entry `i`, relative to the root, without a leading slash (`usr/bin/sh`).
    pub fn path(&self, i: u32) -> Vec<u8> {
        let mut parts = Vec::new();
        let mut cur = i;
        while cur != 0 {
            let e = &self.entries[cur as usize];
            parts.push(&e.name[..]);
            cur = e.parent;
        }
        parts.reverse();
        parts.join(&b'/')
    }

    /// Finds an entry by its slash-separated path relative to the root.
    pub fn lookup(&self, path: &[u8]) -> Option<u32> {
        let mut cur = 0u32;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let kids = self.children(cur);
            let pos = kids.binary_search_by(|&k| self.entries[k as usize].name.as_slice().cmp(comp)).ok()?;
            cur = kids[pos];
        }
        Some(cur)
    }

    /// Finds an entry by path as a process inside the tree would: symbolic links followed (an
    /// absolute target from the tree's root, never above it; `..` likewise), hard links to their
    /// file; at most 40 links, as Linux allows. `None` when the path leads nowhere.
    pub fn resolve(&self, path: &[u8]) -> Option<u32> {
        let mut hops = 0;
        let mut pending: Vec<Vec<u8>> = components(path);
        pending.reverse();
        let mut cur = 0u32;
        while let Some(comp) = pending.pop() {
            if !matches!(self.entries[cur as usize].kind, Kind::Dir { .. }) {
                return None;
            }
            match comp.as_slice() {
                b"." => continue,
                b".." => {
                    cur = self.entries[cur as usize].parent;
                    continue;
                }
                _ => {}
            }
            let kids = self.children(cur);
            let pos = kids.binary_search_by(|&k| self.entries[k as usize].name.as_slice().cmp(&comp)).ok()?;
            let next = kids[pos];
            match &self.entries[next as usize].kind {
                Kind::Symlink { target } => {
                    hops += 1;
                    if hops > 40 || target.is_empty() {
                        return None;
                    }
                    if target.starts_with(b"/") {
                        cur = 0;
                    }
                    pending.extend(components(target).into_iter().rev());
                }
                Kind::Hardlink { target } => cur = *target,
                _ => cur = next,
            }
        }
        Some(cur)
    }

    /// The chunks of a regular file entry, in order (empty for anything else).
    pub fn file_chunks(&self, i: u32) -> impl Iterator<Item = &ChunkRef> + '_ {
        let list: &[u32] = match &self.entries[i as usize].kind {
            Kind::File { chunks, .. } => chunks,
            Kind::Hardlink { target } => match &self.entries[*target as usize].kind {
                Kind::File { chunks, .. } => chunks,
                _ => &[],
            },
            _ => &[],
        };
        list.iter().map(|&c| &self.chunks[c as usize])
    }

    /// Sum of the sizes of all regular files (hard links counted once).
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// The hash of entry `i`: its metadata and content, not its name (names belong to the parent),
    /// so a moved subtree keeps its hash. Directories return their stored hash.
    pub fn entry_hash(&self, i: u32) -> [u8; 32] {
        let e = &self.entries[i as usize];
        if let Kind::Dir { hash } = e.kind {
            return hash;
        }
        self.hash_entry(i, &[])
    }

    fn hash_entry(&self, i: u32, child_hashes: &[[u8; 32]]) -> [u8; 32] {
        let e = &self.entries[i as usize];
        let mut h = blake3::Hasher::new();
        h.update(b"hb-entry-v1\0");
        h.update(&[e.kind.tag(), e.explicit as u8]);
        h.update(&e.meta.mode.to_le_bytes());
        h.update(&e.meta.uid.to_le_bytes());
        h.update(&e.meta.gid.to_le_bytes());
        h.update(&e.meta.mtime.to_le_bytes());
        h.update(&e.meta.mtime_nsec.to_le_bytes());
        h.update(&(e.meta.xattrs.len() as u64).to_le_bytes());
        for (k, v) in &e.meta.xattrs {
            hash_bytes(&mut h, k);
            hash_bytes(&mut h, v);
        }
        match &e.kind {
            Kind::Dir { .. } => {
                for (&c, ch) in self.children(i).iter().zip(child_hashes) {
                    hash_bytes(&mut h, &self.entries[c as usize].name);
                    h.update(ch);
                }
            }
            Kind::File { size, chunks } => {
                h.update(&size.to_le_bytes());
                for &c in chunks {
                    let r = &self.chunks[c as usize];
                    h.update(r.id.as_bytes());
                    h.update(&r.len.to_le_bytes());
                }
            }
            Kind::Symlink { target } => hash_bytes(&mut h, target),
            Kind::Hardlink { target } => hash_bytes(&mut h, &self.path(*target)),
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                h.update(&major.to_le_bytes());
                h.update(&minor.to_le_bytes());
            }
            Kind::Fifo | Kind::Whiteout | Kind::Opaque => {}
        }
        *h.finalize().as_bytes()
    }

    /// Computes every directory's hash bottom-up (reverse pre-order visits children first).
    fn merkle_hashes(&self) -> Vec<[u8; 32]> {
        let mut hashes = vec![[0u8; 32]; self.entries.len()];
        for i in (0..self.entries.len()).rev() {
            let i32_ = i as u32;
            hashes[i] = if matches!(self.entries[i].kind, Kind::Dir { .. }) {
                let kids: Vec<[u8; 32]> = self.children(i32_).iter().map(|&c| hashes[c as usize]).collect();
                self.hash_entry(i32_, &kids)
            } else {
                self.hash_entry(i32_, &[])
            };
        }
        hashes
    }

    fn compute_merkle(&mut self) {
        let hashes = self.merkle_hashes();
        for (e, h) in self.entries.iter_mut().zip(hashes) {
            if let Kind::Dir { hash } = &mut e.kind {
                *hash = h;
            }
        }
    }

    /// Recomputes every directory hash and compares with the stored ones (fsck).
    pub fn verify_merkle(&self) -> bool {
        let hashes = self.merkle_hashes();
        self.entries.iter().zip(hashes).all(|(e, h)| match e.kind {
            Kind::Dir { hash } => hash == h,
            _ => true,
        })
    }

    /// Encodes the index in format version [`FORMAT_VERSION`].
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.hashed, "a view built to serve a mount has no directory hashes to encode");
        let mut out = Vec::with_capacity(64 + self.chunks.len() * 36 + self.entries.len() * 40);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // flags, none defined
        out.push(self.chunker.algorithm as u8);
        out.extend_from_slice(&self.chunker.min_size.to_le_bytes());
        out.extend_from_slice(&self.chunker.avg_size.to_le_bytes());
        out.extend_from_slice(&self.chunker.max_size.to_le_bytes());
        out.extend_from_slice(self.diff_id.as_bytes());
        out.extend_from_slice(&self.root_hash());
        put_varint(&mut out, self.chunks.len() as u64);
        put_varint(&mut out, self.entries.len() as u64);
        for c in &self.chunks {
            out.extend_from_slice(c.id.as_bytes());
            put_varint(&mut out, c.len as u64);
        }
        for e in &self.entries {
            put_varint(&mut out, e.parent as u64);
            put_bytes(&mut out, &e.name);
            out.push(e.kind.tag());
            let mut flags = 0u8;
            if e.explicit {
                flags |= FLAG_EXPLICIT;
            }
            if !e.meta.xattrs.is_empty() {
                flags |= FLAG_XATTRS;
            }
            out.push(flags);
            put_varint(&mut out, e.meta.mode as u64);
            put_varint(&mut out, e.meta.uid as u64);
            put_varint(&mut out, e.meta.gid as u64);
            put_varint(&mut out, zigzag(e.meta.mtime));
            put_varint(&mut out, e.meta.mtime_nsec as u64);
            if !e.meta.xattrs.is_empty() {
                put_varint(&mut out, e.meta.xattrs.len() as u64);
                for (k, v) in &e.meta.xattrs {
                    put_bytes(&mut out, k);
                    put_bytes(&mut out, v);
                }
            }
            match &e.kind {
                Kind::Dir { hash } => out.extend_from_slice(hash),
                Kind::File { size, chunks } => {
                    put_varint(&mut out, *size);
                    put_varint(&mut out, chunks.len() as u64);
                    for &c in chunks {
                        put_varint(&mut out, c as u64);
                    }
                }
                Kind::Symlink { target } => put_bytes(&mut out, target),
                Kind::Hardlink { target } => put_varint(&mut out, *target as u64),
                Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                    put_varint(&mut out, *major as u64);
                    put_varint(&mut out, *minor as u64);
                }
                Kind::Fifo | Kind::Whiteout | Kind::Opaque => {}
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes and fully validates an index: checksum, structure (pre-order, sorted unique
    /// names, parents are directories), hard-link targets, chunk references and file sizes.
    pub fn decode(data: &[u8]) -> Result<Self, IndexError> {
        if data.len() < 4 || &data[..4] != MAGIC {
            return Err(IndexError::BadMagic);
        }
        if data.len() < 6 {
            return Err(IndexError::Truncated);
        }
        let version = u16::from_le_bytes([data[4], data[5]]);
        if version != FORMAT_VERSION {
            return Err(IndexError::UnsupportedVersion(version));
        }
        if data.len() < 8 + 13 + 64 + 32 {
            return Err(IndexError::Truncated);
        }
        let (body, sum) = data.split_at(data.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(IndexError::Checksum);
        }
        let mut r = Reader { buf: body, pos: 8 };
        let algorithm =
            ChunkerParams::algorithm_from_u8(r.u8()?).ok_or_else(|| malformed("unknown chunking algorithm"))?;
        let chunker = ChunkerParams { algorithm, min_size: r.u32()?, avg_size: r.u32()?, max_size: r.u32()? };
        chunker.validate().map_err(IndexError::Malformed)?;
        let diff_id = Digest(r.array32()?);
        let root_hash = r.array32()?;
        let n_chunks = r.varint_count()?;
        let n_entries = r.varint_count()?;
        if n_entries == 0 {
            return Err(malformed("no root entry"));
        }
        let mut chunks = Vec::with_capacity(n_chunks);
        for _ in 0..n_chunks {
            let id = ChunkId(r.array32()?);
            let len = u32::try_from(r.varint()?).map_err(|_| malformed("chunk length"))?;
            if len == 0 || len > chunker.max_size {
                return Err(malformed("chunk length out of range"));
            }
            chunks.push(ChunkRef { id, len });
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(n_entries);
        // The open directories along the current pre-order path, with each one's last child name.
        let mut stack: Vec<(u32, Vec<u8>)> = Vec::new();
        for i in 0..n_entries as u32 {
            let parent = u32::try_from(r.varint()?).map_err(|_| malformed("parent"))?;
            let name = r.bytes()?.to_vec();
            let tag = r.u8()?;
            let flags = r.u8()?;
            let meta_mode = u32::try_from(r.varint()?).map_err(|_| malformed("mode"))?;
            let uid = u32::try_from(r.varint()?).map_err(|_| malformed("uid"))?;
            let gid = u32::try_from(r.varint()?).map_err(|_| malformed("gid"))?;
            let mtime = unzigzag(r.varint()?);
            let mtime_nsec = u32::try_from(r.varint()?).map_err(|_| malformed("mtime_nsec"))?;
            let mut xattrs = Vec::new();
            if flags & FLAG_XATTRS != 0 {
                let n = r.varint_count()?;
                for _ in 0..n {
                    let k = r.bytes()?.to_vec();
                    let v = r.bytes()?.to_vec();
                    if xattrs.last().is_some_and(|(pk, _): &(Vec<u8>, Vec<u8>)| *pk >= k) {
                        return Err(malformed("xattrs not sorted and unique"));
                    }
                    xattrs.push((k, v));
                }
            }
            if flags & !(FLAG_EXPLICIT | FLAG_XATTRS) != 0 || meta_mode & !0o7777 != 0 {
                return Err(malformed("unknown flag or mode bits"));
            }
            let kind = match tag {
                1 => Kind::Dir { hash: r.array32()? },
                2 => {
                    let size = r.varint()?;
                    let n = r.varint_count()?;
                    let mut list = Vec::with_capacity(n);
                    let mut total = 0u64;
                    for _ in 0..n {
                        let c = r.varint()?;
                        let c = chunks
                            .get(c as usize)
                            .map(|ch| {
                                total += ch.len as u64;
                                c as u32
                            })
                            .ok_or_else(|| malformed("chunk index out of range"))?;
                        list.push(c);
                    }
                    if total != size {
                        return Err(malformed("file size does not match its chunks"));
                    }
                    Kind::File { size, chunks: list }
                }
                3 => Kind::Symlink { target: r.bytes()?.to_vec() },
                4 => {
                    let target = u32::try_from(r.varint()?).map_err(|_| malformed("link"))?;
                    if target >= i || !matches!(entries[target as usize].kind, Kind::File { .. }) {
                        return Err(malformed("hard link target is not an earlier file"));
                    }
                    Kind::Hardlink { target }
                }
                5 | 6 => {
                    let major = u32::try_from(r.varint()?).map_err(|_| malformed("major"))?;
                    let minor = u32::try_from(r.varint()?).map_err(|_| malformed("minor"))?;
                    if tag == 5 {
                        Kind::CharDev { major, minor }
                    } else {
                        Kind::BlockDev { major, minor }
                    }
                }
                7 => Kind::Fifo,
                8 => Kind::Whiteout,
                9 => Kind::Opaque,
                t => return Err(malformed(&format!("unknown entry type {t}"))),
            };
            if i == 0 {
                if parent != 0 || !name.is_empty() || !matches!(kind, Kind::Dir { .. }) {
                    return Err(malformed("entry 0 is not the root directory"));
                }
            } else {
                if !valid_name(&name) {
                    return Err(malformed("invalid entry name"));
                }
                while stack.last().is_some_and(|(d, _)| *d != parent) {
                    stack.pop();
                }
                let Some((_, last)) = stack.last_mut() else {
                    return Err(malformed("entries are not in pre-order"));
                };
                if !last.is_empty() && *last >= name {
                    return Err(malformed("children not sorted or not unique"));
                }
                last.clone_from(&name);
            }
            if matches!(kind, Kind::Dir { .. }) {
                stack.push((i, Vec::new()));
            }
            let meta = Meta { mode: meta_mode, uid, gid, mtime, mtime_nsec, xattrs };
            entries.push(Entry { parent, name, explicit: flags & FLAG_EXPLICIT != 0, meta, kind });
        }
        if r.pos != body.len() {
            return Err(malformed("trailing bytes"));
        }
        // The hashes as stored: checked below, every one.
        let mut idx = Self::from_parts_unhashed(chunker, diff_id, chunks, entries);
        idx.hashed = true;
        if idx.root_hash() != root_hash {
            return Err(malformed("root hash in header differs from the root entry"));
        }
        // Every directory's stored hash, not only the root's: an index whose tree was edited
        // behind an honest root hash (a file's chunks, a mode, a name) is refused here, so no
        // caller can use an index the tree's identity does not cover.
        if !idx.verify_merkle() {
            return Err(malformed("a directory's hash does not match its entries"));
        }
        Ok(idx)
    }

    /// Every distinct chunk id the index references.
    pub fn chunk_set(&self) -> HashSet<ChunkId> {
        self.chunks.iter().map(|c| c.id).collect()
    }
}

/// The non-empty components of a slash-separated path.
fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty()).map(<[u8]>::to_vec).collect()
}

fn malformed(what: &str) -> IndexError {
    IndexError::Malformed(what.to_string())
}

fn hash_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v` as unsigned LEB128.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        let end = self.pos.checked_add(n).ok_or(IndexError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(IndexError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, IndexError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, IndexError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn array32(&mut self) -> Result<[u8; 32], IndexError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn varint(&mut self) -> Result<u64, IndexError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed("varint too long"))
    }
    /// A count of items that each take at least one byte: bounded by what is left, so a corrupt
    /// count cannot make the decoder allocate without limit.
    fn varint_count(&mut self) -> Result<usize, IndexError> {
        let n = self.varint()?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(IndexError::Truncated);
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], IndexError> {
        let n = self.varint_count()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_through_symlinks_as_inside_the_tree() {
        use crate::tree::{NewEntry, TreeBuilder};
        let mut b = TreeBuilder::new(ChunkerParams::default());
        let file = |n: u8| NewEntry::File { chunks: vec![ChunkRef { id: ChunkId::of(&[n]), len: 1 }] };
        let link = |t: &str| NewEntry::Symlink { target: t.as_bytes().to_vec() };
        let m = Meta { mode: 0o755, ..Meta::default() };
        b.add(b"usr/bin/python3.11", m.clone(), file(1)).unwrap();
        b.add(b"usr/bin/python3", m.clone(), link("python3.11")).unwrap();
        b.add(b"bin", m.clone(), link("usr/bin")).unwrap();
        b.add(b"usr/lib/x86_64-linux-gnu/libc.so.6", m.clone(), file(2)).unwrap();
        b.add(b"lib64/ld.so", m.clone(), link("/usr/lib/x86_64-linux-gnu/../x86_64-linux-gnu/libc.so.6")).unwrap();
        b.add(b"usr/bin/up", m.clone(), link("../../../../usr/bin/python3")).unwrap();
        b.add(b"loop/a", m.clone(), link("b")).unwrap();
        b.add(b"loop/b", m.clone(), link("a")).unwrap();
        b.add(b"usr/bin/hard", m.clone(), NewEntry::Hardlink { target: b"usr/bin/python3.11".to_vec() }).unwrap();
        let ix = b.finish(Digest::of(b""));
        // (The builder keeps a hard-linked file under its first name in tree order, `hard`.)
        let py = ix.lookup(b"usr/bin/hard").unwrap();
        assert!(matches!(ix.entries[py as usize].kind, Kind::File { .. }));
        assert_eq!(ix.resolve(b"usr/bin/python3.11"), Some(py), "a hard link is its file");
        assert_eq!(ix.resolve(b"/bin/python3"), Some(py), "a link to a folder, then to a file");
        assert_eq!(ix.resolve(b"usr/bin/up"), Some(py), "`..` stops at the root");
        assert_eq!(ix.resolve(b"lib64/ld.so"), ix.lookup(b"usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(ix.resolve(b"loop/a"), None, "a link loop leads nowhere");
        assert_eq!(ix.resolve(b"usr/bin/python3.11/x"), None, "a file is no folder");
        assert_eq!(ix.resolve(b"usr/bin/python3.11/.."), None, "nor has it a parent to go up to");
        assert_eq!(ix.resolve(b"usr/bin/missing"), None);
    }

    #[test]
    fn varint_and_zigzag_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut r = Reader { buf: &out, pos: 0 };
            assert_eq!(r.varint().unwrap(), v);
            assert_eq!(r.pos, out.len());
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, -1_700_000_000] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
