//! Who may read what: anonymous clients with the mirror's own credentials, others as the
//! upstream answers for them (remembered for `auth_ttl`).

use super::*;

impl Mirror {
    /// Whether `who` is one of the mirror's own users (`[[proxy.user]]`), by name and password:
    /// the password as configured, or checked against its bcrypt hash (`$2y$...`, as htpasswd
    /// writes them; see [`hash_password`]).
    pub(super) async fn is_user(&self, who: &Principal) -> bool {
        let Principal::Basic(u, p) = who else { return false };
        // Copied out: a hash is checked without holding the lock a reload takes.
        let stored: Vec<String> = {
            let live = self.live.read().expect("live lock");
            live.users
                .iter()
                .filter(|(n, _)| constant_time_eq(n.as_bytes(), u.as_bytes()))
                .map(|(_, w)| w.clone())
                .collect()
        };
        for w in stored {
            if !is_bcrypt(&w) {
                if constant_time_eq(w.as_bytes(), p.as_bytes()) {
                    return true;
                }
                continue;
            }
            let key = *blake3::hash(format!("{u}\0{p}\0{w}").as_bytes()).as_bytes();
            let known = self.verified.lock().expect("verified lock").get(&key).copied();
            // A verdict is kept; a refusal for a minute only (a password may be fixed upstream).
            let ok = match known {
                Some((ok, at)) if ok || at.elapsed() < Duration::from_secs(60) => ok,
                _ => {
                    // Tens of milliseconds of CPU: off the threads that serve requests.
                    let pw = p.clone();
                    let ok = tokio::task::spawn_blocking(move || bcrypt::verify(pw, &w).unwrap_or(false))
                        .await
                        .unwrap_or(false);
                    let mut v = self.verified.lock().expect("verified lock");
                    if v.len() >= 4096 {
                        v.clear();
                    }
                    v.insert(key, (ok, Instant::now()));
                    ok
                }
            };
            if ok {
                return true;
            }
        }
        false
    }

    /// Whether `who` may read `route.repo`'s cached content: the mirror's own credentials
    /// count for anonymous clients; otherwise the upstream is asked (HEAD of `probe`) and its
    /// answer remembered for `auth_ttl`. A repository that answered anonymous clients before
    /// stays open to them while the upstream is down.
    pub(super) async fn authorize(&self, route: &Route, who: &Principal, probe: &str) -> Result<(), Response<Body>> {
        let up = &self.upstreams[route.upstream];
        if who.is_anonymous() && up.cfg.credentials.is_some() {
            return Ok(());
        }
        let key = (route.upstream, route.repo.clone(), who.clone());
        if let Some((ok, at)) = self.auth.lock().expect("auth lock").get(&key) {
            if at.elapsed() < self.cfg.auth_ttl {
                return if *ok { Ok(()) } else { Err(unauthorized("the upstream refuses these credentials")) };
            }
        }
        let pq = format!("/v2/{}/{probe}", route.repo);
        let ok = match up.send(Method::HEAD, &route.repo, &pq, Default::default(), who).await {
            Ok(r) => !matches!(r.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
            Err(e) => {
                let public = who.is_anonymous() && self.is_public(route);
                tracing::warn!(upstream = %up.cfg.host, repo = %route.repo, error = %e, public, "cannot ask the upstream who may read; serving only what was public");
                if public {
                    return Ok(());
                }
                return Err(oci_error(
                    StatusCode::BAD_GATEWAY,
                    "UNAVAILABLE",
                    &format!("cannot check access to {} with the upstream: {e}", route.repo),
                ));
            }
        };
        self.remember(route, who, ok);
        if ok {
            Ok(())
        } else {
            Err(unauthorized("the upstream refuses access to this repository"))
        }
    }

    pub(super) fn remember(&self, route: &Route, who: &Principal, ok: bool) {
        {
            let mut auth = self.auth.lock().expect("auth lock");
            if auth.len() >= 4096 {
                // Expired answers are worth nothing: keep the map to the live ones.
                let ttl = self.cfg.auth_ttl;
                auth.retain(|_, (_, at)| at.elapsed() < ttl);
            }
            auth.insert((route.upstream, route.repo.clone(), who.clone()), (ok, Instant::now()));
        }
        if ok && who.is_anonymous() && !self.is_public(route) {
            let _ = self.store.put_meta(&self.public_key(route), b"1");
        }
    }

    pub(super) fn public_key(&self, route: &Route) -> String {
        format!("mirror/public/{}/{}", self.cfg.upstreams[route.upstream].host, route.repo)
    }

    pub(super) fn is_public(&self, route: &Route) -> bool {
        matches!(self.store.meta(&self.public_key(route)), Ok(Some(_)))
    }
}

/// Whether a configured password is a bcrypt hash rather than the password itself.
pub fn is_bcrypt(password: &str) -> bool {
    ["$2a$", "$2b$", "$2x$", "$2y$"].iter().any(|p| password.starts_with(p)) && password.len() == 60
}

/// A bcrypt hash of `password` for `[[proxy.user]]` (`hb proxy hash-password`), cost 10 as
/// htpasswd's `-B`.
pub fn hash_password(password: &str) -> Result<String, MirrorError> {
    bcrypt::hash(password, 10).map_err(|e| MirrorError::Config(format!("hashing the password: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hashed_passwords_verify_and_plain_ones_are_not_taken_for_hashes() {
        let h = super::hash_password("s3cret").unwrap();
        assert!(super::is_bcrypt(&h), "{h}");
        assert!(bcrypt::verify("s3cret", &h).unwrap() && !bcrypt::verify("other", &h).unwrap());
        // htpasswd -nbB writes $2y$.
        assert!(super::is_bcrypt("$2y$05$abcdefghijklmnopqrstuu5vX0F7aKpYm1Q4Hn1K8xJ3x0vKJmG6C"));
        assert!(!super::is_bcrypt("$2y$-but-a-password") && !super::is_bcrypt("plain"));
    }
}
