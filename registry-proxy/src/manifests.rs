//! Manifests and tags: tags resolved upstream at most once per TTL (one request per tag at a
//! time), served stale while the upstream is down, accelerated forms for hb clients.

use super::*;

impl Mirror {
    pub(super) async fn manifest(
        self: &Arc<Self>,
        route: &Route,
        reference: Reference,
        who: &Principal,
        head: bool,
        accept: Option<String>,
    ) -> Response<Body> {
        let stats = &self.stats.upstreams[route.upstream];
        let digest = match &reference {
            Reference::Digest(d) => *d,
            Reference::Tag(tag) => match self.resolve_tag(route, tag, who, accept.as_deref()).await {
                Ok(d) => d,
                Err(resp) => return resp,
            },
        };
        let key = format!("mirror/type/{digest}");
        let stored = self.objects.lock().expect("objects lock").contains_key(&digest);
        let mut found = None;
        if stored {
            if let Reference::Digest(d) = &reference {
                if let Err(r) = self.authorize(route, who, &format!("manifests/{d}")).await {
                    return r;
                }
                stats.hits.inc();
            }
            let media_type = self.store.meta(&key).ok().flatten().map(|b| String::from_utf8_lossy(&b).into_owned());
            match self.read_all(&digest).await {
                Ok(body) => found = Some((digest, media_type.unwrap_or_default(), body)),
                Err(e) => tracing::warn!(%digest, error = %e, "a kept manifest could not be read; fetching it again"),
            }
        }
        let (d, media_type, body) = match found {
            Some(f) => f,
            None => {
                stats.misses.inc();
                match self.fetch_manifest(route, &digest.to_string(), who, accept.as_deref(), Some(&digest)).await {
                    Ok(f) => f,
                    Err(resp) => return resp,
                }
            }
        };
        // An hb client asking a tag for its platform gets the accelerated binding (made now if
        // needed); anything going wrong there leaves it the plain manifest, pulled whole.
        if let (Reference::Tag(_), Some(platform)) = (&reference, accelerate::wanted_platform(accept.as_deref())) {
            match self.derived_index(route, &d, &body, &platform, who).await {
                Ok((di, index)) => return manifest_response(&di, hb_registry::OCI_INDEX, index, head, stats),
                Err(e) => {
                    stats.error("convert");
                    tracing::warn!(digest = %d, %platform, error = %e, "no accelerated form for an hb client; serving the manifest as is");
                }
            }
        }
        if !acceptable(accept.as_deref(), &media_type) {
            // As distribution answers a client that did not ask for OCI types.
            return oci_error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                &format!("the manifest is {media_type}, which the request's Accept does not list"),
            );
        }
        manifest_response(&d, &media_type, body, head, stats)
    }

    /// A tag's manifest digest: remembered while fresh, else revalidated (HEAD), else fetched;
    /// the remembered one while the upstream is down.
    pub(super) async fn resolve_tag(
        &self,
        route: &Route,
        tag: &str,
        who: &Principal,
        accept: Option<&str>,
    ) -> Result<Digest, Response<Body>> {
        let up = &self.upstreams[route.upstream];
        let stats = &self.stats.upstreams[route.upstream];
        let key = format!("mirror/tag/{}/{}:{tag}", up.cfg.host, route.repo);
        let _one = self.one_at_a_time(&key).await;
        let rec: Option<TagRecord> = self.store.meta(&key).ok().flatten().and_then(|b| serde_json::from_slice(&b).ok());
        let kept = rec
            .as_ref()
            .and_then(|r| r.digest.parse::<Digest>().ok())
            .filter(|d| self.objects.lock().expect("objects lock").contains_key(d));
        if let (Some(rec), Some(d)) = (&rec, kept) {
            let fresh = now().saturating_sub(rec.checked) < up.cfg.tag_ttl(&route.repo, tag).as_secs();
            if fresh {
                self.authorize(route, who, &format!("manifests/{tag}")).await?;
                stats.hits.inc();
                return Ok(d);
            }
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_TYPES));
            let pq = format!("/v2/{}/manifests/{tag}", route.repo);
            match up.send(Method::HEAD, &route.repo, &pq, headers, who).await {
                Ok(r) if r.status().is_success() => {
                    self.remember(route, who, true);
                    let current = r.headers().get(DIGEST_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
                    if current.as_deref() == Some(rec.digest.as_str()) {
                        let rec = TagRecord { checked: now(), ..rec.clone() };
                        let _ = self.store.put_meta(&key, &serde_json::to_vec(&rec).expect("serialisable"));
                        stats.hits.inc();
                        stats.revalidated.inc();
                        return Ok(d);
                    }
                }
                Ok(r) if matches!(r.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                    self.remember(route, who, false);
                    return Err(unauthorized("the upstream refuses access to this repository"));
                }
                Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                    return Err(oci_error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        &format!("tag {tag} is gone upstream"),
                    ));
                }
                Ok(r) => {
                    return self.stale(route, who, tag, d, &format!("the upstream answered {}", r.status())).await;
                }
                Err(e) => return self.stale(route, who, tag, d, &e.to_string()).await,
            }
        }
        stats.misses.inc();
        let (d, media_type, _) = self.fetch_manifest(route, tag, who, accept, None).await?;
        let rec = TagRecord { digest: d.to_string(), media_type, checked: now() };
        let _ = self.store.put_meta(&key, &serde_json::to_vec(&rec).expect("serialisable"));
        Ok(d)
    }

    /// Serialises work on `key` (a tag's resolution, an image's conversion); the entry goes when
    /// its last holder is done, so the map holds only keys in use.
    pub(super) async fn one_at_a_time(&self, key: &str) -> KeyGuard<'_> {
        let lock = self.tag_locks.lock().expect("tag locks").entry(key.to_string()).or_default().clone();
        let guard = lock.lock_owned().await;
        KeyGuard { mirror: self, key: key.to_string(), guard: Some(guard) }
    }

    pub(super) async fn stale(
        &self,
        route: &Route,
        who: &Principal,
        tag: &str,
        d: Digest,
        why: &str,
    ) -> Result<Digest, Response<Body>> {
        let stats = &self.stats.upstreams[route.upstream];
        self.authorize(route, who, &format!("manifests/{tag}")).await?;
        stats.stale.inc();
        stats.error("upstream");
        tracing::warn!(upstream = %self.cfg.upstreams[route.upstream].host, repo = %route.repo, tag, digest = %d, reason = why, "upstream unavailable: serving the tag's last known manifest");
        Ok(d)
    }

    /// GETs a manifest from the upstream, checks its digest (the one asked for, and the one the
    /// upstream claims), keeps it.
    pub(super) async fn fetch_manifest(
        &self,
        route: &Route,
        reference: &str,
        who: &Principal,
        accept: Option<&str>,
        want: Option<&Digest>,
    ) -> Result<(Digest, String, Bytes), Response<Body>> {
        let up = &self.upstreams[route.upstream];
        let stats = &self.stats.upstreams[route.upstream];
        let mut headers = reqwest::header::HeaderMap::new();
        let accept = accept.filter(|a| !a.trim().is_empty() && a.trim() != "*/*").unwrap_or(MANIFEST_TYPES);
        headers.insert(ACCEPT, HeaderValue::from_str(accept).unwrap_or(HeaderValue::from_static(MANIFEST_TYPES)));
        let pq = format!("/v2/{}/manifests/{reference}", route.repo);
        let r =
            up.send(Method::GET, &route.repo, &pq, headers, who).await.map_err(|e| self.upstream_down(route, &e))?;
        match r.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                self.remember(route, who, false);
                return Err(unauthorized("the upstream requires credentials for this repository"));
            }
            StatusCode::NOT_FOUND => {
                return Err(oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    &format!("manifest {reference} unknown upstream"),
                ))
            }
            s => {
                stats.error("upstream");
                return Err(oci_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &format!("the upstream answered {s}")));
            }
        }
        self.remember(route, who, true);
        let claimed = r.headers().get(DIGEST_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let media_type = r.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if r.content_length().is_some_and(|n| n > MAX_MANIFEST as u64) {
            return Err(oci_error(StatusCode::BAD_GATEWAY, "MANIFEST_INVALID", "the upstream manifest is over 4 MiB"));
        }
        let body = r.bytes().await.map_err(|e| {
            self.upstream_down(
                route,
                &MirrorError::Upstream { host: up.cfg.host.clone(), reason: hb_registry::error_chain(&e) },
            )
        })?;
        stats.bytes_upstream.add(body.len() as u64);
        let actual = Digest::of(&body);
        let wrong = want.is_some_and(|w| *w != actual) || claimed.as_deref().is_some_and(|c| c != actual.to_string());
        if wrong || body.len() > MAX_MANIFEST {
            stats.error("digest");
            tracing::error!(upstream = %up.cfg.host, repo = %route.repo, reference, %actual, "the upstream sent a manifest that does not match its digest; not kept");
            return Err(oci_error(
                StatusCode::BAD_GATEWAY,
                "DIGEST_INVALID",
                &format!("the upstream's manifest {reference} does not match its digest (got {actual})"),
            ));
        }
        let media_type = if media_type.is_empty() || media_type.starts_with("text/") || media_type == "application/json"
        {
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or(media_type)
        } else {
            media_type
        };
        // It becomes our Content-Type header: only a well-formed media type is kept or served.
        if !valid_media_type(&media_type) {
            stats.error("manifest");
            tracing::error!(upstream = %up.cfg.host, repo = %route.repo, reference, media_type = %media_type.escape_debug(), "the upstream sent a manifest with an invalid media type; not kept");
            return Err(oci_error(
                StatusCode::BAD_GATEWAY,
                "MANIFEST_INVALID",
                &format!(
                    "the upstream's manifest {reference} has an invalid media type {:?}; not kept",
                    media_type.escape_debug().to_string()
                ),
            ));
        }
        let b = body.clone();
        let (d, mt) = (actual, media_type.clone());
        let kept = self
            .blocking(move |s| {
                s.put_meta(&format!("mirror/type/{d}"), mt.as_bytes())?;
                s.insert(&d, &mut &b[..])
            })
            .await;
        match kept {
            Ok(()) => self.kept_object(actual, body.len() as u64).await,
            Err(e) => {
                stats.error("store");
                tracing::error!(digest = %actual, error = %e, "keeping a manifest failed; served anyway");
            }
        }
        Ok((actual, media_type, body))
    }
}
