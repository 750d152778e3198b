//! Single flight for blobs: the first request for a missing blob starts one upstream download
//! into a spool file; every request for it, then or later while it runs, streams from that file
//! as the bytes land. The last byte is held back until the whole blob matched its digest, so no
//! client ever receives a complete wrong blob: a failed download ends every stream early (the
//! client sees a short body and its own digest check fails), and nothing is committed.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use hb_core::Digest;
use tokio::sync::watch;

/// Why a download ended without a blob, with the status clients get if it ended before any
/// byte was sent.
#[derive(Clone, Debug)]
pub struct FlightError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, Default)]
pub struct FlightState {
    /// Known once the upstream answered.
    pub size: Option<u64>,
    /// Bytes in the spool file.
    pub written: u64,
    /// `Some(Ok)` once verified and committed.
    pub done: Option<Result<(), FlightError>>,
}

pub struct Flight {
    pub digest: Digest,
    pub spool: PathBuf,
    pub state: watch::Sender<FlightState>,
}

impl Flight {
    pub fn new(digest: Digest, spool: PathBuf) -> Arc<Flight> {
        Arc::new(Flight { digest, spool, state: watch::channel(FlightState::default()).0 })
    }

    pub fn update(&self, f: impl FnOnce(&mut FlightState)) {
        self.state.send_modify(f);
    }

    /// Waits until the size is known (or the download failed first).
    pub async fn size(&self) -> Result<u64, FlightError> {
        let mut rx = self.state.subscribe();
        loop {
            {
                let st = rx.borrow_and_update();
                if let Some(s) = st.size {
                    return Ok(s);
                }
                if let Some(Err(e)) = &st.done {
                    return Err(e.clone());
                }
            }
            if rx.changed().await.is_err() {
                return Err(gone());
            }
        }
    }
}

fn gone() -> FlightError {
    FlightError { status: 502, code: "UNKNOWN", message: "the upstream download stopped".into() }
}

/// A reader of bytes `pos..end` of an in-flight blob, from its own handle on the spool file (so
/// the file may be unlinked once committed). `whole` readers get bytes as they land (but the
/// blob's last byte only once verified); range readers only verified bytes.
pub struct FlightReader {
    pub file: std::fs::File,
    pub rx: watch::Receiver<FlightState>,
    pub pos: u64,
    pub end: u64,
    pub whole: bool,
}

const PIECE: u64 = 256 << 10;

impl FlightReader {
    /// The next piece, `None` at the end, an error when the download failed.
    pub async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.pos >= self.end {
                return None;
            }
            let limit = {
                let st = self.rx.borrow_and_update();
                match &st.done {
                    Some(Err(e)) => return Some(Err(io::Error::other(e.message.clone()))),
                    Some(Ok(())) => self.end,
                    None if self.whole => {
                        let size = st.size.unwrap_or(0);
                        st.written.min(size.saturating_sub(1)).min(self.end)
                    }
                    None => self.pos,
                }
            };
            if self.pos < limit {
                let n = (limit - self.pos).min(PIECE) as usize;
                let mut buf = vec![0u8; n];
                return Some(match self.file.read_exact_at(&mut buf, self.pos) {
                    Ok(()) => {
                        self.pos += n as u64;
                        Ok(Bytes::from(buf))
                    }
                    Err(e) => Err(e),
                });
            }
            if self.rx.changed().await.is_err() {
                // The download task is gone; its last word decides.
                let st = self.rx.borrow().clone();
                if !matches!(st.done, Some(Ok(()))) {
                    return Some(Err(io::Error::other(gone().message)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn readers_get_bytes_as_they_land_but_the_last_only_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut w = std::fs::File::create(&path).unwrap();
        let f = Flight::new(Digest::of(b"x"), path.clone());
        let open = |whole: bool, pos: u64, end: u64| FlightReader {
            file: std::fs::File::open(&path).unwrap(),
            rx: f.state.subscribe(),
            pos,
            end,
            whole,
        };
        let (mut whole, mut range) = (open(true, 0, 10), open(false, 2, 4));
        w.write_all(b"0123456789").unwrap();
        f.update(|s| {
            s.size = Some(10);
            s.written = 10;
        });
        assert_eq!(whole.next().await.unwrap().unwrap(), Bytes::from_static(b"012345678"));
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), whole.next()).await;
        assert!(pending.is_err(), "the last byte waits for verification");
        f.update(|s| s.done = Some(Ok(())));
        assert_eq!(whole.next().await.unwrap().unwrap(), Bytes::from_static(b"9"));
        assert!(whole.next().await.is_none());
        assert_eq!(range.next().await.unwrap().unwrap(), Bytes::from_static(b"23"));
        // A failed download ends a stream with an error.
        let g = Flight::new(Digest::of(b"y"), path.clone());
        let mut r = FlightReader {
            file: std::fs::File::open(&path).unwrap(),
            rx: g.state.subscribe(),
            pos: 0,
            end: 10,
            whole: true,
        };
        g.update(|s| {
            s.size = Some(10);
            s.written = 10;
        });
        assert_eq!(r.next().await.unwrap().unwrap().len(), 9);
        g.update(|s| s.done = Some(Err(FlightError { status: 502, code: "X", message: "bad".into() })));
        assert!(r.next().await.unwrap().is_err());
    }
}
