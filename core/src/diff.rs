//! Merkle diff between two trees.
//!
//! Walks both trees from the root and descends only into directories whose hashes differ, so two
//! versions of a large image that differ in a few files cost a few directory comparisons.

use std::collections::HashSet;

use crate::digest::ChunkId;
use crate::index::{ChunkRef, Kind, LayerIndex};

/// How a path changed from `a` to `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Change {
    Added,
    Removed,
    Modified,
}

impl Change {
    /// The letter `docker diff` uses: A, D or C.
    pub fn letter(self) -> char {
        match self {
            Change::Added => 'A',
            Change::Removed => 'D',
            Change::Modified => 'C',
        }
    }
}

/// One changed path (relative to the root, no leading slash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    pub change: Change,
    pub path: Vec<u8>,
}

/// The result of [`diff`]: changed paths in tree order, and the chunks `b` needs that `a` lacks.
#[derive(Clone, Debug, Default)]
pub struct DiffReport {
    pub changes: Vec<PathChange>,
    pub needed_chunks: Vec<ChunkRef>,
    pub needed_bytes: u64,
    /// Directories whose children were compared (a measure of the work done).
    pub dirs_visited: usize,
}

/// Compares `a` (what is there) with `b` (what is wanted). Removed subtrees are reported by their
/// top path, added subtrees path by path (as `docker diff` does).
pub fn diff(a: &LayerIndex, b: &LayerIndex) -> DiffReport {
    // Unchanged subtrees are skipped by their hashes: a view without them would diff as equal.
    assert!(a.is_hashed() && b.is_hashed(), "a view built to serve a mount has no directory hashes to diff");
    let mut out = DiffReport::default();
    let have: HashSet<ChunkId> = a.chunk_set();
    let mut needed: HashSet<ChunkId> = HashSet::new();
    let mut want = |out: &mut DiffReport, idx: &LayerIndex, i: u32| {
        for c in idx.file_chunks(i) {
            if !have.contains(&c.id) && needed.insert(c.id) {
                out.needed_chunks.push(*c);
                out.needed_bytes += c.len as u64;
            }
        }
    };
    if a.root_hash() == b.root_hash() {
        return out;
    }
    // (entry in a, entry in b), both directories whose hashes differ.
    let mut stack = vec![(0u32, 0u32)];
    while let Some((da, db)) = stack.pop() {
        out.dirs_visited += 1;
        if da != 0 && a.entries[da as usize].meta != b.entries[db as usize].meta {
            out.changes.push(PathChange { change: Change::Modified, path: b.path(db) });
        }
        let (ka, kb) = (a.children(da), b.children(db));
        let (mut i, mut j) = (0, 0);
        let mut deeper = Vec::new();
        while i < ka.len() || j < kb.len() {
            let na = ka.get(i).map(|&x| &a.entries[x as usize].name);
            let nb = kb.get(j).map(|&x| &b.entries[x as usize].name);
            match (na, nb) {
                (Some(x), Some(y)) if x == y => {
                    let (ea, eb) = (ka[i], kb[j]);
                    let both_dirs = matches!(a.entries[ea as usize].kind, Kind::Dir { .. })
                        && matches!(b.entries[eb as usize].kind, Kind::Dir { .. });
                    if a.entry_hash(ea) != b.entry_hash(eb) {
                        if both_dirs {
                            deeper.push((ea, eb));
                        } else {
                            out.changes.push(PathChange { change: Change::Modified, path: b.path(eb) });
                            add_subtree(b, eb, &mut out, &mut want, false);
                        }
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x < y => {
                    out.changes.push(PathChange { change: Change::Removed, path: a.path(ka[i]) });
                    i += 1;
                }
                (Some(_), None) => {
                    out.changes.push(PathChange { change: Change::Removed, path: a.path(ka[i]) });
                    i += 1;
                }
                _ => {
                    add_subtree(b, kb[j], &mut out, &mut want, true);
                    j += 1;
                }
            }
        }
        // Visit subdirectories in name order (the stack pops the last pushed first).
        stack.extend(deeper.into_iter().rev());
    }
    out
}

/// Records `top` (when `include_top`) and everything below it as added, collecting chunks.
fn add_subtree(
    b: &LayerIndex,
    top: u32,
    out: &mut DiffReport,
    want: &mut impl FnMut(&mut DiffReport, &LayerIndex, u32),
    include_top: bool,
) {
    let mut stack = vec![top];
    while let Some(e) = stack.pop() {
        if e != top || include_top {
            out.changes.push(PathChange { change: Change::Added, path: b.path(e) });
        }
        want(out, b, e);
        stack.extend(b.children(e).iter().rev());
    }
}
