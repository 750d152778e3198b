//! Learned start-up orders (cold-start issue): the first cold start of an image records what it
//! reads first; the store (or the daemon that owns it) keeps it across restarts; an `hb proxy`
//! the image came through keeps the first client's order and serves it to every later client;
//! an order naming chunks the image does not have is refused wherever it is offered.

use std::process::Command;

use hb_tests::*;

use super::daemon::{socket, wait_for, with_socket, Daemon};
use super::lazy::{convert, lazily_pulled};
use super::proxy::{curl, Proxy, Upstream};
use super::pull::open_registry;

/// `hb inspect IMAGE`'s start-up order length (None when the image has none).
fn order_chunks(hb: &Hb, image: &str) -> Option<u64> {
    let o = hb.run(&["inspect", image]);
    if !o.status.success() {
        return None;
    }
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    j["startupOrder"]["chunks"].as_u64()
}

/// The manifest digest of `image` in `hb`'s store.
fn image_digest(hb: &Hb, image: &str) -> String {
    let j: serde_json::Value = serde_json::from_str(&hb.ok(&["inspect", image])).unwrap();
    j["digest"].as_str().unwrap().to_string()
}

/// An order naming one chunk no image has.
fn foreign_order() -> Vec<u8> {
    hb_core::StartupOrder { chunks: vec![hb_core::ChunkId::of(b"no image has this chunk")] }.encode()
}

/// PUTs `body` as the start-up order of `digest` of repository `repo` at the proxy.
fn offer(proxy: &Proxy, repo: &str, digest: &str, body: &[u8]) -> (u16, String) {
    let file = proxy.hb.path("offer.bin");
    std::fs::write(&file, body).unwrap();
    let url = format!("http://{}/v2/{repo}/_hyperbox/startup/{digest}", proxy.addr);
    let (code, out) = curl(&["-X", "PUT", "--data-binary", &format!("@{}", file.display()), &url]);
    (code, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn the_first_clients_order_is_served_by_the_proxy_to_every_later_client() {
    let up = Upstream::start();
    up.seed("debian-app:v1");
    up.seed("busybox:latest");
    let mut proxy = Proxy::start(&format!("[proxy]\n[[proxy.upstream]]\nhost = \"{}\"\nalias = \"up\"\n", up.addr));
    let image = format!("{}/up/debian-app:v1", proxy.addr);

    // The first client starts the image cold, with no order anywhere: it learns one, keeps it
    // and offers it to the proxy.
    let a = Hb::new();
    a.ok(&["pull", "-q", "--lazy", "--plain-http", &image]);
    assert_eq!(order_chunks(&a, &image), None, "nothing was recorded yet");
    let o = a.run(&["run", "--rm", &image, "python3", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "42\n", "{}", String::from_utf8_lossy(&o.stderr));
    let learned = order_chunks(&a, &image).expect("the first cold start kept the order it learned");
    assert!(learned > 10, "{learned} chunks");
    // (Offered before `hb run` returned: the learner ends with the mount.)

    // A second client gets it with the accelerated form, before its first start, and runs.
    let b = Hb::new();
    let p = b.json(&["pull", "--lazy", "--plain-http", &image]);
    assert_eq!(p["startup_chunks"].as_u64(), Some(learned), "{p}");
    let o = b.run(&["run", "--rm", &image, "python3", "-c", "print(1)"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "1\n", "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(order_chunks(&b, &image), Some(learned), "an image with an order learns no other");

    // The first order wins: a second offer is answered, and changes nothing.
    let digest = image_digest(&a, &image);
    // (An empty order names no foreign chunk: a valid offer.)
    let raw = hb_core::StartupOrder { chunks: Vec::new() }.encode();
    let (code, body) = offer(&proxy, "up/debian-app", &digest, &raw);
    assert_eq!((code, body.contains("\"kept\":false")), (200, true), "{code} {body}");

    // Bad offers get an OCI error naming what is wrong, and change nothing.
    let (code, body) = offer(&proxy, "up/debian-app", &digest, &foreign_order());
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("BLOB_UPLOAD_INVALID") && body.contains("does not have"), "{body}");
    let (code, body) = offer(&proxy, "up/debian-app", &digest, b"not an order");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("start-up order"), "{body}");
    let unknown = format!("sha256:{}", "0".repeat(64));
    let (code, body) = offer(&proxy, "up/debian-app", &unknown, &raw);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("MANIFEST_UNKNOWN"), "{body}");
    let (code, _) = curl(&[&format!("http://{}/v2/up/debian-app/_hyperbox/startup/{digest}", proxy.addr)]);
    assert_eq!(code, 405, "orders are offered, not listed");

    // Kept across a restart of the proxy.
    proxy.kill9();
    proxy.restart();
    let c = Hb::new();
    let p = c.json(&["pull", "--lazy", "--plain-http", &image]);
    assert_eq!(p["startup_chunks"].as_u64(), Some(learned), "{p}");
    proxy.kill9();
    proxy.hb.fsck_clean();
    a.fsck_clean();
}

#[test]
fn the_daemon_keeps_a_learned_order_across_restarts_and_refuses_a_foreign_one() {
    let reg = open_registry();
    let image = convert(&format!("{reg}/debian-app:v1"), "learned");
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    let args = |a: &[&str]| with_socket(&hb, a);
    let run = args(&["run", "--rm", &image, "python3", "-c", "print(6*7)"]);
    let o = hb.run(&run.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "42\n", "{}", String::from_utf8_lossy(&o.stderr));
    // The mount server learns for a few seconds (or until the mount ends), then the daemon keeps it.
    let mut learned = None;
    wait_for("the daemon to keep the learned order", || {
        learned = order_chunks(&hb, &image);
        learned.is_some()
    });
    let learned = learned.unwrap();
    assert!(learned > 10, "{learned}");
    d.stop();
    let mut d = Daemon::start(&hb);
    assert_eq!(order_chunks(&hb, &image), Some(learned), "kept across a restart");

    // An order naming chunks the image lacks is refused by the daemon's API, with the reason.
    let digest = image_digest(&hb, &image);
    let file = hb.path("order.bin");
    std::fs::write(&file, foreign_order()).unwrap();
    let o = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-X", "POST", "--unix-socket", &socket(&hb)])
        .args(["--data-binary", &format!("@{}", file.display())])
        .arg(format!("http://hb/v1/startup?manifest={digest}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.trim_end().ends_with("400") && text.contains("does not have"), "{text}");
    assert_eq!(order_chunks(&hb, &image), Some(learned));
    d.stop();
    // The image mount outlives the daemons (the second adopted it): a test leaves none behind
    // (regression: one stale FUSE mount per suite run was left in /dev/shm).
    super::daemon::unmount_all(&hb);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(hb.dir.path().to_str().unwrap()), "a mount of this test is left:\n{mounts}");
}

/// A number after `key=` in a log line.
fn logged(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("{key}="))? + key.len() + 1;
    text[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[test]
fn a_first_start_fetches_its_programs_files_before_it_reads_them() {
    // debian-app runs `python3 /app/main.py`: a dynamic ELF program with its loader and libraries.
    let (hb, image) = lazily_pulled("debian-app:v1", "guess");
    let o =
        hb.command(&["run", "--rm", &image]).env("HB_LOG", "hb::phase=debug,hb_images=debug,info").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("hello"), "{err}");
    // The program, /app/main.py, the loader and python's libraries: found before they were read.
    let files = logged(&err, "files").unwrap_or_else(|| panic!("no start-up set was guessed: {err}"));
    assert!(files >= 5, "{files} files guessed: {err}");
    let prefetched = logged(&err, "prefetched_chunks").expect("the mount's figures");
    assert!(prefetched >= 40, "{prefetched} chunks fetched before they were read: {err}");
    // The start learned its order (its guessed files, read by passthrough, stand in it by their
    // opens: `lazy::a_mount_nobody_reads_...` shows a guess alone is not an order).
    let learned = order_chunks(&hb, &image).expect("an order was learned");
    assert!(learned > 10, "learned {learned} chunks");
    assert!(err.contains("program=usr/bin/python3"), "the image's command was guessed for: {err}");
    hb.fsck_clean();

    // `hb run IMAGE CMD`: the guess is for the command given, by docker's rules.
    let other = Hb::new();
    other.ok(&["pull", "-q", "--lazy", "--plain-http", &image]);
    let o = other
        .command(&["run", "--rm", &image, "sh", "-c", "echo given"])
        .env("HB_LOG", "hb_images=debug,info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "given\n", "{err}");
    assert!(err.contains("program=usr/bin/dash"), "sh (dash) was guessed for: {err}");
}
