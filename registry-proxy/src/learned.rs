//! Learned start-up orders: an hb client that started an image cold through this mirror offers
//! the chunks it read first (`PUT /v2/<name>/_hyperbox/startup/<image manifest digest>`, body a
//! start-up order blob). The mirror checks it (a client may read the repository; the order
//! decodes; every chunk it names is one of the image's) and keeps the first one per image; from
//! then on the accelerated form it serves hb clients names that order, so every later client's
//! cold start prefetches it. No push rights to the upstream are needed, and the upstream's
//! content is unchanged: the order is advice about the image's own chunks, never its bytes.

use std::sync::Arc;

use bytes::Bytes;
use hb_core::lazy::AccelConfig;
use hb_core::{Digest, StartupOrder};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Response, StatusCode};

use super::upstream::Principal;
use super::{full, oci_error, Body, Mirror, Route};

/// Orders larger than this are refused (a million chunks, 64 GiB of start-up reads).
const MAX_ORDER: usize = 32 << 20;

/// Where the accelerated config made for image `manifest` is recorded.
pub(super) fn accel_key(manifest: &Digest) -> String {
    format!("mirror/accel-of/{manifest}")
}

fn order_key(manifest: &Digest) -> String {
    format!("mirror/startup/{manifest}")
}

impl Mirror {
    /// The learned order kept for image `manifest` (digest and size of its blob), if its blob is
    /// still kept.
    pub(super) fn learned_order(&self, manifest: &Digest) -> Option<(Digest, u64)> {
        let raw = self.store.meta(&order_key(manifest)).ok().flatten()?;
        let d: Digest = std::str::from_utf8(&raw).ok()?.parse().ok()?;
        let size = self.objects.lock().expect("objects lock").get(&d)?.0;
        Some((d, size))
    }

    /// Answers `PUT .../_hyperbox/startup/<image>`: 201 when kept, 200 when the image has an
    /// order already (the first wins; a published one is never replaced), 4xx with an OCI error
    /// naming what was wrong otherwise.
    pub(super) async fn offer_startup(
        self: &Arc<Self>,
        route: &Route,
        image: Digest,
        body: Incoming,
        who: &Principal,
    ) -> Response<Body> {
        if let Err(resp) = self.authorize(route, who, &format!("manifests/{image}")).await {
            return resp;
        }
        let body = match http_body_util::Limited::new(body, MAX_ORDER).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return oci_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "SIZE_INVALID",
                    &format!("the start-up order could not be read (at most {MAX_ORDER} bytes): {e}"),
                )
            }
        };
        let invalid = |why: String| oci_error(StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID", &why);
        let order = match StartupOrder::decode(&body) {
            Ok(o) => o,
            Err(e) => return invalid(format!("the start-up order for {image}: {e}")),
        };
        let _one = self.one_at_a_time(&order_key(&image)).await;
        let config: Option<Digest> = self
            .store
            .meta(&accel_key(&image))
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok());
        let Some(config) = config else {
            return oci_error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                &format!("this mirror made no accelerated form of {image}: pull it through the mirror first"),
            );
        };
        let cfg: AccelConfig = match self
            .read_all(&config)
            .await
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("accelerated config {config}: {e}")))
        {
            Ok(c) => c,
            Err(e) => {
                return oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    &format!(
                        "the accelerated form of {image} is no longer kept ({e}): pull it through the mirror again"
                    ),
                )
            }
        };
        let mut indexes = Vec::with_capacity(cfg.layers.len());
        for l in &cfg.layers {
            match self
                .read_all(&l.index)
                .await
                .map_err(|e| e.to_string())
                .and_then(|b| hb_registry::decode_index_blob(&b).map_err(|e| e.to_string()))
            {
                Ok(i) => indexes.push(i),
                Err(e) => {
                    return oci_error(
                        StatusCode::NOT_FOUND,
                        "BLOB_UNKNOWN",
                        &format!("the index of layer {} of {image} is not usable: {e}", l.diff_id),
                    )
                }
            }
        }
        if let Err(e) = order.check_within(&indexes) {
            tracing::warn!(%image, repo = %route.repo, error = %e, "refused a start-up order a client offered");
            return invalid(format!("image {image}: {e}"));
        }
        // Checked first, so bad input always gets its error; then the first order wins.
        if cfg.startup.is_some() || self.learned_order(&image).is_some() {
            return kept(StatusCode::OK, false);
        }
        let d = Digest::of(&body);
        let size = body.len() as u64;
        let raw: Bytes = body.clone();
        let stored = self
            .blocking(move |s| {
                s.insert(&d, &mut &raw[..])?;
                s.put_meta(&order_key(&image), d.to_string().as_bytes())
            })
            .await;
        if let Err(e) = stored {
            tracing::error!(%image, error = %e, "keeping a start-up order failed");
            return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &format!("keeping the order: {e}"));
        }
        self.objects.lock().expect("objects lock").insert(d, (size, super::now()));
        tracing::info!(%image, repo = %route.repo, chunks = order.chunks.len(), "kept a start-up order a client learned");
        kept(StatusCode::CREATED, true)
    }
}

fn kept(status: StatusCode, kept: bool) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(serde_json::json!({ "kept": kept }).to_string())))
        .expect("valid response")
}
