//! The daemon's API (HTTP/1.1 + JSON on a Unix socket; docs/api.md): the messages, and the
//! client the CLI uses to reach a running `hb daemon`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// `GET /v1/health`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pid: u32,
    /// The store the daemon owns.
    pub root: PathBuf,
    pub uptime_seconds: u64,
    pub image_mounts: usize,
}

/// `POST /v1/images/mount`: mount an image (pulling it first when missing) and keep it mounted.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountRequest {
    pub image: String,
    #[serde(default)]
    pub plain_http: bool,
    /// The store the caller means; a daemon serving another answers 409.
    pub root: Option<PathBuf>,
    /// Only the image's first N layers (a containerd snapshot chain's lower part).
    #[serde(default)]
    pub layers: Option<usize>,
}

/// An image mount the daemon keeps: a mount server process per image, shared by containers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageMount {
    pub image: String,
    pub digest: String,
    pub path: PathBuf,
    /// The process serving the mount (it outlives the daemon).
    pub pid: u32,
    /// The image's config (JSON text), for building a container's spec.
    pub config: String,
    /// Containers (overlay mounts) using it right now.
    pub users: usize,
    /// Set when only the image's first N layers are mounted.
    #[serde(default)]
    pub layers: Option<usize>,
}

impl ImageMount {
    /// Its name among the daemon's mounts (`DELETE /v1/mounts/<key>`): the manifest digest, with
    /// `/N` for a mount of the first N layers.
    pub fn key(&self) -> String {
        match self.layers {
            Some(n) => format!("{}/{n}", self.digest),
            None => self.digest.clone(),
        }
    }
}

/// `POST /v1/pull`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullRequest {
    pub reference: String,
    #[serde(default)]
    pub lazy: bool,
    #[serde(default)]
    pub plain_http: bool,
    pub platform: Option<String>,
    pub credentials: Option<(String, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PullResponse {
    pub digest: String,
    /// One line for people.
    pub summary: String,
    pub report: serde_json::Value,
}

/// `POST /v1/images/remove`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    pub images: Vec<String>,
}

/// `POST /v1/containers/cleanup`: a finished container's folder (under the daemon's store) whose
/// overlay the daemon unmounts, and removes when `remove`; answered at once, done in the
/// background.
#[derive(Debug, Serialize, Deserialize)]
pub struct CleanupRequest {
    pub dir: PathBuf,
    pub remove: bool,
}

/// Any error: the status code says its class, `error` says what went wrong.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// A connection target: the daemon's socket.
pub struct Client {
    pub socket: PathBuf,
}

impl Client {
    /// The daemon serving the store at `root`, if one answers on `socket`. A socket file nobody
    /// listens on, or a daemon of another store, is no daemon for this command.
    pub fn find(socket: &Path, root: &Path) -> Option<Client> {
        if !socket.exists() {
            return None;
        }
        let c = Client { socket: socket.to_path_buf() };
        match c.call::<Health>("GET", "/v1/health", None::<&()>) {
            Ok(h) => {
                let same = |a: &Path, b: &Path| {
                    std::fs::canonicalize(a).ok().zip(std::fs::canonicalize(b).ok()).is_some_and(|(a, b)| a == b)
                };
                if same(&h.root, root) {
                    Some(c)
                } else {
                    tracing::debug!(daemon_root = %h.root.display(), "the daemon on the socket serves another store");
                    None
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, socket = %socket.display(), "no daemon answers");
                None
            }
        }
    }

    /// A client for `socket` if the socket file exists, unchecked: the first call tells.
    pub fn at(socket: &Path) -> Option<Client> {
        socket.exists().then(|| Client { socket: socket.to_path_buf() })
    }

    /// The daemon's shared mount of an image (pulled first if missing). `Ok(None)`: no daemon
    /// answers here, or it serves another store; the caller does without.
    pub fn image_mount(&self, image: &str, plain_http: bool, root: &Path) -> anyhow::Result<Option<ImageMount>> {
        let req = MountRequest { image: image.into(), plain_http, root: Some(root.to_path_buf()), layers: None };
        let body = Bytes::from(serde_json::to_vec(&req)?);
        match self.exchange("POST", "/v1/images/mount", body) {
            Err(e) => {
                tracing::debug!(error = %e, socket = %self.socket.display(), "no daemon answers");
                Ok(None)
            }
            Ok((status, _)) if status == hyper::StatusCode::CONFLICT => Ok(None),
            Ok((status, bytes)) => Ok(Some(serde_json::from_slice(&Self::check(status, bytes)?)?)),
        }
    }

    /// One request; a non-2xx answer becomes an error carrying the daemon's message.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let bytes = self.call_raw(method, path, payload)?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading the hb daemon's answer to {method} {path}"))
    }

    /// One request with a raw body and answer (the chunk endpoints).
    pub fn call_raw(&self, method: &str, path: &str, payload: Bytes) -> anyhow::Result<Bytes> {
        let (status, bytes) = self.exchange(method, path, payload)?;
        Self::check(status, bytes)
    }

    fn check(status: hyper::StatusCode, bytes: Bytes) -> anyhow::Result<Bytes> {
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("hb daemon: {msg}");
        }
        Ok(bytes)
    }

    /// Sends one request; fails only when the daemon cannot be reached or the exchange breaks.
    fn exchange(&self, method: &str, path: &str, payload: Bytes) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .with_context(|| format!("connecting to the hb daemon at {}", self.socket.display()))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "hb")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(payload))?;
            let resp = sender.send_request(req).await.context("talking to the hb daemon")?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        })
    }
}

/// Where the daemon listens: `--socket`/`HB_SOCKET`, the config file's `daemon.socket`, else
/// /run/hb/hb.sock.
pub fn socket_path(flag: Option<&Path>, file: &crate::config::FileConfig) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| file.daemon.socket.clone())
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET))
}

/// Largest body of a chunk request or answer.
pub const MAX_CHUNK_BODY: usize = 64 << 20;

/// Chunks as the chunk endpoints carry them: for each, its 32-byte id, its length (u32, little
/// endian), its bytes.
pub fn encode_chunks<'a>(chunks: impl Iterator<Item = (&'a hb_core::ChunkId, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, data) in chunks {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// The inverse of [`encode_chunks`]; a truncated or overlong frame is an error.
pub fn decode_chunks(mut b: &[u8]) -> anyhow::Result<Vec<(hb_core::ChunkId, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 36 {
            bail!("truncated chunk frame ({} bytes left)", b.len());
        }
        let id = hb_core::ChunkId(b[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")) as usize;
        if b.len() < 36 + len {
            bail!("chunk {id} frame says {len} bytes, {} remain", b.len() - 36);
        }
        out.push((id, b[36..36 + len].to_vec()));
        b = &b[36 + len..];
    }
    Ok(out)
}

/// Chunk ids as `POST /v1/chunks/get` takes them: 32 bytes each.
pub fn decode_ids(b: &[u8]) -> anyhow::Result<Vec<hb_core::ChunkId>> {
    if !b.len().is_multiple_of(32) {
        bail!("chunk id list of {} bytes is not a multiple of 32", b.len());
    }
    Ok(b.chunks_exact(32).map(|c| hb_core::ChunkId(c.try_into().expect("32 bytes"))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_frames_round_trip_and_reject_truncation() {
        let a = (hb_core::ChunkId::of(b"a"), b"a".to_vec());
        let b = (hb_core::ChunkId::of(b""), Vec::new());
        let enc = encode_chunks([&a, &b].into_iter().map(|(i, d)| (i, d.as_slice())));
        assert_eq!(decode_chunks(&enc).unwrap(), vec![a.clone(), b]);
        assert!(decode_chunks(&enc[..enc.len() - 37]).is_err());
        assert!(decode_chunks(&enc[..10]).is_err());
        assert_eq!(decode_ids(a.0.as_bytes()).unwrap(), vec![a.0]);
        assert!(decode_ids(&[0; 33]).is_err());
    }
}
