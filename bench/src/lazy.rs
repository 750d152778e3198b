//! Lazy-start benchmarks (issue: lazy starts). Baselines: containerd 1.6 with overlayfs (`ctr
//! images pull` then `ctr run`), and overlayfs over an unpacked rootfs for file reads.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{hb_binary, median, repo_root, scratch, timed_command};

const CMD: [&str; 3] = ["python3", "-c", "print(1)"];

/// Runs `cmd` and returns the time until its first byte of stdout (and checks it says "1").
fn time_to_output(mut cmd: Command, started: Instant) -> anyhow::Result<Duration> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("{cmd:?}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut first = [0u8; 1];
    let n = out.read(&mut first)?;
    let t = started.elapsed();
    let status = child.wait_with_output()?;
    if n == 0 || first[0] != b'1' {
        bail!("{cmd:?} printed nothing useful: {}", String::from_utf8_lossy(&status.stderr));
    }
    Ok(t)
}

fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// `hb daemon` on store `root` with both its sockets in `dir` (`hb.sock`, `snapshotter.sock`);
/// returns once both exist.
pub(crate) fn start_daemon(
    hb: &Path,
    root: &Path,
    dir: &Path,
) -> anyhow::Result<(std::process::Child, PathBuf, PathBuf)> {
    start_daemon_logged(hb, root, dir, None)
}

/// [`start_daemon`] with its phase lines (`hb::phase`, and its mount servers' in their own logs
/// under the store's `run/`) written to `phases`.
pub(crate) fn start_daemon_logged(
    hb: &Path,
    root: &Path,
    dir: &Path,
    phases: Option<&Path>,
) -> anyhow::Result<(std::process::Child, PathBuf, PathBuf)> {
    let (api, snap) = (dir.join("hb.sock"), dir.join("snapshotter.sock"));
    let mut cmd = Command::new(hb);
    cmd.arg("--root")
        .arg(root)
        .arg("--socket")
        .arg(&api)
        .args(["-q", "daemon", "--snapshotter-socket"])
        .arg(&snap)
        .stdout(Stdio::null());
    match (phases, std::env::var_os("HB_BENCH_DAEMON_LOG")) {
        (Some(f), _) => {
            cmd.env("HB_LOG", "hb::phase=debug").stderr(std::fs::File::create(f)?);
        }
        // For profiling: `HB_BENCH_DAEMON_LOG=FILE` (with `HB_LOG=hb::phase=debug,info`) keeps
        // what the daemons of a run log, appended to FILE.
        (None, Some(f)) => {
            cmd.stderr(std::fs::OpenOptions::new().create(true).append(true).open(f)?);
        }
        (None, None) => {
            cmd.stderr(Stdio::null());
        }
    }
    let child = cmd.spawn()?;
    let waited = Instant::now();
    while !(api.exists() && snap.exists()) {
        if waited.elapsed() > Duration::from_secs(30) {
            bail!("hb daemon did not come up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((child, api, snap))
}

fn umount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

pub(crate) fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Opens and reads a file: (time to open, time to read it all).
fn read_all(path: &Path) -> anyhow::Result<(Duration, Duration)> {
    let t = Instant::now();
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let opened = t.elapsed();
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok((opened, t.elapsed()))
}

fn stat_all(root: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let o = Command::new("sh")
        .arg("-c")
        .arg("find \"$0\" -xdev -type f -print0 | xargs -0 stat > /dev/null")
        .arg(root)
        .output()?;
    if !o.status.success() {
        bail!("find | xargs stat failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(t.elapsed())
}

/// The largest regular file below `root`.
fn largest_file(root: &Path) -> anyhow::Result<PathBuf> {
    let o = Command::new("sh")
        .arg("-c")
        .arg("find \"$0\" -xdev -type f -printf '%s %P\\n' | sort -n | tail -1")
        .arg(root)
        .output()?;
    let line = String::from_utf8(o.stdout)?;
    Ok(PathBuf::from(line.trim().split_once(' ').context("no files")?.1))
}

pub fn run(runs: usize, image: &str, netns: Option<&str>, start_only: bool) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let containerd = repo_root().join("scripts/containerd.sh");
    let sock =
        std::env::var("HB_CONTAINERD_DIR").unwrap_or_else(|_| "/dev/shm/hb-containerd".into()) + "/containerd.sock";
    let work = scratch()?;
    let src_image = image.to_string();
    // The accelerated form, written once (by the host: the shaped registry shares its storage).
    let lazy_local = format!("{}-lazy-bench", image.replace("/debian-app:", "/bench/debian-app:"));
    let conv = work.path().join("convert");
    timed_command(Command::new(&hb).arg("--root").arg(&conv).args(["-q", "convert", image, &lazy_local]))?;
    // A second accelerated form with the start-up order of the command recorded (`hb optimize`).
    let optimized = format!("{lazy_local}-optimized");
    timed_command(Command::new(&hb).arg("--root").arg(&conv).args(["-q", "convert", image, &optimized]))?;
    timed_command(Command::new(&hb).arg("--root").arg(&conv).args(["-q", "optimize", &optimized, "--"]).args(CMD))?;
    let shaped = |s: &str| match netns {
        Some(_) => s.replace("127.0.0.1:15000", "10.231.0.1:15010"),
        None => s.to_string(),
    };
    let (image, lazy, optimized) = (shaped(image), shaped(&lazy_local), shaped(&optimized));
    let link = if netns.is_some() { "100 Mbit/s veth link" } else { "loopback" };
    let (_, insp) = timed_command(Command::new(&hb).arg("--root").arg(&conv).args(["inspect", &src_image]))?;
    let insp: serde_json::Value = serde_json::from_slice(&insp.stdout)?;
    let compressed: u64 =
        insp["manifest"]["layers"].as_array().map(|l| l.iter().filter_map(|x| x["size"].as_u64()).sum()).unwrap_or(0);

    let (mut t_hb, mut t_opt, mut t_ctr, mut wire, mut data) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        eprintln!("lazy: run {}/{runs}", run + 1);
        // containerd + overlayfs: pull (download + unpack), then run.
        // containerd itself stays in the root namespaces (runc needs the host's cgroup mounts,
        // which `ip netns exec` hides); ctr fetches client-side, so only the pull crosses the link.
        timed_command(Command::new(&containerd).arg("reset"))?;
        let started = Instant::now();
        timed_command(in_netns(netns, Path::new("ctr")).args([
            "-a",
            &sock,
            "-n",
            "bench",
            "images",
            "pull",
            "--plain-http",
            &image,
        ]))?;
        let mut ctr_run = Command::new("ctr");
        ctr_run.args(["-a", &sock, "-n", "bench", "run", "--rm", &image, &format!("bench-{run}")]).args(CMD);
        t_ctr.push(time_to_output(ctr_run, started)?);

        // hb: lazy pull (indexes), mount, run from the mount; without and with a start-up order.
        for (reference, times, prefetch) in [(&lazy, &mut t_hb, "none"), (&optimized, &mut t_opt, "startup")] {
            let dir = scratch()?;
            let (root, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
            std::fs::create_dir_all(&mnt)?;
            // `hb mount` pulls what the store lacks: lazily (indexes only) for an accelerated image.
            // One shell does it all: in a network namespace, `ip netns exec` also makes a mount
            // namespace of its own, and the FUSE mount lives there.
            let script = "\"$0\" --root \"$1\" -q mount -d --plain-http --prefetch \"$2\" \"$3\" \"$4\" && chroot \"$4\" python3 -c 'print(1)'; \"$0\" --root \"$1\" umount \"$4\"";
            let mut sh = in_netns(netns, Path::new("sh"));
            sh.arg("-c").arg(script).arg(&hb).arg(&root).arg(prefetch).arg(reference).arg(&mnt);
            let started = Instant::now();
            times.push(time_to_output(sh, started)?);
            if prefetch == "none" {
                let stats = std::fs::read_dir(root.join("run"))?
                    .flatten()
                    .find(|e| e.file_name().to_string_lossy().ends_with(".stats.json"))
                    .context("the mount left no stats")?;
                let s: serde_json::Value = serde_json::from_slice(&std::fs::read(stats.path())?)?;
                wire.push(s["wire_bytes"].as_u64().unwrap_or(0));
                data.push(s["remote_bytes"].as_u64().unwrap_or(0));
            }
        }
    }
    timed_command(Command::new(&containerd).arg("stop"))?;
    let (h, o, c) = (median(t_hb), median(t_opt), median(t_ctr));
    wire.sort_unstable();
    data.sort_unstable();
    let (w, d) = (wire[wire.len() / 2], data[data.len() / 2]);
    println!("| `python3 -c 'print(1)'` in {image}, {link}, cold, median of {runs} | time to first output | vs hb |");
    println!("|---|---|---|");
    println!(
        "| hb: `hb mount -d` (lazy pull of the indexes + FUSE mount) + chroot, start-up order recorded by `hb optimize` and prefetched | {:.2} s | 1.00x |",
        o.as_secs_f64()
    );
    println!(
        "| hb: the same without a start-up order (`--prefetch none`: every chunk on demand) | {:.2} s | {:.2}x |",
        h.as_secs_f64(),
        h.as_secs_f64() / o.as_secs_f64()
    );
    println!(
        "| containerd 1.6: `ctr images pull` + `ctr run --rm` (overlayfs, runc) | {:.2} s | **{:.1}x** (vs on demand: {:.1}x) |",
        c.as_secs_f64(),
        c.as_secs_f64() / o.as_secs_f64(),
        c.as_secs_f64() / h.as_secs_f64()
    );
    println!();
    println!(
        "| bytes hb fetched before that output (on demand) | bytes | of the image's compressed size ({:.1} MB) |",
        compressed as f64 / 1e6
    );
    println!("|---|---|---|");
    println!(
        "| over the wire (zstd chunks, Range requests) | {:.2} MB | **{:.2} %** |",
        w as f64 / 1e6,
        w as f64 * 100.0 / compressed as f64
    );
    println!(
        "| file data those chunks hold (uncompressed) | {:.2} MB | {:.2} % |",
        d as f64 / 1e6,
        d as f64 * 100.0 / compressed as f64
    );
    if start_only {
        return Ok(());
    }
    reads(runs, &hb, image.as_str())
}

/// Fully-local reads: hb's mount of a pulled image vs overlayfs over the same rootfs unpacked.
fn reads(runs: usize, hb: &Path, image: &str) -> anyhow::Result<()> {
    let image = image.replace("10.231.0.1:15010", "127.0.0.1:15000");
    let dir = scratch()?;
    let root = dir.path().join("store");
    let (export, mnt) = (dir.path().join("rootfs"), dir.path().join("mnt"));
    let (upper, work, merged) = (dir.path().join("upper"), dir.path().join("work"), dir.path().join("merged"));
    for d in [&mnt, &upper, &work, &merged] {
        std::fs::create_dir_all(d)?;
    }
    timed_command(Command::new(hb).arg("--root").arg(&root).args(["-q", "pull", &image]))?;
    timed_command(Command::new(hb).arg("--root").arg(&root).args(["-q", "export", &image]).arg(&export))?;
    let big = largest_file(&export)?;
    let size = std::fs::metadata(export.join(&big))?.len();
    let overlay = || -> anyhow::Result<()> {
        timed_command(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!("lowerdir={},upperdir={},workdir={}", export.display(), upper.display(), work.display()))
                .arg(&merged),
        )?;
        Ok(())
    };
    let hb_mount = |extra: &[&str]| -> anyhow::Result<()> {
        timed_command(
            Command::new(hb).arg("--root").arg(&root).args(["-q", "mount", "-d"]).args(extra).arg(&image).arg(&mnt),
        )?;
        Ok(())
    };
    let hb_umount = || timed_command(Command::new(hb).arg("--root").arg(&root).arg("umount").arg(&mnt)).map(|_| ());
    let (mut ov_cold, mut ov_warm, mut hb_first, mut hb_cold, mut hb_warm, mut fuse_cold) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut ov_stat, mut hb_stat) = (vec![], vec![]);
    for run in 0..runs {
        eprintln!("reads: run {}/{runs}", run + 1);
        overlay()?;
        drop_caches();
        ov_cold.push(read_all(&merged.join(&big))?);
        ov_warm.push(read_all(&merged.join(&big))?);
        umount(&merged);
        overlay()?;
        drop_caches();
        ov_stat.push(stat_all(&merged)?);
        umount(&merged);

        // Passthrough: the first open materialises the file once (kept across mounts).
        let _ = std::fs::remove_dir_all(root.join("files"));
        hb_mount(&[])?;
        drop_caches();
        hb_first.push(read_all(&mnt.join(&big))?);
        hb_umount()?;
        hb_mount(&[])?;
        drop_caches();
        hb_cold.push(read_all(&mnt.join(&big))?);
        hb_warm.push(read_all(&mnt.join(&big))?);
        hb_umount()?;
        hb_mount(&["--no-passthrough"])?;
        drop_caches();
        fuse_cold.push(read_all(&mnt.join(&big))?);
        hb_umount()?;
        hb_mount(&[])?;
        drop_caches();
        hb_stat.push(stat_all(&mnt)?);
        hb_umount()?;
    }
    let mbs = |d: Duration| size as f64 / 1e6 / d.as_secs_f64();
    let med =
        |v: &[(Duration, Duration)]| (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect()));
    let ((_, oc), (_, ow)) = (med(&ov_cold), med(&ov_warm));
    println!();
    println!(
        "| sequential read of /{} ({:.1} MB), fully local, median of {runs} | read MB/s | vs overlayfs (same state) | open() |",
        big.display(),
        size as f64 / 1e6
    );
    println!("|---|---|---|---|");
    println!(
        "| overlayfs over the unpacked rootfs, caches dropped | {:.0} | 1.00x | {:.2} ms |",
        mbs(oc),
        med(&ov_cold).0.as_secs_f64() * 1e3
    );
    for (label, v, base) in [
        ("hb mount, passthrough, caches dropped", &hb_cold, oc),
        ("hb mount, passthrough, first open ever (materialises the file)", &hb_first, oc),
        ("hb mount without passthrough (FUSE reads), caches dropped", &fuse_cold, oc),
        ("overlayfs, second read (page cache)", &ov_warm, ow),
        ("hb mount, passthrough, second read (page cache)", &hb_warm, ow),
    ] {
        let (o, d) = med(v);
        println!(
            "| {label} | {:.0} | **{:.2}x** | {:.2} ms |",
            mbs(d),
            base.as_secs_f64() / d.as_secs_f64(),
            o.as_secs_f64() * 1e3
        );
    }
    let (os, hs) = (median(ov_stat), median(hb_stat));
    println!();
    println!(
        "| `find -xdev -type f \\| xargs stat`, fresh mount, caches dropped, median of {runs} | time | vs overlayfs |"
    );
    println!("|---|---|---|");
    println!("| overlayfs over the unpacked rootfs | {:.2} s | 1.00x |", os.as_secs_f64());
    println!("| hb mount | {:.2} s | **{:.2}x** |", hs.as_secs_f64(), hs.as_secs_f64() / os.as_secs_f64());
    Ok(())
}

/// `hb run` against the runtime underneath it, and a cold start against containerd.
pub fn containers(runs: usize, small: &str, large: &str) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let work = scratch()?;
    let root = work.path().join("store");
    timed_command(Command::new(&hb).arg("--root").arg(&root).args(["-q", "pull", small]))?;
    // The same image as a plain runc bundle: rootfs unpacked, `runc spec` adjusted.
    let bundle = work.path().join("bundle");
    timed_command(Command::new(&hb).arg("--root").arg(&root).args(["-q", "export", small]).arg(bundle.join("rootfs")))?;
    timed_command(Command::new("runc").arg("spec").current_dir(&bundle))?;
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["true"]);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
    let (mut t_hb, mut t_runc) = (vec![], vec![]);
    for run in 0..runs.max(5) {
        let t = Instant::now();
        timed_command(Command::new("runc").args(["run", "--bundle"]).arg(&bundle).arg(format!("hb-bench-{run}")))?;
        t_runc.push(t.elapsed());
        let t = Instant::now();
        timed_command(Command::new(&hb).arg("--root").arg(&root).args(["-q", "run", "--rm", small, "true"]))?;
        t_hb.push(t.elapsed());
    }
    // With `hb daemon` running: the image mount is shared and stays; a run is overlayfs + spec +
    // runc + cleanup.
    let (mut daemon, socket, _) = start_daemon(&hb, &root, work.path())?;
    let hb_daemon = |args: &[&str]| {
        let mut c = Command::new(&hb);
        c.arg("--root").arg(&root).arg("--socket").arg(&socket).args(args);
        c
    };
    timed_command(&mut hb_daemon(&["-q", "run", "--rm", small, "true"]))?;
    // The same rootfs with the very spec hb gives runc (its seccomp profile, capabilities,
    // masked paths, namespaces): what runc costs under hb, so the difference is hb's own.
    let (_, out) = timed_command(&mut hb_daemon(&["-q", "run", "-d", small, "sleep", "60"]))?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("containers").join(&id).join("config.json"))?)?;
    timed_command(&mut hb_daemon(&["-q", "rm", "-f", &id]))?;
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["root"] = serde_json::json!({"path": bundle.join("rootfs"), "readonly": false});
    let same = work.path().join("bundle-hb-spec");
    std::fs::create_dir_all(&same)?;
    std::fs::write(same.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    // The same spec on what hb gives runc: a fresh overlayfs over the daemon's image mount per
    // container (set up and torn down outside the timing): what the lazy mount costs runc. (hb
    // also makes runc's mount points in the upper dir beforehand; here runc makes them itself.)
    let image_mount = std::fs::read_dir(root.join("images"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("the daemon's image mount")?;
    // The four are timed back to back in an order that rotates each round, so each follows each
    // of the others equally often: whichever comes right after a container's teardown (still
    // going on in the kernel; hb's is the daemon's, in the background) pays for it, and that
    // cost is shared out evenly. Many rounds: this machine's noise is about 10 % per sample, and
    // a run's times are spread wide (18 to 30 ms for the same runc command), so a median of 100
    // still moved by 0.05x between runs; of 200, less.
    let rounds = runs.max(5) * 20;
    let mut times: [Vec<Duration>; 4] = Default::default();
    for round in 0..rounds {
        for k in 0..4 {
            let variant = (round + k) % 4;
            let t = match variant {
                0 => {
                    timed_command(
                        Command::new("runc").args(["run", "--bundle"]).arg(&bundle).arg(format!("hb-bench-d{round}")),
                    )?
                    .0
                }
                1 => {
                    timed_command(
                        Command::new("runc").args(["run", "--bundle"]).arg(&same).arg(format!("hb-bench-s{round}")),
                    )?
                    .0
                }
                2 => {
                    let fresh = work.path().join(format!("over-{round}"));
                    for d in ["upper", "work", "rootfs"] {
                        std::fs::create_dir_all(fresh.join(d))?;
                    }
                    timed_command(
                        Command::new("mount")
                            .args(["-t", "overlay", "overlay", "-o"])
                            .arg(format!(
                                "lowerdir={},upperdir={},workdir={}",
                                image_mount.display(),
                                fresh.join("upper").display(),
                                fresh.join("work").display()
                            ))
                            .arg(fresh.join("rootfs")),
                    )?;
                    spec["root"] = serde_json::json!({"path": fresh.join("rootfs"), "readonly": false});
                    std::fs::write(fresh.join("config.json"), serde_json::to_vec(&spec)?)?;
                    let (t, _) = timed_command(
                        Command::new("runc").args(["run", "--bundle"]).arg(&fresh).arg(format!("hb-bench-o{round}")),
                    )?;
                    timed_command(Command::new("umount").arg("-l").arg(fresh.join("rootfs")))?;
                    std::fs::remove_dir_all(&fresh)?;
                    t
                }
                _ => timed_command(&mut hb_daemon(&["-q", "run", "--rm", small, "true"]))?.0,
            };
            times[variant].push(t);
        }
    }
    let [t_runc2, t_same, t_over, t_hbd] = times;
    // hb's own part, free of runc's variance: the same `hb run` with a runtime that does nothing
    // (`/bin/true` answers `run` at once), against starting that runtime alone.
    let (mut t_noop, mut t_true) = (vec![], vec![]);
    for _ in 0..runs.max(5) * 4 {
        let t = Instant::now();
        timed_command(Command::new("/bin/true").args(["run", "--bundle", "x", "y"]))?;
        t_true.push(t.elapsed());
        let t = Instant::now();
        timed_command(&mut hb_daemon(&["-q", "run", "--runtime", "/bin/true", "--rm", small, "true"]))?;
        t_noop.push(t.elapsed());
    }
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    let _ = daemon.wait();
    for e in std::fs::read_dir(root.join("images"))?.flatten() {
        if e.path().is_dir() {
            timed_command(Command::new(&hb).arg("--root").arg(&root).args(["-q", "umount"]).arg(e.path()))?;
        }
    }
    let n = runs.max(5);
    let (h, r) = (median(t_hb), median(t_runc));
    let (hd, r2, rs) = (median(t_hbd.clone()), median(t_runc2.clone()), median(t_same));
    println!("| `true` in {small}, warm store | time | vs runc |");
    println!("|---|---|---|");
    println!("| `runc run` of a pre-extracted bundle (median of {n}) | {:.3} s | 1.00x |", r.as_secs_f64());
    println!(
        "| `hb run --rm`, no daemon (image mount + overlayfs + spec + runc run + cleanup; median of {n}) | {:.3} s | {:.2}x |",
        h.as_secs_f64(),
        h.as_secs_f64() / r.as_secs_f64()
    );
    let over = median(t_over);
    println!(
        "| `runc run` of the bundle, the next three rows in rotation with it (median of {rounds}) | {:.3} s | 1.00x |",
        r2.as_secs_f64()
    );
    println!(
        "| `runc run` of the bundle with hb's own spec (seccomp profile, capabilities, masked paths; median of {rounds}) | {:.3} s | {:.2}x |",
        rs.as_secs_f64(),
        rs.as_secs_f64() / r2.as_secs_f64()
    );
    println!(
        "| `runc run` with hb's spec on a fresh overlayfs over the daemon's image mount (what hb hands runc, without hb; median of {rounds}) | {:.3} s | {:.2}x |",
        over.as_secs_f64(),
        over.as_secs_f64() / r2.as_secs_f64()
    );
    let (lo, hi) = crate::ratio_interval(&t_hbd, &t_runc2);
    println!(
        "| `hb run --rm` with `hb daemon` (shared image mount; overlayfs + spec + runc run + cleanup; median of {rounds}) | {:.3} s | **{:.2}x** (95 % interval {lo:.2}-{hi:.2}); {:.2}x of runc with the same spec |",
        hd.as_secs_f64(),
        hd.as_secs_f64() / r2.as_secs_f64(),
        hd.as_secs_f64() / rs.as_secs_f64()
    );
    let (noop, bare) = (median(t_noop), median(t_true));
    println!(
        "| hb's own work per container: `hb run --rm --runtime /bin/true` (everything but the runtime) minus `/bin/true` alone (median of {}) | {:.1} ms | {:.1} % of the runc row above |",
        n * 4,
        (noop.as_secs_f64() - bare.as_secs_f64()) * 1e3,
        (noop.as_secs_f64() - bare.as_secs_f64()) / r2.as_secs_f64() * 100.0
    );

    // Cold: nothing on the machine, to the first line the command prints.
    let containerd = repo_root().join("scripts/containerd.sh");
    let sock =
        std::env::var("HB_CONTAINERD_DIR").unwrap_or_else(|_| "/dev/shm/hb-containerd".into()) + "/containerd.sock";
    let conv = work.path().join("convert");
    let lazy = format!("{}-run-bench", large.replace("/debian-app:", "/bench/debian-app:"));
    timed_command(Command::new(&hb).arg("--root").arg(&conv).args(["-q", "convert", large, &lazy]))?;
    timed_command(Command::new(&hb).arg("--root").arg(&conv).args(["-q", "optimize", &lazy, "--"]).args(CMD))?;
    let (mut t_cold, mut t_ctr) = (vec![], vec![]);
    for run in 0..runs {
        timed_command(Command::new(&containerd).arg("reset"))?;
        let started = Instant::now();
        timed_command(Command::new("ctr").args(["-a", &sock, "-n", "bench", "images", "pull", "--plain-http", large]))?;
        let mut ctr_run = Command::new("ctr");
        ctr_run.args(["-a", &sock, "-n", "bench", "run", "--rm", large, &format!("run-bench-{run}")]).args(CMD);
        t_ctr.push(time_to_output(ctr_run, started)?);
        let dir = scratch()?;
        let mut hb_run = Command::new(&hb);
        hb_run.arg("--root").arg(dir.path().join("store")).args(["-q", "run", "--rm", &lazy]).args(CMD);
        t_cold.push(time_to_output(hb_run, Instant::now())?);
    }
    timed_command(Command::new(&containerd).arg("stop"))?;
    let (h, c) = (median(t_cold), median(t_ctr));
    println!();
    println!("| `python3 -c 'print(1)'` in {large}, cold, loopback, median of {runs} | time to first output | vs hb |");
    println!("|---|---|---|");
    println!("| `hb run --rm` of the accelerated image (lazy pull, mount, overlayfs, runc; start-up order prefetched) | {:.2} s | 1.00x |", h.as_secs_f64());
    println!(
        "| containerd 1.6: `ctr images pull` + `ctr run --rm` (overlayfs, runc) | {:.2} s | **{:.1}x** |",
        c.as_secs_f64(),
        c.as_secs_f64() / h.as_secs_f64()
    );
    Ok(())
}

/// VmRSS of a process, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// An idle `hb daemon` with the image pulled and mounted (one container run on it), vs an idle
/// containerd with the same image pulled and unpacked (one container run).
pub fn memory(image: &str) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let work = scratch()?;
    let root = work.path().join("store");
    let (mut daemon, socket, _) = start_daemon(&hb, &root, work.path())?;
    let hb_cmd = |args: &[&str]| {
        let mut c = Command::new(&hb);
        c.arg("--root").arg(&root).arg("--socket").arg(&socket).args(args);
        c
    };
    timed_command(&mut hb_cmd(&["-q", "pull", image]))?;
    timed_command(&mut hb_cmd(&["-q", "run", "--rm", image, "true"]))?;
    std::thread::sleep(Duration::from_secs(12));
    let d = rss(daemon.id())?;
    let mounts: serde_json::Value = {
        let o = Command::new("curl").args(["-sf", "--unix-socket"]).arg(&socket).arg("http://hb/v1/mounts").output()?;
        serde_json::from_slice(&o.stdout)?
    };
    let server = mounts[0]["pid"].as_u64().context("no image mount")? as u32;
    let m = rss(server)?;
    // The mount server the daemon keeps standing by (`hb-engine mount-standby`) is the daemon's
    // too: the one child that serves no mount.
    let parent = format!("PPid:\t{}", daemon.id());
    let standby = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| *p != server)
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|st| st.lines().any(|l| l == parent))
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.windows(13).any(|w| w == b"mount-standby"))
        });
    let s = standby.map(rss).transpose()?.unwrap_or(0);
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    let _ = daemon.wait();
    timed_command(
        Command::new(&hb).arg("--root").arg(&root).arg("umount").arg(mounts[0]["path"].as_str().unwrap_or("")),
    )?;

    let containerd = repo_root().join("scripts/containerd.sh");
    let dir = std::env::var("HB_CONTAINERD_DIR").unwrap_or_else(|_| "/dev/shm/hb-containerd".into());
    let sock = format!("{dir}/containerd.sock");
    timed_command(Command::new(&containerd).arg("reset"))?;
    timed_command(Command::new("ctr").args(["-a", &sock, "-n", "bench", "images", "pull", "--plain-http", image]))?;
    timed_command(Command::new("ctr").args(["-a", &sock, "-n", "bench", "run", "--rm", image, "mem-bench", "true"]))?;
    std::thread::sleep(Duration::from_secs(12));
    let pid: u32 = std::fs::read_to_string(format!("{dir}/pid"))?.trim().parse()?;
    let c = rss(pid)?;
    timed_command(Command::new(&containerd).arg("stop"))?;
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    println!("| idle, {image} pulled, one container run | RSS | vs containerd |");
    println!("|---|---|---|");
    println!("| containerd 1.6 (overlayfs snapshotter) | {:.1} MiB | 1.00x |", mb(c));
    println!("| `hb daemon` | {:.1} MiB | **{:.2}x** |", mb(d), d as f64 / c as f64);
    println!("| its image mount server (`hb mount`, one per mounted image) | {:.1} MiB | |", mb(m));
    println!("| its standby mount server (one, waiting for the next image) | {:.1} MiB | |", mb(s));
    println!("| daemon + mount server + standby | {:.1} MiB | {:.2}x |", mb(d + m + s), (d + m + s) as f64 / c as f64);
    Ok(())
}

/// containerd with hb as its snapshotter, pulling lazily (`ctr-remote images rpull`: remote
/// snapshot labels), against containerd with its overlayfs snapshotter (`ctr images pull`), same
/// registry and image: pull start to the first output of a command in a new container.
pub fn snapshotter(runs: usize, large: &str) -> anyhow::Result<()> {
    let hb = hb_binary()?;
    let work = scratch()?;
    let conv = work.path().join("convert");
    let lazy = format!("{}-snapshotter-bench", large.replace("/debian-app:", "/bench/debian-app:"));
    timed_command(Command::new(&hb).arg("--root").arg(&conv).args(["-q", "convert", large, &lazy]))?;
    timed_command(Command::new(&hb).arg("--root").arg(&conv).args(["-q", "optimize", &lazy, "--"]).args(CMD))?;
    let containerd = repo_root().join("scripts/containerd.sh");
    let dir = std::env::var("HB_CONTAINERD_DIR").unwrap_or_else(|_| "/dev/shm/hb-containerd".into());
    let sock = format!("{dir}/containerd.sock");
    let (mut t_hb, mut t_ov, mut wire) = (vec![], vec![], vec![]);
    for run in 0..runs {
        // Overlayfs: containerd downloads and unpacks every layer, then runs.
        timed_command(Command::new(&containerd).arg("reset"))?;
        let started = Instant::now();
        timed_command(Command::new("ctr").args(["-a", &sock, "-n", "bench", "images", "pull", "--plain-http", large]))?;
        let mut run_ov = Command::new("ctr");
        run_ov.args(["-a", &sock, "-n", "bench", "run", "--rm", large, &format!("ov-{run}")]).args(CMD);
        t_ov.push(time_to_output(run_ov, started)?);

        // hb: a fresh store and daemon; containerd asks it for remote snapshots.
        let store = scratch()?;
        let (mut daemon, api, snap) = start_daemon(&hb, &store.path().join("store"), store.path())?;
        timed_command(Command::new(&containerd).arg("reset").env("HB_SNAPSHOTTER_SOCK", &snap))?;
        let started = Instant::now();
        timed_command(
            Command::new("ctr-remote").args(["-a", &sock, "-n", "bench", "images", "rpull", "--plain-http"]).args([
                "--snapshotter",
                "hb",
                &lazy,
            ]),
        )?;
        let mut run_hb = Command::new("ctr");
        run_hb
            .args(["-a", &sock, "-n", "bench", "run", "--rm", "--snapshotter", "hb", &lazy, &format!("hb-{run}")])
            .args(CMD);
        t_hb.push(time_to_output(run_hb, started)?);
        std::thread::sleep(Duration::from_secs(1));
        let m = Command::new("curl").args(["-sf", "--unix-socket"]).arg(&api).arg("http://hb/metrics").output()?;
        let text = String::from_utf8_lossy(&m.stdout).into_owned();
        wire.push(
            text.lines()
                .find_map(|l| l.strip_prefix("hb_fetched_bytes_total{source=\"wire\"} "))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0),
        );
        timed_command(Command::new(&containerd).arg("stop"))?;
        let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
        let _ = daemon.wait();
        for e in std::fs::read_dir(store.path().join("store/images"))?.flatten() {
            if e.path().is_dir() {
                timed_command(
                    Command::new(&hb).arg("--root").arg(store.path().join("store")).arg("umount").arg(e.path()),
                )?;
            }
        }
    }
    let (h, o) = (median(t_hb), median(t_ov));
    let w = wire.iter().sum::<f64>() / wire.len().max(1) as f64;
    println!("| `python3 -c 'print(1)'` in {large} through containerd 1.6, cold, loopback, median of {runs} | pull start to first output | vs hb |");
    println!("|---|---|---|");
    println!(
        "| containerd + hb snapshotter, lazily (`ctr-remote images rpull` of the accelerated image, `ctr run`; {:.1} MB over the wire) | {:.2} s | 1.00x |",
        w / 1e6,
        h.as_secs_f64()
    );
    println!(
        "| containerd + overlayfs (`ctr images pull`, `ctr run`) | {:.2} s | **{:.1}x** |",
        o.as_secs_f64(),
        o.as_secs_f64() / h.as_secs_f64()
    );
    Ok(())
}
