//! Blobs: kept objects served from their chunks (with Range), single-flight spooled downloads
//! for the first request, the LRU cap, and the data blobs of accelerated forms.

use super::*;

impl Mirror {
    /// Records a newly kept object and evicts the least recently used ones over the cap.
    pub(super) async fn kept_object(&self, d: Digest, size: u64) {
        self.objects.lock().expect("objects lock").insert(d, (size, now()));
        let Some(max) = self.max_bytes() else { return };
        let victims: Vec<Digest> = {
            let objects = self.objects.lock().expect("objects lock");
            let total: u64 = objects.values().map(|(s, _)| s).sum();
            if total <= max {
                return;
            }
            let flying = self.flights.lock().expect("flights lock");
            let mut by_age: Vec<(&Digest, &(u64, u64))> =
                objects.iter().filter(|(k, _)| **k != d && !flying.contains_key(k)).collect();
            by_age.sort_by_key(|(_, (_, used))| *used);
            let low = max / 10 * 9;
            let mut left = total;
            by_age
                .into_iter()
                .take_while(|(_, (s, _))| {
                    let go = left > low;
                    left = left.saturating_sub(*s);
                    go
                })
                .map(|(k, _)| *k)
                .collect()
        };
        if victims.is_empty() {
            return;
        }
        let n = victims.len();
        {
            let mut objects = self.objects.lock().expect("objects lock");
            victims.iter().for_each(|v| {
                objects.remove(v);
            });
        }
        let released: Vec<Digest> = {
            let mut virtuals = self.virtuals.lock().expect("virtuals lock");
            victims.iter().filter_map(|v| virtuals.remove(v)).filter_map(|x| x.diff_id.parse().ok()).collect()
        };
        if !released.is_empty() {
            self.save_virtuals();
            let mut tables = self.tables.lock().expect("tables lock");
            victims.iter().for_each(|v| {
                tables.pop(v);
            });
        }
        let freed = self
            .blocking(move |s| {
                for v in &victims {
                    s.remove(v)?;
                }
                for d in &released {
                    s.release_layer(d)?;
                }
                s.reclaim()
            })
            .await;
        self.stats.evictions.add(n as u64);
        match freed {
            Ok(()) => tracing::info!(evicted = n, "over the size cap: least recently used objects removed"),
            Err(e) => tracing::error!(error = %e, "eviction failed"),
        }
        let _ = self.save_usage();
    }

    pub(super) async fn chunk(&self, id: ChunkId) -> io::Result<Bytes> {
        if let Some(b) = self.cache.lock().expect("cache lock").get(&id) {
            return Ok(b);
        }
        let b = Bytes::from(self.blocking(move |s| s.chunk(&id)).await?);
        self.cache.lock().expect("cache lock").put(id, b.clone());
        Ok(b)
    }

    pub(super) async fn read_all(&self, d: &Digest) -> io::Result<Bytes> {
        let d = *d;
        let chunks = self.blocking(move |s| s.lookup(&d)).await?.ok_or_else(|| io::Error::other("not kept"))?;
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&self.chunk(c.id).await?);
        }
        self.touch(&d);
        Ok(Bytes::from(out))
    }

    pub(super) async fn blob(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        who: &Principal,
        head: bool,
        range: Option<String>,
    ) -> Response<Body> {
        let stats = &self.stats.upstreams[route.upstream];
        let probe = format!("blobs/{digest}");
        let kept = self.objects.lock().expect("objects lock").get(&digest).map(|(s, _)| *s);
        if let Some(size) = kept {
            if let Err(r) = self.authorize(route, who, &probe).await {
                return r;
            }
            let virt = self.virtuals.lock().expect("virtuals lock").get(&digest).cloned();
            if let Some(v) = virt {
                stats.hits.inc();
                self.touch(&digest);
                // The blob is served through its index and table: they age with it, not before it.
                for d in [Some(&v.table), v.index.as_ref()].into_iter().flatten() {
                    if let Ok(d) = d.parse::<Digest>() {
                        self.touch(&d);
                    }
                }
                return self.virtual_blob(route, digest, v, head, range.as_deref()).await;
            }
            let d = digest;
            match self.blocking(move |s| s.lookup(&d)).await {
                Ok(Some(chunks)) => {
                    stats.hits.inc();
                    self.touch(&digest);
                    return self.stored_blob(route, digest, size, chunks, head, range.as_deref());
                }
                Ok(None) => {
                    self.objects.lock().expect("objects lock").remove(&digest);
                }
                Err(e) => {
                    stats.error("store");
                    return oci_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "UNKNOWN",
                        &format!("reading blob {digest}: {e}"),
                    );
                }
            }
        }
        if head {
            // A HEAD does not start a download.
            return self.pass_through(route, &format!("/v2/{}/{probe}", route.repo), who, true).await;
        }
        stats.misses.inc();
        let (flight, started) = match self.flight_for(route, digest, who) {
            Ok(f) => f,
            Err(e) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &e.to_string()),
        };
        let size = match flight.size().await {
            Ok(s) => s,
            Err(e) => return flight_error_response(&e),
        };
        if !started {
            if let Err(r) = self.authorize(route, who, &probe).await {
                return r;
            }
        }
        let range = match parse_range(range.as_deref(), size) {
            Ok(r) => r,
            Err(Unsatisfiable) => return range_not_satisfiable(size),
        };
        let opened = {
            // Opened under the lock the downloader takes before it unlinks the spool.
            let flights = self.flights.lock().expect("flights lock");
            std::fs::File::open(&flight.spool).map_err(|e| (e, flights.contains_key(&digest)))
        };
        let file = match opened {
            Ok(f) => f,
            Err((_, false)) => {
                // Committed meanwhile: serve it from the store.
                let range = range.map(|(a, b)| format!("bytes={a}-{}", b - 1));
                return Box::pin(self.blob(route, digest, who, head, range)).await;
            }
            Err((e, true)) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &format!("spool: {e}")),
        };
        let (pos, end) = range.unwrap_or((0, size));
        let reader = FlightReader { file, rx: flight.state.subscribe(), pos, end, whole: range.is_none() };
        let stats_bytes = self.clone();
        let upstream = route.upstream;
        let stream =
            futures_util::stream::unfold(reader, |mut r| async move { r.next().await.map(|b| (b, r)) }).map(move |b| {
                if let Ok(b) = &b {
                    stats_bytes.stats.upstreams[upstream].bytes_served.add(b.len() as u64);
                }
                b.map(Frame::data)
            });
        blob_response(&digest, size, range, BodyExt::boxed(StreamBody::new(stream)))
    }

    /// The download of `digest`: the one in progress, or a new one (then `true`).
    pub(super) fn flight_for(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        who: &Principal,
    ) -> io::Result<(Arc<Flight>, bool)> {
        let (flight, started) = {
            let mut flights = self.flights.lock().expect("flights lock");
            match flights.get(&digest) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Flight::new(digest, self.cfg.spool_dir.join(format!("{}.partial", digest.hex())));
                    flights.insert(digest, f.clone());
                    (f, true)
                }
            }
        };
        if started {
            // Created before any reader opens it.
            if let Err(e) = std::fs::File::create(&flight.spool) {
                self.flights.lock().expect("flights lock").remove(&digest);
                return Err(io::Error::other(format!("spooling blob {digest}: {e}")));
            }
            tokio::spawn(self.clone().download(route.clone(), who.clone(), flight.clone()));
        }
        Ok((flight, started))
    }

    pub(super) fn stored_blob(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        size: u64,
        chunks: Vec<ChunkRef>,
        head: bool,
        range: Option<&str>,
    ) -> Response<Body> {
        let range = match parse_range(range, size) {
            Ok(r) => r,
            Err(Unsatisfiable) => return range_not_satisfiable(size),
        };
        if head {
            return blob_response(&digest, size, range, empty());
        }
        let (start, end) = range.unwrap_or((0, size));
        // The chunks overlapping start..end, each with the part of it to send.
        let mut pieces = Vec::new();
        let mut at = 0u64;
        for c in chunks {
            let (a, b) = (at, at + c.len as u64);
            at = b;
            if b <= start || a >= end {
                continue;
            }
            pieces.push((c.id, (start.max(a) - a) as usize, (end.min(b) - a) as usize));
        }
        self.piece_stream(route, digest, size, range, pieces, false)
    }

    /// The body of `pieces` (chunk, slice of it), as decoded chunks or in their stored form.
    pub(super) fn piece_stream(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        size: u64,
        range: Option<(u64, u64)>,
        pieces: Vec<(ChunkId, usize, usize)>,
        stored_form: bool,
    ) -> Response<Body> {
        let me = self.clone();
        let upstream = route.upstream;
        let stream = futures_util::stream::iter(pieces).then(move |(id, from, to)| {
            let me = me.clone();
            async move {
                let b = if stored_form {
                    Bytes::from(me.blocking(move |s| s.stored_chunk(&id)).await?)
                } else {
                    me.chunk(id).await?
                };
                if to > b.len() {
                    return Err(io::Error::other(format!("chunk {id} is shorter than its table says")));
                }
                me.stats.upstreams[upstream].bytes_served.add((to - from) as u64);
                Ok::<_, io::Error>(Frame::data(b.slice(from..to)))
            }
        });
        blob_response(&digest, size, range, BodyExt::boxed(StreamBody::new(stream)))
    }

    /// A converted layer's data blob: its chunks' stored bytes back to back, as its table says.
    pub(super) async fn virtual_blob(
        self: &Arc<Self>,
        route: &Route,
        digest: Digest,
        v: accelerate::Virtual,
        head: bool,
        range: Option<&str>,
    ) -> Response<Body> {
        let range = match parse_range(range, v.size) {
            Ok(r) => r,
            Err(Unsatisfiable) => return range_not_satisfiable(v.size),
        };
        if head {
            return blob_response(&digest, v.size, range, empty());
        }
        let table = match self.virtual_table(digest, &v).await {
            Ok(t) => t,
            Err(e) => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &format!("chunk table: {e}")),
        };
        let (start, end) = range.unwrap_or((0, v.size));
        let pieces = table
            .entries
            .iter()
            .filter(|e| e.offset + e.stored_len as u64 > start && e.offset < end)
            .map(|e| {
                let a = e.offset;
                (e.id, (start.max(a) - a) as usize, (end.min(a + e.stored_len as u64) - a) as usize)
            })
            .collect();
        self.piece_stream(route, digest, v.size, range, pieces, true)
    }

    /// The chunk table of converted data blob `digest`, decoded once and kept for its next
    /// ranges (a lazy client reads a blob in many ranges; the compact table needs its index).
    async fn virtual_table(&self, digest: Digest, v: &accelerate::Virtual) -> io::Result<Arc<hb_core::ChunkTable>> {
        if let Some(t) = self.tables.lock().expect("tables lock").get(&digest) {
            return Ok(t.clone());
        }
        let parse = |d: &str| d.parse::<Digest>().map_err(|e| io::Error::other(format!("{e}")));
        let table_blob = self.read_all(&parse(&v.table)?).await?;
        let table = match &v.index {
            Some(index) => {
                let index_blob = self.read_all(&parse(index)?).await?;
                hb_registry::decode_layer_form(&index_blob, &table_blob).map(|(_, t)| t).map_err(io::Error::other)?
            }
            // Recorded by an older build: a self-contained table.
            None => hb_core::ChunkTable::decode(&table_blob).map_err(io::Error::other)?,
        };
        let table = Arc::new(table);
        self.tables.lock().expect("tables lock").put(digest, table.clone());
        Ok(table)
    }

    /// Downloads one blob into its spool (resuming with Range), verifies it, keeps it, and
    /// tells every reader how it went.
    pub(super) async fn download(self: Arc<Self>, route: Route, who: Principal, flight: Arc<Flight>) {
        let result = self.download_inner(&route, &who, &flight).await;
        let digest = flight.digest;
        let stats = &self.stats.upstreams[route.upstream];
        let result = match result {
            Ok(size) => {
                let spool = flight.spool.clone();
                let kept = self
                    .blocking(move |s| {
                        let mut f = std::fs::File::open(&spool)?;
                        s.insert(&digest, &mut f)
                    })
                    .await;
                match kept {
                    Ok(()) => {
                        self.kept_object(digest, size).await;
                        Ok(())
                    }
                    Err(e) => {
                        // Verified bytes, just not kept: readers still get them.
                        stats.error("store");
                        tracing::error!(%digest, error = %e, "keeping a verified blob failed");
                        Ok(())
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%digest, upstream = %self.cfg.upstreams[route.upstream].host, error = %e.message, "blob download failed; nothing kept");
                Err(e)
            }
        };
        flight.update(|s| s.done = Some(result));
        let mut flights = self.flights.lock().expect("flights lock");
        flights.remove(&digest);
        let _ = std::fs::remove_file(&flight.spool);
    }

    pub(super) async fn download_inner(
        &self,
        route: &Route,
        who: &Principal,
        flight: &Flight,
    ) -> Result<u64, FlightError> {
        let up = &self.upstreams[route.upstream];
        let stats = &self.stats.upstreams[route.upstream];
        let digest = flight.digest;
        let fail = |status: u16, code: &'static str, message: String| FlightError { status, code, message };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&flight.spool)
            .map_err(|e| fail(500, "UNKNOWN", format!("spool: {e}")))?;
        let pq = format!("/v2/{}/blobs/{digest}", route.repo);
        let mut hasher = DigestHasher::new();
        let mut offset = 0u64;
        let mut size: Option<u64> = None;
        let mut failures = 0u32;
        loop {
            let mut headers = reqwest::header::HeaderMap::new();
            if offset > 0 {
                headers.insert(RANGE, HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii"));
            }
            stats.upstream_gets.inc();
            let step: Result<(), FlightError> = async {
                let r = up
                    .send(Method::GET, &route.repo, &pq, headers, who)
                    .await
                    .map_err(|e| fail(502, "UNAVAILABLE", e.to_string()))?;
                let mut skip = match r.status() {
                    StatusCode::OK => offset,
                    StatusCode::PARTIAL_CONTENT if offset > 0 => 0,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        self.remember(route, who, false);
                        return Err(FlightError {
                            status: 401,
                            code: "UNAUTHORIZED",
                            message: "the upstream requires credentials for this repository".into(),
                        });
                    }
                    StatusCode::NOT_FOUND => {
                        return Err(fail(404, "BLOB_UNKNOWN", format!("blob {digest} unknown upstream")))
                    }
                    s => return Err(fail(502, "UNAVAILABLE", format!("the upstream answered {s}"))),
                };
                if size.is_none() {
                    self.remember(route, who, true);
                    let n = r
                        .content_length()
                        .ok_or_else(|| fail(502, "UNAVAILABLE", "the upstream sent no Content-Length".into()))?;
                    size = Some(n);
                    flight.update(|s| s.size = Some(n));
                }
                let total = size.expect("set above");
                let mut body = r.bytes_stream();
                while let Some(item) = body.next().await {
                    let bytes = item.map_err(|e| fail(502, "UNAVAILABLE", hb_registry::error_chain(&e)))?;
                    let drop = skip.min(bytes.len() as u64) as usize;
                    skip -= drop as u64;
                    let b = &bytes[drop..];
                    if b.is_empty() {
                        continue;
                    }
                    if offset + b.len() as u64 > total {
                        return Err(fail(502, "DIGEST_INVALID", format!("the upstream sent more than {total} bytes")));
                    }
                    file.write_all_at(b, offset).map_err(|e| fail(500, "UNKNOWN", format!("spool: {e}")))?;
                    hasher.update(b);
                    offset += b.len() as u64;
                    stats.bytes_upstream.add(b.len() as u64);
                    flight.update(|s| s.written = offset);
                }
                Ok(())
            }
            .await;
            let total = size.unwrap_or(u64::MAX);
            match step {
                Ok(()) if offset == total => break,
                Err(e) if e.status != 502 || e.code == "DIGEST_INVALID" => return Err(e),
                Err(e) if failures + 1 >= self.cfg.attempts.max(1) => {
                    stats.error("upstream");
                    return Err(e);
                }
                Ok(()) if failures + 1 >= self.cfg.attempts.max(1) => {
                    stats.error("upstream");
                    return Err(fail(
                        502,
                        "UNAVAILABLE",
                        format!("the upstream closed the blob after {offset} of {total} bytes"),
                    ));
                }
                other => {
                    failures += 1;
                    let wait = hb_registry::retry::delay(failures, None);
                    let reason = match other {
                        Err(e) => e.message,
                        Ok(()) => format!("closed after {offset} of {total} bytes"),
                    };
                    tracing::warn!(%digest, offset, attempt = failures + 1, %reason, "upstream blob download interrupted; resuming");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let actual = hasher.finish();
        if actual != digest {
            stats.error("digest");
            return Err(fail(
                502,
                "DIGEST_INVALID",
                format!("the upstream sent bytes that do not match {digest} (got {actual}); not kept"),
            ));
        }
        Ok(offset)
    }
}
