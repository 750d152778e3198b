//! Updates cost their changed chunks (updates issue): `hb pull` of an image with an accelerated
//! form fetches only the chunks the store lacks, by Range, verified; layers stay those of the
//! original image. Bytes are counted from the real registry's log (`http.response.written`).

use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hb_tests::*;

use crate::proxy::{Proxy, Upstream};
use crate::pull::open_registry;

/// debian-app v1 and v2 (v2: one more package and small edits), converted once per test process.
fn converted() -> &'static (String, String) {
    static C: OnceLock<(String, String)> = OnceLock::new();
    C.get_or_init(|| {
        let reg = open_registry();
        (
            crate::lazy::convert(&format!("{reg}/debian-app:v1"), "delta-v1"),
            crate::lazy::convert(&format!("{reg}/debian-app:v2"), "delta-v2"),
        )
    })
}

/// What containerd downloads for `plan`'s image: every layer blob the store lacks, whole.
fn whole_bytes(plan: &serde_json::Value) -> u64 {
    plan["fetch"].as_array().unwrap().iter().map(|l| l["size"].as_u64().unwrap()).sum()
}

fn chunk_layers(plan: &serde_json::Value) -> Vec<serde_json::Value> {
    plan["fetch"].as_array().unwrap().iter().filter(|l| l["via"] == "chunks").cloned().collect()
}

/// Each layer of `image` exported by `a` and by `b` is the same tar, byte for byte.
fn same_layer_tars(a: &Hb, b: &Hb, image: &str) {
    let cfg = a.json(&["inspect", image]);
    for d in cfg["config"]["rootfs"]["diff_ids"].as_array().unwrap() {
        let d = d.as_str().unwrap();
        let (x, y) = (a.path("a.tar"), b.path("b.tar"));
        a.ok(&["layer", "export", d, "--output", x.to_str().unwrap()]);
        b.ok(&["layer", "export", d, "--output", y.to_str().unwrap()]);
        let (x, y) = (std::fs::read(&x).unwrap(), std::fs::read(&y).unwrap());
        assert!(x.len() == y.len() && x == y, "layer {d}: the tars differ ({} vs {} bytes)", x.len(), y.len());
    }
}

fn within_5_percent(what: &str, got: u64, want: u64) {
    assert!(got.abs_diff(want) * 20 <= want.max(1), "{what}: {got} bytes, the plan said {want}");
}

#[test]
fn an_update_downloads_only_its_new_chunks_and_its_layers_export_byte_identical() {
    let (v1, v2) = converted();
    let up = Upstream::start();
    up.seed_as(v1, "app:v1");
    up.seed_as(v2, "app:v2");
    let (v1, v2) = (format!("{}/app:v1", up.addr), format!("{}/app:v2", up.addr));
    let hb = Hb::new();
    hb.json(&["pull", &v1]);
    let plan = hb.json(&["pull", "--plan", &v2]);
    let containerd = whole_bytes(&plan);
    let chunked = chunk_layers(&plan);
    assert!(!chunked.is_empty(), "the changed package layer comes by chunks: {plan:#}");
    let before = up.bytes_to("hb/");
    let r = hb.json(&["pull", &v2]);
    let on_wire = up.bytes_to("hb/") - before;
    // Goal: at most 2 % of what containerd downloads for the same update (its changed layers).
    assert!(
        on_wire * 50 <= containerd,
        "{on_wire} bytes from the registry for an update containerd pulls as {containerd}: {r:#}"
    );
    assert!(r["layers_by_chunks"].as_u64().unwrap() >= 1, "{r:#}");
    // The plan said what the pull fetched, and the registry's log agrees with both.
    within_5_percent(
        "the pull's own count",
        r["bytes_downloaded"].as_u64().unwrap(),
        plan["fetch_bytes"].as_u64().unwrap(),
    );
    let manifests = 64 << 10;
    assert!(on_wire <= r["bytes_downloaded"].as_u64().unwrap() + manifests, "{on_wire} on the wire: {r:#}");
    // No layer that came by chunks was downloaded whole.
    for l in &chunked {
        assert_eq!(up.blob_gets_from(l["digest"].as_str().unwrap(), "hb/"), 0, "{l}");
    }
    // The same layers as a whole pull of the original image, byte for byte.
    let clean = Hb::new();
    clean.ok(&["pull", &format!("{}/debian-app:v2", open_registry())]);
    same_layer_tars(&hb, &clean, &v2);
    hb.fsck_clean();
}

#[test]
fn a_pull_completes_a_lazily_pulled_image_with_only_its_missing_chunks() {
    let (v1, v2) = converted();
    let hb = Hb::new();
    hb.json(&["pull", v1]);
    // v2 lazily: its changed layers are lazy, most of their chunks shared with v1 already.
    hb.json(&["pull", "--lazy", v2]);
    let plan = hb.json(&["pull", "--plan", v2]);
    let chunked = chunk_layers(&plan);
    assert!(!chunked.is_empty(), "{plan:#}");
    for l in &chunked {
        assert_eq!(l["meta_bytes"], 0, "the index and table are in the store already: {l}");
    }
    let r = hb.json(&["pull", v2]);
    within_5_percent(
        "completing the lazy image",
        r["bytes_downloaded"].as_u64().unwrap(),
        plan["fetch_bytes"].as_u64().unwrap(),
    );
    assert!(r["bytes_downloaded"].as_u64().unwrap() * 100 < whole_bytes(&plan), "{r:#}");
    let du = hb.json(&["du"]);
    assert_eq!(du["absent_chunks"], 0, "every layer is complete: {du}");
    hb.fsck_clean();
}

/// Bad input: a data blob whose chunks do not hash to their ids. Each layer that came by chunks
/// falls back to its layer blob, and the result is the same image.
#[test]
fn corrupt_chunks_are_refused_and_the_layer_comes_whole_instead() {
    let (v1, v2) = converted();
    let up = Upstream::start();
    up.seed_as(v2, "app:v2");
    let v2 = format!("{}/app:v2", up.addr);
    let hb = Hb::new();
    hb.json(&["pull", v1]);
    let plan = hb.json(&["pull", "--plan", &v2]);
    // Spoil every data blob of the accelerated form (same length: the registry serves it).
    let spoiled = data_blobs(&up, &v2);
    assert!(!spoiled.is_empty());
    for d in &spoiled {
        let f = up.blob_file(d);
        let bytes: Vec<u8> = std::fs::read(&f).unwrap().iter().map(|b| b ^ 0x5a).collect();
        std::fs::write(&f, bytes).unwrap();
    }
    let out = hb.command(&["--json", "pull", &v2]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("downloading the layer blob instead") && err.contains("corrupt"),
        "the fallback is said: {err}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["layers_by_chunks"], 0, "{r:#}");
    for l in chunk_layers(&plan) {
        assert_eq!(up.blob_gets_from(l["digest"].as_str().unwrap(), "hb/"), 1, "fetched whole: {l}");
    }
    let clean = Hb::new();
    clean.ok(&["pull", &format!("{}/debian-app:v2", open_registry())]);
    same_layer_tars(&hb, &clean, &v2);
    hb.fsck_clean();
}

/// The data blobs (`application/vnd.hyperbox...data`) of `image`'s accelerated form.
fn data_blobs(up: &Upstream, image: &str) -> Vec<String> {
    let (_, rest) = image.split_once('/').unwrap();
    let (repo, tag) = rest.split_once(':').unwrap();
    let get = |what: &str, accept: &str| -> serde_json::Value {
        let (code, body) = crate::proxy::curl(&[
            "-H",
            &format!("Accept: {accept}"),
            &format!("http://{}/v2/{repo}/manifests/{what}", up.addr),
        ]);
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    };
    let index = get(tag, "application/vnd.oci.image.index.v1+json");
    let accel = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["io.hyperbox.accelerated"].is_string())
        .expect("an accelerated manifest in the index")["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let m = get(&accel, "application/vnd.oci.image.manifest.v1+json");
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == "application/vnd.hyperbox.chunk.data.v1")
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// A registry that loses the blobs mid-update: the pull fails, no image appears, the store
/// passes fsck; with the blobs back, the next pull fetches only what is still missing (the
/// indexes and tables were kept) and makes the same layers as a clean pull. Then kill -9 at
/// random moments of a delta pull: fsck passes after each, and a last pull completes the image.
#[test]
fn a_registry_dying_or_a_kill_9_mid_update_leaves_a_store_the_next_pull_completes() {
    let (v1, v2) = converted();
    let up = Upstream::start();
    up.seed_as(v2, "app:v2");
    let v2 = format!("{}/app:v2", up.addr);
    let hb = Hb::new();
    hb.json(&["pull", v1]);
    let plan = hb.json(&["pull", "--plan", &v2]);
    let chunked = chunk_layers(&plan);
    assert!(!chunked.is_empty(), "{plan:#}");
    // The registry loses the data blobs and the changed layer blobs.
    let mut lost: Vec<(std::path::PathBuf, Vec<u8>)> = Vec::new();
    for d in data_blobs(&up, &v2).into_iter().chain(chunked.iter().map(|l| l["digest"].as_str().unwrap().to_string())) {
        let f = up.blob_file(&d);
        lost.push((f.clone(), std::fs::read(&f).unwrap()));
        std::fs::remove_file(&f).unwrap();
    }
    let err = hb.fails(&["pull", &v2], 1);
    assert!(err.contains("layer"), "the error names what failed: {err}");
    let images = hb.json(&["images"]);
    assert_eq!(images.as_array().unwrap().len(), 1, "no half image is visible: {images}");
    hb.fsck_clean();
    for (f, bytes) in &lost {
        std::fs::write(f, bytes).unwrap();
    }
    let resumed = hb.json(&["pull", "--plan", &v2]);
    for l in chunk_layers(&resumed) {
        assert_eq!(l["meta_bytes"], 0, "the index and table were kept: {l}");
    }
    hb.json(&["pull", &v2]);
    let clean = Hb::new();
    clean.ok(&["pull", &format!("{}/debian-app:v2", open_registry())]);
    same_layer_tars(&hb, &clean, &v2);
    hb.fsck_clean();

    // kill -9 at random moments of a delta pull (timed from an uninterrupted one).
    let hb = Hb::new();
    hb.json(&["pull", v1]);
    let full = {
        let probe = Hb::new();
        probe.json(&["pull", v1]);
        let t = Instant::now();
        probe.json(&["pull", &v2]);
        t.elapsed()
    };
    let mut rng = Rng(0x5eed_de17a);
    for _ in 0..4 {
        let delay = Duration::from_micros(rng.next() % (full.as_micros() as u64).max(1000));
        let mut child = hb.command(&["-q", "pull", &v2]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        hb.fsck_clean();
    }
    hb.json(&["pull", &v2]);
    same_layer_tars(&hb, &clean, &v2);
    hb.fsck_clean();
}

/// An hb client of `hb proxy`: the proxy makes the accelerated form; an update reaches the
/// client as its new chunks.
#[test]
fn through_the_proxy_an_update_reaches_hb_clients_as_its_new_chunks() {
    let up = Upstream::start();
    up.seed("debian-app:v1");
    up.seed("debian-app:v2");
    let proxy = Proxy::start(&format!("[proxy]\n[[proxy.upstream]]\nhost = \"{}\"\nalias = \"up\"\n", up.addr));
    let (v1, v2) = (format!("{}/up/debian-app:v1", proxy.addr), format!("{}/up/debian-app:v2", proxy.addr));
    let hb = Hb::new();
    hb.json(&["pull", "--plain-http", &v1]);
    // The proxy converts v2 on the first hb request; a lazy pull asks for it.
    let warm = Hb::new();
    warm.json(&["pull", "--lazy", "--plain-http", &v2]);
    let plan = hb.json(&["pull", "--plan", "--plain-http", &v2]);
    assert!(!chunk_layers(&plan).is_empty(), "{plan:#}");
    let r = hb.json(&["pull", "--plain-http", &v2]);
    let got = r["bytes_downloaded"].as_u64().unwrap();
    assert!(got * 50 <= whole_bytes(&plan), "{got} bytes for an update of {}: {r:#}", whole_bytes(&plan));
    within_5_percent("through the proxy", got, plan["fetch_bytes"].as_u64().unwrap());
    let clean = Hb::new();
    clean.ok(&["pull", &format!("{}/debian-app:v2", open_registry())]);
    same_layer_tars(&hb, &clean, &v2);
    hb.fsck_clean();
}
