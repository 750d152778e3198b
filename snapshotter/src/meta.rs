//! Snapshot records and containerd's rules for them, with no I/O: which operations are allowed on
//! which kinds, parent chains, labels, filters. [`crate::Snapshots`] persists and mounts them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why an operation is refused; each maps to the gRPC code containerd expects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapError {
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot: active (writable, by key), view (read-only, by key) or committed (by name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// A committed snapshot's name, or empty.
    pub parent: String,
    pub kind: Kind,
    /// Its folder under the snapshotter's root (`<id>/fs`, `<id>/work`).
    pub id: u64,
    /// Unix seconds and nanoseconds.
    pub created: (i64, u32),
    pub updated: (i64, u32),
    pub labels: BTreeMap<String, String>,
    /// Bytes and inodes of its own layer, measured at commit (committed snapshots).
    #[serde(default)]
    pub usage: Option<(i64, i64)>,
    /// A layer hb serves lazily instead of containerd unpacking it (a remote snapshot).
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
}

/// Layer `index` (0 = bottom) of `image`, served from hb's store and registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    pub image: String,
    pub index: usize,
}

/// Every snapshot, by name.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Table {
    pub snapshots: BTreeMap<String, Snapshot>,
    pub next_id: u64,
}

/// Largest key plus value of one label, as containerd limits them.
pub const MAX_LABEL_BYTES: usize = 4096;

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), SnapError> {
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_BYTES {
            return Err(SnapError::InvalidArgument(format!(
                "label {k:?} is {} bytes with its value (at most {MAX_LABEL_BYTES})",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

impl Table {
    /// A new active or view snapshot on `parent` (a committed snapshot, or none).
    pub fn create(
        &mut self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        now: (i64, u32),
    ) -> Result<Snapshot, SnapError> {
        if key.is_empty() {
            return Err(SnapError::InvalidArgument("a snapshot key must not be empty".into()));
        }
        check_labels(&labels)?;
        if self.snapshots.contains_key(key) {
            return Err(SnapError::AlreadyExists(key.into()));
        }
        if !parent.is_empty() {
            match self.snapshots.get(parent) {
                None => return Err(SnapError::NotFound(parent.into())),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(SnapError::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot (it is {})",
                        p.kind.name()
                    )))
                }
                Some(_) => {}
            }
        }
        self.next_id += 1;
        let s = Snapshot {
            name: key.into(),
            parent: parent.into(),
            kind,
            id: self.next_id,
            created: now,
            updated: now,
            labels,
            usage: None,
            remote: None,
        };
        self.snapshots.insert(key.into(), s.clone());
        Ok(s)
    }

    /// Records remote layer `name` (committed, on `parent`) when the chain allows it: the parent
    /// is none for the image's bottom layer, else the image's previous layer, remote too.
    /// `Ok(None)`: the chain does not fit (containerd unpacks the layer itself).
    pub fn add_remote(
        &mut self,
        name: &str,
        parent: &str,
        layer: RemoteLayer,
        labels: BTreeMap<String, String>,
        now: (i64, u32),
    ) -> Result<Option<Snapshot>, SnapError> {
        check_labels(&labels)?;
        if self.snapshots.contains_key(name) {
            return Err(SnapError::AlreadyExists(name.into()));
        }
        let fits = match (layer.index, self.snapshots.get(parent)) {
            (0, _) => parent.is_empty(),
            (i, Some(p)) => p.remote.as_ref().is_some_and(|r| r.image == layer.image && r.index + 1 == i),
            (_, None) => false,
        };
        if !fits {
            return Ok(None);
        }
        self.next_id += 1;
        let s = Snapshot {
            name: name.into(),
            parent: parent.into(),
            kind: Kind::Committed,
            id: self.next_id,
            created: now,
            updated: now,
            labels,
            usage: Some((0, 0)),
            remote: Some(layer),
        };
        self.snapshots.insert(name.into(), s.clone());
        Ok(Some(s))
    }

    /// An active or view snapshot (for its mounts).
    pub fn live(&self, key: &str) -> Result<&Snapshot, SnapError> {
        match self.snapshots.get(key) {
            None => Err(SnapError::NotFound(key.into())),
            Some(s) if s.kind == Kind::Committed => {
                Err(SnapError::FailedPrecondition(format!("snapshot {key:?} is committed: it has no mounts")))
            }
            Some(s) => Ok(s),
        }
    }

    /// The committed snapshots below `s`, nearest first.
    pub fn ancestors(&self, s: &Snapshot) -> Vec<&Snapshot> {
        let mut out = Vec::new();
        let mut p = s.parent.as_str();
        while let Some(next) = self.snapshots.get(p).filter(|_| !p.is_empty()) {
            out.push(next);
            p = next.parent.as_str();
        }
        out
    }

    /// Turns active snapshot `key` into committed snapshot `name` (same folder).
    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: (i64, i64),
        now: (i64, u32),
    ) -> Result<Snapshot, SnapError> {
        check_labels(&labels)?;
        match self.snapshots.get(key) {
            None => return Err(SnapError::NotFound(key.into())),
            Some(s) if s.kind != Kind::Active => {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key:?} is {}: only an active snapshot can be committed",
                    s.kind.name()
                )))
            }
            Some(_) => {}
        }
        if name.is_empty() {
            return Err(SnapError::InvalidArgument("a committed snapshot needs a name".into()));
        }
        if self.snapshots.contains_key(name) {
            return Err(SnapError::AlreadyExists(name.into()));
        }
        let mut s = self.snapshots.remove(key).expect("checked above");
        s.name = name.into();
        s.kind = Kind::Committed;
        // A commit makes a new snapshot: created and updated now (containerd's
        // `storage.CommitActive`; its conformance suite's Update test checks it).
        s.created = now;
        s.updated = now;
        s.usage = Some(usage);
        // The committed snapshot carries the labels given at commit, not the active one's
        // (as containerd's own snapshotters do).
        s.labels = labels;
        self.snapshots.insert(name.into(), s.clone());
        Ok(s)
    }

    /// Removes a snapshot nothing is built on; returns it (its folder goes too).
    pub fn remove(&mut self, key: &str) -> Result<Snapshot, SnapError> {
        if !self.snapshots.contains_key(key) {
            return Err(SnapError::NotFound(key.into()));
        }
        if let Some(child) = self.snapshots.values().find(|s| s.parent == key) {
            return Err(SnapError::FailedPrecondition(format!(
                "cannot remove snapshot {key:?}: snapshot {:?} is built on it",
                child.name
            )));
        }
        Ok(self.snapshots.remove(key).expect("checked above"))
    }

    /// Updates labels (the only mutable field), all of them or those `paths` name
    /// (`labels`, `labels.<key>`).
    pub fn update(
        &mut self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
        now: (i64, u32),
    ) -> Result<Snapshot, SnapError> {
        check_labels(&labels)?;
        let s = self.snapshots.get_mut(key).ok_or_else(|| SnapError::NotFound(key.into()))?;
        if paths.is_empty() {
            s.labels = labels;
        } else {
            for p in paths {
                if p == "labels" {
                    s.labels = labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => s.labels.insert(k.into(), v.clone()),
                        None => s.labels.remove(k),
                    };
                } else {
                    return Err(SnapError::InvalidArgument(format!(
                        "cannot update field {p:?} of a snapshot (only labels)"
                    )));
                }
            }
        }
        s.updated = now;
        Ok(s.clone())
    }
}

/// One clause of a containerd filter: `field==value`, `field!=value`, or `field` (present).
#[derive(Debug, PartialEq, Eq)]
struct Clause {
    field: Vec<String>,
    op: Option<(bool, String)>,
}

/// A containerd filter list: any filter matches (OR); within one, every clause (`,`: AND).
/// Fields: `name`, `parent`, `kind`, `labels.<key>` (a key may be quoted: `labels."a.b"`).
pub struct Filters(Vec<Vec<Clause>>);

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters, SnapError> {
        let mut out = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            let mut clauses = Vec::new();
            for c in split_outside_quotes(f, ',') {
                clauses.push(parse_clause(c.trim())?);
            }
            out.push(clauses);
        }
        Ok(Filters(out))
    }

    pub fn matches(&self, s: &Snapshot) -> bool {
        self.0.is_empty() || self.0.iter().any(|clauses| clauses.iter().all(|c| clause_matches(c, s)))
    }
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, ch) in s.char_indices() {
        match ch {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn unquote(s: &str) -> String {
    let t = s.trim();
    t.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(t).to_string()
}

fn parse_clause(c: &str) -> Result<Clause, SnapError> {
    let bad = |why: &str| SnapError::InvalidArgument(format!("filter {c:?}: {why}"));
    if c.contains("~=") {
        return Err(bad("regular expressions (~=) are not supported"));
    }
    let (field, op) = if let Some((f, v)) = c.split_once("!=") {
        (f, Some((false, unquote(v))))
    } else if let Some((f, v)) = c.split_once("==") {
        (f, Some((true, unquote(v))))
    } else {
        (c, None)
    };
    let parts: Vec<String> = split_outside_quotes(field.trim(), '.').into_iter().map(unquote).collect();
    if parts.is_empty() || parts[0].is_empty() {
        return Err(bad("no field"));
    }
    match parts[0].as_str() {
        "name" | "parent" | "kind" if parts.len() == 1 => {}
        "labels" if parts.len() >= 2 => {}
        _ => return Err(bad("fields are name, parent, kind, labels.<key>")),
    }
    // A label key may itself hold dots when unquoted: labels.a.b means key "a.b".
    let field = if parts[0] == "labels" { vec!["labels".into(), parts[1..].join(".")] } else { parts };
    Ok(Clause { field, op })
}

fn clause_matches(c: &Clause, s: &Snapshot) -> bool {
    let value: Option<String> = match c.field[0].as_str() {
        "name" => Some(s.name.clone()),
        "parent" => Some(s.parent.clone()),
        "kind" => Some(s.kind.name().into()),
        _ => s.labels.get(&c.field[1]).cloned(),
    };
    match (&c.op, value) {
        (None, v) => v.is_some_and(|v| !v.is_empty()),
        (Some((true, want)), Some(v)) => v == *want,
        (Some((true, _)), None) => false,
        (Some((false, want)), v) => v.as_deref() != Some(want.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn containerd_semantics_for_prepare_commit_view_remove() {
        let mut t = Table::default();
        let now = (1, 0);
        t.create(Kind::Active, "a", "", labels(&[]), now).unwrap();
        assert_eq!(t.create(Kind::Active, "a", "", labels(&[]), now), Err(SnapError::AlreadyExists("a".into())));
        assert!(matches!(t.create(Kind::Active, "b", "a", labels(&[]), now), Err(SnapError::InvalidArgument(_))));
        assert_eq!(t.create(Kind::Active, "b", "nope", labels(&[]), now), Err(SnapError::NotFound("nope".into())));
        let later = (5, 0);
        let c = t.commit("layer1", "a", labels(&[("x", "1")]), (10, 1), later).unwrap();
        // Regression (containerd's conformance suite, Update): the Prepare time was kept.
        assert_eq!((c.created, c.updated), (later, later), "a commit is created when committed");
        assert_eq!((c.kind, c.labels.get("x").map(String::as_str)), (Kind::Committed, Some("1")));
        assert!(!t.snapshots.contains_key("a"), "the active key is gone after commit");
        assert_eq!(t.commit("layer2", "a", labels(&[]), (0, 0), now), Err(SnapError::NotFound("a".into())));
        t.create(Kind::View, "v", "layer1", labels(&[]), now).unwrap();
        assert!(matches!(t.commit("x", "v", labels(&[]), (0, 0), now), Err(SnapError::FailedPrecondition(_))));
        t.create(Kind::Active, "b", "layer1", labels(&[]), now).unwrap();
        assert_eq!(t.commit("layer1", "b", labels(&[]), (0, 0), now), Err(SnapError::AlreadyExists("layer1".into())));
        t.commit("layer2", "b", labels(&[]), (0, 0), now).unwrap();
        let top = t.create(Kind::Active, "c", "layer2", labels(&[]), now).unwrap();
        let chain: Vec<&str> = t.ancestors(&top).iter().map(|s| s.name.as_str()).collect();
        assert_eq!(chain, ["layer2", "layer1"]);
        assert!(matches!(t.live("layer1"), Err(SnapError::FailedPrecondition(_))));
        assert!(matches!(t.remove("layer1"), Err(SnapError::FailedPrecondition(_))), "has children");
        t.remove("c").unwrap();
        t.remove("v").unwrap();
        t.remove("layer2").unwrap();
        t.remove("layer1").unwrap();
        assert_eq!(t.remove("layer1"), Err(SnapError::NotFound("layer1".into())));
        let big = "x".repeat(MAX_LABEL_BYTES);
        assert!(matches!(
            t.create(Kind::Active, "d", "", labels(&[("k", &big)]), now),
            Err(SnapError::InvalidArgument(_))
        ));
    }

    #[test]
    fn remote_layers_stack_only_on_their_image_s_previous_layer() {
        let mut t = Table::default();
        let l = |image: &str, index| RemoteLayer { image: image.into(), index };
        let now = (1, 0);
        assert!(t.add_remote("c1", "", l("img", 1), labels(&[]), now).unwrap().is_none(), "layer 1 needs layer 0");
        let s = t.add_remote("c0", "", l("img", 0), labels(&[]), now).unwrap().unwrap();
        assert_eq!(s.kind, Kind::Committed);
        assert_eq!(t.add_remote("c0", "", l("img", 0), labels(&[]), now), Err(SnapError::AlreadyExists("c0".into())));
        assert!(t.add_remote("x1", "c0", l("other", 1), labels(&[]), now).unwrap().is_none(), "another image");
        assert!(t.add_remote("x2", "c0", l("img", 2), labels(&[]), now).unwrap().is_none(), "a gap");
        t.add_remote("c1", "c0", l("img", 1), labels(&[]), now).unwrap().unwrap();
        let top = t.create(Kind::Active, "run", "c1", labels(&[]), now).unwrap();
        assert_eq!(t.ancestors(&top).len(), 2);
        assert!(matches!(t.remove("c0"), Err(SnapError::FailedPrecondition(_))));
    }

    #[test]
    fn updates_touch_labels_only() {
        let mut t = Table::default();
        t.create(Kind::Active, "a", "", labels(&[("keep", "1"), ("drop", "2")]), (1, 0)).unwrap();
        let s = t.update("a", labels(&[("new", "3")]), &["labels.new".into(), "labels.drop".into()], (2, 0)).unwrap();
        assert_eq!(s.labels, labels(&[("keep", "1"), ("new", "3")]));
        assert_eq!(s.updated, (2, 0));
        let s = t.update("a", labels(&[("only", "x")]), &[], (3, 0)).unwrap();
        assert_eq!(s.labels, labels(&[("only", "x")]));
        assert!(matches!(t.update("a", labels(&[]), &["parent".into()], (3, 0)), Err(SnapError::InvalidArgument(_))));
        assert_eq!(t.update("zz", labels(&[]), &[], (3, 0)), Err(SnapError::NotFound("zz".into())));
    }

    #[test]
    fn filters_follow_containerd_syntax() {
        let mut t = Table::default();
        t.create(Kind::Active, "a", "", labels(&[("containerd.io/gc.root", "x"), ("team", "db")]), (1, 0)).unwrap();
        t.commit("base", "a", labels(&[("team", "db")]), (0, 0), (1, 0)).unwrap();
        t.create(Kind::View, "v", "base", labels(&[("team", "web")]), (1, 0)).unwrap();
        let names = |f: &[&str]| -> Vec<String> {
            let f = Filters::parse(&f.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
            t.snapshots.values().filter(|s| f.matches(s)).map(|s| s.name.clone()).collect()
        };
        assert_eq!(names(&[]), ["base", "v"]);
        assert_eq!(names(&["kind==committed"]), ["base"]);
        assert_eq!(names(&["labels.team==web"]), ["v"]);
        assert_eq!(names(&["labels.\"team\"!=web"]), ["base"]);
        assert_eq!(names(&["parent==base,labels.team"]), ["v"]);
        assert_eq!(names(&["name==base", "name==v"]), ["base", "v"], "filters OR");
        assert_eq!(names(&["labels.missing"]), Vec::<String>::new());
        assert!(Filters::parse(&["name~=b.*".into()]).is_err());
        assert!(Filters::parse(&["size==1".into()]).is_err());
    }
}
