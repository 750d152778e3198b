//! `hb proxy`, the pull-through mirror: real clients (skopeo, containerd's ctr, hb, curl) through
//! it against real upstreams (Debian's docker-registry, started per test where requests are
//! counted) and a scripted upstream for the faults a real one will not make on demand.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hb_tests::*;
use sha2::Digest as _;

use super::daemon::wait_for;
use super::pull::{open_registry, run};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub(crate) fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect::<String>())
}

/// `hb proxy` on its own store and port; killed on drop.
pub(crate) struct Proxy {
    pub(crate) hb: Hb,
    child: Option<Child>,
    pub(crate) addr: String,
}

impl Proxy {
    pub(crate) fn start(proxy_toml: &str) -> Proxy {
        Self::start_with(proxy_toml, |_| {})
    }

    /// [`Proxy::start`] after `prepare` had the store's settings (e.g. its root) to change.
    pub(crate) fn start_with(proxy_toml: &str, prepare: impl FnOnce(&mut Hb)) -> Proxy {
        let mut hb = Hb::with_config(proxy_toml);
        prepare(&mut hb);
        let mut p = Proxy { hb, child: None, addr: format!("127.0.0.1:{}", free_port()) };
        p.restart();
        p
    }

    /// [`Proxy::start`] listening on `addr` (e.g. a veth address a namespace reaches).
    pub(crate) fn start_on(proxy_toml: &str, addr: String) -> Proxy {
        let mut p = Proxy { hb: Hb::with_config(proxy_toml), child: None, addr };
        p.restart();
        p
    }

    /// The proxy's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub(crate) fn restart(&mut self) {
        let child = self
            .hb
            .command(&["proxy", "--listen", &self.addr])
            .env("HB_LOG", "warn,access=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.hb.path("proxy.log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = self.addr.clone();
        wait_for("hb proxy to answer", || TcpStream::connect(&addr).is_ok());
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn stats(&self) -> serde_json::Value {
        let s = self.hb.json(&["proxy", "stats", "--url", &format!("http://{}", self.addr)]);
        s["upstreams"][0].clone()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.hb.path("proxy.log")).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A docker-registry of our own (its log counts what reached it); killed on drop.
pub(crate) struct Upstream {
    child: Option<Child>,
    pub(crate) addr: String,
    dir: tempfile::TempDir,
}

impl Upstream {
    pub(crate) fn start() -> Upstream {
        let dir = scratch();
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: info, formatter: json}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {addr}, secret: s}}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut u = Upstream { child: None, addr, dir };
        u.restart();
        u
    }

    pub(crate) fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("log")).unwrap();
        self.child = Some(
            Command::new("docker-registry")
                .arg("serve")
                .arg(self.dir.path().join("config.yml"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let addr = self.addr.clone();
        wait_for("docker-registry to answer", || TcpStream::connect(&addr).is_ok());
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Copies `image` (e.g. `busybox:latest`) from the shared test registry into this one.
    pub(crate) fn seed(&self, image: &str) {
        self.copy(&format!("{}/{image}", open_registry()), image, false);
    }

    /// Copies `src` (any reference, every manifest of an index: an accelerated form too) into
    /// this registry as `dst`.
    pub(crate) fn seed_as(&self, src: &str, dst: &str) {
        self.copy(src, dst, true);
    }

    fn copy(&self, src: &str, dst: &str, all: bool) {
        let o = Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args(all.then_some("--all"))
            .arg(format!("docker://{src}"))
            .arg(format!("docker://{}/{dst}", self.addr))
            .output()
            .unwrap();
        assert!(o.status.success(), "seeding {dst}: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Where this registry keeps blob `digest` (`sha256:...`) on disk.
    pub(crate) fn blob_file(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// Body bytes of completed GETs it answered clients whose User-Agent starts with `agent`.
    pub(crate) fn bytes_to(&self, agent: &str) -> u64 {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap();
        let field = format!(r#""http.request.useragent":"{agent}"#);
        log.lines()
            .filter(|l| l.contains("response completed") && l.contains(&field))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["http.response.written"].as_u64())
            .sum()
    }

    /// Completed GETs of blob `digest` from clients whose User-Agent starts with `agent`.
    pub(crate) fn blob_gets_from(&self, digest: &str, agent: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap();
        let field = format!(r#""http.request.useragent":"{agent}"#);
        log.lines()
            .filter(|l| {
                l.contains("response completed")
                    && l.contains(&field)
                    && l.contains(r#""http.request.method":"GET""#)
                    && l.contains(&format!("/blobs/{digest}"))
            })
            .count()
    }

    /// Completed requests from clients whose User-Agent starts with `agent` (`hb/` for hb's
    /// own reads, `hb-mirror/` for an `hb proxy`'s), from its log.
    pub(crate) fn requests_from(&self, agent: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap();
        let field = format!(r#""http.request.useragent":"{agent}"#);
        log.lines().filter(|l| l.contains("response completed") && l.contains(&field)).count()
    }

    /// Completed `GET /v2/` (the version check a client makes to learn how to authorize) from
    /// clients whose User-Agent starts with `agent`.
    pub(crate) fn version_checks_from(&self, agent: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap();
        let field = format!(r#""http.request.useragent":"{agent}"#);
        log.lines()
            .filter(|l| {
                l.contains("response completed") && l.contains(&field) && l.contains(r#""http.request.uri":"/v2/""#)
            })
            .count()
    }

    /// Completed GETs of `digest`'s blob the registry answered, from its log.
    fn blob_gets(&self, digest: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap();
        log.lines()
            .filter(|l| {
                l.contains("response completed")
                    && l.contains(r#""http.request.method":"GET""#)
                    && l.contains(&format!("/blobs/{digest}"))
            })
            .count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn skopeo(args: &[&str]) -> (bool, String) {
    let o = Command::new("skopeo").args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
}

/// `curl -s` with extra arguments: (HTTP status, body).
pub(crate) fn curl(args: &[&str]) -> (u16, Vec<u8>) {
    let o = Command::new("curl").args(["-s", "-o", "-", "-w", "\n%{http_code}"]).args(args).output().unwrap();
    let mut out = o.stdout;
    let split = out.iter().rposition(|&b| b == b'\n').unwrap();
    let code = String::from_utf8_lossy(&out[split + 1..]).trim().parse().unwrap_or(0);
    out.truncate(split);
    (code, out)
}

/// The layers of an image's manifest (via the upstream), largest last.
fn layers(registry: &str, image: &str) -> Vec<(String, u64)> {
    let (ok, out) = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{registry}/{image}")]);
    assert!(ok, "{out}");
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut l: Vec<(String, u64)> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["digest"].as_str().unwrap().to_string(), l["size"].as_u64().unwrap()))
        .collect();
    l.sort_by_key(|(_, s)| *s);
    l
}

#[test]
fn real_clients_pull_through_the_proxy_and_each_blob_crosses_the_link_once() {
    let mut up = Upstream::start();
    up.seed("busybox:latest");
    up.seed("debian-app:v1");
    let mut proxy = Proxy::start(&format!(
        "[proxy]\n[[proxy.upstream]]\nhost = \"{}\"\nalias = \"up\"\ntag_ttl_seconds = 0\n",
        up.addr
    ));
    let p = proxy.addr.clone();
    let big = layers(&up.addr, "debian-app:v1").pop().unwrap();

    // 32 skopeo clients cold-pull the same image at once: one upstream GET per blob.
    let oks: Vec<(bool, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..32)
            .map(|i| {
                let dest = format!("dir:{}", proxy.hb.path(&format!("bb{i}")).display());
                let src = format!("docker://{p}/up/busybox:latest");
                s.spawn(move || skopeo(&["copy", "--src-tls-verify=false", &src, &dest]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(oks.iter().all(|(ok, _)| *ok), "{:?}", oks.iter().find(|(ok, _)| !ok));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(proxy.hb.path("bb0").join("manifest.json")).unwrap()).unwrap();
    for d in [&m["config"]["digest"], &m["layers"][0]["digest"]] {
        assert_eq!(up.blob_gets(d.as_str().unwrap()), 1, "blob {d}: one upstream GET for 32 clients");
    }

    // 32 clients at once ask for the large layer the proxy does not have: one upstream GET.
    let results: Vec<(u16, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|_| {
                let url = format!("http://{p}/v2/up/debian-app/blobs/{}", big.0);
                s.spawn(move || {
                    let o = Command::new("curl")
                        .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", &url])
                        .output()
                        .unwrap();
                    let t = String::from_utf8_lossy(&o.stdout).to_string();
                    let (c, n) = t.split_once(' ').unwrap();
                    (c.parse().unwrap(), n.parse().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|&(c, n)| c == 200 && n as u64 == big.1), "{results:?}");
    assert_eq!(up.blob_gets(&big.0), 1, "one upstream GET for 32 concurrent clients");
    let (code, body) = curl(&[&format!("http://{p}/v2/up/debian-app/blobs/{}", big.0)]);
    assert_eq!((code, sha256(&body)), (200, big.0.clone()), "served bytes match the digest");

    // skopeo by alias, path style, and by the default upstream; each blob fetched upstream once.
    let (ok, out) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{p}/up/debian-app:v1"),
        &format!("dir:{}", proxy.hb.path("a").display()),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{p}/debian-app:v1"),
        &format!("dir:{}", proxy.hb.path("b").display()),
    ]);
    assert!(ok, "{out}");
    for (d, _) in layers(&up.addr, "debian-app:v1") {
        assert_eq!(up.blob_gets(&d), 1, "blob {d} crossed the link once");
    }
    // containerd with hosts.toml (`?ns=` addressing).
    let hosts = proxy.hb.path("certs.d").join(&up.addr);
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!("server = \"http://{}\"\n[host.\"http://{p}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", up.addr),
    )
    .unwrap();
    let ctd = super::snapshotter::Containerd::start_plain(&proxy.hb);
    ctd.ok(&[
        "images",
        "pull",
        "--hosts-dir",
        proxy.hb.path("certs.d").to_str().unwrap(),
        &format!("{}/busybox:latest", up.addr),
    ]);
    drop(ctd);
    assert!(proxy.log().is_empty() || !proxy.log().contains("ERROR"), "{}", proxy.log());
    // hb itself pulls through it.
    let client = Hb::new();
    client.ok(&["pull", "-q", "--plain-http", &format!("{p}/up/busybox:latest")]);
    let bb = layers(&up.addr, "busybox:latest");
    assert_eq!(up.blob_gets(&bb[0].0), 1, "containerd and hb share one upstream GET");

    // Range and HEAD answered from the store; errors in the OCI format.
    let (code, part) = curl(&["-r", "100-199", &format!("http://{p}/v2/up/debian-app/blobs/{}", big.0)]);
    assert_eq!((code, part.len()), (206, 100));
    assert_eq!(part, body[100..200]);
    let (code, _) = curl(&["-r", &format!("{}-", big.1), &format!("http://{p}/v2/up/debian-app/blobs/{}", big.0)]);
    assert_eq!(code, 416);
    let (code, head) = curl(&["-I", &format!("http://{p}/v2/up/debian-app/blobs/{}", big.0)]);
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(code == 200 && head.contains(&format!("content-length: {}", big.1)) && head.contains(&big.0), "{head}");
    let (code, err) = curl(&[&format!("http://{p}/v2/up/debian-app/blobs/sha256:{}", "0".repeat(64))]);
    assert!(code == 404 && String::from_utf8_lossy(&err).contains("BLOB_UNKNOWN"), "{}", String::from_utf8_lossy(&err));
    let (code, err) = curl(&[&format!("http://{p}/v2/quay.io/x/manifests/v1")]);
    assert!(code == 404 && String::from_utf8_lossy(&err).contains("NAME_UNKNOWN"));
    let (code, _) = curl(&["-X", "PUT", &format!("http://{p}/v2/up/x/manifests/v1")]);
    assert_eq!(code, 405);
    // Accept negotiation: a client that lists only Docker's types is not handed an OCI manifest.
    let (code, err) = curl(&[
        "-H",
        "Accept: application/vnd.docker.distribution.manifest.v2+json",
        &format!("http://{p}/v2/up/busybox/manifests/latest"),
    ]);
    // (The test image's manifest is an OCI one.)
    assert!(code == 404 && String::from_utf8_lossy(&err).contains("MANIFEST_UNKNOWN"), "{code}");
    // tags/list is passed through.
    let (code, tags) = curl(&[&format!("http://{p}/v2/up/busybox/tags/list")]);
    let tags: serde_json::Value = serde_json::from_slice(&tags).unwrap();
    assert_eq!((code, tags["tags"][0].as_str()), (200, Some("latest")), "{tags}");

    // The upstream goes down: tags are served stale (visible in stats), blobs from the store.
    let before = proxy.stats()["bytes_from_upstream"].as_u64().unwrap();
    up.stop();
    let (ok, out) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{p}/up/debian-app:v1"),
        &format!("dir:{}", proxy.hb.path("c").display()),
    ]);
    assert!(ok, "served while the upstream is down: {out}");
    let s = proxy.stats();
    assert!(s["stale_served"].as_u64().unwrap() >= 1 && s["hits"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["bytes_from_upstream"].as_u64(), Some(before), "nothing came from the upstream meanwhile");
    up.restart();
    proxy.kill9();
    proxy.hb.fsck_clean();
}

#[test]
fn private_content_is_served_only_to_clients_the_upstream_lets_in() {
    let reg = open_registry();
    let port: u16 = reg.rsplit(':').next().unwrap().parse().unwrap();
    let (basic, token) = (format!("127.0.0.1:{}", port + 1), format!("127.0.0.1:{}", port + 2));
    let proxy = Proxy::start(&format!(
        "[proxy]\n[[proxy.upstream]]\nhost = \"{basic}\"\nalias = \"basic\"\n[[proxy.upstream]]\nhost = \"{token}\"\nalias = \"token\"\n"
    ));
    let p = proxy.addr.clone();
    for alias in ["basic", "token"] {
        let src = format!("docker://{p}/{alias}/private/busybox:latest");
        let dest = |n: &str| format!("dir:{}", proxy.hb.path(&format!("{alias}-{n}")).display());
        let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", &src, &dest("anon")]);
        assert!(
            !ok && (out.contains("401") || out.to_lowercase().contains("unauthorized")),
            "{alias}: anonymous refused: {out}"
        );
        let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "hb:hb-secret", &src, &dest("ok")]);
        assert!(ok, "{alias} with credentials: {out}");
        // Now cached: still refused to anonymous clients and to wrong credentials.
        let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", &src, &dest("anon2")]);
        assert!(!ok, "{alias}: cached private content served anonymously: {out}");
        let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "hb:wrong", &src, &dest("wrong")]);
        assert!(!ok, "{alias}: cached private content served to wrong credentials: {out}");
        let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "hb:hb-secret", &src, &dest("ok2")]);
        assert!(ok, "{alias} with credentials again: {out}");
    }
    // A cached private blob by URL: 401 with a challenge, not the bytes.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(proxy.hb.path("basic-ok").join("manifest.json")).unwrap()).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let (code, body) = curl(&[&format!("http://{p}/v2/basic/private/busybox/blobs/{layer}")]);
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
    let (code, body) = curl(&["-u", "hb:hb-secret", &format!("http://{p}/v2/basic/private/busybox/blobs/{layer}")]);
    assert_eq!((code, sha256(&body)), (200, layer.to_string()));
    assert!(proxy.stats()["hits"].as_u64().unwrap() > 0);

    // With the mirror's own credentials for an upstream, anonymous clients get what they allow.
    let shared = Proxy::start(&format!(
        "[proxy]\n[[proxy.upstream]]\nhost = \"{token}\"\nalias = \"token\"\nusername = \"hb\"\npassword = \"hb-secret\"\n"
    ));
    let (ok, out) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/token/private/busybox:latest", shared.addr),
        &format!("dir:{}", shared.hb.path("anon").display()),
    ]);
    assert!(ok, "the mirror's credentials serve anonymous clients: {out}");

    // The mirror's credentials as an identity token (user `<token>`, docker's identitytoken):
    // exchanged at the upstream's token service; a stale one is refused.
    for (secret, works) in [("hb-refresh-token", true), ("a-stale-token", false)] {
        let p = Proxy::start(&format!(
            "[proxy]\n[[proxy.upstream]]\nhost = \"{token_host}\"\nalias = \"token\"\nusername = \"<token>\"\npassword = \"{secret}\"\n",
            token_host = token
        ));
        let (ok, out) = skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/token/private/busybox:latest", p.addr),
            &format!("dir:{}", p.hb.path("identity").display()),
        ]);
        assert_eq!(ok, works, "identity token {secret}: {out}");
    }
}

/// What the scripted upstream does with blob GETs.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Fault {
    /// Closes the first response halfway, then serves Range requests properly.
    TruncateOnce,
    /// Same length, one byte changed.
    WrongBytes,
    /// 64 KiB every 20 ms.
    Slow,
    /// Closes every response halfway.
    DiesMidBlob,
    /// Serves the blob as it is.
    Clean,
}

/// A minimal registry that serves one blob at `/v2/fake/blobs/<digest>` and misbehaves as told.
pub(crate) struct Scripted {
    pub(crate) addr: String,
    pub(crate) blob: Arc<Vec<u8>>,
    pub(crate) digest: String,
    gets: Arc<AtomicUsize>,
    ranges: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    pub(crate) fn start(fault: Fault, size: usize) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let blob = Arc::new(pseudo_random(7, size));
        let digest = sha256(&blob);
        let gets = Arc::new(AtomicUsize::new(0));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let s =
            Scripted { addr, blob: blob.clone(), digest: digest.clone(), gets: gets.clone(), ranges: ranges.clone() };
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (blob, digest, gets, ranges) = (blob.clone(), digest.clone(), gets.clone(), ranges.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap_or(0);
                    let mut range = None;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_lowercase().strip_prefix("range: bytes=") {
                            range = v.trim().strip_suffix('-').and_then(|s| s.parse::<usize>().ok());
                        }
                    }
                    let mut w = conn;
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    if path == "/v2/fake/manifests/bad-type" {
                        // A control character in the media type the manifest declares.
                        let body = BAD_TYPE_MANIFEST.as_bytes();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = w.write_all(head.as_bytes()).and_then(|_| w.write_all(body));
                        return;
                    }
                    if path != format!("/v2/fake/blobs/{digest}") {
                        let _ =
                            w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        return;
                    }
                    let n = gets.fetch_add(1, Ordering::SeqCst);
                    let mut data = blob.to_vec();
                    if fault == Fault::WrongBytes {
                        data[size / 2] ^= 1;
                    }
                    let start = range.unwrap_or(0);
                    ranges.lock().unwrap().push(format!("{start}"));
                    let head = if start > 0 {
                        format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n", size - start, size - 1, size)
                    } else {
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n")
                    };
                    let _ = w.write_all(head.as_bytes());
                    let body = &data[start..];
                    let cut = match fault {
                        Fault::TruncateOnce if n == 0 => size / 2,
                        Fault::DiesMidBlob => (size / 2).saturating_sub(start),
                        _ => body.len(),
                    };
                    for piece in body[..cut].chunks(64 << 10) {
                        if w.write_all(piece).is_err() {
                            return;
                        }
                        if fault == Fault::Slow {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    let _ = w.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        s
    }

    pub(crate) fn url(&self, proxy: &Proxy) -> String {
        format!("http://{}/v2/fake/blobs/{}", proxy.addr, self.digest)
    }
}

/// A manifest whose `mediaType` holds a BEL character.
const BAD_TYPE_MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json\u0007","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;

pub(crate) fn scripted_proxy(s: &Scripted) -> Proxy {
    Proxy::start(&format!("[proxy]\n[[proxy.upstream]]\nhost = \"{}\"\n", s.addr))
}

#[test]
fn upstream_faults_never_reach_clients_as_good_bytes() {
    // Dropped mid-blob once: the proxy resumes with Range, the client sees one whole blob.
    let s = Scripted::start(Fault::TruncateOnce, 3 << 20);
    let proxy = scripted_proxy(&s);
    let (code, body) = curl(&[&s.url(&proxy)]);
    assert_eq!((code, body.len(), sha256(&body)), (200, s.blob.len(), s.digest.clone()));
    assert_eq!(
        s.ranges.lock().unwrap().clone(),
        vec!["0".to_string(), format!("{}", 3 << 19)],
        "resumed where it broke"
    );
    drop(proxy);

    // Wrong bytes: the client's body ends short (never the whole wrong blob), nothing is kept,
    // the next request fetches again.
    let s = Scripted::start(Fault::WrongBytes, 1 << 20);
    let proxy = scripted_proxy(&s);
    for _ in 0..2 {
        let (_, body) = curl(&[&s.url(&proxy)]);
        assert!(body.len() < s.blob.len(), "a wrong blob was served whole");
    }
    assert_eq!(s.gets.load(Ordering::SeqCst), 2, "nothing wrong was kept");
    let st = proxy.stats();
    assert!(st["errors"]["digest"].as_u64().unwrap() >= 2, "{st}");
    assert!(proxy.log().contains("do not match"), "{}", proxy.log());
    drop(proxy);

    // An upstream that dies mid-blob every time: the client's body ends short, nothing kept.
    let s = Scripted::start(Fault::DiesMidBlob, 1 << 20);
    let proxy = scripted_proxy(&s);
    let (_, body) = curl(&["--max-time", "60", &s.url(&proxy)]);
    assert!(body.len() < s.blob.len());
    assert_eq!(proxy.hb.json(&["proxy", "stats", "--url", &format!("http://{}", proxy.addr)])["objects"], 0);
}

/// Regression (hardening issue): a control character in an upstream manifest's media type went
/// into a Content-Type header with `expect`, and the handler panicked.
#[test]
fn a_manifest_with_an_invalid_media_type_is_refused_with_an_oci_error() {
    let s = Scripted::start(Fault::WrongBytes, 1 << 10);
    let proxy = scripted_proxy(&s);
    let url = format!("http://{}/v2/fake/manifests/bad-type", proxy.addr);
    for _ in 0..2 {
        let (code, body) = curl(&[&url]);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(code, 502, "{text}");
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(err["errors"][0]["code"], "MANIFEST_INVALID", "{err}");
        assert!(err["errors"][0]["message"].as_str().unwrap().contains("invalid media type"), "{err}");
    }
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
    assert_eq!(
        proxy.hb.json(&["proxy", "stats", "--url", &format!("http://{}", proxy.addr)])["objects"],
        0,
        "nothing kept"
    );
}

#[test]
fn slow_upstream_single_flight_disconnects_and_kill_9_during_a_fill() {
    let s = Scripted::start(Fault::Slow, 4 << 20);
    let mut proxy = scripted_proxy(&s);
    // 32 clients at once while the upstream trickles: one upstream GET, every client whole.
    let url = s.url(&proxy);
    let sums: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..32).map(|_| sc.spawn(|| sha256(&curl(&[&url]).1))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(sums.iter().all(|d| *d == s.digest), "every client got the verified blob");
    assert_eq!(s.gets.load(Ordering::SeqCst), 1);

    // kill -9 during a fill: the store stays consistent and the blob is fetched whole later.
    let s2 = Scripted::start(Fault::Slow, 4 << 20);
    proxy.kill9();
    let mut proxy2 = scripted_proxy(&s2);
    let url2 = s2.url(&proxy2);
    let addr = proxy2.addr.clone();
    // A client that reads a little and hangs up: the download goes on.
    {
        let mut c = TcpStream::connect(&addr).unwrap();
        let path = url2.split_once(addr.as_str()).unwrap().1.to_string();
        write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    proxy2.kill9();
    proxy2.hb.fsck_clean();
    proxy2.restart();
    let (code, body) = curl(&[&url2]);
    assert_eq!((code, sha256(&body)), (200, s2.digest.clone()));
    assert_eq!(s2.gets.load(Ordering::SeqCst), 2, "the killed fill left nothing behind; one new fetch");
    let (code, body) = curl(&[&url2]);
    assert_eq!((code, sha256(&body)), (200, s2.digest.clone()));
    assert_eq!(s2.gets.load(Ordering::SeqCst), 2, "then served from the store");
    proxy2.kill9();
    proxy2.hb.fsck_clean();
}

#[test]
fn the_proxy_serves_https_and_says_what_is_wrong_with_its_configuration() {
    let dir = std::env::var("HB_REGISTRY_DIR").unwrap_or_else(|_| "/var/tmp/hb-registry".into());
    let tls = std::path::Path::new(&dir).join("tls");
    let hb = Hb::with_config(&format!(
        "[proxy]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[[proxy.upstream]]\nhost = \"{}\"\n",
        tls.join("server.pem").display(),
        tls.join("server.key").display(),
        open_registry()
    ));
    let mut proxy = Proxy { hb, child: None, addr: format!("127.0.0.1:{}", free_port()) };
    proxy.restart();
    let ca = tls.join("ca.pem");
    let base = format!("https://{}", proxy.addr);
    let (code, body) = curl(&["--cacert", ca.to_str().unwrap(), &format!("{base}/v2/busybox/manifests/latest")]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // skopeo trusts the CA from a certs dir of *.crt files, as docker's certs.d.
    let certs = proxy.hb.path("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&ca, certs.join("ca.crt")).unwrap();
    let (ok, out) =
        skopeo(&["inspect", "--cert-dir", certs.to_str().unwrap(), &format!("docker://{}/busybox:latest", proxy.addr)]);
    assert!(ok, "{out}");
    let (code, _) = curl(&[&format!("http://{}/v2/", proxy.addr)]);
    assert_eq!(code, 0, "plain HTTP is not answered on a TLS port");
    proxy.kill9();
    // Configuration mistakes are named.
    let err = proxy.hb.fails(&["proxy", "--listen", "127.0.0.1:1", "--tls-key", "/nonexistent"], 1);
    assert!(err.contains("nonexistent"), "{err}");
    let bad = Hb::with_config("[proxy]\n");
    let err = bad.fails(&["proxy"], 1);
    assert!(err.contains("no upstream registry"), "{err}");
    let err = bad.fails(&["proxy", "--upstream", "127.0.0.1:1", "--listen", "nonsense"], 1);
    assert!(err.contains("bad listen address"), "{err}");
    let err = bad.fails(&["proxy", "--upstream", "h=ftp://h"], 1);
    assert!(err.contains("must start with http"), "{err}");
}

#[test]
fn hb_pulls_any_image_lazily_through_the_proxy_which_converts_it_once() {
    let up = Upstream::start();
    up.seed("debian-app:v1");
    let proxy = Proxy::start(&format!("[proxy]\n[[proxy.upstream]]\nhost = \"{}\"\nalias = \"up\"\n", up.addr));
    let image = format!("{}/up/debian-app:v1", proxy.addr);
    let a = Hb::new();
    let out = a.json(&["pull", "--lazy", "--plain-http", &image]);
    assert!(out.to_string().contains("lazy"), "{out}");
    let o = a.run(&["run", "--rm", &image, "python3", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "42\n", "{}", String::from_utf8_lossy(&o.stderr));
    // A second hb client: the accelerated form is made once.
    let b = Hb::new();
    b.ok(&["pull", "-q", "--lazy", "--plain-http", &image]);
    let o = b.run(&["run", "--rm", &image, "sh", "-c", "gcc --version | head -c 3"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "gcc", "{}", String::from_utf8_lossy(&o.stderr));
    let stats = proxy.hb.json(&["proxy", "stats", "--url", &format!("http://{}", proxy.addr)]);
    assert_eq!(stats["conversions"], 1, "{stats}");
    let (code, metrics) = curl(&[&format!("http://{}/metrics", proxy.addr)]);
    assert_eq!(code, 200);
    super::daemon::assert_exposition(&String::from_utf8_lossy(&metrics), "hb proxy");
    let served = stats["upstreams"][0]["bytes_served"].as_u64().unwrap();
    assert!(served < 60 << 20, "lazy clients read a fraction of the 190 MB image: {served}");
    // Other clients see the upstream's manifest byte for byte.
    let (ok, via) = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{image}")]);
    let (ok2, direct) =
        skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/debian-app:v1", up.addr)]);
    assert!(ok && ok2 && via == direct, "{via}\n{direct}");
    let mut proxy = proxy;
    proxy.kill9();
    proxy.hb.fsck_clean();
}

#[test]
fn above_its_size_cap_the_proxy_evicts_the_least_recently_used_blobs() {
    let up = Upstream::start();
    up.seed("busybox:latest");
    let s = Scripted::start(Fault::TruncateOnce, 1 << 20);
    let mut proxy = Proxy::start(&format!(
        "[proxy]\nmax_size = \"1500K\"\n[[proxy.upstream]]\nhost = \"{}\"\nalias = \"up\"\n[[proxy.upstream]]\nhost = \"{}\"\n",
        up.addr, s.addr
    ));
    let bb = layers(&up.addr, "busybox:latest").pop().unwrap();
    let bb_url = format!("http://{}/v2/up/busybox/blobs/{}", proxy.addr, bb.0);
    let scripted_url = format!("http://{}/v2/{}/fake/blobs/{}", proxy.addr, s.addr, s.digest);
    assert_eq!(curl(&[&bb_url]).0, 200);
    assert_eq!(curl(&[&bb_url]).0, 200);
    assert_eq!(up.blob_gets(&bb.0), 1, "kept");
    let (code, body) = curl(&[&scripted_url]);
    assert_eq!((code, sha256(&body)), (200, s.digest.clone()));
    let st = proxy.hb.json(&["proxy", "stats", "--url", &format!("http://{}", proxy.addr)]);
    assert!(st["evictions"].as_u64().unwrap() >= 1 && st["kept_bytes"].as_u64().unwrap() <= 1500 << 10, "{st}");
    // The older blob went: asked again, it crosses the link again.
    assert_eq!(curl(&[&bb_url]).0, 200);
    assert_eq!(up.blob_gets(&bb.0), 2, "evicted, fetched again");
    proxy.kill9();
    proxy.hb.fsck_clean();
}

#[test]
fn a_proxy_with_its_own_users_refuses_everyone_else() {
    let up = Upstream::start();
    up.seed("busybox:latest");
    let proxy = Proxy::start(&format!(
        "[proxy]\n[[proxy.user]]\nname = \"ci\"\npassword = \"s3cret\"\n[[proxy.upstream]]\nhost = \"{}\"\nalias = \"up\"\n",
        up.addr
    ));
    let src = format!("docker://{}/up/busybox:latest", proxy.addr);
    let dest = |n: &str| format!("dir:{}", proxy.hb.path(n).display());
    let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", &src, &dest("anon")]);
    assert!(!ok, "anonymous client served: {out}");
    let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "ci:wrong", &src, &dest("wrong")]);
    assert!(!ok, "wrong password served: {out}");
    let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "ci:s3cret", &src, &dest("ok")]);
    assert!(ok, "{out}");
    let (code, _) = curl(&[&format!("http://{}/v2/up/busybox/manifests/latest", proxy.addr)]);
    assert_eq!(code, 401);
    // `hb config show` does not print the password.
    let shown = proxy.hb.ok(&["config", "show"]);
    assert!(shown.contains("name = \"ci\"") && !shown.contains("s3cret"), "{shown}");
    // The access log: one line per request, with its status and user (regression: logs written
    // to a file carried ANSI colour codes between the field names and their values).
    let log = proxy.log();
    assert!(log.lines().any(|l| l.contains("request") && l.contains("status=401") && l.contains("user=ci")), "{log}");
    assert!(log.lines().any(|l| l.contains("status=200") && l.contains("user=ci")), "{log}");
    // A hashed password, taken on SIGHUP; the old user goes at the same time.
    let mut hash = proxy.hb.command(&["proxy", "hash-password"]);
    let mut child = hash.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"h4shed\n").unwrap();
    let hashed = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap().trim().to_string();
    assert!(hashed.starts_with("$2") && hashed.len() == 60, "{hashed:?}");
    std::fs::write(
        proxy.hb.config.as_ref().unwrap(),
        format!(
            "version = 1\n[proxy]\n[[proxy.user]]\nname = \"bot\"\npassword = \"{hashed}\"\n[[proxy.upstream]]\nhost = \"{}\"\nalias = \"up\"\n",
            up.addr
        ),
    )
    .unwrap();
    run(Command::new("kill").args(["-HUP", &proxy.pid().to_string()]));
    wait_for("the reload to be logged", || proxy.log().contains("configuration reloaded (SIGHUP): users: 1"));
    let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "bot:h4shed", &src, &dest("hashed")]);
    assert!(ok, "{out}");
    let (ok, _) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "bot:wrong", &src, &dest("bad")]);
    assert!(!ok, "a wrong password against the hash");
    let (ok, _) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "ci:s3cret", &src, &dest("gone")]);
    assert!(!ok, "the removed user is refused after the reload");
    // A config that does not parse leaves the mirror as it was.
    std::fs::write(proxy.hb.config.as_ref().unwrap(), "version = 1\n[proxy\n").unwrap();
    run(Command::new("kill").args(["-HUP", &proxy.pid().to_string()]));
    wait_for("the failed reload to be logged", || proxy.log().contains("configuration not reloaded (SIGHUP)"));
    let (ok, out) = skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "bot:h4shed", &src, &dest("still")]);
    assert!(ok, "{out}");
}

/// The per-tier figures of the mounts `hb` served (`<root>/run/*.stats.json`), summed by tier:
/// name -> (chunks, errors).
fn tier_figures(hb: &Hb) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(hb.root.join("run")).unwrap().flatten() {
        if !e.file_name().to_string_lossy().ends_with(".stats.json") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        for t in v["sources"].as_array().unwrap() {
            let f: &mut (u64, u64) = out.entry(t["name"].as_str().unwrap().to_string()).or_default();
            f.0 += t["chunks"].as_u64().unwrap();
            f.1 += t["errors"].as_u64().unwrap() + t["corrupt"].as_u64().unwrap();
        }
    }
    out
}

/// Mounts `image` lazily with `hosts` as the hosts.toml folder, reads a large file through the
/// mount, unmounts; returns the file's bytes.
fn read_through_mount(hb: &Hb, hosts: &std::path::Path, image: &str) -> Vec<u8> {
    let dir = hb.path("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let h = hosts.to_str().unwrap();
    hb.ok(&["--hosts-dir", h, "mount", "-d", image, dir.to_str().unwrap()]);
    let bytes = std::fs::read(dir.join("usr/bin/perl")).unwrap();
    hb.ok(&["umount", dir.to_str().unwrap()]);
    bytes
}

#[test]
fn a_hosts_toml_mirror_serves_hbs_pulls_and_lazy_reads_and_the_registry_takes_over_when_it_is_down() {
    let up = Upstream::start();
    up.seed("debian-app:v1");
    let plain = format!("{}/debian-app:v1", up.addr);
    let lazy = format!("{}/debian-app:lazy", up.addr);
    // An accelerated form in the registry itself, so a lazy start works without the mirror too.
    Hb::new().ok(&["convert", &plain, &lazy]);
    let mut proxy = Proxy::start(&format!("[proxy]\n[[proxy.upstream]]\nhost = \"{}\"\n", up.addr));
    // containerd's layout: <dir>/<registry host>/hosts.toml, the mirror first.
    let hosts = scratch();
    std::fs::create_dir_all(hosts.path().join(&up.addr)).unwrap();
    std::fs::write(
        hosts.path().join(&up.addr).join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            up.addr, proxy.addr
        ),
    )
    .unwrap();
    let h = hosts.path().to_str().unwrap();
    let direct_before = up.requests_from("hb/");

    // The mirror is up: a lazy start and a whole pull read through it; hb never asks the registry.
    let a = Hb::new();
    let want = read_through_mount(&a, hosts.path(), &lazy);
    let tiers = tier_figures(&a);
    let mirror = tiers.iter().find(|(n, _)| n.starts_with("mirror ")).map(|(_, f)| *f);
    let registry = tiers.iter().find(|(n, _)| n.starts_with("registry ")).map(|(_, f)| *f);
    assert!(mirror.is_some_and(|(chunks, errors)| chunks > 0 && errors == 0), "{tiers:?}");
    assert_eq!(registry.map(|f| f.0), Some(0), "{tiers:?}");
    let c = Hb::new();
    c.ok(&["--hosts-dir", h, "pull", &plain]);
    assert_eq!(up.requests_from("hb/"), direct_before, "every read went through the mirror");
    assert!(up.requests_from("hb-mirror/") > 0);
    let o = c.run(&["run", "--rm", &plain, "python3", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "42\n", "{}", String::from_utf8_lossy(&o.stderr));

    // The mirror is down: the same commands fall back to the registry.
    proxy.kill9();
    let b = Hb::new();
    let got = read_through_mount(&b, hosts.path(), &lazy);
    assert!(got == want, "the same file through the registry");
    let tiers = tier_figures(&b);
    let mirror = tiers.iter().find(|(n, _)| n.starts_with("mirror ")).map(|(_, f)| *f);
    let registry = tiers.iter().find(|(n, _)| n.starts_with("registry ")).map(|(_, f)| *f);
    assert!(mirror.is_some_and(|(chunks, errors)| chunks == 0 && errors > 0), "{tiers:?}");
    assert!(registry.is_some_and(|(chunks, _)| chunks > 0), "{tiers:?}");
    let d = Hb::new();
    d.ok(&["--hosts-dir", h, "pull", &plain]);
    assert!(up.requests_from("hb/") > direct_before, "read from the registry itself");
    a.fsck_clean();
    d.fsck_clean();
}

/// A network namespace joined to the host by a veth pair: the host side 10.233.0.1, the
/// namespace 10.233.0.2, nothing else (no route out: a client that falls back to Docker Hub
/// fails instead of leaving the machine). Deleted on drop.
struct IsolatedNet {
    name: String,
}

impl IsolatedNet {
    const HOST: &'static str = "10.233.0.1";

    fn new() -> IsolatedNet {
        let name = format!("hbdk{}", std::process::id() % 100_000);
        let host_if = format!("{name}h");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let host = format!("{}/30", Self::HOST);
        for args in [
            vec!["netns", "add", &name],
            vec!["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &name],
            vec!["addr", "add", &host, "dev", &host_if],
            vec!["link", "set", &host_if, "up"],
            vec!["-n", &name, "addr", "add", "10.233.0.2/30", "dev", "eth0"],
            vec!["-n", &name, "link", "set", "eth0", "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let o = Command::new("ip").args(&args).output().unwrap();
            assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        IsolatedNet { name }
    }

    /// `program` run inside the namespace (`nsenter --net`: same mounts and files as the host).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg(program);
        c
    }
}

impl Drop for IsolatedNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Kills a process and waits for it when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        for _ in 0..100 {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Regression (operators issue): Docker gave up on the mirror ("no basic auth credentials")
/// because `/v2/` challenged anonymous clients with Basic auth, and fell back to Docker Hub.
/// Now the mirror is a token service as Docker Hub is: anonymous clients get an anonymous token.
/// Real dockerd (its own data root and sockets, `registry-mirrors`) and podman (`registries.conf`
/// mirror), each in a namespace with no way out, pull a public image through the mirror.
#[test]
fn docker_and_podman_pull_public_images_through_the_mirror_without_credentials() {
    let up = Upstream::start();
    up.seed_as(&format!("{}/busybox:latest", open_registry()), "library/hbtest-busybox:latest");
    let net = IsolatedNet::new();
    let proxy = Proxy::start_on(
        &format!(
            "[proxy]\ndefault_upstream = \"docker.io\"\n[[proxy.upstream]]\nhost = \"docker.io\"\nurl = \"http://{}\"\n",
            up.addr
        ),
        format!("{}:{}", IsolatedNet::HOST, free_port()),
    );
    let mirror = format!("http://{}", proxy.addr);
    // Anonymous: challenged with the token service, which hands out an anonymous token.
    let o = Command::new("curl").args(["-si", &format!("{mirror}/v2/")]).output().unwrap();
    let head = String::from_utf8_lossy(&o.stdout);
    assert!(head.to_lowercase().contains(&format!("www-authenticate: bearer realm=\"{mirror}/_hb/token\"")), "{head}");
    let (code, body) = curl(&[&format!("{mirror}/_hb/token?service=hb-mirror&scope=repository:library/x:pull")]);
    let token: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    assert_eq!(code, 200);
    assert_eq!(curl(&["-H", &format!("Authorization: Bearer {token}"), &format!("{mirror}/v2/")]).0, 200);
    assert_eq!(curl(&["-H", "Authorization: Bearer hbm-0123", &format!("{mirror}/v2/")]).0, 401, "an unknown token");
    assert_eq!(curl(&[&format!("{mirror}/healthz")]), (200, b"ok\n".to_vec()), "health, without credentials");

    // Docker: dockerd started by the test inside the namespace.
    let d = proxy.hb.path("docker");
    std::fs::create_dir_all(&d).unwrap();
    let sock = format!("unix://{}", d.join("docker.sock").display());
    let log = d.join("dockerd.log");
    let dockerd = Killed(
        net.command("/usr/sbin/dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args(["-H", &sock, "--bridge=none", "--iptables=false", "--ip6tables=false", "--storage-driver=vfs"])
            .args(["--registry-mirror", &mirror])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("dockerd to answer", || {
        Command::new("/usr/bin/docker").args(["-H", &sock, "version"]).output().is_ok_and(|o| o.status.success())
    });
    let o = Command::new("/usr/bin/docker").args(["-H", &sock, "pull", "hbtest-busybox"]).output().unwrap();
    let dlog = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(o.status.success(), "docker pull: {}\n{}\n{dlog}", String::from_utf8_lossy(&o.stderr), proxy.log());
    assert!(!dlog.contains("Attempting next endpoint"), "docker left the mirror:\n{dlog}");
    // The image docker pulled is whole.
    let id = Command::new("/usr/bin/docker")
        .args(["-H", &sock, "image", "inspect", "-f", "{{.Id}}", "hbtest-busybox"])
        .output()
        .unwrap();
    assert!(id.status.success() && String::from_utf8_lossy(&id.stdout).starts_with("sha256:"), "{id:?}");
    drop(dockerd);

    // podman, with the mirror in its registries.conf.
    let conf = proxy.hb.path("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
            proxy.addr
        ),
    )
    .unwrap();
    let o = net
        .command("podman")
        .env("CONTAINERS_REGISTRIES_CONF", &conf)
        .arg("--root")
        .arg(proxy.hb.path("podman"))
        .arg("--runroot")
        .arg(proxy.hb.path("podman-run"))
        .args(["--storage-driver", "vfs", "pull", "docker.io/library/hbtest-busybox:latest"])
        .output()
        .unwrap();
    assert!(o.status.success(), "podman pull: {}\n{}", String::from_utf8_lossy(&o.stderr), proxy.log());
    // Both came through the mirror: each blob crossed the upstream link once, the second client
    // was served from the mirror's store.
    let s = proxy.stats();
    assert!(s["hits"].as_u64().unwrap() >= 1, "{s}");
    let m = layers(&up.addr, "library/hbtest-busybox:latest");
    for (digest, _) in &m {
        assert_eq!(up.blob_gets(digest), 1, "{digest} crossed the upstream link once");
    }
}
