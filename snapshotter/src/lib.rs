//! containerd's Snapshots API (`proxy_plugins.<name>`, `type = "snapshot"`) over overlayfs, as
//! containerd's own overlayfs snapshotter lays layers out: each snapshot a folder `<root>/<id>/`
//! with `fs/` (its layer: the upper dir while active) and `work/`; mounts are a bind mount (no
//! parent, or a view of one layer) or an overlayfs (`lowerdir` = the committed parents, nearest
//! first). Records live in `<root>/metadata.json`, replaced atomically after every change; a crash
//! between making a folder and recording it leaves a folder `Cleanup` removes.
//!
//! The rules (which kinds allow which operations, parent chains, labels, filters) are in
//! [`meta`], without I/O; [`service`] maps them onto gRPC codes.

pub mod meta;
pub mod service;

/// The generated gRPC types and service (`proto/`).
pub mod api {
    /// Modules as the proto packages nest (the generated code refers across them).
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::snapshots::v1::*;
    pub use containerd::types;
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use meta::{Kind, RemoteLayer, SnapError, Snapshot};

/// Label containerd's remote-snapshot clients set on a layer's Prepare: the committed name
/// (chain id) the layer would get. With it, a snapshotter that can provide the layer itself
/// records it and answers AlreadyExists, and containerd skips the download.
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";

/// Where layers served lazily come from (hb's daemon: its store, the registry).
pub trait Remote: Send + Sync {
    /// The layer a Prepare's labels describe, if it can be served lazily (the image is made ready:
    /// its indexes pulled). `Ok(None)`: no (containerd unpacks it).
    fn layer(&self, labels: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>, String>;
    /// A folder holding `image`'s first `layers` layers merged (kept mounted).
    fn mount(&self, image: &str, layers: usize) -> Result<PathBuf, String>;
    /// Bytes of the layer's data held locally now, and its entries.
    fn usage(&self, layer: &RemoteLayer) -> Result<(i64, i64), String>;
    /// No snapshot uses `image`'s layers any more: its local data may go.
    fn release(&self, image: &str);
}

/// A mount(2) for containerd to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The snapshotter: its records and folders.
pub struct Snapshots {
    root: PathBuf,
    table: Mutex<meta::Table>,
    remote: Option<std::sync::Arc<dyn Remote>>,
}

fn now() -> (i64, u32) {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> SnapError {
    move |e| SnapError::Internal(format!("{what}: {e}"))
}

impl Snapshots {
    /// Opens (or creates) the snapshotter's root.
    pub fn open(root: &Path) -> Result<Snapshots, SnapError> {
        std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
        let path = root.join("metadata.json");
        let table = match std::fs::read(&path) {
            Ok(raw) => serde_json::from_slice(&raw)
                .map_err(|e| SnapError::Internal(format!("{} is corrupt: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => meta::Table::default(),
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        };
        Ok(Snapshots { root: root.to_path_buf(), table: Mutex::new(table), remote: None })
    }

    /// Serves layers lazily through `remote` when containerd's client asks for remote snapshots.
    pub fn with_remote(mut self, remote: std::sync::Arc<dyn Remote>) -> Self {
        self.remote = Some(remote);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Writes the table: temporary file, fsync, rename.
    fn save(&self, t: &meta::Table) -> Result<(), SnapError> {
        let tmp = self.root.join("metadata.json.tmp");
        let raw = serde_json::to_vec(t).map_err(|e| SnapError::Internal(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&raw)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.root.join("metadata.json"))
        };
        write().map_err(io(format!("saving {}/metadata.json", self.root.display())))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, meta::Table> {
        self.table.lock().expect("snapshot table lock")
    }

    /// Prepare (active) or View: records the snapshot, makes its folder, returns its mounts.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<MountSpec>, SnapError> {
        if let (Kind::Active, Some(target), Some(remote)) = (kind, labels.get(TARGET_LABEL), &self.remote) {
            if self.table().snapshots.contains_key(target.as_str()) {
                return Err(SnapError::AlreadyExists(target.clone()));
            }
            // Outside the lock: this may pull the image's indexes.
            match remote.layer(&labels) {
                Ok(Some(layer)) => {
                    let mut t = self.table();
                    let mut kept = labels.clone();
                    kept.insert("containerd.io/snapshot/remote".into(), "hb".into());
                    if let Some(s) = t.add_remote(target, parent, layer, kept, now())? {
                        let made = std::fs::create_dir_all(self.dir(s.id).join("fs"));
                        if let Err(e) =
                            made.map_err(io("creating a remote snapshot's folder".into())).and_then(|_| self.save(&t))
                        {
                            t.snapshots.remove(target.as_str());
                            return Err(e);
                        }
                        tracing::info!(name = %target, image = ?s.remote, "remote snapshot: the layer is served lazily");
                        return Err(SnapError::AlreadyExists(target.clone()));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(key, error = %e, "cannot serve the layer lazily; containerd unpacks it"),
            }
        }
        let mut t = self.table();
        let s = t.create(kind, key, parent, labels, now())?;
        let dir = self.dir(s.id);
        let made = std::fs::create_dir_all(dir.join("fs")).and_then(|_| std::fs::create_dir_all(dir.join("work")));
        if let Err(e) = made.map_err(io(format!("creating {}", dir.display()))).and_then(|_| self.save(&t)) {
            t.snapshots.remove(key);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let lowers = self.lowers(&t, &s);
        drop(t);
        self.mounts_of(&s, lowers?)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>, SnapError> {
        let t = self.table();
        let s = t.live(key)?.clone();
        let lowers = self.lowers(&t, &s);
        drop(t);
        self.mounts_of(&s, lowers?)
    }

    /// The lower layers under `s`, nearest first: a local layer is its folder; the nearest remote
    /// layer stands for itself and everything below it (one merged mount of the image's first
    /// layers), so the walk stops there.
    fn lowers(&self, t: &meta::Table, s: &Snapshot) -> Result<Vec<Lower>, SnapError> {
        let mut out = Vec::new();
        for p in t.ancestors(s) {
            match &p.remote {
                Some(r) => {
                    out.push(Lower::Remote(r.clone()));
                    break;
                }
                None => out.push(Lower::Local(p.id)),
            }
        }
        Ok(out)
    }

    fn mounts_of(&self, s: &Snapshot, lowers: Vec<Lower>) -> Result<Vec<MountSpec>, SnapError> {
        let fs = |id: u64| self.dir(id).join("fs").display().to_string();
        let mut dirs = Vec::with_capacity(lowers.len());
        for l in lowers {
            dirs.push(match l {
                Lower::Local(id) => fs(id),
                Lower::Remote(r) => {
                    let remote = self.remote.as_ref().ok_or_else(|| {
                        SnapError::FailedPrecondition(format!(
                            "layer {} of {} is remote and no remote source is set",
                            r.index, r.image
                        ))
                    })?;
                    remote
                        .mount(&r.image, r.index + 1)
                        .map_err(|e| {
                            SnapError::Internal(format!("mounting {} (first {} layers): {e}", r.image, r.index + 1))
                        })?
                        .display()
                        .to_string()
                }
            });
        }
        Ok(layout(s, &fs(s.id), &self.dir(s.id).join("work").display().to_string(), &dirs))
    }
}

/// A lower layer of a mount.
enum Lower {
    Local(u64),
    Remote(RemoteLayer),
}

/// containerd's overlayfs layout: a bind mount without lower layers (or a view of one), else an
/// overlay (read-only for a view: no upper dir).
fn layout(s: &Snapshot, own_fs: &str, own_work: &str, lowers: &[String]) -> Vec<MountSpec> {
    {
        let parents = lowers;
        let bind = |source: String, ro: bool| MountSpec {
            kind: "bind".into(),
            source,
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        match (s.kind, parents) {
            (Kind::View, []) => vec![bind(own_fs.into(), true)],
            (_, []) => vec![bind(own_fs.into(), false)],
            (Kind::View, [one]) => vec![bind(one.clone(), true)],
            (Kind::View, many) => vec![MountSpec {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!("lowerdir={}", many.join(":"))],
            }],
            (_, many) => vec![MountSpec {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={own_work}"),
                    format!("upperdir={own_fs}"),
                    format!("lowerdir={}", many.join(":")),
                ],
            }],
        }
    }
}

impl Snapshots {
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), SnapError> {
        let id = self.table().live(key)?.id;
        // Measured outside the lock: a layer can be large.
        let usage = disk_usage(&self.dir(id).join("fs"))?;
        let mut t = self.table();
        let before = t.snapshots.get(key).cloned();
        t.commit(name, key, labels, usage, now())?;
        if let Err(e) = self.save(&t) {
            t.snapshots.remove(name);
            if let Some(b) = before {
                t.snapshots.insert(key.into(), b);
            }
            return Err(e);
        }
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), SnapError> {
        let mut t = self.table();
        let s = t.remove(key)?;
        if let Err(e) = self.save(&t) {
            t.snapshots.insert(key.into(), s);
            return Err(e);
        }
        let still_used =
            |image: &str| t.snapshots.values().any(|o| o.remote.as_ref().is_some_and(|r| r.image == image));
        let released = s.remote.as_ref().filter(|r| !still_used(&r.image)).map(|r| r.image.clone());
        drop(t);
        if let (Some(image), Some(remote)) = (released, &self.remote) {
            remote.release(&image);
        }
        let dir = self.dir(s.id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            // Recorded as gone: Cleanup takes the folder later.
            tracing::warn!(dir = %dir.display(), error = %e, "removing a snapshot's folder failed");
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Snapshot, SnapError> {
        self.table().snapshots.get(key).cloned().ok_or_else(|| SnapError::NotFound(key.into()))
    }

    pub fn update(&self, key: &str, labels: BTreeMap<String, String>, paths: &[String]) -> Result<Snapshot, SnapError> {
        let mut t = self.table();
        let before = t.snapshots.get(key).cloned();
        let s = t.update(key, labels, paths, now())?;
        if let Err(e) = self.save(&t) {
            if let Some(b) = before {
                t.snapshots.insert(key.into(), b);
            }
            return Err(e);
        }
        Ok(s)
    }

    pub fn list(&self, filters: &[String]) -> Result<Vec<Snapshot>, SnapError> {
        let f = meta::Filters::parse(filters)?;
        Ok(self.table().snapshots.values().filter(|s| f.matches(s)).cloned().collect())
    }

    /// Bytes and inodes of the snapshot's own layer (measured now while active).
    pub fn usage(&self, key: &str) -> Result<(i64, i64), SnapError> {
        let s = self.stat(key)?;
        if let (Some(r), Some(remote)) = (&s.remote, &self.remote) {
            return remote
                .usage(r)
                .map_err(|e| SnapError::Internal(format!("usage of {} layer {}: {e}", r.image, r.index)));
        }
        match (s.kind, s.usage) {
            (Kind::Committed, Some(u)) => Ok(u),
            _ => disk_usage(&self.dir(s.id).join("fs")),
        }
    }

    /// Removes folders no record names (left by a crash or a failed removal).
    pub fn cleanup(&self) -> Result<usize, SnapError> {
        let ids: std::collections::HashSet<String> =
            self.table().snapshots.values().map(|s| s.id.to_string()).collect();
        let entries = std::fs::read_dir(&self.root).map_err(io(format!("listing {}", self.root.display())))?;
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && name.bytes().all(|b| b.is_ascii_digit()) && !ids.contains(&name) {
                std::fs::remove_dir_all(e.path()).map_err(io(format!("removing {}", e.path().display())))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Bytes (allocated blocks, as du counts them) and inodes under `dir`, not crossing mounts.
fn disk_usage(dir: &Path) -> Result<(i64, i64), SnapError> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::symlink_metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
    let dev = top.dev();
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(io(format!("listing {}", d.display())))?;
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.dev() != dev || !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            bytes += (m.blocks() * 512) as i64;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_records_and_mounts_follow_the_overlay_layout() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        let m = s.create(Kind::Active, "k1", "", BTreeMap::new()).unwrap();
        assert_eq!(m[0].kind, "bind");
        assert!(m[0].options.contains(&"rw".to_string()));
        std::fs::write(dir.path().join("1/fs/file"), vec![7u8; 10000]).unwrap();
        s.commit("l1", "k1", BTreeMap::new()).unwrap();
        let (bytes, inodes) = s.usage("l1").unwrap();
        assert!(bytes >= 10000 && inodes == 1, "{bytes} {inodes}");
        let m = s.create(Kind::Active, "k2", "l1", BTreeMap::new()).unwrap();
        assert_eq!(m[0].kind, "overlay");
        assert!(m[0].options.iter().any(|o| o == &format!("lowerdir={}", dir.path().join("1/fs").display())));
        assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=") && o.ends_with("/2/fs")));
        s.commit("l2", "k2", BTreeMap::new()).unwrap();
        let v = s.create(Kind::View, "v", "l1", BTreeMap::new()).unwrap();
        assert_eq!(v[0].kind, "bind", "a view of one layer binds it");
        assert!(v[0].options.contains(&"ro".to_string()));
        let v = s.create(Kind::View, "vv", "l2", BTreeMap::new()).unwrap();
        assert_eq!(v[0].kind, "overlay", "a view of several layers stacks them");
        assert!(v[0].options.iter().all(|o| o.starts_with("lowerdir=")), "read-only: no upper dir");
        let v2 = s.create(Kind::Active, "top", "l2", BTreeMap::new()).unwrap();
        let lower = v2[0].options.iter().find(|o| o.starts_with("lowerdir=")).unwrap();
        let want = format!("lowerdir={}:{}", dir.path().join("2/fs").display(), dir.path().join("1/fs").display());
        assert_eq!(lower, &want, "nearest parent first");
        assert_eq!(s.mounts("top").unwrap(), v2);
        // Records survive a reopen; orphan folders are cleaned up.
        drop(s);
        std::fs::create_dir_all(dir.path().join("99/fs")).unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        assert_eq!(s.list(&[]).unwrap().len(), 5);
        assert_eq!(s.stat("top").unwrap().id, 5);
        assert_eq!(s.cleanup().unwrap(), 1);
        assert!(!dir.path().join("99").exists());
        s.remove("top").unwrap();
        assert!(!dir.path().join("5").exists(), "a removed snapshot's folder goes");
        assert_eq!(s.stat("top"), Err(SnapError::NotFound("top".into())));
    }
}
