//! Building layer indexes: from tar entries (ingest) and from other indexes (merged rootfs views).
//!
//! The builder holds a mutable tree with name-sorted children; [`TreeBuilder::finish`] flattens it
//! into the canonical pre-order of a [`LayerIndex`] and computes the Merkle hashes.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::chunker::ChunkerParams;
use crate::digest::{ChunkId, Digest};
use crate::index::{ChunkRef, Entry, Kind, LayerIndex, Meta, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::path::{split_layer_path, valid_name, PathError};

/// Why an entry cannot be added to a layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("entry {path:?}: {source}")]
    BadPath {
        path: String,
        #[source]
        source: PathError,
    },
    #[error("entry {path:?}: duplicate entry in the same layer")]
    Duplicate { path: String },
    #[error("entry {path:?}: its parent {parent:?} is a {kind}, not a directory")]
    ParentNotDir { path: String, parent: String, kind: &'static str },
    #[error("entry {path:?}: hard link target {target:?} is not a regular file earlier in this layer")]
    BadHardlink { path: String, target: String },
    #[error("entry {path:?}: {why}")]
    BadWhiteout { path: String, why: &'static str },
    #[error("entry {path:?}: the layer root can only be a directory")]
    RootNotDir { path: String },
}

/// What a tar entry adds to the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NewEntry {
    Dir,
    File {
        chunks: Vec<ChunkRef>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link, naming its target by path as tar does.
    Hardlink {
        target: Vec<u8>,
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
}

#[derive(Clone, Debug)]
enum NodeKind {
    Dir,
    /// `group` ties hard-linked names together: every member shares content and metadata.
    File {
        chunks: Vec<ChunkRef>,
        group: Option<u64>,
    },
    Symlink(Vec<u8>),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
    Whiteout,
    Opaque,
}

impl NodeKind {
    fn label(&self) -> &'static str {
        match self {
            NodeKind::Dir => "dir",
            NodeKind::File { .. } => "file",
            NodeKind::Symlink(_) => "symlink",
            NodeKind::CharDev(..) => "char device",
            NodeKind::BlockDev(..) => "block device",
            NodeKind::Fifo => "fifo",
            NodeKind::Whiteout => "whiteout",
            NodeKind::Opaque => "opaque marker",
        }
    }
}

#[derive(Clone, Debug)]
struct Node {
    name: Vec<u8>,
    explicit: bool,
    meta: Meta,
    kind: NodeKind,
    children: BTreeMap<Vec<u8>, usize>,
}

/// A mutable file tree that becomes a [`LayerIndex`].
pub struct TreeBuilder {
    chunker: ChunkerParams,
    nodes: Vec<Node>,
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

impl TreeBuilder {
    pub fn new(chunker: ChunkerParams) -> Self {
        let root = Node {
            name: Vec::new(),
            explicit: false,
            meta: Meta::implicit_dir(),
            kind: NodeKind::Dir,
            children: BTreeMap::new(),
        };
        TreeBuilder { chunker, nodes: vec![root] }
    }

    fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Walks `comps` from the root, creating implicit directories, and returns the directory node.
    fn ensure_dir(&mut self, comps: &[&[u8]], path: &[u8]) -> Result<usize, BuildError> {
        let mut cur = 0usize;
        for (depth, comp) in comps.iter().enumerate() {
            cur = match self.nodes[cur].children.get(*comp) {
                Some(&c) => {
                    if !matches!(self.nodes[c].kind, NodeKind::Dir) {
                        return Err(BuildError::ParentNotDir {
                            path: lossy(path),
                            parent: lossy(&comps[..=depth].join(&b'/')),
                            kind: self.nodes[c].kind.label(),
                        });
                    }
                    c
                }
                None => {
                    let id = self.push(Node {
                        name: comp.to_vec(),
                        explicit: false,
                        meta: Meta::implicit_dir(),
                        kind: NodeKind::Dir,
                        children: BTreeMap::new(),
                    });
                    self.nodes[cur].children.insert(comp.to_vec(), id);
                    id
                }
            };
        }
        Ok(cur)
    }

    /// Adds one tar entry. `path` is the raw member name; whiteouts and opaque markers are
    /// recognised by name. Refuses escaping paths, duplicates, entries below non-directories and
    /// hard links to anything but an earlier regular file of this layer.
    pub fn add(&mut self, path: &[u8], meta: Meta, entry: NewEntry) -> Result<(), BuildError> {
        let comps = split_layer_path(path).map_err(|source| BuildError::BadPath { path: lossy(path), source })?;
        let Some((last, parents)) = comps.split_last() else {
            // The layer root itself ("./").
            if entry != NewEntry::Dir {
                return Err(BuildError::RootNotDir { path: lossy(path) });
            }
            if self.nodes[0].explicit {
                return Err(BuildError::Duplicate { path: lossy(path) });
            }
            self.nodes[0].explicit = true;
            self.nodes[0].meta = meta;
            return Ok(());
        };
        let parent = self.ensure_dir(parents, path)?;
        let kind = if *last == OPAQUE_MARKER {
            match &entry {
                NewEntry::File { chunks } if chunks.is_empty() => NodeKind::Opaque,
                _ => {
                    return Err(BuildError::BadWhiteout {
                        path: lossy(path),
                        why: "an opaque marker must be an empty regular file",
                    })
                }
            }
        } else if last.starts_with(b".wh..wh.") {
            return Err(BuildError::BadWhiteout { path: lossy(path), why: "unsupported AUFS metadata entry" });
        } else if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) {
            match &entry {
                NewEntry::File { chunks } if chunks.is_empty() && valid_name(hidden) => NodeKind::Whiteout,
                _ => {
                    return Err(BuildError::BadWhiteout {
                        path: lossy(path),
                        why: "a whiteout must be an empty regular file naming a valid entry",
                    })
                }
            }
        } else {
            match entry {
                NewEntry::Dir => NodeKind::Dir,
                NewEntry::File { chunks } => NodeKind::File { chunks, group: None },
                NewEntry::Symlink { target } => NodeKind::Symlink(target),
                NewEntry::CharDev { major, minor } => NodeKind::CharDev(major, minor),
                NewEntry::BlockDev { major, minor } => NodeKind::BlockDev(major, minor),
                NewEntry::Fifo => NodeKind::Fifo,
                NewEntry::Hardlink { target } => {
                    let bad = || BuildError::BadHardlink { path: lossy(path), target: lossy(&target) };
                    let tcomps = split_layer_path(&target).map_err(|_| bad())?;
                    let t = self.find(&tcomps).ok_or_else(bad)?;
                    let NodeKind::File { chunks, group } = &mut self.nodes[t].kind else {
                        return Err(bad());
                    };
                    let g = *group.get_or_insert(t as u64);
                    let chunks = chunks.clone();
                    let meta = self.nodes[t].meta.clone();
                    return self.insert_leaf(parent, last, path, meta, NodeKind::File { chunks, group: Some(g) });
                }
            }
        };
        if let Some(&existing) = self.nodes[parent].children.get(*last) {
            // A directory listed after entries inside it was implied first: fill in its metadata.
            let n = &mut self.nodes[existing];
            if matches!(kind, NodeKind::Dir) && matches!(n.kind, NodeKind::Dir) && !n.explicit {
                n.explicit = true;
                n.meta = meta;
                return Ok(());
            }
            return Err(BuildError::Duplicate { path: lossy(path) });
        }
        self.insert_leaf(parent, last, path, meta, kind)
    }

    fn insert_leaf(
        &mut self,
        parent: usize,
        name: &[u8],
        path: &[u8],
        meta: Meta,
        kind: NodeKind,
    ) -> Result<(), BuildError> {
        if self.nodes[parent].children.contains_key(name) {
            return Err(BuildError::Duplicate { path: lossy(path) });
        }
        let id = self.push(Node { name: name.to_vec(), explicit: true, meta, kind, children: BTreeMap::new() });
        self.nodes[parent].children.insert(name.to_vec(), id);
        Ok(())
    }

    fn find(&self, comps: &[&[u8]]) -> Option<usize> {
        let mut cur = 0usize;
        for c in comps {
            cur = *self.nodes[cur].children.get(*c)?;
        }
        Some(cur)
    }

    /// Applies `layer` on top of the tree as overlayfs would show it: whiteouts remove lower
    /// entries, an opaque marker hides everything lower in its directory, upper entries replace
    /// lower ones, directories merge. Whiteouts and markers themselves do not appear in the result.
    /// `layer_no` keeps hard-link groups of different layers apart.
    pub fn apply_layer(&mut self, layer: &LayerIndex, layer_no: u32) {
        let targets: HashSet<u32> = layer
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                Kind::Hardlink { target } => Some(target),
                _ => None,
            })
            .collect();
        let root = &layer.entries[0];
        if root.explicit {
            self.nodes[0].meta = root.meta.clone();
            self.nodes[0].explicit = true;
        }
        let mut work = vec![(0u32, 0usize)];
        while let Some((dir, node)) = work.pop() {
            let kids = layer.children(dir);
            if kids.iter().any(|&k| layer.entries[k as usize].kind == Kind::Opaque) {
                self.nodes[node].children.clear();
            }
            for &k in kids {
                let e = &layer.entries[k as usize];
                if e.kind == Kind::Whiteout {
                    self.nodes[node].children.remove(&e.name[WHITEOUT_PREFIX.len()..]);
                }
            }
            for &k in kids {
                let e = &layer.entries[k as usize];
                let group = |t: u32| Some(((layer_no as u64) << 32) | t as u64);
                let kind = match &e.kind {
                    Kind::Whiteout | Kind::Opaque => continue,
                    Kind::Dir { .. } => {
                        let existing = self.nodes[node].children.get(&e.name).copied();
                        if let Some(ex) = existing.filter(|&x| matches!(self.nodes[x].kind, NodeKind::Dir)) {
                            if e.explicit {
                                self.nodes[ex].meta = e.meta.clone();
                                self.nodes[ex].explicit = true;
                            }
                            work.push((k, ex));
                            continue;
                        }
                        NodeKind::Dir
                    }
                    Kind::File { .. } => NodeKind::File {
                        chunks: layer.file_chunks(k).copied().collect(),
                        group: if targets.contains(&k) { group(k) } else { None },
                    },
                    Kind::Hardlink { target } => {
                        NodeKind::File { chunks: layer.file_chunks(k).copied().collect(), group: group(*target) }
                    }
                    Kind::Symlink { target } => NodeKind::Symlink(target.clone()),
                    Kind::CharDev { major, minor } => NodeKind::CharDev(*major, *minor),
                    Kind::BlockDev { major, minor } => NodeKind::BlockDev(*major, *minor),
                    Kind::Fifo => NodeKind::Fifo,
                };
                let meta = match &e.kind {
                    Kind::Hardlink { target } => layer.entries[*target as usize].meta.clone(),
                    _ => e.meta.clone(),
                };
                let is_dir = matches!(kind, NodeKind::Dir);
                let id = self.push(Node {
                    name: e.name.clone(),
                    explicit: e.explicit,
                    meta,
                    kind,
                    children: BTreeMap::new(),
                });
                self.nodes[node].children.insert(e.name.clone(), id);
                if is_dir {
                    work.push((k, id));
                }
            }
        }
    }

    /// Flattens the tree into a [`LayerIndex`]: pre-order, sorted children, a de-duplicated chunk
    /// table, the first name of each hard-link group as the file and the others as links to it.
    pub fn finish(self, diff_id: Digest) -> LayerIndex {
        let (chunker, chunks, entries) = self.flatten();
        LayerIndex::from_parts(chunker, diff_id, chunks, entries)
    }

    /// The tree in pre-order: its chunk list and entries (directory hashes zero).
    fn flatten(self) -> (ChunkerParams, Vec<ChunkRef>, Vec<Entry>) {
        let mut entries: Vec<Entry> = Vec::with_capacity(self.nodes.len());
        let mut chunk_pos: HashMap<ChunkId, u32> = HashMap::new();
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let mut first_of_group: HashMap<u64, u32> = HashMap::new();
        let mut stack: Vec<(usize, u32)> = vec![(0, 0)];
        while let Some((n, parent)) = stack.pop() {
            let node = &self.nodes[n];
            let me = entries.len() as u32;
            let kind = match &node.kind {
                NodeKind::Dir => Kind::Dir { hash: [0; 32] },
                NodeKind::File { chunks: list, group } => match group.and_then(|g| first_of_group.get(&g).copied()) {
                    Some(target) => Kind::Hardlink { target },
                    None => {
                        if let Some(g) = group {
                            first_of_group.insert(*g, me);
                        }
                        let idx = list
                            .iter()
                            .map(|c| {
                                *chunk_pos.entry(c.id).or_insert_with(|| {
                                    chunks.push(*c);
                                    (chunks.len() - 1) as u32
                                })
                            })
                            .collect();
                        let size = list.iter().map(|c| c.len as u64).sum();
                        Kind::File { size, chunks: idx }
                    }
                },
                NodeKind::Symlink(t) => Kind::Symlink { target: t.clone() },
                NodeKind::CharDev(major, minor) => Kind::CharDev { major: *major, minor: *minor },
                NodeKind::BlockDev(major, minor) => Kind::BlockDev { major: *major, minor: *minor },
                NodeKind::Fifo => Kind::Fifo,
                NodeKind::Whiteout => Kind::Whiteout,
                NodeKind::Opaque => Kind::Opaque,
            };
            entries.push(Entry {
                parent,
                name: node.name.clone(),
                explicit: node.explicit,
                meta: node.meta.clone(),
                kind,
            });
            for &c in node.children.values().rev() {
                stack.push((c, me));
            }
        }
        (self.chunker, chunks, entries)
    }
}

/// Merges layers bottom to top into one rootfs view (no whiteouts or markers left).
pub fn merge_layers<'a>(chunker: ChunkerParams, layers: impl IntoIterator<Item = &'a LayerIndex>) -> LayerIndex {
    merged(chunker, layers).finish(Digest([0; 32]))
}

/// [`merge_layers`] without directory hashes (every one zero): the view a mount serves, which
/// reads no hash, built without hashing every entry on the path of every start. Never for a
/// diff, an encoding or the store.
pub fn merge_layers_to_serve<'a>(
    chunker: ChunkerParams,
    layers: impl IntoIterator<Item = &'a LayerIndex>,
) -> LayerIndex {
    let (chunker, chunks, entries) = merged(chunker, layers).flatten();
    LayerIndex::from_parts_unhashed(chunker, Digest([0; 32]), chunks, entries)
}

fn merged<'a>(chunker: ChunkerParams, layers: impl IntoIterator<Item = &'a LayerIndex>) -> TreeBuilder {
    let mut b = TreeBuilder::new(chunker);
    for (n, layer) in layers.into_iter().enumerate() {
        b.apply_layer(layer, n as u32);
    }
    b
}
