//! Image mounts: one mount server process per image, shared by its containers, adopted again
//! after a restart, unmounted when idle; remote layers for containerd.

use super::*;

/// How long after a standby mount process is used the next one starts.
const STANDBY_AFTER: Duration = Duration::from_secs(2);

impl Daemon {
    /// The image's mount, started (and the image pulled) if needed.
    /// The live mount `req` asks for, if there is one (no pull, no mount: cheap enough to answer
    /// on the API's own thread, which is what `hb run` asks for most).
    pub(super) fn existing_mount(&self, req: &MountRequest) -> anyhow::Result<Option<ImageMount>> {
        let Some((_, digest)) = crate::find_image(&self.store, &req.image)? else { return Ok(None) };
        let key = match req.layers {
            Some(n) => format!("{digest}/{n}"),
            None => digest.to_string(),
        };
        // (A request for all N layers of an N-layer image misses here; the slow path keys it as
        // the whole image.)
        Ok(self.live_mount(key))
    }

    /// The mount recorded under `key` if its server is alive and it is still mounted; marked as
    /// used now.
    pub(super) fn live_mount(&self, key: String) -> Option<ImageMount> {
        let m = self.mounts.lock().expect("mounts lock").get(&key).cloned()?;
        if !(pid_alive(m.pid) && hb_fuse::is_mountpoint(&m.path)) {
            return None;
        }
        self.last_used.lock().expect("lock").insert(key, Instant::now());
        Some(m)
    }

    /// Containers using an image mount: overlays over it, its spares not counted.
    pub(super) fn users(&self, m: &ImageMount) -> usize {
        let spares = self.spares.lock().expect("spares lock").get(&m.key()).map_or(0, Vec::len);
        overlay_users(&m.path).saturating_sub(spares)
    }

    pub(super) fn image_mount(&self, req: &MountRequest) -> anyhow::Result<ImageMount> {
        self.note_plain(&req.image, req.plain_http);
        let one = self.prepare();
        let platform = req
            .platform
            .as_deref()
            .map(|p| p.parse::<hb_registry::Platform>().map_err(|e| anyhow::Error::new(BadRequest(e))))
            .transpose()?;
        let present = !crate::mount::needs_pull(&self.store, &req.image, platform.as_ref())?;
        if !req.pull.pull_now(&req.image, present)? {
            one.nothing_to_learn();
        } else {
            crate::mount::pull_for_mount(
                &self.hosts(),
                &self.work,
                &self.store,
                &req.image,
                req.plain_http,
                platform.as_ref(),
                &Silent,
            )?;
            self.metrics.pulls.fetch_add(1, Ordering::Relaxed);
            self.dirty.store(true, Ordering::SeqCst);
        }
        let (name, digest, rec) = crate::require_image(&self.store, &req.image)?;
        // The first N layers of an N-layer image are the image.
        let layers = req.layers.filter(|n| *n < rec.layers.len());
        if layers == Some(0) {
            bail!("cannot mount the first 0 layers of {name}");
        }
        let key = match layers {
            Some(n) => format!("{digest}/{n}"),
            None => digest.to_string(),
        };
        if let Some(m) = self.live_mount(key.clone()) {
            return Ok(m);
        }
        // No flush of the metadata first (the reaper flushes within seconds): the new server's
        // read-only view replays the log instead, which costs it less than the flush's table
        // writes and fsyncs cost the start (Prepare to mounted: ~130 -> ~115 ms, py-app).
        let dir_name = match layers {
            Some(n) => format!("{}-{n}", &digest.hex()[..16]),
            None => digest.hex()[..16].to_string(),
        };
        let path = images_dir(&self.root).join(dir_name);
        let _ = hb_fuse::clean_stale(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let plain_http = req.plain_http || self.known_plain(&req.image);
        let pid = self.start_mount_server(&req.image, &path, plain_http, layers)?;
        let m = ImageMount {
            image: name,
            digest: digest.to_string(),
            path: path.clone(),
            pid,
            config: rec.config,
            users: 0,
            layers,
            spare: None,
        };
        std::fs::write(path.with_extension("json"), serde_json::to_vec_pretty(&m)?)?;
        self.mounts.lock().expect("mounts lock").insert(key.clone(), m.clone());
        self.last_used.lock().expect("lock").insert(key, Instant::now());
        Ok(m)
    }

    /// The layer a containerd Prepare describes (image reference and layer digest labels, CRI's
    /// or the stargz family's), if hb can serve it lazily: the image has an accelerated form
    /// (its indexes are pulled now) or is in the store already. Also answers the image's layer
    /// count.
    pub(super) fn remote_layer(
        &self,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<Option<(hb_snapshotter::RemoteLayer, usize)>> {
        let get = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
        let (Some(image), Some(layer)) = (
            get(&["containerd.io/snapshot/cri.image-ref", "containerd.io/snapshot/remote/stargz.reference"]),
            get(&["containerd.io/snapshot/cri.layer-digest", "containerd.io/snapshot/remote/stargz.digest"]),
        ) else {
            tracing::debug!(?labels, "a remote-snapshot Prepare without image and layer labels");
            return Ok(None);
        };
        let one = self.prepare();
        if crate::find_image(&self.store, &image)?.is_some() {
            one.nothing_to_learn();
        } else {
            let r = hb_registry::ImageRef::parse(&image)?;
            let creds = crate::config::docker_credentials(r.registry())?;
            let eps = self.hosts().endpoints(&r, false, creds, hb_registry::Platform::default())?;
            let (registry, resolved) = crate::pull::resolve(&self.work, eps)?;
            tracing::debug!(target: hb_images::mount::PHASE, %image, "resolved");
            // (Through a mirror, the mirror's protocol says nothing of the registry's.)
            if registry.plain_http() && resolved.reference.mirror().is_none() {
                self.learned_plain(r.registry());
            }
            if resolved.accelerated.is_none() {
                one.nothing_to_learn();
                tracing::info!(%image, "no accelerated form: containerd unpacks its layers");
                return Ok(None);
            }
            let report = self.pull_lazy(registry, resolved)?;
            tracing::debug!(target: hb_images::mount::PHASE, %image, layers = report.layers_lazy, bytes = report.bytes_downloaded, "indexes fetched");
            self.metrics.pulls.fetch_add(1, Ordering::Relaxed);
            self.dirty.store(true, Ordering::SeqCst);
            tracing::info!(%image, summary = %crate::pull::lazy_summary(&report), "pulled lazily for containerd");
            self.for_containerd.lock().expect("lock").insert(image.clone());
        }
        let (_, _, rec) = crate::require_image(&self.store, &image)?;
        let total = rec.layers.len();
        Ok(rec
            .layers
            .iter()
            .position(|l| l.digest.to_string() == layer)
            .map(|index| (hb_snapshotter::RemoteLayer { image, index }, total)))
    }

    /// Starts `hb mount IMAGE DIR` as a process of its own (not the daemon's child in any way
    /// that matters: own process group, its own log) and returns once it serves.
    pub(super) fn start_mount_server(
        &self,
        image: &str,
        dir: &Path,
        plain_http: bool,
        layers: Option<usize>,
    ) -> anyhow::Result<u32> {
        let mut flags: Vec<String> = Vec::new();
        if plain_http {
            flags.push("--plain-http".into());
        }
        if let Some(n) = layers {
            flags.extend(["--layers".to_string(), n.to_string()]);
        }
        // The standby takes its arguments as JSON strings: a folder that is not UTF-8 gets a server
        // started with it as an argument instead.
        let standby = match dir.to_str() {
            Some(d) => self.standby.lock().expect("standby lock").take().map(|s| (s, d)),
            None => None,
        };
        let served = match standby {
            Some((s, d)) => {
                let args: Vec<String> = [image.to_string(), d.to_string()].into_iter().chain(flags.clone()).collect();
                // The next one starts off the path of this start (two cores: not beside it).
                let d = self.this.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(STANDBY_AFTER);
                    if let Some(d) = d.upgrade() {
                        d.start_standby();
                    }
                });
                s.serve(&self.root, dir, &args)
            }
            None => Ok(None),
        };
        let (mut child, _) = match served {
            Ok(Some(started)) => Ok(started),
            // No standby (or it had ended): a server started now.
            Ok(None) => {
                let mut cmd = std::process::Command::new(crate::self_exe());
                crate::pass_globals(&mut cmd, &self.g, &self.root);
                cmd.arg("mount").arg(image).arg(dir).args(&flags);
                crate::mount::start_server(&mut cmd, &self.root, dir)
            }
            Err(e) => Err(e),
        }
        .with_context(|| format!("starting the mount server for {image}"))?;
        // Reaped by a thread of ours when it ends (it normally outlives us).
        let pid = child.id();
        std::thread::spawn(move || child.wait());
        Ok(pid)
    }

    /// Starts the next image mount's server ahead of need, unless one waits already or the
    /// daemon is stopping. Best effort: without one, a mount starts its server itself.
    pub(super) fn start_standby(&self) {
        // Not with the standby lock held: `stopping` is held while a spare is prepared, and a
        // mount waiting for the standby must not wait for that.
        if *self.stopping.lock().expect("stopping lock") {
            return;
        }
        let mut standby = self.standby.lock().expect("standby lock");
        if standby.is_some() {
            return;
        }
        let mut cmd = std::process::Command::new(crate::self_exe());
        crate::pass_globals(&mut cmd, &self.g, &self.root);
        cmd.arg("mount-standby");
        match crate::mount::Standby::start(&mut cmd, &self.root) {
            Ok(s) => *standby = Some(s),
            Err(e) => tracing::warn!(error = %e, "starting a standby mount process failed; mounts start their own"),
        }
    }

    /// Current image mounts with their users counted.
    pub(super) fn list_mounts(&self) -> Vec<ImageMount> {
        let mut v: Vec<ImageMount> = self.mounts.lock().expect("mounts lock").values().cloned().collect();
        for m in &mut v {
            m.users = self.users(m);
        }
        v.sort_by(|a, b| a.image.cmp(&b.image));
        v
    }

    /// Unmounts an image mount (refused while a container uses it, unless `force`).
    pub(super) fn unmount(&self, digest: &str, force: bool) -> anyhow::Result<()> {
        let m = self.mounts.lock().expect("mounts lock").get(digest).cloned();
        let Some(m) = m else { return Err(NotFound(format!("no image mount {digest}")).into()) };
        // A spare an `hb run` claimed is a user: known once its advertisement is withdrawn.
        self.withdraw_all();
        let users = self.users(&m);
        if users > 0 && !force {
            bail!("image mount of {} is used by {users} containers", m.image);
        }
        self.release_spares(Some(digest));
        crate::mount::umount(&self.root, &m.path, &Silent)?;
        let _ = std::fs::remove_dir(&m.path);
        let _ = std::fs::remove_file(m.path.with_extension("json"));
        self.mounts.lock().expect("mounts lock").remove(digest);
        Ok(())
    }

    /// Unmounts image mounts no container has used for `idle`.
    pub(super) fn reap_idle(&self) {
        let now = Instant::now();
        for m in self.list_mounts() {
            let mut last = self.last_used.lock().expect("lock");
            let seen = last.entry(m.key()).or_insert(now);
            if m.users > 0 {
                *seen = now;
                continue;
            }
            if now.duration_since(*seen) >= self.idle {
                drop(last);
                tracing::info!(image = %m.image, "unmounting an idle image mount");
                if let Err(e) = self.unmount(&m.key(), false) {
                    tracing::warn!(image = %m.image, error = %e, "unmounting an idle image mount failed");
                }
            }
        }
    }
}
