//! The chunk protocol's messages (`/hb/chunks/1`, one request and one response per substream)
//! and their binary codec. Every length is bounded before anything is allocated: a peer is a
//! stranger's program as far as this code knows.
//!
//! ```text
//! request  := 0x01 u32:n (id[32]){n}                  Get: these chunks, please
//!           | 0x02 u64:epoch u64:generation           Summary: what you hold, since this
//!           | 0x03 u32:n (id[32]){n}                  Fetch: these chunks, fetched from your own
//!                                                     sources if you lack them (you own them)
//!           | 0x04 sha256[32]                         Blob: this layer-form blob (an accelerated
//!                                                     form's index or chunk table), if you keep it
//! response := 0x01 u32:n (id[32] u32:len bytes){n}    Chunks (those held, any order)
//!           | 0x02 u64:epoch u64:generation u8:serving summary
//!                                                     Summary (serving 0: switched off)
//!           | 0x03 u8:0                               Blob: not kept here
//!           | 0x03 u8:1 u32:len bytes                 Blob: its bytes (at most 16 MiB)
//! summary  := 0x00                                    unchanged since the asked generation
//!           | 0x01 u32:len bloom-bytes                a whole Bloom filter (bloomfilter 3 bytes)
//!           | 0x02 u32:n (id[32]){n}                   ids added since the asked generation
//! ```
//! Integers are little endian.

use std::io;

use futures::prelude::*;
use hb_core::{ChunkId, Digest};

/// The protocol name negotiated on each substream.
pub const PROTOCOL: &str = "/hb/chunks/1";
/// Most ids one Get may name.
pub const MAX_IDS: usize = 1024;
/// Largest chunk a peer may send (hb's chunker cuts at most 256 KiB; room for other params).
pub const MAX_CHUNK: usize = 4 << 20;
/// Largest response body: a server stops adding chunks before it.
pub const MAX_RESPONSE: usize = 16 << 20;
/// Largest summary a peer may send (a 1 % Bloom filter of about 13 million chunks).
pub const MAX_SUMMARY: usize = 16 << 20;
/// Most ids one summary delta may carry (above, a whole filter is sent).
pub const MAX_DELTA: usize = 65_536;
const MAX_REQUEST: usize = 1 + 4 + MAX_IDS * 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Get(Vec<ChunkId>),
    Fetch(Vec<ChunkId>),
    Summary { epoch: u64, generation: u64 },
    Blob(Digest),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Chunks(Vec<(ChunkId, Vec<u8>)>),
    Summary { epoch: u64, generation: u64, serving: bool, body: SummaryBody },
    Blob(Option<Vec<u8>>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SummaryBody {
    Unchanged,
    Full(std::sync::Arc<[u8]>),
    Delta(Vec<ChunkId>),
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// A cursor over a received message that refuses to read past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad(format!("message truncated: {n} bytes wanted, {} left", self.0.len())));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn id(&mut self) -> io::Result<ChunkId> {
        Ok(ChunkId(self.take(32)?.try_into().expect("32 bytes")))
    }
    fn ids(&mut self, max: usize) -> io::Result<Vec<ChunkId>> {
        let n = self.u32()?;
        if n > max {
            return Err(bad(format!("{n} ids in one message (at most {max})")));
        }
        (0..n).map(|_| self.id()).collect()
    }
    fn end(&self) -> io::Result<()> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(bad(format!("{n} bytes after the end of the message"))),
        }
    }
}

fn put_ids(out: &mut Vec<u8>, ids: &[ChunkId]) {
    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    ids.iter().for_each(|id| out.extend_from_slice(id.as_bytes()));
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Request::Get(ids) => {
                out.push(1);
                put_ids(&mut out, ids);
            }
            Request::Fetch(ids) => {
                out.push(3);
                put_ids(&mut out, ids);
            }
            Request::Summary { epoch, generation } => {
                out.push(2);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
            }
            Request::Blob(digest) => {
                out.push(4);
                out.extend_from_slice(digest.as_bytes());
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> io::Result<Request> {
        let mut r = Reader(b);
        let req = match r.u8()? {
            1 => Request::Get(r.ids(MAX_IDS)?),
            2 => Request::Summary { epoch: r.u64()?, generation: r.u64()? },
            3 => Request::Fetch(r.ids(MAX_IDS)?),
            4 => Request::Blob(Digest(r.take(32)?.try_into().expect("32 bytes"))),
            t => return Err(bad(format!("unknown request type {t}"))),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Response::Chunks(chunks) => {
                out.push(1);
                out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                for (id, b) in chunks {
                    out.extend_from_slice(id.as_bytes());
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(b);
                }
            }
            Response::Summary { epoch, generation, serving, body } => {
                out.push(2);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                out.push(u8::from(*serving));
                match body {
                    SummaryBody::Unchanged => out.push(0),
                    SummaryBody::Full(bloom) => {
                        out.push(1);
                        out.extend_from_slice(&(bloom.len() as u32).to_le_bytes());
                        out.extend_from_slice(bloom);
                    }
                    SummaryBody::Delta(ids) => {
                        out.push(2);
                        put_ids(&mut out, ids);
                    }
                }
            }
            Response::Blob(blob) => {
                out.push(3);
                match blob {
                    None => out.push(0),
                    Some(b) => {
                        out.push(1);
                        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> io::Result<Response> {
        let mut r = Reader(b);
        let res = match r.u8()? {
            1 => {
                let n = r.u32()?;
                // Each chunk takes at least 36 bytes: a count beyond that is a lie.
                if n > r.0.len() / 36 {
                    return Err(bad(format!("{n} chunks announced in {} bytes", r.0.len())));
                }
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.id()?;
                    let len = r.u32()?;
                    if len > MAX_CHUNK {
                        return Err(bad(format!("chunk {id} of {len} bytes (at most {MAX_CHUNK})")));
                    }
                    chunks.push((id, r.take(len)?.to_vec()));
                }
                Response::Chunks(chunks)
            }
            2 => {
                let (epoch, generation) = (r.u64()?, r.u64()?);
                let serving = match r.u8()? {
                    0 => false,
                    1 => true,
                    f => return Err(bad(format!("serving flag {f}"))),
                };
                let body = match r.u8()? {
                    0 => SummaryBody::Unchanged,
                    1 => {
                        let len = r.u32()?;
                        if len > MAX_SUMMARY {
                            return Err(bad(format!("summary of {len} bytes (at most {MAX_SUMMARY})")));
                        }
                        SummaryBody::Full(r.take(len)?.into())
                    }
                    2 => SummaryBody::Delta(r.ids(MAX_DELTA)?),
                    t => return Err(bad(format!("unknown summary type {t}"))),
                };
                Response::Summary { epoch, generation, serving, body }
            }
            3 => match r.u8()? {
                0 => Response::Blob(None),
                1 => {
                    let len = r.u32()?;
                    if len > MAX_RESPONSE {
                        return Err(bad(format!("blob of {len} bytes (at most {MAX_RESPONSE})")));
                    }
                    Response::Blob(Some(r.take(len)?.to_vec()))
                }
                f => return Err(bad(format!("blob flag {f}"))),
            },
            t => return Err(bad(format!("unknown response type {t}"))),
        };
        r.end()?;
        Ok(res)
    }
}

/// Reads a whole message of at most `max` bytes (the writer closes its side after it).
async fn read_bounded<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > max {
        return Err(bad(format!("message larger than {max} bytes")));
    }
    Ok(buf)
}

async fn write_all<T: AsyncWrite + Unpin + Send>(io: &mut T, b: &[u8]) -> io::Result<()> {
    io.write_all(b).await?;
    io.close().await
}

/// The request-response codec of [`PROTOCOL`].
#[derive(Clone, Default)]
pub struct Codec;

#[async_trait::async_trait]
impl libp2p::request_response::Codec for Codec {
    type Protocol = libp2p::StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        Request::decode(&read_bounded(io, MAX_REQUEST).await?)
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        // A summary or a chunk batch, plus their headers.
        Response::decode(&read_bounded(io, MAX_RESPONSE.max(MAX_SUMMARY) + 64).await?)
    }

    async fn write_request<T>(&mut self, _: &Self::Protocol, io: &mut T, req: Request) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_all(io, &req.encode()).await
    }

    async fn write_response<T>(&mut self, _: &Self::Protocol, io: &mut T, res: Response) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_all(io, &res.encode()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    #[test]
    fn messages_round_trip() {
        for req in [
            Request::Get(vec![id(1), id(2)]),
            Request::Get(vec![]),
            Request::Summary { epoch: 7, generation: 9 },
            Request::Blob(Digest::of(b"blob")),
        ] {
            assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        }
        for res in [
            Response::Chunks(vec![(id(1), vec![1, 2, 3]), (id(2), vec![])]),
            Response::Summary { epoch: 1, generation: 2, serving: true, body: SummaryBody::Unchanged },
            Response::Summary {
                epoch: 1,
                generation: 2,
                serving: false,
                body: SummaryBody::Full(vec![9u8; 100].into()),
            },
            Response::Summary { epoch: 1, generation: 2, serving: true, body: SummaryBody::Delta(vec![id(3)]) },
            Response::Blob(None),
            Response::Blob(Some(vec![7; 1000])),
        ] {
            assert_eq!(Response::decode(&res.encode()).unwrap(), res);
        }
    }

    #[test]
    fn bad_messages_are_refused_without_allocating_what_they_claim() {
        // A count far beyond the body.
        let mut b = vec![1u8];
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Response::decode(&b).unwrap_err().to_string().contains("announced"));
        assert!(Request::decode(&b).unwrap_err().to_string().contains("ids in one message"));
        // A chunk longer than allowed.
        let mut b = vec![1u8];
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(id(1).as_bytes());
        b.extend_from_slice(&(MAX_CHUNK as u32 + 1).to_le_bytes());
        assert!(Response::decode(&b).unwrap_err().to_string().contains("at most"));
        // Truncated, trailing bytes, unknown types.
        let full = Response::Chunks(vec![(id(1), vec![5; 10])]).encode();
        assert!(Response::decode(&full[..full.len() - 1]).unwrap_err().to_string().contains("truncated"));
        let mut long = full.clone();
        long.push(0);
        assert!(Response::decode(&long).unwrap_err().to_string().contains("after the end"));
        assert!(Request::decode(&[9]).is_err());
        // A blob: a digest cut short, a length past the limit, a flag that is neither.
        assert!(Request::decode(&[4, 1, 2, 3]).unwrap_err().to_string().contains("truncated"));
        let mut b = vec![3u8, 1];
        b.extend_from_slice(&(MAX_RESPONSE as u32 + 1).to_le_bytes());
        assert!(Response::decode(&b).unwrap_err().to_string().contains("at most"));
        assert!(Response::decode(&[3, 2]).unwrap_err().to_string().contains("blob flag"));
        assert!(Response::decode(&[]).is_err());
    }
}
