//! The API's HTTP side: routes (docs/api.md), bodies, errors as JSON, blocking work off the
//! async threads.

use super::*;

/// Something an API request names is not there (answered with 404).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct NotFound(pub(super) String);

/// What an API request sent is not acceptable (answered with 400).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct BadRequest(pub(super) String);

pub(super) fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

pub(super) fn error(status: StatusCode, e: &anyhow::Error) -> Response<Full<Bytes>> {
    json(status, &api::ErrorBody { error: crate::error_chain(e) })
}

/// A handler's blocking work on a thread of its own, its error mapped to a status code.
pub(super) async fn blocking<T: Serialize + Send + 'static>(
    d: &Arc<Daemon>,
    kind: &'static str,
    f: impl FnOnce(&Daemon) -> anyhow::Result<T> + Send + 'static,
) -> Response<Full<Bytes>> {
    match blocking_value(d, kind, f).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(resp) => resp,
    }
}

/// A handler's blocking work: its value, or the error answer.
pub(super) async fn blocking_value<T: Send + 'static>(
    d: &Arc<Daemon>,
    kind: &'static str,
    f: impl FnOnce(&Daemon) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, Response<Full<Bytes>>> {
    let d2 = d.clone();
    match tokio::task::spawn_blocking(move || f(&d2)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            d.metrics.error(kind);
            // Decided by the error's type, never by its text.
            let missing = e.chain().any(|c| {
                c.is::<NotFound>()
                    || matches!(
                        c.downcast_ref::<hb_images::ImagesError>(),
                        Some(hb_images::ImagesError::NoSuchImage(_))
                    )
            });
            let bad = e.chain().any(|c| c.is::<BadRequest>() || c.is::<hb_core::LazyFormatError>());
            let status = match (missing, bad) {
                (true, _) => StatusCode::NOT_FOUND,
                (_, true) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(error(status, &e))
        }
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, &anyhow::anyhow!("handler failed: {e}"))),
    }
}

/// A handler's blocking work answering raw bytes.
pub(super) async fn blocking_raw(
    d: &Arc<Daemon>,
    kind: &'static str,
    f: impl FnOnce(&Daemon) -> anyhow::Result<Vec<u8>> + Send + 'static,
) -> Response<Full<Bytes>> {
    let d2 = d.clone();
    match tokio::task::spawn_blocking(move || f(&d2)).await {
        Ok(Ok(v)) => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(Bytes::from(v)))
            .expect("valid response"),
        Ok(Err(e)) => {
            d.metrics.error(kind);
            error(StatusCode::INTERNAL_SERVER_ERROR, &e)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &anyhow::anyhow!("handler failed: {e}")),
    }
}

/// A request body of at most [`api::MAX_CHUNK_BODY`] bytes.
pub(super) async fn raw_body(req: Request<hyper::body::Incoming>) -> anyhow::Result<Bytes> {
    let limited = http_body_util::Limited::new(req.into_body(), api::MAX_CHUNK_BODY);
    limited.collect().await.map(|c| c.to_bytes()).map_err(|e| anyhow::anyhow!("reading the request body: {e}"))
}

pub(super) async fn body_json<T: serde::de::DeserializeOwned>(
    req: Request<hyper::body::Incoming>,
) -> anyhow::Result<T> {
    let bytes = req.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&bytes).context("the request body is not the JSON this endpoint takes")
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// What the daemon shows of itself: `/metrics` (Prometheus), `/status` (HTML), `/healthz`; on
/// the API socket and on `daemon.metrics_address`.
fn observation(d: &Daemon, path: &str) -> Option<Response<Full<Bytes>>> {
    match path {
        "/metrics" => Some(text(StatusCode::OK, "text/plain; version=0.0.4", d.metrics_text())),
        "/status" => Some(text(StatusCode::OK, "text/html; charset=utf-8", d.status_page())),
        "/healthz" => Some(text(StatusCode::OK, "text/plain", "ok\n".into())),
        _ => None,
    }
}

/// The TCP side (`daemon.metrics_address`): [`observation`] only, nothing of the API.
pub(super) async fn metrics_only(
    d: Arc<Daemon>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = match req.uri().path() {
        "/" => "/status",
        p => p,
    };
    let found = matches!(*req.method(), Method::GET | Method::HEAD).then(|| observation(&d, path)).flatten();
    Ok(found.unwrap_or_else(|| {
        text(StatusCode::NOT_FOUND, "text/plain", "only /metrics, /status and /healthz are served here\n".into())
    }))
}

pub(super) async fn handle(
    d: Arc<Daemon>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    // What may change which image a reference names: no spare stays advertised under one
    // (before, and after, as a spare may be made meanwhile).
    let renames = matches!((&method, path.as_str()), (&Method::POST, "/v1/pull" | "/v1/images/remove" | "/v1/gc"))
        || (method == Method::DELETE && path.starts_with("/v1/mounts/"));
    if renames {
        d.withdraw_all();
    }
    let resp = match (&method, path.as_str()) {
        (&Method::GET, "/v1/health") => json(StatusCode::OK, &d.health()),
        (&Method::GET, "/metrics" | "/status") => observation(&d, &path).expect("an observation path"),
        (&Method::GET, "/v1/mounts") => json(StatusCode::OK, &d.list_mounts()),
        (&Method::POST, "/v1/images/mount") => match body_json::<MountRequest>(req).await {
            Ok(m) if m.root.as_deref().is_some_and(|r| !same_path(r, &d.root)) => error(
                StatusCode::CONFLICT,
                &anyhow::anyhow!(
                    "this daemon serves store {}, not {}",
                    d.root.display(),
                    m.root.unwrap_or_default().display()
                ),
            ),
            Ok(m) => {
                let spare = m.spare && m.layers.is_none();
                let (image, plain_http) = (m.image.clone(), m.plain_http);
                let mount = match d.existing_mount(&m) {
                    Ok(Some(mount)) => Ok(mount),
                    _ => blocking_value(&d, "mount", move |d| d.image_mount(&m)).await,
                };
                match mount {
                    Ok(mut mount) => {
                        if spare {
                            mount.spare = d.take_spare(&mount, &image, plain_http);
                        }
                        json(StatusCode::OK, &mount)
                    }
                    Err(resp) => resp,
                }
            }
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::DELETE, p) if p.starts_with("/v1/mounts/") => {
            let digest = p["/v1/mounts/".len()..].to_string();
            let force = query.split('&').any(|kv| kv == "force=1" || kv == "force=true");
            blocking(&d, "unmount", move |d| d.unmount(&digest, force).map(|_| serde_json::json!({}))).await
        }
        (&Method::POST, "/v1/pull") => match body_json::<PullRequest>(req).await {
            Ok(p) => blocking(&d, "pull", move |d| d.pull(&p)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/images/remove") => match body_json::<RemoveRequest>(req).await {
            Ok(r) => blocking(&d, "remove", move |d| d.remove_images(&r)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/chunks/get") => match raw_body(req).await {
            Ok(b) => blocking_raw(&d, "chunks", move |d| d.chunks_get(&b)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/startup") => {
            let manifest = query.split('&').find_map(|kv| kv.strip_prefix("manifest=")).unwrap_or("").to_string();
            match raw_body(req).await {
                Ok(b) => blocking(&d, "startup", move |d| d.keep_startup(&manifest, &b)).await,
                Err(e) => error(StatusCode::BAD_REQUEST, &e),
            }
        }
        (&Method::POST, "/v1/peers/chunks") => match raw_body(req).await {
            Ok(b) => blocking_raw(&d, "peers", move |d| d.peers_get(&b)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::GET, "/v1/peers") => match d.node() {
            Ok(n) => json(StatusCode::OK, &n.report()),
            Err(e) => error(StatusCode::NOT_FOUND, &e),
        },
        (&Method::POST, "/v1/peers/switch") => match (d.node(), body_json::<api::PeersSwitch>(req).await) {
            (Ok(n), Ok(s)) => {
                n.set_enabled(s.on);
                json(StatusCode::OK, &n.report())
            }
            (Err(e), _) => error(StatusCode::NOT_FOUND, &e),
            (_, Err(e)) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/chunks/fill") => match raw_body(req).await {
            Ok(b) => blocking(&d, "store_fill", move |d| d.chunks_fill(&b)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/chunks/fill-frames") => match raw_body(req).await {
            Ok(b) => blocking(&d, "store_fill", move |d| d.chunks_fill_frames(&b)).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/containers/cleanup") => match body_json::<crate::api::CleanupRequest>(req).await {
            Ok(c) => match d.start_cleanup(&c) {
                Ok(()) => json(StatusCode::ACCEPTED, &serde_json::json!({})),
                Err(CleanupRefused::NotContainer(e)) => error(StatusCode::BAD_REQUEST, &e),
                Err(CleanupRefused::Missing(e)) => error(StatusCode::NOT_FOUND, &e),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        },
        (&Method::POST, "/v1/gc") => blocking(&d, "gc", |d| Ok(d.gc()?)).await,
        _ => error(StatusCode::NOT_FOUND, &anyhow::anyhow!("no endpoint {method} {path} (see docs/api.md)")),
    };
    if renames {
        d.withdraw_all();
    }
    let took = started.elapsed();
    let label = metric_path(&path).to_string();
    *d.metrics.requests.lock().expect("metrics lock").entry((label, resp.status().as_u16())).or_default() += 1;
    {
        let mut l = d.metrics.latency.lock().expect("metrics lock");
        let i = BUCKETS.iter().position(|b| took.as_secs_f64() <= *b).unwrap_or(BUCKETS.len());
        l.0[i] += 1;
        l.1 += took.as_micros() as u64;
    }
    Ok(resp)
}
