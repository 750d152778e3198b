//! The daemon's API (HTTP/1.1 + JSON on a Unix socket; docs/api.md): the messages, and the
//! client the CLI uses to reach a running `hb daemon`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
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
    /// LAN peers are on (`/v1/peers/chunks` answers).
    #[serde(default)]
    pub peers: bool,
}

/// `POST /v1/peers/switch`: fetch from and serve to LAN peers, or not.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeersSwitch {
    pub on: bool,
}

/// `POST /v1/images/mount`: mount an image (pulling it first when missing) and keep it mounted.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountRequest {
    pub image: String,
    /// `hb run --pull`: when the image is pulled before it is mounted.
    #[serde(default)]
    pub pull: PullPolicy,
    /// `hb run --platform`: the platform to pull (os/arch[/variant]) [default: the daemon's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default)]
    pub plain_http: bool,
    /// The store the caller means; a daemon serving another answers 409.
    pub root: Option<PathBuf>,
    /// Only the image's first N layers (a containerd snapshot chain's lower part).
    #[serde(default)]
    pub layers: Option<usize>,
    /// Also hand over a spare container folder for this image (`ImageMount::spare`): the caller
    /// is about to run a container of it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spare: bool,
}

/// `hb run --pull`, as docker's: pull when the store lacks the image (the default), pull
/// always (a moved tag is followed), or never (a missing image is an error).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    #[default]
    Missing,
    Always,
    Never,
}

impl PullPolicy {
    /// Whether to pull `image` now, given whether the store has it; an error for `never` when
    /// it does not.
    pub fn pull_now(self, image: &str, present: bool) -> anyhow::Result<bool> {
        match self {
            PullPolicy::Always => Ok(true),
            PullPolicy::Missing => Ok(!present),
            PullPolicy::Never if present => Ok(false),
            PullPolicy::Never => anyhow::bail!("no such image in the store: {image} (--pull never: not pulled)"),
        }
    }
}

/// A spare container folder the daemon advertises to `hb run` (a file in [`ready_dir`]), so a
/// foreground `hb run --rm` of that image needs no request: it claims the file by renaming it
/// ([`claim_ready`]), and its hand-over tells the daemon. The daemon withdraws an advertisement
/// the same way before it hands that spare to anyone else or releases it: whoever renames the
/// file first has the spare.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    /// The daemon that made it: an advertisement of a daemon that is gone is not used.
    pub daemon: u32,
    /// What `POST /v1/images/mount` with `spare` would answer for the image.
    pub mount: ImageMount,
}

/// Where the daemon advertises spares: `<root>/containers/.ready/`.
pub fn ready_dir(root: &Path) -> PathBuf {
    crate::container::containers_dir(root).join(".ready")
}

/// The advertisement for `hb run IMAGE` (the reference as given, and `--plain-http`).
pub fn ready_file(root: &Path, image: &str, plain_http: bool) -> PathBuf {
    let h = blake3::hash(format!("{plain_http}\n{image}").as_bytes());
    ready_dir(root).join(format!("{}.json", &h.to_hex()[..32]))
}

/// Claims the spare the daemon advertised for `hb run IMAGE`: the image mount and the spare
/// folder (`ImageMount::spare`) as the mount request would have answered, without asking. `None`
/// when there is none, or it is not sound: its daemon or mount server gone, or the spare's
/// overlay or the image not mounted (then the caller asks the daemon).
pub fn claim_ready(root: &Path, image: &str, plain_http: bool) -> Option<ImageMount> {
    let file = ready_file(root, image, plain_http);
    let mine = file.with_extension(format!("claimed{}", std::process::id()));
    std::fs::rename(&file, &mine).ok()?;
    let raw = std::fs::read(&mine);
    let _ = std::fs::remove_file(&mine);
    let ready: Ready = serde_json::from_slice(&raw.ok()?).ok()?;
    let alive = |pid: u32| crate::container::process_start(pid).is_some();
    // A mount point is on another device than the folder it is in.
    let mounted = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        p.parent().is_some_and(|parent| dev(p).is_some() && dev(p) != dev(parent))
    };
    let spare = ready.mount.spare.as_deref()?;
    // (A state makes a folder a container: never claimed, whatever the advertisement says.)
    let sound = alive(ready.daemon)
        && alive(ready.mount.pid)
        && mounted(&spare.join("rootfs"))
        && mounted(&ready.mount.path)
        && !spare.join("state.json").exists();
    if !sound {
        tracing::debug!(file = %file.display(), "an advertised spare is not sound; asking the daemon");
    }
    sound.then_some(ready.mount)
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
    /// A container folder the daemon prepared ahead of time for this image, now the caller's:
    /// `<root>/containers/<id>` with the overlay mounted at `rootfs/` (and the mount points in
    /// it) but no `state.json` yet. Writing one makes it a container; the daemon releases a
    /// spare still without one a minute after it handed it over. Asked for with
    /// `MountRequest::spare`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spare: Option<PathBuf>,
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
    /// Not now: when the process exits whose pidfd comes with the datagram (`SCM_RIGHTS`). The
    /// way `hb run --rm` hands its container to the daemon and becomes the runtime itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub when_exits: bool,
}

/// Where the daemon listening on `socket` takes cleanup requests as datagrams (a
/// [`CleanupRequest`] as JSON each, no answer): `hb.sock` -> `hb.cleanup.sock`, beside it.
pub fn cleanup_socket(socket: &Path) -> PathBuf {
    let name = socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.strip_suffix(".sock").unwrap_or(&name);
    socket.with_file_name(format!("{stem}.cleanup.sock"))
}

/// Hands a cleanup to the daemon listening on `socket` in one datagram; false when no daemon
/// takes it (no socket, nobody reading it, its queue full).
pub fn send_cleanup(socket: &Path, req: &CleanupRequest) -> bool {
    let Ok(msg) = serde_json::to_vec(req) else { return false };
    let Ok(s) = std::os::unix::net::UnixDatagram::unbound() else { return false };
    s.set_nonblocking(true).is_ok() && s.send_to(&msg, cleanup_socket(socket)).is_ok_and(|n| n == msg.len())
}

/// Hands the container in `dir` over to the daemon listening on `socket`: it cleans up (stops
/// what the runtime left, unmounts the overlay, removes the folder) when this process exits,
/// whatever it has become by then. One datagram carrying this process's pidfd; false when no
/// daemon takes it.
pub fn hand_over(socket: &Path, dir: &Path) -> bool {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::os::fd::AsFd;
    let req = CleanupRequest { dir: dir.to_path_buf(), remove: true, when_exits: true };
    let Ok(msg) = serde_json::to_vec(&req) else { return false };
    let me = rustix::process::getpid();
    let Ok(pidfd) = rustix::process::pidfd_open(me, rustix::process::PidfdFlags::empty()) else { return false };
    let Ok(s) = std::os::unix::net::UnixDatagram::unbound() else { return false };
    if s.set_nonblocking(true).is_err() || s.connect(cleanup_socket(socket)).is_err() {
        return false;
    }
    let fds = [pidfd.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds))
        && rustix::net::sendmsg(&s, &[std::io::IoSlice::new(&msg)], &mut control, SendFlags::empty())
            .is_ok_and(|n| n == msg.len())
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
                    tracing::warn!(
                        socket = %socket.display(),
                        "the hb daemon on the socket serves store {}, not {}; going without it",
                        h.root.display(),
                        root.display()
                    );
                    None
                }
            }
            Err(e) => {
                c.going_without(&e);
                None
            }
        }
    }

    /// A client for `socket` if the socket file exists, unchecked: the first call tells.
    pub fn at(socket: &Path) -> Option<Client> {
        socket.exists().then(|| Client { socket: socket.to_path_buf() })
    }

    /// The daemon's shared mount of an image (pulled first if missing); `slow` is called once
    /// when the answer takes over a second (a pull). `Ok(None)`: no daemon answers here, or it
    /// serves another store; the caller does without.
    pub fn image_mount(&self, req: &MountRequest, slow: impl FnOnce()) -> anyhow::Result<Option<ImageMount>> {
        let root = req.root.clone().unwrap_or_default();
        let slow = (std::time::Duration::from_secs(1), Box::new(slow) as Box<dyn FnOnce()>);
        match self.exchange("POST", "/v1/images/mount", &serde_json::to_vec(req)?, Some(slow)) {
            Err(e) => {
                self.going_without(&e);
                Ok(None)
            }
            Ok((409, bytes)) => {
                let why = Self::check(409, bytes).expect_err("409 is an error");
                tracing::warn!(socket = %self.socket.display(), "{why:#}; going without the daemon (this process serves the image from store {})", root.display());
                Ok(None)
            }
            Ok((status, bytes)) => Ok(Some(serde_json::from_slice(&Self::check(status, bytes)?)?)),
        }
    }

    /// Says why a request found no daemon to take it: nothing when nobody listens on the socket
    /// (a daemon that stopped leaves none, a killed one a stale file), a warning when a daemon
    /// is there but failed to answer (the caller then goes the slow way, on its own).
    fn going_without(&self, e: &anyhow::Error) {
        let nobody = e
            .chain()
            .filter_map(|c| c.downcast_ref::<std::io::Error>())
            .any(|io| matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound));
        if nobody {
            tracing::debug!(error = %e, socket = %self.socket.display(), "no daemon listens");
        } else {
            tracing::warn!(socket = %self.socket.display(), "the hb daemon did not answer ({e:#}); going without it");
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
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        let bytes = self.call_raw(method, path, &payload)?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading the hb daemon's answer to {method} {path}"))
    }

    /// One request with a raw body and answer (the chunk endpoints).
    pub fn call_raw(&self, method: &str, path: &str, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        let (status, bytes) = self.exchange(method, path, payload, None)?;
        Self::check(status, bytes)
    }

    fn check(status: u16, bytes: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        if !(200..300).contains(&status) {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("hb daemon: {msg}");
        }
        Ok(bytes)
    }

    /// Sends one request (HTTP/1.1, one connection per request, blocking: `hb run` must not pay
    /// for an async runtime) and reads the answer, calling `slow`'s function once if none came
    /// after its delay; fails only when the daemon cannot be reached or the exchange breaks.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        payload: &[u8],
        mut slow: Option<(std::time::Duration, Box<dyn FnOnce() + '_>)>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to the hb daemon at {}", self.socket.display()))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: hb\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            payload.len()
        )
        .into_bytes();
        req.extend_from_slice(payload);
        stream.write_all(&req).context("talking to the hb daemon")?;
        stream.set_read_timeout(slow.as_ref().map(|(after, _)| *after))?;
        // Room for a usual answer: read in one go, not from a 32-byte probe up.
        let mut answer = Vec::with_capacity(4096);
        loop {
            match stream.read_to_end(&mut answer) {
                Ok(_) => break,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if let Some((_, f)) = slow.take() {
                        f();
                    }
                    stream.set_read_timeout(None)?;
                }
                Err(e) => return Err(e).context("reading the hb daemon's answer"),
            }
        }
        parse_response(&answer).with_context(|| format!("the hb daemon's answer to {method} {path}"))
    }
}

/// Status and body of a whole HTTP/1.1 answer read to the end of its connection (the daemon
/// sends `Content-Length`; a chunked body is decoded too).
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(raw).context("malformed HTTP answer")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => bail!("the connection closed before the answer's headers ended"),
    };
    let status = resp.code.context("no status code")?;
    let header = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let rest = &raw[head..];
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case(b"chunked")) {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let (start, size) = match httparse::parse_chunk_size(&rest[at..]) {
                Ok(httparse::Status::Complete((n, size))) => (at + n, size as usize),
                _ => bail!("malformed chunked body"),
            };
            if size == 0 {
                return Ok((status, body));
            }
            let end = start.checked_add(size).filter(|e| *e + 2 <= rest.len()).context("truncated chunked body")?;
            body.extend_from_slice(&rest[start..end]);
            at = end + 2;
        }
    }
    match header("content-length") {
        Some(v) => {
            let len: usize =
                std::str::from_utf8(v).ok().and_then(|v| v.trim().parse().ok()).context("bad Content-Length")?;
            if rest.len() < len {
                bail!("the answer ended after {} of {len} bytes", rest.len());
            }
            Ok((status, rest[..len].to_vec()))
        }
        None => Ok((status, rest.to_vec())),
    }
}

/// Where the daemon listens: `--socket`/`HB_SOCKET`, the config file's `daemon.socket`, else
/// /run/hb/hb.sock.
pub fn socket_path(flag: Option<&Path>, file: &crate::config::FileConfig) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| file.daemon.socket.clone())
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET))
}

/// `POST /v1/chunks/fill`'s answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillResponse {
    /// Chunks new to the store.
    pub filled: usize,
    /// Chunks it had already.
    pub skipped: usize,
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

/// Chunks as zstd frames, as `POST /v1/chunks/fill-frames` takes them: for each, its 32-byte id,
/// its length (u32, little endian), the frame's length (u32), the frame.
pub fn encode_frames<'a>(frames: impl Iterator<Item = (&'a hb_core::ChunkId, u32, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, len, frame) in frames {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(frame);
    }
    out
}

/// The inverse of [`encode_frames`]: (id, chunk length, frame); a truncated entry is an error.
pub fn decode_frames(mut b: &[u8]) -> anyhow::Result<Vec<(hb_core::ChunkId, u32, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 40 {
            bail!("truncated chunk frame entry ({} bytes left)", b.len());
        }
        let id = hb_core::ChunkId(b[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes"));
        let n = u32::from_le_bytes(b[36..40].try_into().expect("4 bytes")) as usize;
        if b.len() < 40 + n {
            bail!("chunk {id}'s frame says {n} bytes, {} remain", b.len() - 40);
        }
        out.push((id, len, b[40..40 + n].to_vec()));
        b = &b[40 + n..];
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
    fn an_advertised_spare_is_claimed_once_and_only_when_sound() {
        let root = tempfile::tempdir().unwrap();
        let file = ready_file(root.path(), "r/busybox:latest", false);
        assert_eq!(file.parent(), Some(ready_dir(root.path()).as_path()));
        assert_ne!(file, ready_file(root.path(), "r/busybox:latest", true), "--plain-http names another");
        assert_ne!(file, ready_file(root.path(), "r/busybox:1", false));
        assert!(claim_ready(root.path(), "r/busybox:latest", false).is_none(), "nothing advertised");
        // Its daemon and mount server (pid 1 here) alive, but its overlay not mounted.
        std::fs::create_dir_all(ready_dir(root.path())).unwrap();
        let spare = root.path().join("containers").join("ab".repeat(32));
        std::fs::create_dir_all(spare.join("rootfs")).unwrap();
        let mount = ImageMount {
            image: "r/busybox:latest".into(),
            digest: "sha256:00".into(),
            path: "/".into(),
            pid: 1,
            config: "{}".into(),
            users: 0,
            layers: None,
            spare: Some(spare.clone()),
        };
        std::fs::write(&file, serde_json::to_vec(&Ready { daemon: 1, mount: mount.clone() }).unwrap()).unwrap();
        assert!(claim_ready(root.path(), "r/busybox:latest", false).is_none(), "an unmounted spare was used");
        assert!(!file.exists(), "the claimed advertisement stayed");
        // A dead daemon's is not used either.
        let dead = Ready { daemon: u32::MAX, mount };
        std::fs::write(&file, serde_json::to_vec(&dead).unwrap()).unwrap();
        assert!(claim_ready(root.path(), "r/busybox:latest", false).is_none());
        assert_eq!(std::fs::read_dir(ready_dir(root.path())).unwrap().count(), 0, "a claim left a file behind");
        // Mounted (tmpfs for the overlay and the image mount): claimed, once.
        let image = root.path().join("image");
        std::fs::create_dir_all(&image).unwrap();
        let tmpfs = |p: &Path| {
            rustix::mount::mount("tmpfs", p, "tmpfs", rustix::mount::MountFlags::empty(), None).unwrap();
        };
        tmpfs(&spare.join("rootfs"));
        tmpfs(&image);
        let sound = Ready { daemon: 1, mount: ImageMount { path: image.clone(), ..dead.mount } };
        std::fs::write(&file, serde_json::to_vec(&sound).unwrap()).unwrap();
        let claimed = claim_ready(root.path(), "r/busybox:latest", false);
        assert_eq!(claimed.and_then(|m| m.spare), Some(spare.clone()));
        assert!(claim_ready(root.path(), "r/busybox:latest", false).is_none(), "claimed twice");
        // A folder with a state is a container already: an advertisement naming it is not used.
        std::fs::write(spare.join("state.json"), b"{}").unwrap();
        std::fs::write(&file, serde_json::to_vec(&sound).unwrap()).unwrap();
        let used = claim_ready(root.path(), "r/busybox:latest", false);
        for p in [spare.join("rootfs"), image] {
            rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH).unwrap();
        }
        assert!(used.is_none(), "a running container's folder was claimed as a spare");
    }

    #[test]
    fn a_slow_answer_is_noted_once_and_still_read() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let (noted_tx, noted_rx) = std::sync::mpsc::channel::<()>();
        // The daemon answers only once the client said it is waiting (or gives up after 10 s).
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).unwrap();
            let waited = noted_rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok();
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
            waited
        });
        let client = Client { socket };
        let mut calls = 0;
        let slow = Box::new(|| {
            calls += 1;
            noted_tx.send(()).unwrap();
        });
        let (status, body) = client
            .exchange("POST", "/v1/images/mount", b"{}", Some((std::time::Duration::from_millis(20), slow)))
            .unwrap();
        assert_eq!((status, body.as_slice()), (200, b"{}".as_slice()));
        assert!(server.join().unwrap(), "the client did not call `slow` while waiting");
        assert_eq!(calls, 1);
    }

    #[test]
    fn cleanup_sockets_sit_beside_the_api_socket() {
        assert_eq!(cleanup_socket(Path::new("/run/hb/hb.sock")), Path::new("/run/hb/hb.cleanup.sock"));
        assert_eq!(cleanup_socket(Path::new("/tmp/x/api")), Path::new("/tmp/x/api.cleanup.sock"));
        // Nobody listening: not taken (the caller falls back).
        let dir = tempfile::tempdir().unwrap();
        let req = CleanupRequest { dir: dir.path().join("c"), remove: true, when_exits: false };
        assert!(!send_cleanup(&dir.path().join("hb.sock"), &req));
        let rx = std::os::unix::net::UnixDatagram::bind(dir.path().join("hb.cleanup.sock")).unwrap();
        assert!(send_cleanup(&dir.path().join("hb.sock"), &req));
        let mut buf = [0u8; 4096];
        let n = rx.recv(&mut buf).unwrap();
        let got: CleanupRequest = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!((got.dir, got.remove), (req.dir, true));
    }

    #[test]
    fn answers_are_read_by_length_or_chunks() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).unwrap(), (200, b"hello".to_vec()));
        let chunked = b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (409, b"abcde".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-le").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab").is_err());
    }

    #[test]
    fn chunk_frames_round_trip_and_reject_truncation() {
        let a = (hb_core::ChunkId::of(b"a"), b"a".to_vec());
        let b = (hb_core::ChunkId::of(b""), Vec::new());
        let enc = encode_chunks([&a, &b].into_iter().map(|(i, d)| (i, d.as_slice())));
        assert_eq!(decode_chunks(&enc).unwrap(), vec![a.clone(), b.clone()]);
        assert!(decode_chunks(&enc[..enc.len() - 37]).is_err());
        assert!(decode_chunks(&enc[..10]).is_err());
        assert_eq!(decode_ids(a.0.as_bytes()).unwrap(), vec![a.0]);
        assert!(decode_ids(&[0; 33]).is_err());
        let frames = [(a.0, 7u32, b"zstd".to_vec()), (b.0, 0, Vec::new())];
        let enc = encode_frames(frames.iter().map(|(i, n, f)| (i, *n, f.as_slice())));
        assert_eq!(decode_frames(&enc).unwrap(), frames.to_vec());
        assert!(decode_frames(&enc[..enc.len() - 41]).is_err(), "one byte of the first frame missing");
        assert!(decode_frames(&enc[..39]).is_err());
    }
}
