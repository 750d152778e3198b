//! Blob downloads with our own HTTP requests (reqwest, the client oci-client also uses), so the
//! status and headers are visible: `Retry-After` on 429/503, `206` for resumed Range reads.
//! Authorization comes from the token flow `Registry::connect` ran.

use std::time::Duration;

use crate::error::RegistryError;

pub(crate) struct BlobHttp {
    pub(crate) http: reqwest::Client,
}

pub(crate) enum BlobBody {
    /// 200: the whole blob.
    Full(reqwest::Response),
    /// 206: from the requested offset.
    Partial(reqwest::Response),
}

impl BlobHttp {
    /// GETs `url` from byte `offset` on, translating the status once.
    pub async fn get(
        &self,
        registry: &str,
        url: &str,
        auth: Option<&str>,
        offset: u64,
        end: Option<u64>,
    ) -> Result<BlobBody, RegistryError> {
        let mut req = self.http.get(url);
        if let Some(a) = auth {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        match end {
            Some(last) => req = req.header(reqwest::header::RANGE, format!("bytes={offset}-{last}")),
            None if offset > 0 => req = req.header(reqwest::header::RANGE, format!("bytes={offset}-")),
            None => {}
        }
        let resp = req.send().await.map_err(|e| RegistryError::Transport {
            registry: registry.to_string(),
            reason: crate::error::chain(&e),
        })?;
        let status = resp.status().as_u16();
        match status {
            200 => Ok(BlobBody::Full(resp)),
            206 => Ok(BlobBody::Partial(resp)),
            _ => Err(status_error(registry, url, status, resp.headers(), String::new())),
        }
    }
}

/// The error a refusing answer means, decided once by its status (`detail`: what its body said).
fn status_error(
    registry: &str,
    url: &str,
    status: u16,
    headers: &reqwest::header::HeaderMap,
    detail: String,
) -> RegistryError {
    match status {
        401 | 403 => {
            RegistryError::Unauthorized { registry: registry.to_string(), reason: format!("HTTP {status} for {url}") }
        }
        404 => RegistryError::NotFound { reference: url.to_string() },
        408 | 429 | 500..=599 => {
            RegistryError::Busy { registry: registry.to_string(), status, retry_after: retry_after(headers) }
        }
        _ => RegistryError::Rejected {
            registry: registry.to_string(),
            reason: format!("HTTP {status} for {url}{detail}"),
        },
    }
}

impl BlobHttp {
    /// PUTs `body` to `url`; the status, translated once ([`RegistryError`] for 4xx/5xx).
    pub async fn put(
        &self,
        registry: &str,
        url: &str,
        auth: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<u16, RegistryError> {
        let mut req = self.http.put(url).header(reqwest::header::CONTENT_TYPE, content_type).body(body);
        if let Some(a) = auth {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let resp = req.send().await.map_err(|e| RegistryError::Transport {
            registry: registry.to_string(),
            reason: crate::error::chain(&e),
        })?;
        let status = resp.status().as_u16();
        if (200..=299).contains(&status) {
            return Ok(status);
        }
        // 405: a registry without the path at all is the same answer as 404 to the caller.
        let status = if status == 405 { 404 } else { status };
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        let detail: String = body.chars().filter(|c| !c.is_control()).take(300).collect();
        let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
        Err(status_error(registry, url, status, &headers, detail))
    }
}

/// The response's `Retry-After`, if readable ([`crate::retry::parse_retry_after`]).
pub(crate) fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    crate::retry::parse_retry_after(h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?, std::time::SystemTime::now())
}
