//! The mirror's own token service, as Docker Hub's: a 401 names `Bearer realm=<mirror>/_hb/token`,
//! clients fetch a token there (anonymously, or with Basic credentials) and present it.
//!
//! Why not a Basic challenge: Docker and podman treat a Basic challenge on `/v2/` as "this
//! registry needs a password" and give up on a mirror without one ("no basic auth
//! credentials"), while every client fetches a Bearer token anonymously when it has no
//! credentials. A token stands for the credentials it was issued for (kept in memory, named by
//! a keyed hash of them, so one set of credentials is one entry however often it asks); the
//! upstream still decides what they may read.

use super::*;

/// The token anonymous clients get: it stands for nobody.
const ANONYMOUS: &str = "anonymous";
/// How long a token is valid (clients ask again when it runs out or is refused).
pub(super) const TOKEN_TTL: Duration = Duration::from_secs(300);
/// Credentials remembered at once; beyond it expired ones go, then the oldest.
const MAX_TOKENS: usize = 16384;
/// Tokens the mirror issued carry this prefix (others are the upstream's, passed through).
const PREFIX: &str = "hbm-";

pub(super) struct Tokens {
    key: [u8; 32],
    issued: Mutex<HashMap<String, (Principal, Instant)>>,
}

/// What a request's `Authorization` header stands for.
pub(super) enum Who {
    Known(Principal),
    /// A token of ours that ran out (or from before a restart): the client should ask again.
    Expired,
}

impl Tokens {
    pub(super) fn new() -> io::Result<Tokens> {
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key))?;
        Ok(Tokens { key, issued: Mutex::new(HashMap::new()) })
    }

    /// A token for `who` (anonymous, or Basic credentials).
    pub(super) fn issue(&self, who: Principal) -> String {
        let Principal::Basic(user, password) = &who else { return ANONYMOUS.to_string() };
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(user.as_bytes());
        h.update(&[0]);
        h.update(password.as_bytes());
        let token = format!("{PREFIX}{}", h.finalize().to_hex());
        let mut issued = self.issued.lock().expect("tokens lock");
        if issued.len() >= MAX_TOKENS && !issued.contains_key(&token) {
            issued.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
            if issued.len() >= MAX_TOKENS {
                let oldest = issued.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    issued.remove(&k);
                }
            }
        }
        issued.insert(token.clone(), (who, Instant::now()));
        token
    }

    /// Who an `Authorization` header names: Basic credentials as given, a token of ours as the
    /// credentials it was issued for, any other Bearer token as the upstream's.
    pub(super) fn who(&self, header: Option<&str>) -> Who {
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim) else {
            return Who::Known(Principal::from_header(header));
        };
        if token == ANONYMOUS {
            return Who::Known(Principal::Mirror);
        }
        if !token.starts_with(PREFIX) {
            return Who::Known(Principal::Bearer(token.to_string()));
        }
        match self.issued.lock().expect("tokens lock").get(token) {
            Some((who, at)) if at.elapsed() < TOKEN_TTL => Who::Known(who.clone()),
            _ => Who::Expired,
        }
    }
}

impl Mirror {
    /// `GET /_hb/token`: a token for the client's credentials (none: an anonymous one). With
    /// users of its own the mirror checks them here already (as `docker login` expects).
    pub(super) async fn token(&self, req: &Request<Incoming>) -> Response<Body> {
        let who = Principal::from_header(req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()));
        if self.has_users() && !self.is_user(&who).await {
            return unauthorized("this mirror requires its own credentials");
        }
        let token = self.tokens.issue(who);
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_TTL.as_secs(),
        })
        .to_string();
        Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len())
            .header("cache-control", "no-store")
            .body(full(Bytes::from(body)))
            .expect("valid response")
    }
}

/// The challenge of a 401 from this mirror: its token service, at the address the client used.
pub(super) fn challenge(host: Option<&str>, secure: bool) -> HeaderValue {
    let scheme = if secure { "https" } else { "http" };
    host.filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'))
        .and_then(|h| {
            HeaderValue::from_str(&format!("Bearer realm=\"{scheme}://{h}/_hb/token\",service=\"hb-mirror\"")).ok()
        })
        .unwrap_or_else(|| HeaderValue::from_static("Basic realm=\"hb mirror\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> String {
        use base64::Engine;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
    }

    #[test]
    fn tokens_stand_for_the_credentials_they_were_issued_for() {
        let t = Tokens::new().unwrap();
        let anon = t.issue(Principal::Mirror);
        assert!(matches!(t.who(Some(&format!("Bearer {anon}"))), Who::Known(Principal::Mirror)));
        let alice = Principal::Basic("alice".into(), "pw".into());
        let tok = t.issue(alice.clone());
        assert_eq!(tok, t.issue(alice.clone()), "one set of credentials is one token");
        assert_ne!(tok, t.issue(Principal::Basic("alice".into(), "other".into())));
        assert!(matches!(t.who(Some(&format!("Bearer {tok}"))), Who::Known(p) if p == alice));
        // Basic credentials and upstream tokens are taken as before.
        assert!(matches!(t.who(Some(&basic("bob", "x"))), Who::Known(Principal::Basic(u, _)) if u == "bob"));
        assert!(matches!(t.who(Some("Bearer upstream.jwt")), Who::Known(Principal::Bearer(b)) if b == "upstream.jwt"));
        assert!(matches!(t.who(None), Who::Known(Principal::Mirror)));
        // A token of ours it does not know (a restart, another mirror's): ask again.
        assert!(matches!(t.who(Some("Bearer hbm-0000")), Who::Expired));
        // Another mirror's key makes other tokens.
        assert_ne!(Tokens::new().unwrap().issue(alice), tok);
    }

    #[test]
    fn the_challenge_names_the_address_the_client_used_and_refuses_odd_hosts() {
        let c = challenge(Some("10.0.0.1:5090"), false);
        assert_eq!(c, "Bearer realm=\"http://10.0.0.1:5090/_hb/token\",service=\"hb-mirror\"");
        assert!(challenge(Some("m.example"), true).to_str().unwrap().contains("https://m.example/_hb/token"));
        for odd in [None, Some(""), Some("a\"b"), Some("a b")] {
            assert_eq!(challenge(odd, false), "Basic realm=\"hb mirror\"", "{odd:?}");
        }
    }
}
