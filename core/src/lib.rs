//! HyperBox's shared vocabulary: content ids and digests, the pinned chunker parameters, the
//! layer index (a layer's file tree whose regular files are lists of chunk refs) with its binary
//! format, the Merkle diff between two trees, the [`ChunkSource`] trait every reader uses, and
//! the one parser of sizes people write ([`parse_size`]).
//!
//! This crate does no I/O: no files, no network, no clocks. It is what the store, the mounts,
//! the proxy and the peers agree on, so none of them needs to depend on another's internals.

pub mod chunker;
pub mod diff;
pub mod digest;
pub mod elf;
pub mod index;
pub mod lazy;
pub mod metrics;
pub mod path;
pub mod size;
pub mod source;
pub mod status;
pub mod tree;

pub use chunker::{ChunkAlgorithm, ChunkerParams};
pub use diff::{diff, Change, DiffReport, PathChange};
pub use digest::{ChunkId, Digest, DigestError, DigestHasher};
pub use index::{ChunkRef, Entry, IndexError, Kind, LayerIndex, Meta};
pub use lazy::{AccelConfig, AccelLayer, ChunkTable, LazyFormatError, LazySource, StartupOrder, TableEntry};
pub use path::PathError;
pub use size::{parse_size, SizeError};
pub use source::{blob_key, BlobSource, ChunkSource, SourceChain, SourceError, TierStats};
pub use tree::{merge_layers, merge_layers_to_serve, BuildError, NewEntry, TreeBuilder};

/// The user name that marks registry credentials' secret as an identity token (an OAuth2
/// refresh token: docker's `identitytoken`, and what credential helpers answer for one), which
/// is exchanged at the registry's token service rather than sent.
pub const IDENTITY_TOKEN_USER: &str = "<token>";
