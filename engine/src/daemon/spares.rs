//! Spare container folders: an overlay ready over an image mount before `hb run` asks, advertised
//! to it, claimed, refilled, released when unused.

use super::*;

impl Daemon {
    /// A spare container folder for the image of `m`, if one is ready; another is prepared for
    /// the next container in the background (at the lowest priority: it waits for idle CPU).
    pub(super) fn take_spare(&self, m: &ImageMount, image: &str, plain_http: bool) -> Option<PathBuf> {
        let key = m.key();
        let spare = loop {
            let Some(s) = self.spares.lock().expect("spares lock").get_mut(&key).and_then(Vec::pop) else { break None };
            // Handed out either way: to this caller, or to the `hb run` that claimed it first.
            self.handed.lock().expect("handed lock").push((s.clone(), Instant::now()));
            if self.withdraw(&s) {
                break Some(s);
            }
        };
        self.refill(Refill { key, lower: m.path.clone(), image: image.to_string(), plain_http });
        spare
    }

    /// Has a spare prepared for `r`'s image mount unless one is being prepared already.
    pub(super) fn refill(&self, r: Refill) {
        if self.refilling.lock().expect("refilling lock").insert(r.key.clone()) {
            let _ = self.refill.send(r);
        }
    }

    /// Makes spare `dir` of image mount `r.key` the daemon's: on the spares (for `take_spare`),
    /// and advertised to `hb run r.image` (`api::ready_file`) unless a spare is advertised for
    /// that already or the reference names another image now. Listed even when its image mount
    /// went meanwhile: `reap_spares` releases it then.
    pub(super) fn publish(&self, dir: &Path, r: &Refill) {
        let mount = self.mounts.lock().expect("mounts lock").get(&r.key).cloned();
        let live = mount.is_some();
        let file = api::ready_file(&self.root, &r.image, r.plain_http);
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let written = mount
            .ok_or_else(|| std::io::Error::other("its image mount is gone"))
            .and_then(|mut m| {
                m.spare = Some(dir.to_path_buf());
                serde_json::to_vec(&api::Ready { daemon: std::process::id(), mount: m }).map_err(std::io::Error::other)
            })
            .and_then(|bytes| std::fs::write(&tmp, bytes));
        // Held until the spare is both advertised and on the spares: whoever takes it either
        // way (`take_spare`, or the hand-over of an `hb run` that claimed it the moment it was
        // in place) finds it recorded both ways, and withdraws it or learns it was claimed.
        let mut advertised = self.advertised.lock().expect("advertised lock");
        // Checked under the lock: a pull withdraws all advertisements after it tagged.
        let names_it = crate::find_image(&self.store, &r.image)
            .ok()
            .flatten()
            .is_some_and(|(_, digest)| digest.to_string() == r.key);
        let advertised_now = written.and_then(|_| {
            if !names_it {
                return Err(std::io::Error::other(format!("{} names another image now", r.image)));
            }
            rustix::fs::renameat_with(rustix::fs::CWD, &tmp, rustix::fs::CWD, &file, rustix::fs::RenameFlags::NOREPLACE)
                .map_err(std::io::Error::from)
        });
        match advertised_now {
            Ok(()) => {
                advertised.insert(dir.to_path_buf(), Advert { file: file.clone(), made_for: r.clone() });
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                if e.kind() != std::io::ErrorKind::AlreadyExists && names_it && live {
                    tracing::warn!(error = %e, file = %file.display(), "advertising a spare container folder failed");
                }
            }
        }
        self.spares.lock().expect("spares lock").entry(r.key.clone()).or_default().push(dir.to_path_buf());
    }

    /// Withdraws spare `dir`'s advertisement, if it has one: true when the spare is still the
    /// daemon's, false when an `hb run` claimed it first (it is that run's container now).
    pub(super) fn withdraw(&self, dir: &Path) -> bool {
        // Held through the rename: no new advertisement can take the file's name meanwhile.
        let mut advertised = self.advertised.lock().expect("advertised lock");
        let Some(advert) = advertised.remove(dir) else { return true };
        let tmp = advert.file.with_extension("withdrawn");
        match std::fs::rename(&advert.file, &tmp) {
            Ok(()) => {
                let _ = std::fs::remove_file(&tmp);
                true
            }
            Err(_) => false,
        }
    }

    /// Withdraws every advertisement (image references may name other images now); the spares
    /// stay, handed out through the API.
    pub(super) fn withdraw_all(&self) {
        let dirs: Vec<PathBuf> = self.advertised.lock().expect("advertised lock").keys().cloned().collect();
        for dir in dirs {
            if !self.withdraw(&dir) {
                self.forget_spare(&dir);
                self.handed.lock().expect("handed lock").push((dir, Instant::now()));
            }
        }
    }

    /// Takes `dir` off the spares (claimed by an `hb run`).
    pub(super) fn forget_spare(&self, dir: &Path) {
        for v in self.spares.lock().expect("spares lock").values_mut() {
            v.retain(|s| s != dir);
        }
    }

    /// A hand-over of `dir`: if it is an advertised spare an `hb run` claimed without asking
    /// (`api::claim_ready`), it is off the spares now, and the next is prepared.
    pub(super) fn spare_claimed(&self, dir: &Path) {
        // By id: `dir` is canonical, the daemon's own paths need not be.
        let advert = {
            let mut advertised = self.advertised.lock().expect("advertised lock");
            let mine = advertised.keys().find(|k| k.file_name() == dir.file_name()).cloned();
            mine.and_then(|k| advertised.remove(&k).map(|a| (k, a)))
        };
        let Some((dir, advert)) = advert else { return };
        self.forget_spare(&dir);
        self.last_used.lock().expect("lock").insert(advert.made_for.key.clone(), Instant::now());
        self.refill(advert.made_for);
    }

    /// Prepares a spare container folder over image mount `lower` (key `key`): on the daemon's
    /// `hb-spares` thread, which runs at the lowest priority.
    pub(super) fn prepare_spare(&self, r: Refill) {
        let stopping = self.stopping.lock().expect("stopping lock");
        if *stopping {
            self.refilling.lock().expect("refilling lock").remove(&r.key);
            return;
        }
        let (key, lower) = (r.key.clone(), r.lower.as_path());
        let dir = crate::container::containers_dir(&self.root).join(crate::container::new_id());
        let made = std::fs::create_dir_all(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|_| Ok(crate::container::make_spare_files(&dir)?))
            .and_then(|_| crate::rootfs::prepare(lower, &dir, &crate::rootfs::MOUNT_POINTS));
        let live = self.mounts.lock().expect("mounts lock").contains_key(&key);
        match made {
            Ok(()) if live => {
                self.publish(&dir, &r);
                self.prepared(&dir, r);
            }
            // Failed, or its image mount went meanwhile.
            other => {
                if let Err(e) = other {
                    tracing::warn!(error = %crate::error_chain(&e), "preparing a spare container folder failed");
                }
                hb_cli::teardown::cleanup(&dir, true);
                self.refilling.lock().expect("refilling lock").remove(&key);
            }
        }
    }

    /// Spare `dir`, made for `r` and published, is no longer being prepared; if it was taken
    /// already (handed out, or claimed the moment it was advertised), whoever took it asked for
    /// the next while this one still counted as being prepared, and was not heard: the next is
    /// asked for here.
    pub(super) fn prepared(&self, dir: &Path, r: Refill) {
        self.refilling.lock().expect("refilling lock").remove(&r.key);
        if !self.is_spare(&r.key, dir) && self.mounts.lock().expect("mounts lock").contains_key(&r.key) {
            self.refill(r);
        }
    }

    /// Whether `dir` is on the spares of image mount `key` (not handed out or claimed).
    pub(super) fn is_spare(&self, key: &str, dir: &Path) -> bool {
        self.spares.lock().expect("spares lock").get(key).is_some_and(|v| v.iter().any(|s| s == dir))
    }

    /// The daemon stops: no spare is made from now on (one under way is waited for), and all
    /// are released.
    pub(super) fn stop_spares(&self) {
        *self.stopping.lock().expect("stopping lock") = true;
        self.release_spares(None);
    }

    /// Unmounts and removes the spares of image mount `key` (all keys: `None`).
    pub(super) fn release_spares(&self, key: Option<&str>) {
        let gone: Vec<PathBuf> = {
            let mut spares = self.spares.lock().expect("spares lock");
            match key {
                Some(k) => spares.remove(k).unwrap_or_default(),
                None => spares.drain().flat_map(|(_, v)| v).collect(),
            }
        };
        for dir in gone {
            if self.withdraw(&dir) {
                hb_cli::teardown::cleanup(&dir, true);
            } else {
                self.handed.lock().expect("handed lock").push((dir, Instant::now()));
            }
        }
    }

    /// Spares handed out a minute ago or more that never became containers (their `hb run`
    /// died first), and spares of image mounts that are gone: released.
    pub(super) fn reap_spares(&self) {
        let stale: Vec<PathBuf> = {
            let mut handed = self.handed.lock().expect("handed lock");
            let (old, young) = handed.drain(..).partition(|(_, t)| t.elapsed() >= Duration::from_secs(60));
            *handed = young;
            old.into_iter().map(|(p, _)| p).collect()
        };
        if !stale.is_empty() {
            // `hb run` writes a spare's state under this lock.
            let _lock = crate::run::lock_containers(&self.root);
            for dir in stale.into_iter().filter(|d| d.exists() && !d.join("state.json").exists()) {
                tracing::info!(dir = %dir.display(), "releasing a spare container folder nobody claimed");
                hb_cli::teardown::cleanup(&dir, true);
            }
        }
        let keys: Vec<String> = self.spares.lock().expect("spares lock").keys().cloned().collect();
        let mounts: Vec<String> = self.mounts.lock().expect("mounts lock").keys().cloned().collect();
        for k in keys.iter().filter(|k| !mounts.contains(k)) {
            self.release_spares(Some(k));
        }
    }

    /// Container folders without a state (spares of an earlier daemon, or of an `hb run` that
    /// died before writing one): unmounted and removed.
    pub(super) fn sweep_spares(&self) {
        let Ok(_lock) = crate::run::lock_containers(&self.root) else { return };
        // An earlier daemon's advertisements (`hb run` ignores them: their daemon is gone).
        let ready = api::ready_dir(&self.root);
        let _ = std::fs::remove_dir_all(&ready);
        let _ = std::fs::create_dir_all(&ready);
        let Ok(entries) = std::fs::read_dir(crate::container::containers_dir(&self.root)) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name.to_str().is_some_and(crate::container::is_id) && p.is_dir() && !p.join("state.json").exists() {
                tracing::info!(dir = %p.display(), "removing a spare container folder left by an earlier daemon");
                hb_cli::teardown::cleanup(&p, true);
            }
        }
    }
}
