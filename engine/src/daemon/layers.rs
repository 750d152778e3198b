//! containerd's remote snapshots: the snapshotter's `Remote`, served by the daemon's image mounts.

use super::*;

/// The daemon as the snapshotter's source of lazy layers.
pub(super) struct DaemonLayers(pub(super) Arc<Daemon>);

impl hb_snapshotter::Remote for DaemonLayers {
    fn layer(
        &self,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<hb_snapshotter::RemoteLayer>, String> {
        let found = self.0.remote_layer(labels).map_err(|e| {
            self.0.metrics.error("remote_snapshot");
            crate::error_chain(&e)
        })?;
        // The image's top layer: containerd will want the whole image next (a container on it);
        // mount it now, so the mount and its start-up prefetch are under way by then.
        if let Some((layer, total)) = &found {
            if layer.index + 1 == *total {
                let (d, image) = (self.0.clone(), layer.image.clone());
                std::thread::spawn(move || {
                    let req = MountRequest {
                        image,
                        pull: Default::default(),
                        platform: None,
                        plain_http: false,
                        root: None,
                        layers: None,
                        spare: false,
                    };
                    if let Err(e) = d.image_mount(&req) {
                        tracing::warn!(error = %crate::error_chain(&e), "mounting a lazily pulled image ahead failed");
                    }
                });
            }
        }
        Ok(found.map(|(l, _)| l))
    }

    fn mount(&self, image: &str, layers: usize) -> Result<PathBuf, String> {
        let req = MountRequest {
            image: image.into(),
            pull: Default::default(),
            platform: None,
            plain_http: false,
            root: None,
            layers: Some(layers),
            spare: false,
        };
        self.0.image_mount(&req).map(|m| m.path).map_err(|e| {
            self.0.metrics.error("mount");
            crate::error_chain(&e)
        })
    }

    fn usage(&self, layer: &hb_snapshotter::RemoteLayer) -> Result<(i64, i64), String> {
        let inner = || -> anyhow::Result<(i64, i64)> {
            let (_, _, rec) = crate::require_image(&self.0.store, &layer.image)?;
            let diff_id = rec.layers.get(layer.index).context("no such layer")?.diff_id;
            let idx = self.0.store.layer(&diff_id)?.with_context(|| format!("layer {diff_id} is missing"))?;
            let mut bytes = 0i64;
            for c in &idx.chunks {
                if self.0.store.has_chunk(&c.id)? {
                    bytes += i64::from(c.len);
                }
            }
            Ok((bytes, idx.entries.len() as i64))
        };
        inner().map_err(|e| crate::error_chain(&e))
    }

    fn release(&self, image: &str) {
        // containerd no longer uses the image: its name goes from hb's store (a daemon gc frees
        // what no other image shares), unless something else of hb's mounts it.
        let d = &self.0;
        if !d.for_containerd.lock().expect("lock").remove(image) {
            return;
        }
        let mounted = d.mounts.lock().expect("mounts lock").values().any(|m| m.image == image && d.users(m) > 0);
        if mounted {
            return;
        }
        match d.remove_images(&RemoveRequest { images: vec![image.to_string()] }) {
            Ok(lines) => lines.iter().for_each(|l| tracing::info!("{l} (containerd removed its snapshots)")),
            Err(e) => {
                tracing::warn!(image, error = %crate::error_chain(&e), "releasing an image containerd no longer uses")
            }
        }
    }
}
