//! Lazy pulls of any image through the mirror: an hb client asks a tag with
//! `Accept: application/vnd.hyperbox.image.v1; platform=os/arch` beside the usual manifest
//! types, and gets an index that binds the platform's manifest to an accelerated form the mirror
//! made on first request (`docs/formats/lazy-image.md`): the layers are imported into the store,
//! their indexes and chunk tables kept as objects, and their data blobs are *virtual*, served by
//! range from the stored chunks, each checked against its id first. Other clients never see the
//! derived index: they get the upstream's manifest, byte for byte.

use std::sync::Arc;

use bytes::Bytes;
use hb_core::lazy::{AccelConfig, AccelLayer, ARTIFACT_TYPE};
use hb_core::Digest;
use serde::{Deserialize, Serialize};

use super::upstream::Principal;
use super::{learned, Mirror, Route};

/// A data blob served from stored chunks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Virtual {
    pub table: String,
    /// The layer's index (absent in records of older builds, whose tables name their chunks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
    pub diff_id: String,
    pub size: u64,
}

/// A derived index made before, and every object it needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Derived {
    index: String,
    needs: Vec<String>,
    /// The platform's image manifest and its accelerated config (absent in records of older
    /// builds, which are then never re-published with a learned order).
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    config: Option<String>,
    /// The start-up order blob the config names, if any.
    #[serde(default)]
    startup: Option<String>,
}

/// The platform an hb client asks an accelerated form for, from its `Accept`.
pub fn wanted_platform(accept: Option<&str>) -> Option<String> {
    accept?.split(',').find_map(|item| {
        let mut parts = item.split(';').map(str::trim);
        if parts.next()? != ARTIFACT_TYPE {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("platform=")).map(|p| p.trim_matches('"').to_string())
    })
}

fn matches(p: &serde_json::Value, want: &str) -> bool {
    let mut w = want.split('/');
    let (os, arch, variant) = (w.next(), w.next(), w.next());
    p["os"].as_str() == os
        && p["architecture"].as_str() == arch
        && (variant.is_none() || p["variant"].as_str() == variant)
}

fn digest_of(v: &serde_json::Value) -> Result<Digest, String> {
    v["digest"].as_str().and_then(|d| d.parse().ok()).ok_or_else(|| format!("bad descriptor {v}"))
}

impl Mirror {
    pub(super) fn load_virtuals(&self) {
        let map: std::collections::HashMap<String, Virtual> = self
            .store
            .meta("mirror/virtuals")
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut v = self.virtuals.lock().expect("virtuals lock");
        let mut objects = self.objects.lock().expect("objects lock");
        for (d, x) in map {
            if let Ok(d) = d.parse::<Digest>() {
                objects.entry(d).or_insert((x.size, 0));
                v.insert(d, x);
            }
        }
    }

    pub(super) fn save_virtuals(&self) {
        let map: std::collections::HashMap<String, Virtual> =
            self.virtuals.lock().expect("virtuals lock").iter().map(|(d, v)| (d.to_string(), v.clone())).collect();
        if let Err(e) = self.store.put_meta("mirror/virtuals", &serde_json::to_vec(&map).expect("serialisable")) {
            tracing::error!(error = %e, "saving the list of converted layers failed");
        }
    }

    /// Waits until blob `d` is kept, downloading it (or joining its download) if needed.
    async fn ensure_kept(self: &Arc<Self>, route: &Route, d: Digest, who: &Principal) -> Result<(), String> {
        if self.objects.lock().expect("objects lock").contains_key(&d) {
            return Ok(());
        }
        let (flight, _) = self.flight_for(route, d, who).map_err(|e| e.to_string())?;
        let mut rx = flight.state.subscribe();
        loop {
            if let Some(done) = rx.borrow_and_update().done.clone() {
                return done.map_err(|e| e.message);
            }
            if rx.changed().await.is_err() {
                return Err(format!("the download of {d} stopped"));
            }
        }
    }

    /// The index binding manifest `digest` (bytes `body`) for `platform` to its accelerated
    /// form, made now if it was not made before (once at a time per image).
    pub(super) async fn derived_index(
        self: &Arc<Self>,
        route: &Route,
        digest: &Digest,
        body: &Bytes,
        platform: &str,
        who: &Principal,
    ) -> Result<(Digest, Bytes), String> {
        let key = format!("mirror/accel/{digest}/{platform}");
        let _one = self.one_at_a_time(&key).await;
        let made: Option<Derived> = self.store.meta(&key).ok().flatten().and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(m) = made {
            let all_kept = {
                let objects = self.objects.lock().expect("objects lock");
                m.needs.iter().chain([&m.index]).all(|d| d.parse().is_ok_and(|d: Digest| objects.contains_key(&d)))
            };
            if all_kept {
                if let Some(republished) = self.with_learned_order(&key, &m, platform).await? {
                    return Ok(republished);
                }
                let d: Digest = m.index.parse().map_err(|e| format!("{e}"))?;
                return Ok((d, self.read_all(&d).await.map_err(|e| e.to_string())?));
            }
        }
        let started = std::time::Instant::now();
        let m: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("manifest: {e}"))?;
        // The platform's manifest, and the entries the derived index keeps.
        let (image, entries): (serde_json::Value, Vec<serde_json::Value>) = match m["manifests"].as_array() {
            Some(list) => {
                let chosen = list
                    .iter()
                    .find(|e| {
                        matches(&e["platform"], platform) && e["annotations"][hb_core::lazy::ANNOTATION].is_null()
                    })
                    .ok_or_else(|| format!("no {platform} manifest in the index"))?;
                let d = digest_of(chosen)?;
                let bytes = match self.read_all(&d).await {
                    Ok(b) => b,
                    Err(_) => {
                        self.fetch_manifest(route, &d.to_string(), who, None, Some(&d))
                            .await
                            .map_err(|r| format!("manifest {d}: HTTP {}", r.status()))?
                            .2
                    }
                };
                let image = serde_json::from_slice(&bytes).map_err(|e| format!("manifest {d}: {e}"))?;
                (
                    image,
                    list.iter().filter(|e| e["annotations"][hb_core::lazy::ANNOTATION].is_null()).cloned().collect(),
                )
            }
            None => {
                let media_type = m["mediaType"].as_str().unwrap_or(hb_registry::OCI_MANIFEST).to_string();
                let entry = serde_json::json!({
                    "mediaType": media_type, "digest": digest.to_string(), "size": body.len(),
                    "platform": hb_registry::platform_json(platform),
                });
                (m.clone(), vec![entry])
            }
        };
        let image_digest = match m["manifests"].as_array() {
            Some(_) => digest_of(entries.iter().find(|e| matches(&e["platform"], platform)).expect("chosen above"))?,
            None => *digest,
        };
        let config = digest_of(&image["config"])?;
        let layers: Vec<Digest> = image["layers"]
            .as_array()
            .ok_or("the manifest has no layers")?
            .iter()
            .map(digest_of)
            .collect::<Result<_, _>>()?;
        self.ensure_kept(route, config, who).await?;
        let cfg: serde_json::Value = serde_json::from_slice(&self.read_all(&config).await.map_err(|e| e.to_string())?)
            .map_err(|e| format!("config: {e}"))?;
        let diff_ids: Vec<Digest> = cfg["rootfs"]["diff_ids"]
            .as_array()
            .ok_or("the config has no diff_ids")?
            .iter()
            .map(|d| d.as_str().and_then(|d| d.parse().ok()).ok_or_else(|| format!("bad diff_id {d}")))
            .collect::<Result<_, _>>()?;
        if diff_ids.len() != layers.len() {
            return Err(format!("{} layers but {} diff_ids", layers.len(), diff_ids.len()));
        }
        let mut accel_layers: Vec<AccelLayer> = Vec::new();
        for (blob, diff_id) in layers.iter().zip(&diff_ids) {
            self.ensure_kept(route, *blob, who).await?;
            let (b, d) = (*blob, *diff_id);
            let a = self.blocking(move |s| s.accelerate(&b, &d)).await.map_err(|e| format!("layer {blob}: {e}"))?;
            {
                let mut objects = self.objects.lock().expect("objects lock");
                objects.insert(a.index, (a.index_size, super::now()));
                objects.insert(a.table, (a.table_size, super::now()));
                objects.insert(a.data, (a.data_size, super::now()));
            }
            self.virtuals.lock().expect("virtuals lock").insert(
                a.data,
                Virtual {
                    table: a.table.to_string(),
                    index: Some(a.index.to_string()),
                    diff_id: diff_id.to_string(),
                    size: a.data_size,
                },
            );
            accel_layers.push(a);
        }
        self.save_virtuals();
        let startup = self.learned_order(&image_digest);
        let accel_cfg = AccelConfig { version: 1, manifest: image_digest, config, layers: accel_layers, startup };
        let out = self.publish(&key, &accel_cfg, entries, platform).await?;
        tracing::info!(image = %image_digest, platform, layers = layers.len(), ms = started.elapsed().as_millis() as u64, "made an accelerated form for hb clients");
        self.stats.conversions.inc();
        Ok(out)
    }

    /// Stores accelerated config `cfg`, its manifest and the index binding it to `entries` (the
    /// upstream's own manifests) for `platform`, and records them under `key`.
    async fn publish(
        &self,
        key: &str,
        cfg: &AccelConfig,
        entries: Vec<serde_json::Value>,
        platform: &str,
    ) -> Result<(Digest, Bytes), String> {
        let cfg_bytes = serde_json::to_vec(cfg).expect("serialisable");
        let manifest = hb_registry::accel_manifest(cfg, &cfg_bytes);
        let manifest_digest = Digest::of(&manifest);
        let index =
            hb_registry::binding_index(entries, (&manifest_digest, manifest.len() as u64), platform, &cfg.manifest);
        let index_digest = Digest::of(&index);
        let config_digest = Digest::of(&cfg_bytes);
        let mut needs: Vec<String> = vec![config_digest.to_string(), manifest_digest.to_string()];
        for l in &cfg.layers {
            needs.extend([l.index.to_string(), l.table.to_string(), l.data.to_string()]);
        }
        if let Some((d, _)) = cfg.startup {
            needs.push(d.to_string());
        }
        for (bytes, media_type) in [
            (cfg_bytes, None),
            (manifest, Some(hb_registry::OCI_MANIFEST)),
            (index.clone(), Some(hb_registry::OCI_INDEX)),
        ] {
            let d = Digest::of(&bytes);
            let size = bytes.len() as u64;
            self.blocking(move |s| {
                if let Some(mt) = media_type {
                    s.put_meta(&format!("mirror/type/{d}"), mt.as_bytes())?;
                }
                s.insert(&d, &mut &bytes[..])
            })
            .await
            .map_err(|e| e.to_string())?;
            self.objects.lock().expect("objects lock").insert(d, (size, super::now()));
        }
        let rec = Derived {
            index: index_digest.to_string(),
            needs,
            image: Some(cfg.manifest.to_string()),
            config: Some(config_digest.to_string()),
            startup: cfg.startup.map(|(d, _)| d.to_string()),
        };
        let _ = self.store.put_meta(key, &serde_json::to_vec(&rec).expect("serialisable"));
        let _ = self.store.put_meta(&learned::accel_key(&cfg.manifest), config_digest.to_string().as_bytes());
        Ok((index_digest, Bytes::from(index)))
    }

    /// `m` made again with the start-up order a client taught this mirror since, if there is
    /// one it lacks; None when `m` is current.
    async fn with_learned_order(
        &self,
        key: &str,
        m: &Derived,
        platform: &str,
    ) -> Result<Option<(Digest, Bytes)>, String> {
        let (Some(image), Some(config)) = (&m.image, &m.config) else { return Ok(None) };
        let Ok(image) = image.parse::<Digest>() else { return Ok(None) };
        let Some(order) = self.learned_order(&image) else { return Ok(None) };
        if m.startup.as_deref() == Some(order.0.to_string().as_str()) {
            return Ok(None);
        }
        let config: Digest = config.parse().map_err(|e| format!("{e}"))?;
        let mut cfg: AccelConfig = serde_json::from_slice(&self.read_all(&config).await.map_err(|e| e.to_string())?)
            .map_err(|e| format!("accelerated config {config}: {e}"))?;
        if cfg.startup.is_some() {
            return Ok(None);
        }
        cfg.startup = Some(order);
        let index: Digest = m.index.parse().map_err(|e| format!("{e}"))?;
        let old: serde_json::Value = serde_json::from_slice(&self.read_all(&index).await.map_err(|e| e.to_string())?)
            .map_err(|e| format!("index {index}: {e}"))?;
        let entries: Vec<serde_json::Value> = old["manifests"]
            .as_array()
            .map(|l| l.iter().filter(|e| e["annotations"][hb_core::lazy::ANNOTATION].is_null()).cloned().collect())
            .unwrap_or_default();
        tracing::info!(%image, platform, "serving the learned start-up order to hb clients");
        self.publish(key, &cfg, entries, platform).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_platform_comes_from_accept() {
        let a = format!("application/vnd.oci.image.index.v1+json, {ARTIFACT_TYPE}; platform=linux/arm64/v8");
        assert_eq!(wanted_platform(Some(&a)).as_deref(), Some("linux/arm64/v8"));
        assert_eq!(wanted_platform(Some("application/vnd.oci.image.index.v1+json")), None);
        assert_eq!(wanted_platform(None), None);
        assert!(matches(&serde_json::json!({"os": "linux", "architecture": "amd64"}), "linux/amd64"));
        assert!(!matches(
            &serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v7"}),
            "linux/arm64/v8"
        ));
    }
}
