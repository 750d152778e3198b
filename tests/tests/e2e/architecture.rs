//! The crate dependency edges in ARCHITECTURE.md are the real ones, and the pure core stays pure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use hb_tests::workspace;

/// Edges documented between `<!-- deps:begin -->` and `<!-- deps:end -->` as `crate -> a, b`.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(workspace().join("ARCHITECTURE.md")).unwrap();
    let block = text.split("<!-- deps:begin -->").nth(1).unwrap().split("<!-- deps:end -->").next().unwrap();
    block
        .lines()
        .map(|l| l.trim().trim_start_matches('-').replace('`', ""))
        .filter_map(|l| l.split_once("->").map(|(k, v)| (k.trim().to_string(), v.to_string())))
        .map(|(k, v)| {
            let deps = v.split(',').map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect();
            (k, deps)
        })
        .collect()
}

fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--manifest-path"])
        .arg(workspace().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn crate_edges_match_architecture_md() {
    let meta = metadata();
    let members: BTreeSet<String> =
        meta["packages"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    let mut actual: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .filter(|d| members.contains(d))
            .collect();
        actual.insert(p["name"].as_str().unwrap().to_string(), deps);
    }
    assert_eq!(actual, documented(), "ARCHITECTURE.md's dependency block is out of date");
}

#[test]
fn the_core_does_no_io() {
    let meta = metadata();
    let core = meta["packages"].as_array().unwrap().iter().find(|p| p["name"] == "hb-core").unwrap();
    let allowed = ["blake3", "hex", "serde", "sha2", "thiserror"];
    for d in core["dependencies"].as_array().unwrap() {
        let name = d["name"].as_str().unwrap();
        assert!(allowed.contains(&name), "hb-core must stay pure; it depends on {name}");
    }
    for entry in std::fs::read_dir(workspace().join("core/src")).unwrap() {
        let src = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for banned in ["std::fs", "std::net", "std::process", "std::env", "SystemTime"] {
            assert!(!src.contains(banned), "hb-core uses {banned}");
        }
    }
}

/// `hb` links only the `hb_cli` library, so what makes a binary slow to start (RocksDB's C++,
/// FUSE, the registry client, async runtimes) must stay out of it: the library's modules may not
/// name those crates. (`hb run`'s overhead over runc depends on it; see ARCHITECTURE.md.)
#[test]
fn the_front_binary_links_no_store() {
    let src = workspace().join("cli/src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let mut files: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod ")))
        .map(|m| format!("{}.rs", m.trim_end_matches(';')))
        .collect();
    assert!(files.contains(&"run.rs".to_string()), "lib.rs declares its modules as expected: {files:?}");
    files.extend(["lib.rs".to_string(), "front.rs".to_string()]);
    for f in &files {
        let text = std::fs::read_to_string(src.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        for banned in ["hb_store", "hb_fuse", "hb_registry", "hb_snapshotter", "tokio", "hyper", "indicatif", "rocksdb"]
        {
            assert!(!text.contains(banned), "cli/src/{f} (part of the lean `hb`) uses {banned}");
        }
    }
}

/// `hb` is its own package's only binary (`hb-cli`): what `cargo tree` shows for it is all it can
/// link. The engine's crates (the store with RocksDB, FUSE, HTTP, async runtimes) stay out.
#[test]
fn cargo_tree_of_the_front_binary_shows_no_store_fuse_http_or_tokio() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "--offline", "-p", "hb-cli", "-e", "normal,build", "--prefix", "none", "--manifest-path"])
        .arg(workspace().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: BTreeSet<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.contains("hb-runtime"), "cargo tree listed hb-cli's dependencies: {names:?}");
    for banned in [
        "rocksdb",
        "librocksdb-sys",
        "fuser",
        "hyper",
        "tokio",
        "reqwest",
        "hb-store",
        "hb-fuse",
        "hb-registry",
        "hb-mirror",
    ] {
        assert!(!names.contains(banned), "the `hb` front binary's package depends on {banned}");
    }
}

/// The top-level modules of each crate, and which others each names (`crate::x`), tests left out.
fn module_edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut text: BTreeMap<String, String> = BTreeMap::new();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        let body = if p.is_dir() {
            std::fs::read_dir(&p)
                .unwrap()
                .flatten()
                .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
                .filter(|t| !t.starts_with("use super::*;\n\n#[test]"))
                .collect::<Vec<_>>()
                .join("\n")
        } else if ["lib", "main", "front"].contains(&name.as_str()) {
            continue;
        } else {
            std::fs::read_to_string(&p).unwrap()
        };
        let code = body.split("#[cfg(test)]").next().unwrap().to_string();
        text.insert(name, code);
    }
    let names: BTreeSet<String> = text.keys().cloned().collect();
    text.iter()
        .map(|(m, code)| {
            let used = code
                .match_indices("crate::")
                .map(|(i, _)| {
                    code[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>()
                })
                .filter(|r| names.contains(r) && r != m)
                .collect();
            (m.clone(), used)
        })
        .collect()
}

/// Regression (one-house issue): `mount.rs` and `pull.rs` named each other, as did the registry
/// client's `blob.rs` and `client.rs`. Within every crate, modules form no cycle.
#[test]
fn no_crate_has_a_cycle_between_its_modules() {
    let meta = metadata();
    for p in meta["packages"].as_array().unwrap() {
        let manifest = Path::new(p["manifest_path"].as_str().unwrap());
        let src = manifest.parent().unwrap().join("src");
        if !src.is_dir() {
            continue;
        }
        let edges = module_edges(&src);
        // Depth-first search for a path back to where it started.
        fn reaches(
            edges: &BTreeMap<String, BTreeSet<String>>,
            from: &str,
            to: &str,
            seen: &mut BTreeSet<String>,
        ) -> bool {
            edges
                .get(from)
                .into_iter()
                .flatten()
                .any(|n| n == to || (seen.insert(n.clone()) && reaches(edges, n, to, seen)))
        }
        for m in edges.keys() {
            assert!(
                !reaches(&edges, m, m, &mut BTreeSet::new()),
                "{}: module {m} is part of a cycle ({:?})",
                p["name"],
                edges
            );
        }
    }
}

/// Regression (hardening issue): the release `hb`, a root-run binary, was linked at a fixed
/// address (`relocation-model=static`), so its own image had no ASLR. The script must link it
/// position-independent and refuse an executable that is not.
#[test]
fn the_release_hb_keeps_aslr() {
    let script = std::fs::read_to_string(workspace().join("scripts/build-release.sh")).unwrap();
    let flags: Vec<&str> =
        script.lines().filter(|l| l.contains("cargo rustc") && !l.trim_start().starts_with('#')).collect();
    assert!(!flags.is_empty(), "build-release.sh links hb with `cargo rustc`");
    for l in flags {
        assert!(!l.contains("relocation-model=static"), "hb linked at a fixed address: {l}");
    }
    assert!(script.contains("readelf -h") && script.contains("DYN"), "build-release.sh checks that hb is PIE");
}
