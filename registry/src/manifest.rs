//! What manifests, indexes and configs say, checked: pure functions over their bytes (the client
//! fetches and verifies the bytes; the fuzzer feeds these any bytes at all).

use hb_core::Digest;
use serde::Deserialize;

use crate::error::RegistryError;
use crate::platform::Platform;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Configs larger than this are refused (a real one is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// One layer as the manifest describes it, with the diff_id its config promises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDesc {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub diff_id: Digest,
}

pub(crate) const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<PlatformJson>,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct PlatformJson {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct ManifestJson {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct ConfigJson {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// An index's choice for a platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// The platform's image manifest (the original, never hb's accelerated one).
    pub digest: String,
    pub platform: String,
    /// hb's accelerated manifest for that platform (digest, size), if the index binds one.
    pub accelerated: Option<(Digest, u64)>,
}

/// An image manifest's parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub media_type: String,
    /// The config blob (its `diff_id` is its digest: a config is not compressed).
    pub config: LayerDesc,
    /// Each layer blob: digest, size, media type.
    pub layers: Vec<(Digest, u64, String)>,
}

/// A manifest or an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Index(Chosen),
    Image(Image),
}

/// Reads a manifest or index of `reference`; from an index, the entry for `wanted`.
pub fn parse(reference: &str, bytes: &[u8], wanted: &Platform) -> Result<Parsed, RegistryError> {
    let malformed = |what: &'static str, reason: String| RegistryError::Malformed {
        reference: reference.to_string(),
        what,
        reason,
    };
    let m: ManifestJson = serde_json::from_slice(bytes).map_err(|e| malformed("manifest", e.to_string()))?;
    if let Some(list) = &m.manifests {
        let for_platform = |d: &&Descriptor| {
            d.platform.as_ref().is_some_and(|p| wanted.matches(&p.os, &p.architecture, p.variant.as_deref()))
        };
        // hb's accelerated manifests sit beside the originals; a pull takes the original.
        let chosen = list.iter().filter(for_platform).find(|d| !d.annotations.contains_key(hb_core::lazy::ANNOTATION));
        // The accelerated form of the chosen manifest: named by its digest (bindings made before
        // that annotation: by platform).
        let accelerated = chosen.and_then(|c| {
            list.iter()
                .filter(|d| d.annotations.get(hb_core::lazy::ANNOTATION).is_some_and(|v| v == "v1"))
                .find(|d| match d.annotations.get(hb_core::lazy::ANNOTATION_MANIFEST) {
                    Some(m) => *m == c.digest,
                    None => for_platform(d),
                })
                .and_then(|d| Some((d.digest.parse().ok()?, d.size)))
        });
        let Some(chosen) = chosen else {
            let available: Vec<String> = list
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| {
                    Platform { os: p.os.clone(), arch: p.architecture.clone(), variant: p.variant.clone() }.to_string()
                })
                .collect();
            return Err(RegistryError::NoPlatform {
                reference: reference.to_string(),
                wanted: wanted.to_string(),
                available: available.join(", "),
            });
        };
        let platform = match &chosen.platform {
            Some(p) => {
                Platform { os: p.os.clone(), arch: p.architecture.clone(), variant: p.variant.clone() }.to_string()
            }
            None => wanted.to_string(),
        };
        // Asked for by digest next: it must be one.
        chosen.digest.parse::<Digest>().map_err(|e| malformed("index", e.to_string()))?;
        return Ok(Parsed::Index(Chosen { digest: chosen.digest.clone(), platform, accelerated }));
    }
    let media_type = if m.media_type.is_empty() { OCI_MANIFEST.to_string() } else { m.media_type.clone() };
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Err(RegistryError::Unsupported { reference: reference.to_string(), what: "manifest", media_type });
    }
    let config_desc = m.config.ok_or_else(|| malformed("manifest", "no config".into()))?;
    let config_digest: Digest =
        config_desc.digest.parse().map_err(|e: hb_core::DigestError| malformed("manifest", e.to_string()))?;
    if config_desc.size > MAX_CONFIG_BYTES {
        return Err(malformed("manifest", format!("config of {} bytes (limit {MAX_CONFIG_BYTES})", config_desc.size)));
    }
    let mut layers = Vec::new();
    for l in m.layers.unwrap_or_default() {
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(RegistryError::Unsupported {
                reference: reference.to_string(),
                what: "layer",
                media_type: l.media_type.clone(),
            });
        }
        let digest = l.digest.parse().map_err(|e: hb_core::DigestError| malformed("manifest", e.to_string()))?;
        layers.push((digest, l.size, l.media_type));
    }
    Ok(Parsed::Image(Image {
        media_type,
        config: LayerDesc {
            digest: config_digest,
            size: config_desc.size,
            media_type: config_desc.media_type,
            diff_id: config_digest,
        },
        layers,
    }))
}

/// Pairs `image`'s layers with the diff_ids its config (`config`, verified bytes) promises.
pub fn pair_layers(reference: &str, image: &Image, config: &[u8]) -> Result<Vec<LayerDesc>, RegistryError> {
    let malformed = |what: &'static str, reason: String| RegistryError::Malformed {
        reference: reference.to_string(),
        what,
        reason,
    };
    let cfg: ConfigJson = serde_json::from_slice(config).map_err(|e| malformed("config", e.to_string()))?;
    if cfg.rootfs.diff_ids.len() != image.layers.len() {
        return Err(malformed(
            "image",
            format!("{} layers but {} diff_ids in the config", image.layers.len(), cfg.rootfs.diff_ids.len()),
        ));
    }
    image
        .layers
        .iter()
        .zip(&cfg.rootfs.diff_ids)
        .map(|((digest, size, media_type), diff_id)| {
            Ok(LayerDesc {
                digest: *digest,
                size: *size,
                media_type: media_type.clone(),
                diff_id: diff_id.parse().map_err(|e: hb_core::DigestError| malformed("config", e.to_string()))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    /// Regression (updates issue): containerd 1.6's `ctr images pull` fetched every manifest of
    /// the platform, so an accelerated image cost plain clients its hb blobs too (206 MB for a
    /// 96 MB update). The binding's entry has a variant no client matches; hb binds by digest.
    #[test]
    fn a_binding_index_hides_the_accelerated_entry_from_platform_matchers_but_hb_finds_it() {
        let original: Digest = d('c').parse().unwrap();
        let accel: Digest = d('b').parse().unwrap();
        let entry = serde_json::json!({"mediaType": crate::OCI_MANIFEST, "digest": original.to_string(), "size": 3,
            "platform": {"os": "linux", "architecture": "amd64"}});
        let idx = crate::binding_index(vec![entry], (&accel, 2), "linux/amd64", &original);
        let v: serde_json::Value = serde_json::from_slice(&idx).unwrap();
        let entries = v["manifests"].as_array().unwrap();
        // What a platform matcher sees (containerd compares os, architecture and variant).
        let matching: Vec<&serde_json::Value> = entries
            .iter()
            .filter(|e| e["platform"]["architecture"] == "amd64" && e["platform"]["variant"].is_null())
            .collect();
        assert_eq!(matching.len(), 1, "only the original matches linux/amd64: {v:#}");
        assert_eq!(matching[0]["digest"], original.to_string());
        let Parsed::Index(c) = parse("r", &idx, &"linux/amd64".parse().unwrap()).unwrap() else { panic!("an index") };
        assert_eq!((c.digest, c.accelerated), (original.to_string(), Some((accel, 2))));
    }

    #[test]
    fn an_index_chooses_the_original_for_the_platform_and_notes_the_accelerated_form() {
        let idx = format!(
            r#"{{"manifests":[
              {{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
              {{"digest":"{}","size":2,"platform":{{"os":"linux","architecture":"amd64"}},"annotations":{{"{}":"v1"}}}},
              {{"digest":"{}","size":3,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d('a'),
            d('b'),
            hb_core::lazy::ANNOTATION,
            d('c')
        );
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let Parsed::Index(c) = parse("r", idx.as_bytes(), &amd64).unwrap() else { panic!("an index") };
        assert_eq!((c.digest, c.platform.as_str()), (d('c'), "linux/amd64"));
        assert_eq!(c.accelerated, Some((d('b').parse().unwrap(), 2)));
        let s390: Platform = "linux/s390x".parse().unwrap();
        let e = parse("r", idx.as_bytes(), &s390).unwrap_err().to_string();
        assert!(e.contains("linux/arm64") && e.contains("linux/amd64"), "{e}");
        let bad = idx.replace(&d('c'), "sha256:nothex");
        assert!(matches!(parse("r", bad.as_bytes(), &amd64), Err(RegistryError::Malformed { what: "index", .. })));
    }

    #[test]
    fn an_image_pairs_its_layers_with_the_configs_diff_ids() {
        let m = format!(
            r#"{{"config":{{"digest":"{}","size":10}},"layers":[{{"mediaType":"{}","digest":"{}","size":5}}]}}"#,
            d('1'),
            LAYER_TYPES[1],
            d('2')
        );
        let Parsed::Image(img) = parse("r", m.as_bytes(), &Platform::default()).unwrap() else { panic!("an image") };
        assert_eq!((img.media_type.as_str(), img.layers.len()), (OCI_MANIFEST, 1));
        let cfg = format!(r#"{{"rootfs":{{"diff_ids":["{}"]}}}}"#, d('3'));
        let layers = pair_layers("r", &img, cfg.as_bytes()).unwrap();
        assert_eq!(layers[0].diff_id.to_string(), d('3'));
        let two = format!(r#"{{"rootfs":{{"diff_ids":["{}","{}"]}}}}"#, d('3'), d('4'));
        assert!(pair_layers("r", &img, two.as_bytes()).unwrap_err().to_string().contains("1 layers but 2 diff_ids"));
        let foreign = m.replace(LAYER_TYPES[1], "application/x-foreign");
        assert!(matches!(parse("r", foreign.as_bytes(), &Platform::default()), Err(RegistryError::Unsupported { .. })));
    }
}
