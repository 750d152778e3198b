//! HTTP answers as the distribution API gives them: OCI error bodies, manifests and blobs with
//! their headers, Range and Accept negotiation, media types checked before they become headers.

use super::*;

pub(super) fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(full(Bytes::from(body)))
        .expect("valid response")
}

pub(super) fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never: Infallible| match never {}).boxed()
}

pub(super) fn empty() -> Body {
    full(Bytes::new())
}

pub(super) fn unauthorized(message: &str) -> Response<Body> {
    let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    r.headers_mut().insert("www-authenticate", HeaderValue::from_static("Basic realm=\"hb mirror\""));
    r
}

/// Every `Accept` header of a request as one list (Go's clients send one line per type).
pub fn accept_of(headers: &hyper::HeaderMap) -> Option<String> {
    let all: Vec<&str> = headers.get_all(ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    (!all.is_empty()).then(|| all.join(", "))
}

/// Whether a client with `accept` takes a manifest of `media_type`: any client takes Docker's
/// types (old clients send no Accept for them); OCI types only when asked for, or with no
/// `Accept` at all, or `*/*`.
pub fn acceptable(accept: Option<&str>, media_type: &str) -> bool {
    let Some(a) = accept.filter(|a| !a.trim().is_empty()) else { return true };
    if !media_type.starts_with("application/vnd.oci.") {
        return true;
    }
    a.split(',').map(|t| t.split(';').next().unwrap_or("").trim()).any(|t| t == media_type || t == "*/*")
}

/// A `Range` that starts past the blob's end (416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A byte range of a blob of `size` bytes, from a `Range` header; `Err` when unsatisfiable.
/// Several ranges, or a malformed header, mean the whole blob (RFC 9110 allows ignoring it).
pub fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else { return Ok(None) };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        // A last position past the end means the end (RFC 9110 14.1.2), u64::MAX included.
        (Some(s), Some(e)) if s <= e => (s, e.saturating_add(1).min(size)),
        (Some(s), None) if b.is_empty() => (s, size),
        (None, Some(n)) if a.is_empty() && n > 0 => (size.saturating_sub(n), size),
        _ => return Ok(None),
    };
    if start >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

/// Whether `s` is a media type as RFC 6838 names them (`type/subtype`, restricted name characters,
/// optional `; parameter=value` parts of visible ASCII): what may go into a Content-Type header.
pub fn valid_media_type(s: &str) -> bool {
    let restricted = |t: &str| {
        !t.is_empty()
            && t.len() <= 127
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
            && t.as_bytes()[0].is_ascii_alphanumeric()
    };
    let mut parts = s.split(';');
    let essence = parts.next().unwrap_or("").trim();
    let essence_ok = essence.split_once('/').is_some_and(|(t, sub)| restricted(t) && restricted(sub));
    essence_ok
        && parts.all(|p| {
            p.trim().split_once('=').is_some_and(|(k, v)| {
                restricted(k.trim()) && !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            })
        })
}

pub(super) fn manifest_response(
    d: &Digest,
    media_type: &str,
    body: Bytes,
    head: bool,
    stats: &UpstreamStats,
) -> Response<Body> {
    // Checked when kept; a record from an older version may still hold anything.
    let Ok(content_type) = HeaderValue::from_str(media_type).map_err(drop).and_then(|v| {
        if valid_media_type(media_type) {
            Ok(v)
        } else {
            Err(())
        }
    }) else {
        stats.error("manifest");
        tracing::error!(digest = %d, media_type = %media_type.escape_debug(), "a kept manifest has an invalid media type; not served");
        return oci_error(
            StatusCode::BAD_GATEWAY,
            "MANIFEST_INVALID",
            &format!("manifest {d} has an invalid media type {:?}", media_type.escape_debug().to_string()),
        );
    };
    if !head {
        stats.bytes_served.add(body.len() as u64);
    }
    Response::builder()
        .header(CONTENT_TYPE, content_type)
        .header(DIGEST_HEADER, d.to_string())
        .header(CONTENT_LENGTH, body.len())
        .body(if head { empty() } else { full(body) })
        .expect("valid response")
}

pub(super) fn blob_response(d: &Digest, size: u64, range: Option<(u64, u64)>, body: Body) -> Response<Body> {
    let b = Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(DIGEST_HEADER, d.to_string())
        .header("accept-ranges", "bytes")
        .header("etag", format!("\"{d}\""));
    let b = match range {
        Some((a, e)) => b
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-range", format!("bytes {a}-{}/{size}", e - 1))
            .header(CONTENT_LENGTH, e - a),
        None => b.header(CONTENT_LENGTH, size),
    };
    b.body(body).expect("valid response")
}

pub(super) fn range_not_satisfiable(size: u64) -> Response<Body> {
    let mut r =
        oci_error(StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN", "the requested range is past the blob's end");
    r.headers_mut().insert("content-range", HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"));
    r
}

pub(super) fn flight_error_response(e: &FlightError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if status == StatusCode::UNAUTHORIZED {
        return unauthorized(&e.message);
    }
    oci_error(status, e.code, &e.message)
}
