//! `hb-bench proxy`: hb proxy vs Debian's docker-registry in proxy mode (`proxy.remoteurl`, the
//! CNCF distribution registry as a pull-through cache), both in front of one docker-registry
//! upstream on loopback, both warm, loaded by ApacheBench (`ab -k`) with the same blobs.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(addr: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing answered on {addr}")
}

/// docker-registry on `dir`, optionally as a pull-through cache of `remote`.
fn registry(dir: &Path, remote: Option<&str>) -> anyhow::Result<(Killed, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let cfg = dir.join("config.yml");
    let mut text = format!(
        "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {addr}, secret: s}}\n",
        dir.join("data").display()
    );
    if let Some(r) = remote {
        text.push_str(&format!("proxy: {{remoteurl: \"http://{r}\"}}\n"));
    }
    std::fs::write(&cfg, text)?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log"))?)
        .spawn()
        .context("starting docker-registry")?;
    let k = Killed(child);
    wait_port(&addr)?;
    Ok((k, addr))
}

/// What ab measured: requests per second, and the 50th/99th percentile latency in ms.
#[derive(Debug, Clone, Copy)]
struct Load {
    rps: f64,
    p50: f64,
    p99: f64,
    failed: u64,
}

fn ab(url: &str, concurrency: usize, requests: usize) -> anyhow::Result<Load> {
    let o = Command::new("ab")
        .args(["-k", "-q", "-c", &concurrency.to_string(), "-n", &requests.to_string(), url])
        .output()
        .context("running ab (apache2-utils; scripts/setup.sh installs it)")?;
    let out = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        bail!("ab {url}: {}{}", out, String::from_utf8_lossy(&o.stderr));
    }
    let field = |prefix: &str| -> Option<f64> {
        out.lines().find(|l| l.trim_start().starts_with(prefix))?.trim_start()[prefix.len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let failed = field("Failed requests:").unwrap_or(0.0) as u64 + field("Non-2xx responses:").unwrap_or(0.0) as u64;
    Ok(Load {
        rps: field("Requests per second:").context("ab printed no rate")?,
        p50: field("50%").context("ab printed no median")?,
        p99: field("99%").context("ab printed no 99th percentile")?,
        failed,
    })
}

fn curl_ok(url: &str) -> anyhow::Result<()> {
    let o = Command::new("curl").args(["-sf", "-o", "/dev/null", url]).output()?;
    if !o.status.success() {
        bail!("GET {url} failed");
    }
    Ok(())
}

/// The blobs of `image` in `registry`: (digest, size), smallest first.
fn blobs(registry: &str, image: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let o = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{registry}/{image}")])
        .output()?;
    if !o.status.success() {
        bail!("skopeo inspect {image}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let m: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let mut v: Vec<(String, u64)> = m["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .filter_map(|l| Some((l["digest"].as_str()?.to_string(), l["size"].as_u64()?)))
        .collect();
    v.sort_by_key(|(_, s)| *s);
    Ok(v)
}

/// `small` and `large` are full references (`127.0.0.1:15000/busybox:latest`).
pub fn run(runs: usize, small: &str, large: &str) -> anyhow::Result<()> {
    let dir = crate::scratch()?;
    let split = |r: &str| -> anyhow::Result<(String, String)> {
        let (reg, image) = r.split_once('/').with_context(|| format!("{r}: expected REGISTRY/IMAGE:TAG"))?;
        Ok((reg.to_string(), image.to_string()))
    };
    let ((open, small), (_, large)) = (split(small)?, split(large)?);
    let (small, large) = (small.as_str(), large.as_str());
    std::fs::create_dir_all(dir.path().join("up"))?;
    let (_up, up) = registry(&dir.path().join("up"), None)?;
    for image in [small, large] {
        let o = Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .arg(format!("docker://{open}/{image}"))
            .arg(format!("docker://{up}/{image}"))
            .output()?;
        if !o.status.success() {
            bail!("seeding {image}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    std::fs::create_dir_all(dir.path().join("dr"))?;
    let (_dr, dr) = registry(&dir.path().join("dr"), Some(&up))?;
    let hb_addr = format!("127.0.0.1:{}", free_port()?);
    let cfg = dir.path().join("hb.toml");
    std::fs::write(&cfg, "version = 1\n")?;
    let _hb = Killed(
        Command::new(crate::hb_binary()?)
            .arg("--root")
            .arg(dir.path().join("hb-store"))
            .arg("--config")
            .arg(&cfg)
            .args(["proxy", "--listen", &hb_addr, "--upstream", &up])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("hb.log"))?)
            .spawn()?,
    );
    wait_port(&hb_addr)?;
    let cases = [
        (
            format!("{small} layer"),
            small.split(':').next().unwrap_or(small).to_string(),
            blobs(&up, small)?.pop().context("no layer")?,
            4000usize,
        ),
        (
            format!("{large} largest layer"),
            large.split(':').next().unwrap_or(large).to_string(),
            blobs(&up, large)?.pop().context("no layer")?,
            96,
        ),
    ];
    println!("## Pull-through proxy: warm hits, hb proxy vs docker-registry proxy mode\n");
    println!("`ab -k -c 32` against each, same blob, both warm, one docker-registry upstream on loopback; medians of {runs} interleaved runs.\n");
    println!(
        "| blob | requests | hb req/s | registry req/s | throughput ratio | hb p50 / p99 ms | registry p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (what, repo, (digest, size), n) in cases {
        let hb_url = format!("http://{hb_addr}/v2/{repo}/blobs/{digest}");
        let dr_url = format!("http://{dr}/v2/{repo}/blobs/{digest}");
        // Warm both: docker-registry keeps a blob once a client read it whole.
        for u in [&hb_url, &dr_url] {
            curl_ok(u)?;
        }
        std::thread::sleep(Duration::from_millis(500));
        curl_ok(&dr_url)?;
        let (mut hb, mut reg) = (Vec::new(), Vec::new());
        for i in 0..runs {
            eprintln!("proxy: {what} run {}/{runs}", i + 1);
            hb.push(ab(&hb_url, 32, n)?);
            reg.push(ab(&dr_url, 32, n)?);
        }
        let med = |v: &[Load], f: fn(&Load) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(|a, b| a.partial_cmp(b).expect("numbers"));
            x[x.len() / 2]
        };
        if hb.iter().chain(&reg).any(|l| l.failed > 0) {
            bail!("failed requests: hb {hb:?}, registry {reg:?}");
        }
        let (h_rps, r_rps) = (med(&hb, |l| l.rps), med(&reg, |l| l.rps));
        println!(
            "| {what} ({:.1} MiB) | {n} | {h_rps:.0} | {r_rps:.0} | **{:.2}x** | {} / {} | {} / {} |",
            size as f64 / (1u64 << 20) as f64,
            h_rps / r_rps,
            med(&hb, |l| l.p50),
            med(&hb, |l| l.p99),
            med(&reg, |l| l.p50),
            med(&reg, |l| l.p99),
        );
    }
    Ok(())
}
