//! HyperBox's OCI distribution client: image references parsed as docker does, manifests and
//! indexes (OCI and Docker) resolved to one platform, anonymous/basic/Bearer auth (through
//! `oci-client`), and blob downloads that resume with Range requests and retry with backoff.
//! Every manifest, config and blob is checked against its digest here; layer blobs are checked
//! again by the store before anything is committed.
//!
//! What it must not do: touch the store (the binary wires downloads into it), read config files
//! or the environment, or own a runtime (callers bring tokio). The pull-through mirror that
//! serves the distribution API is another crate (`hb-mirror`, `registry-proxy/`) built on this one.

mod accel;
mod blob;
mod client;
mod error;
pub mod http;
mod layer_form;
mod link;
pub mod manifest;
mod options;
mod platform;
mod reference;
mod remote;
pub mod retry;

pub use accel::{accel_manifest, binding_index, platform_json, MAX_META_BLOB};
pub use client::{
    LayerDesc, Registry, RegistryOptions, ResolvedImage, Scheme, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
pub use error::{chain as error_chain, RegistryError};
pub use http::preload_trust_roots;
pub use layer_form::{decode_index_blob, decode_layer_form, encode_layer_form, LayerFormError};
pub use platform::Platform;
pub use reference::ImageRef;
pub use remote::RangeSource;
