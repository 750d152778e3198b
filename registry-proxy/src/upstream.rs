//! Requests to one upstream registry with its authorization: anonymous or configured
//! credentials, or the client's own (Basic, used for the upstream's token flow; Bearer, passed
//! through). Tokens are kept per repository and principal until the upstream refuses them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use super::{MirrorError, UpstreamConfig};

/// Who a request to the upstream speaks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// Nobody: anonymous, or the mirror's configured credentials when it has some.
    Mirror,
    /// A client's Basic credentials.
    Basic(String, String),
    /// A client's Bearer token, issued by the upstream's token service.
    Bearer(String),
}

impl Principal {
    /// The principal a client's `Authorization` header names.
    pub fn from_header(h: Option<&str>) -> Principal {
        let Some(h) = h else { return Principal::Mirror };
        if let Some(b) = h.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(b.trim()).ok();
            if let Some((u, p)) = decoded
                .and_then(|d| String::from_utf8(d).ok())
                // An empty name is how some clients say "nobody" (skopeo sends `Basic Og==`).
                .and_then(|s| {
                    s.split_once(':').filter(|(u, _)| !u.is_empty()).map(|(u, p)| (u.to_string(), p.to_string()))
                })
            {
                return Principal::Basic(u, p);
            }
        } else if let Some(t) = h.strip_prefix("Bearer ") {
            return Principal::Bearer(t.trim().to_string());
        }
        Principal::Mirror
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self, Principal::Mirror)
    }
}

pub struct Upstream {
    pub cfg: UpstreamConfig,
    http: reqwest::Client,
    /// `Authorization` values that worked, per (repository, principal).
    tokens: Mutex<HashMap<(String, Principal), String>>,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Result<Upstream, MirrorError> {
        let http = hb_registry::http::http_client(&hb_registry::http::HttpSettings {
            ca_pem: &cfg.ca_pem,
            skip_verify: cfg.skip_verify,
            user_agent: concat!("hb-mirror/", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(10),
            pool_max_idle_per_host: Some(64),
            ..hb_registry::http::HttpSettings::new(&cfg.host)
        })
        .map_err(|e| MirrorError::Config(format!("upstream {}: {e}", cfg.host)))?;
        Ok(Upstream { cfg, http, tokens: Mutex::new(HashMap::new()) })
    }

    fn basic(user: &str, pass: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
    }

    /// The credentials a principal brings to a token service or a Basic challenge.
    fn credentials<'a>(&'a self, who: &'a Principal) -> Option<(&'a str, &'a str)> {
        match who {
            Principal::Basic(u, p) => Some((u, p)),
            Principal::Mirror => self.cfg.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
            Principal::Bearer(_) => None,
        }
    }

    /// Sends `method` to `path_and_query` (under the upstream's base URL) for `repo`, answering
    /// one 401 challenge (token flow or Basic) as `who`. A final 401 comes back as a response,
    /// for the caller to hand on.
    pub async fn send(
        &self,
        method: Method,
        repo: &str,
        path_and_query: &str,
        headers: HeaderMap,
        who: &Principal,
    ) -> Result<Response, MirrorError> {
        let url = format!("{}{}", self.cfg.url.trim_end_matches('/'), path_and_query);
        let key = (repo.to_string(), who.clone());
        let cached = match who {
            Principal::Bearer(t) => Some(format!("Bearer {t}")),
            _ => self.tokens.lock().expect("tokens lock").get(&key).cloned(),
        };
        let resp = self.once(&method, &url, &headers, cached.as_deref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED || matches!(who, Principal::Bearer(_)) {
            return Ok(resp);
        }
        let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let params = hb_registry::http::bearer_challenge(&challenge);
        let auth = if let Some(realm) = params.get("realm") {
            match self.token(realm, params.get("service").map(String::as_str), repo, who).await? {
                Some(t) => format!("Bearer {t}"),
                None => return Ok(resp),
            }
        } else if challenge.to_ascii_lowercase().starts_with("basic") {
            match self.credentials(who) {
                Some((u, p)) => Self::basic(u, p),
                None => return Ok(resp),
            }
        } else {
            return Ok(resp);
        };
        let resp = self.once(&method, &url, &headers, Some(&auth)).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            self.tokens.lock().expect("tokens lock").insert(key, auth);
        }
        Ok(resp)
    }

    async fn once(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        auth: Option<&str>,
    ) -> Result<Response, MirrorError> {
        let mut req = self.http.request(method.clone(), url).headers(headers.clone());
        if let Some(a) = auth.and_then(|a| HeaderValue::from_str(a).ok()) {
            req = req.header(AUTHORIZATION, a);
        }
        req.send()
            .await
            .map_err(|e| MirrorError::Upstream { host: self.cfg.host.clone(), reason: hb_registry::error_chain(&e) })
    }

    /// A pull token for `repo` from the upstream's token service; `None` when it refuses.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        repo: &str,
        who: &Principal,
    ) -> Result<Option<String>, MirrorError> {
        let scope = format!("repository:{repo}:pull");
        let req = match self.credentials(who) {
            // An identity token (docker's `identitytoken`): the OAuth2 refresh_token grant.
            Some((u, token)) if u == hb_core::IDENTITY_TOKEN_USER => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token),
                    ("client_id", "hb-proxy"),
                    ("scope", scope.as_str()),
                ];
                form.extend(service.map(|s| ("service", s)));
                let body: Vec<String> =
                    form.iter().map(|(k, v)| format!("{k}={}", hb_registry::http::form_encode(v))).collect();
                self.http
                    .post(realm)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body.join("&"))
            }
            creds => {
                let mut req = self.http.get(realm).query(&[("scope", &scope)]);
                if let Some(s) = service {
                    req = req.query(&[("service", s)]);
                }
                if let Some((u, p)) = creds {
                    req = req.header(AUTHORIZATION, Self::basic(u, p));
                }
                req
            }
        };
        let resp = req.send().await.map_err(|e| MirrorError::Upstream {
            host: self.cfg.host.clone(),
            reason: format!("token service {realm}: {}", hb_registry::error_chain(&e)),
        })?;
        if matches!(resp.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(MirrorError::Upstream {
                host: self.cfg.host.clone(),
                reason: format!("token service {realm} answered {}", resp.status()),
            });
        }
        #[derive(serde::Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let t: Token = resp.json().await.map_err(|e| MirrorError::Upstream {
            host: self.cfg.host.clone(),
            reason: format!("token service {realm}: {e}"),
        })?;
        Ok(t.token.or(t.access_token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_and_challenges() {
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("hb:s3cret:x"));
        assert_eq!(Principal::from_header(Some(&basic)), Principal::Basic("hb".into(), "s3cret:x".into()));
        assert_eq!(Principal::from_header(Some("Bearer abc")), Principal::Bearer("abc".into()));
        assert_eq!(Principal::from_header(None), Principal::Mirror);
        assert_eq!(Principal::from_header(Some("Basic !!")), Principal::Mirror);
        assert_eq!(Principal::from_header(Some("Basic Og==")), Principal::Mirror, "empty credentials are nobody's");
    }
}
