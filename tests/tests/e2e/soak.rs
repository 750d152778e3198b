//! Soaks, bounded in count and time, on loopback only: many containers through one daemon leak
//! nothing. Sizes come from the environment (the documented runs use the larger ones;
//! `docs/reliability.md`): `HB_SOAK_CONTAINERS` (default 100).

use std::collections::BTreeSet;

use hb_tests::*;

use super::daemon::{container_mounts, folders, spares, unmount_all, wait_for, with_socket, Daemon};
use super::pull::open_registry;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so read after its closing parenthesis.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.insert(p);
        }
    }
    out
}

/// Processes anywhere whose command line names `needle` (a store's path).
fn processes_naming(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    out
}

#[test]
fn the_daemon_starts_and_stops_many_containers_across_five_images_and_leaks_nothing() {
    let reg = open_registry();
    let images: Vec<String> = ["busybox:latest", "busybox:zstd", "busybox:v2s2", "debian-app:v1", "debian-app:v2"]
        .iter()
        .map(|i| format!("{reg}/{i}"))
        .collect();
    let n = env_count("HB_SOAK_CONTAINERS", 100);
    let hb = Hb::new();
    let mut d = Daemon::start(&hb);
    let pid = d.pid();
    let hbv = |args: &[&str]| with_socket(&hb, args);
    let run_one = |k: usize| {
        let image = &images[k % images.len()];
        if k % 10 == 9 {
            // Every tenth: detached, then stopped and removed, as docker users do.
            let args = hbv(&["run", "-d", "--runtime", "runc", image, "sleep", "30"]);
            let id = hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim().to_string();
            let args = hbv(&["stop", "-t", "5", &id]);
            hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
            let args = hbv(&["rm", &id]);
            hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        } else {
            let args = hbv(&["run", "--rm", "--runtime", "runc", image, "sh", "-c", &format!("echo {k}")]);
            let out = hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(out, format!("{k}\n"), "container {k} on {image}");
        }
    };
    // Warm-up: every image mounted, a round of each kind of run.
    for k in 0..images.len() * 2 {
        run_one(k);
    }
    let settled = |what: &str| {
        wait_for(what, || {
            let removing = hb.root.join("containers").join(".removing");
            let spare_set: Vec<String> =
                spares(&hb).iter().map(|s| s.join("rootfs").to_string_lossy().into_owned()).collect();
            folders(&hb).iter().all(|f| !f.join("state.json").exists())
                && spare_set.len() <= images.len()
                && std::fs::read_dir(&removing).map_or(true, |mut r| r.next().is_none())
                && container_mounts(&hb).iter().all(|m| spare_set.contains(m))
        })
    };
    settled("the warm-up's containers to be cleaned up");
    let (fds_warm, kids_warm) = (fds(pid), children(pid));
    let t = std::time::Instant::now();
    for k in images.len() * 2..n {
        run_one(k);
    }
    let took = t.elapsed();
    settled("every container to be cleaned up");
    let (fds_end, kids_end) = (fds(pid), children(pid));
    println!(
        "soak: {n} containers across {} images in {:.1} s; daemon fds {fds_warm} -> {fds_end}, children {} -> {}",
        images.len(),
        took.as_secs_f64(),
        kids_warm.len(),
        kids_end.len()
    );
    assert!(fds_end <= fds_warm + 4, "the daemon's open files grew from {fds_warm} to {fds_end}");
    assert_eq!(kids_end, kids_warm, "the daemon's child processes changed (mount servers and the standby only)");
    assert_eq!(kids_end.len(), images.len() + 1, "one mount server per image, and one standing by");
    let runc: Vec<String> = std::fs::read_dir("/run/runc")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let ours: BTreeSet<String> =
        folders(&hb).iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(runc.iter().all(|id| !ours.contains(id)), "runtime state left: {runc:?}");
    d.stop();
    unmount_all(&hb);
    let root = hb.root.to_string_lossy().into_owned();
    wait_for("the mount servers to exit", || processes_naming(&root).is_empty());
    assert!(container_mounts(&hb).is_empty(), "mounts left: {:?}", container_mounts(&hb));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&root), "mounts under the store left");
    assert!(folders(&hb).is_empty(), "container folders left: {:?}", folders(&hb));
    hb.fsck_clean();
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// An upstream registry serving `blobs` at `/v2/soak/blobs/<digest>` that misbehaves at random on
/// half the GETs: a cut halfway, one wrong byte, a stall of 3 s before the body, a 500 or a 503.
/// Returns its address.
fn faulty_upstream(blobs: Vec<(String, Vec<u8>)>, seed: u64) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let blobs = std::sync::Arc::new(blobs);
    let rng = std::sync::Arc::new(std::sync::Mutex::new(Rng(seed)));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (blobs, rng) = (blobs.clone(), rng.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap_or(0);
                let mut start = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_lowercase().strip_prefix("range: bytes=") {
                        start = v.trim().split('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    }
                }
                let mut w = conn;
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let Some((_, data)) = blobs.iter().find(|(d, _)| path == format!("/v2/soak/blobs/{d}")) else {
                    let _ = w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                };
                let size = data.len();
                if method == "HEAD" {
                    let _ = w.write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n").as_bytes(),
                    );
                    return;
                }
                let fault = rng.lock().unwrap().next() % 10;
                if fault == 5 || fault == 6 {
                    let code = if fault == 5 { "500 Internal Server Error" } else { "503 Service Unavailable" };
                    let _ = w.write_all(
                        format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                    );
                    return;
                }
                let start = start.min(size);
                let head = if start > 0 {
                    format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{size}\r\nConnection: close\r\n\r\n", size - start, size - 1)
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n")
                };
                if w.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let mut body = data[start..].to_vec();
                match fault {
                    7 => body.truncate(body.len() / 2),
                    8 if !body.is_empty() => {
                        let mid = body.len() / 2;
                        body[mid] ^= 0x40;
                    }
                    9 => std::thread::sleep(std::time::Duration::from_secs(3)),
                    _ => {}
                }
                let _ = w.write_all(&body);
                let _ = w.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

/// One GET through the proxy: (status, body, declared length), or None when the connection broke
/// before the headers.
fn get(addr: &str, path: &str, range: Option<(usize, usize)>) -> Option<(u16, Vec<u8>, Option<usize>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).ok()?;
    let range = range.map_or(String::new(), |(a, b)| format!("Range: bytes={a}-{}\r\n", b - 1));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{range}Connection: close\r\n\r\n").as_bytes()).ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok());
    Some((status, raw[split + 4..].to_vec(), len))
}

/// `hb proxy` under 64 concurrent clients while its upstream fails half the requests at random,
/// with a size cap that keeps evicting (so faults keep reaching the fills): no client ever gets
/// a whole body with a wrong byte, and memory and open files stay flat after the warm-up.
/// `HB_SOAK_SECONDS` (default 20) bounds it.
#[test]
fn the_mirror_under_64_clients_and_a_faulty_upstream_never_serves_a_wrong_byte_and_stays_flat() {
    let secs = env_count("HB_SOAK_SECONDS", 20) as u64;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("mirror soak: {secs} s, seed {seed}");
    let blobs: Vec<(String, Vec<u8>)> = (0..12u64)
        .map(|i| {
            let data = pseudo_random(1000 + i, (256 << 10) + (i as usize * 97_000));
            (super::proxy::sha256(&data), data)
        })
        .collect();
    let upstream = faulty_upstream(blobs.clone(), seed);
    let proxy =
        super::proxy::Proxy::start(&format!("[proxy]\nmax_size = \"4M\"\n[[proxy.upstream]]\nhost = \"{upstream}\"\n"));
    let pid = proxy.pid();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let warm_at = std::time::Instant::now() + std::time::Duration::from_secs(secs / 4);
    let warm = std::sync::Mutex::new(None::<(u64, usize)>);
    let tally = std::sync::Mutex::new([0u64; 4]); // whole and right, short, errors, ranges right
                                                  // The proxy's RSS at every tenth of the run: a leak climbs steadily, a warm-up levels off.
    let tenth = std::time::Duration::from_secs(secs) / 10;
    let next_sample = std::sync::Mutex::new(std::time::Instant::now() + tenth);
    let timeline = std::sync::Mutex::new(Vec::<u64>::new());
    std::thread::scope(|s| {
        for c in 0..64u64 {
            let (blobs, proxy, tally, warm) = (&blobs, &proxy, &tally, &warm);
            let (next_sample, timeline) = (&next_sample, &timeline);
            s.spawn(move || {
                let mut rng = Rng(seed ^ (c + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                while std::time::Instant::now() < deadline {
                    if c == 0 && std::time::Instant::now() >= warm_at {
                        warm.lock().unwrap().get_or_insert((rss_kib(pid), fds(pid)));
                    }
                    if c == 0 && std::time::Instant::now() >= *next_sample.lock().unwrap() {
                        timeline.lock().unwrap().push(rss_kib(pid));
                        *next_sample.lock().unwrap() += tenth;
                    }
                    let (digest, data) = &blobs[(rng.next() % blobs.len() as u64) as usize];
                    let path = format!("/v2/soak/blobs/{digest}");
                    let ranged = rng.next().is_multiple_of(4);
                    let range = ranged.then(|| {
                        let a = (rng.next() % data.len() as u64) as usize;
                        (a, (a + 1 + (rng.next() % 100_000) as usize).min(data.len()))
                    });
                    let got = get(&proxy.addr, &path, range);
                    let mut t = tally.lock().unwrap();
                    match got {
                        Some((200, body, Some(len))) if body.len() == len && len == data.len() => {
                            assert_eq!(
                                super::proxy::sha256(&body),
                                *digest,
                                "a whole body with wrong bytes (seed {seed})"
                            );
                            t[0] += 1;
                        }
                        Some((206, body, Some(len))) if body.len() == len => {
                            let (a, b) = range.expect("asked for a range");
                            assert_eq!(body, data[a..b], "a range with wrong bytes (seed {seed})");
                            t[3] += 1;
                        }
                        Some((200 | 206, _, _)) => t[1] += 1,
                        _ => t[2] += 1,
                    }
                }
            });
        }
    });
    let t = *tally.lock().unwrap();
    let (rss_warm, fds_warm) = warm.lock().unwrap().expect("measured after the warm-up");
    let (rss_end, fds_end) = (rss_kib(pid), fds(pid));
    println!(
        "mirror soak: {} whole and right, {} ranges right, {} cut short, {} errors; RSS {rss_warm} -> {rss_end} KiB, fds {fds_warm} -> {fds_end}",
        t[0], t[3], t[1], t[2]
    );
    println!("mirror soak: the proxy's RSS at each tenth of the run (KiB): {:?}", timeline.lock().unwrap());
    assert!(t[0] > 64 && t[3] > 0, "too little got through to judge: {t:?}");
    assert!(t[1] + t[2] > 0, "the upstream's faults never showed");
    // Bounded since the store's memtables are (RocksDB's default let them grow by up to 320 MiB:
    // +23 MB over a 10-minute soak before).
    assert!(rss_end <= rss_warm + rss_warm / 4 + 16 * 1024, "the proxy's memory grew: {rss_warm} -> {rss_end} KiB");
    assert!(fds_end <= fds_warm + 16, "the proxy's open files grew: {fds_warm} -> {fds_end}");
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
}
