//! `hb run` (foreground): real runc, real overlayfs over the image's FUSE mount, real cgroups.

use std::process::Command;

use hb_tests::*;

use super::pull::{open_registry, run};

/// Runs `hb run ARGS` and returns (exit code, stdout, stderr).
fn hb_run(hb: &Hb, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["-q", "run", "--rm"];
    a.extend_from_slice(args);
    let o = hb.run(&a);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// No container bundle, overlay or image mount of this store is left behind.
fn assert_cleaned_up(hb: &Hb) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(hb.dir.path().to_str().unwrap()), "a mount of this test is left:\n{mounts}");
    hb.fsck_clean();
}

#[test]
fn busybox_runs_with_docker_semantics_for_output_exit_codes_env_and_user() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    assert_eq!(hb_run(&hb, &[&image, "echo", "hello"]), (0, "hello\n".into(), String::new()));
    // A relative `--root` is the working directory's (regression: the runtime got a relative
    // rootfs path, which it took from the bundle's folder, and failed).
    let o = Command::new(hb_bin())
        .current_dir(hb.dir.path())
        .args(["--root", "store", "--config"])
        .arg(hb.path("hb-default.toml"))
        .args(["-q", "run", "--rm", &image, "echo", "relative"])
        .env_remove("HB_ROOT")
        .env_remove("HB_SOCKET")
        .output()
        .unwrap();
    assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()), (Some(0), "relative\n"), "{o:?}");
    let (code, out, err) = hb_run(&hb, &[&image, "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
    // docker's codes for what is not the container's own exit: 127 no such command, 126 not
    // runnable, 125 hb failed; each says what was wrong, and no container is left behind.
    let cases: [(&[&str], &[&str], i32, &str); 6] = [
        (&[], &["nosuch"], 127, "exec: \"nosuch\": executable file not found in $PATH"),
        (&[], &["/bin/nosuch"], 127, "exec: \"/bin/nosuch\": no such file or directory"),
        (&["-w", "/bin"], &["./nosuch"], 127, "no such file or directory"),
        (&[], &["/etc/passwd"], 126, "exec: \"/etc/passwd\": permission denied"),
        (&[], &["/etc"], 126, "permission denied"),
        (&["--entrypoint", "/etc/group"], &[], 126, "permission denied"),
    ];
    for (flags, command, code, says) in cases {
        let all: Vec<&str> =
            ["run", "--rm"].iter().chain(flags).chain([&image.as_str()]).chain(command).copied().collect();
        let err = hb.fails(&all, code);
        assert!(err.contains(says), "{all:?}: {err}");
    }
    let err = hb.fails(&["run", "--rm", &image.replace("busybox", "nosuch-image"), "true"], 125);
    assert!(err.contains("nosuch-image"), "{err}");
    // A command in a volume is not in the image: not judged before it is mounted.
    let tools = hb.path("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::write(tools.join("hello"), "#!/bin/sh\necho from a volume\n").unwrap();
    std::fs::set_permissions(tools.join("hello"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let volume = format!("{}:/tools", tools.display());
    assert_eq!(hb_run(&hb, &["-v", &volume, &image, "/tools/hello"]), (0, "from a volume\n".into(), String::new()));
    let (code, out, _) = hb_run(
        &hb,
        &[
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "--hostname",
            "box1",
            &image,
            "sh",
            "-c",
            "echo $FOO $(pwd) $(id -u):$(id -g) $(hostname)",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "bar /tmp 1000:1000 box1\n"));
    let (code, out, _) = hb_run(&hb, &["--entrypoint", "/bin/echo", &image, "from", "entrypoint"]);
    assert_eq!((code, out.as_str()), (0, "from entrypoint\n"));
    // Output passes through byte for byte: a 40000-byte line, a last line without a newline,
    // both streams at once.
    let script = "head -c 40000 /dev/zero | tr '\\0' a; echo; echo e1 >&2; printf tail; printf e2 >&2";
    let (code, out, err) = hb_run(&hb, &[&image, "sh", "-c", script]);
    assert_eq!((code, out.len(), err.as_str()), (0, 40005, "e1\ne2"));
    assert_eq!(out, format!("{}\ntail", "a".repeat(40000)));
    // SIGTERM to hb reaches the container (which traps it here) and its exit code comes back.
    let mut child = hb
        .command(&["-q", "run", &image, "sh", "-c", "trap 'exit 42' TERM; echo ready; while true; do sleep 0.1; done"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line, "ready\n");
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    assert_eq!(child.wait().unwrap().code(), Some(42), "the container's exit code after SIGTERM");
    // Bad flags are refused before anything runs.
    let err = hb.fails(&["run", "--memory", "lots", &image, "true"], 125);
    assert!(err.contains("--memory"), "{err}");
    assert_cleaned_up(&hb);
}

#[test]
fn limits_read_only_volumes_and_network_are_enforced() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    let (code, _, _) = hb_run(&hb, &["--memory", "32m", &image, "sh", "-c", "tail /dev/zero"]);
    assert_eq!(code, 137, "a memory hog is OOM-killed");
    let (code, _, err) =
        hb_run(&hb, &["--pids-limit", "10", &image, "sh", "-c", "for i in $(seq 30); do sleep 2 & done; wait"]);
    assert!(code != 0 && err.contains("can't fork"), "a fork bomb is stopped: {code} {err}");
    let (code, _, err) = hb_run(&hb, &["--read-only", &image, "touch", "/x"]);
    assert!(code != 0 && err.contains("Read-only file system"), "{code} {err}");
    let vol = hb.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("in"), "from host\n").unwrap();
    let bind = format!("{}:/mnt/vol", vol.display());
    let (code, out, _) =
        hb_run(&hb, &["-v", &bind, &image, "sh", "-c", "cat /mnt/vol/in; echo from container > /mnt/vol/out"]);
    assert_eq!((code, out.as_str()), (0, "from host\n"));
    assert_eq!(std::fs::read_to_string(vol.join("out")).unwrap(), "from container\n");
    let ro = format!("{}:/mnt/vol:ro", vol.display());
    let (code, _, _) = hb_run(&hb, &["-v", &ro, &image, "touch", "/mnt/vol/x"]);
    assert_ne!(code, 0, "a read-only volume stays read-only");
    let (code, out, _) = hb_run(&hb, &["--network", "none", &image, "sh", "-c", "ls /sys/class/net"]);
    assert_eq!((code, out.as_str()), (0, "lo\n"), "--network none: loopback only");
    // Writes go to the container's own upper dir: the next container sees the image unchanged.
    let (code, out, _) = hb_run(&hb, &[&image, "sh", "-c", "echo x > /etc/passwd; ls /tmp | wc -l"]);
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = hb_run(&hb, &[&image, "head", "-c", "4", "/etc/passwd"]);
    assert_ne!(out, "x\n", "the image was modified by a container");
    assert_cleaned_up(&hb);
}

#[test]
fn the_large_image_runs_python_and_gcc_from_a_cold_lazy_mount() {
    let reg = open_registry();
    let lazy = format!("{reg}/lazy-test/run:{}", std::process::id());
    Hb::new().ok(&["convert", &format!("{reg}/debian-app:v1"), &lazy]);
    let hb = Hb::new();
    let (code, out, err) = hb_run(&hb, &[&lazy, "python3", "-c", "print(1)"]);
    assert_eq!((code, out.as_str()), (0, "1\n"), "{err}");
    let du = hb.json(&["du"]);
    assert!(du["absent_chunks"].as_u64().unwrap() > 0, "the image was pulled lazily: {du}");
    // Regression (hardening issue): docker's seccomp profile, an allow list. io_uring_setup (425)
    // is refused with EPERM (the old deny list let it through: EFAULT here), clone3 (435) answers
    // ENOSYS so libc falls back to a checked clone (EINVAL before).
    let probe = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
        def errno(n, *a):\n    return 0 if libc.syscall(n, *a) >= 0 else ctypes.get_errno()\n\
        print(errno(425, 1, None), errno(435, None, 0))";
    let (code, out, err) = hb_run(&hb, &[&lazy, "python3", "-c", probe]);
    assert_eq!((code, out.as_str()), (0, "1 38\n"), "io_uring_setup must fail with EPERM, clone3 with ENOSYS: {err}");
    let (code, out, err) = hb_run(
        &hb,
        &[&lazy, "sh", "-c", "printf '#include <stdio.h>\\nint main(void){puts(\"built\");return 0;}\\n' > /tmp/h.c && gcc -o /tmp/h /tmp/h.c && /tmp/h"],
    );
    assert_eq!((code, out.as_str()), (0, "built\n"), "{err}");
    // The image's own command.
    let (code, out, _) = hb_run(&hb, &[&lazy]);
    assert_eq!(code, 0);
    assert!(out.contains("hello from the hb test app"), "{out}");
    assert_cleaned_up(&hb);
    let _ = Command::new("true").status();
}

/// Polls `f` every 50 ms for up to 60 s; panics with `what` if it never holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

fn ps_json(hb: &Hb) -> Vec<serde_json::Value> {
    hb.json(&["ps", "-a"]).as_array().unwrap().clone()
}

fn container<'a>(all: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    all.iter().find(|c| c["name"] == name)
}

#[test]
fn detached_containers_outlive_hb_and_have_a_docker_lifecycle() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    let script = "echo started; echo oops >&2; trap 'echo bye; exit 3' TERM; while true; do sleep 0.1; done";
    // `hb run -d` returns (the hb process is gone) with the id; the container keeps running.
    let id = hb.ok(&["-q", "run", "-d", "--name", "web", &image, "sh", "-c", script]);
    let id = id.trim();
    assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()), "docker-style id: {id:?}");
    let ps = hb.ok(&["ps"]);
    assert!(
        ps.lines().nth(1).is_some_and(|l| l.starts_with(&id[..12]) && l.contains("Up") && l.ends_with("web")),
        "{ps}"
    );
    assert_eq!(hb.ok(&["-q", "ps"]).trim(), &id[..12], "-q prints ids only");
    // docker's --format: a template, or one JSON object per line.
    assert_eq!(hb.ok(&["ps", "--format", "{{.ID}}\\t{{.Name}}"]), format!("{id}\tweb\n"));
    let line: serde_json::Value = serde_json::from_str(hb.ok(&["ps", "--format", "json"]).trim()).unwrap();
    assert_eq!((line["id"].as_str(), line["running"].as_bool()), (Some(id), Some(true)), "{line}");
    let err = hb.fails(&["ps", "--format", "{{.Nope}}"], 1);
    assert!(err.contains("no field \"Nope\""), "{err}");
    // images: -q digests once each, --format.
    let image_digest = hb.json(&["images"])[0]["digest"].as_str().unwrap().to_string();
    let q = hb.ok(&["-q", "images"]);
    assert!(q.lines().count() == 1 && image_digest.contains(q.trim()), "{q} vs {image_digest}");
    assert_eq!(hb.ok(&["images", "--format", "{{.Digest}}"]).trim(), image_digest);
    // Logs keep the streams apart.
    eventually("the container's first output in its log", || {
        let o = hb.run(&["logs", "web"]);
        o.stdout == b"started\n" && o.stderr == b"oops\n"
    });
    // exec: in the same container (its hostname is the short id), exit codes and -u.
    let o = hb.run(&["exec", &id[..6], "sh", "-c", "echo $(hostname) $((1+2)); exit 5"]);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(5), &*format!("{} 3\n", &id[..12]))
    );
    assert_eq!(hb.ok(&["exec", "-u", "1000", "web", "id", "-u"]), "1000\n");
    assert_eq!(hb.ok(&["exec", "-e", "X=y", "web", "sh", "-c", "echo $X"]), "y\n");
    // Names are unique; a running container is not removed without -f.
    let err = hb.fails(&["run", "-d", "--name", "web", &image, "true"], 125);
    assert!(err.contains("already in use by container"), "{err}");
    let err = hb.fails(&["rm", "web"], 1);
    assert!(err.contains("is running"), "{err}");
    // A second container at the same time (its mount reads the store another monitor holds).
    let other = hb.ok(&["-q", "run", "-d", &image, "sleep", "600"]);
    assert_eq!(hb.ok(&["-q", "ps"]).lines().count(), 2);
    // stop: SIGTERM reaches the trap; its exit code and last output are recorded.
    assert_eq!(hb.ok(&["stop", "web"]), "web\n");
    let all = ps_json(&hb);
    let web = container(&all, "web").unwrap();
    assert_eq!((web["status"].as_str(), web["exit_code"].as_i64()), (Some("exited"), Some(3)), "{web}");
    assert_eq!(hb.ok(&["logs", "--tail", "1", "web"]), "bye\n");
    let err = hb.fails(&["exec", "web", "true"], 1);
    assert!(err.contains("not running"), "{err}");
    // kill: SIGKILL by default, 137 as docker reports it.
    assert_eq!(hb.ok(&["kill", other.trim()]), format!("{}\n", other.trim()));
    eventually("the killed container to be recorded as exited", || {
        let all = ps_json(&hb);
        all.iter().any(|c| c["id"] == other.trim() && c["exit_code"] == 137)
    });
    // rm removes the folder, its mounts are gone.
    assert_eq!(hb.ok(&["rm", "web", other.trim()]), format!("web\n{}\n", other.trim()));
    assert!(ps_json(&hb).is_empty());
    let err = hb.fails(&["logs", "web"], 1);
    assert!(err.contains("no such container: web"), "{err}");
    // Start failures are errors of `hb run -d`, not ids of containers that never ran.
    let err = hb.fails(&["run", "-d", "-t", &image, "true"], 125);
    assert!(err.contains("-d with -t is not supported"), "{err}");
    let err = hb.fails(&["run", "-d", "--user", "nosuch", &image, "true"], 125);
    assert!(err.contains("unknown user \"nosuch\""), "{err}");
    assert!(ps_json(&hb).is_empty(), "a container that could not be made is not kept");
    let err = hb.fails(&["run", "-d", "--name", "bad", &image, "/nonexistent"], 127);
    assert!(err.contains("exec: \"/nonexistent\": no such file or directory"), "{err}");
    assert!(ps_json(&hb).is_empty(), "a container whose command is not there is not kept");
    // --rm -d: gone by itself once it ends.
    hb.ok(&["-q", "run", "-d", "--rm", "--name", "brief", &image, "sh", "-c", "sleep 0.3"]);
    eventually("an --rm container to remove itself", || container(&ps_json(&hb), "brief").is_none());
    assert_cleaned_up(&hb);
}

#[test]
fn a_container_whose_monitor_died_shows_as_dead_and_rm_cleans_it_up() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    hb.ok(&["-q", "run", "-d", "--name", "orphan", &image, "sleep", "600"]);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(container_dir(&hb, "orphan").join("state.json")).unwrap()).unwrap();
    let monitor = state["monitor"][0].as_u64().unwrap();
    run(Command::new("kill").args(["-KILL", &monitor.to_string()]));
    eventually("the dead monitor to show", || hb.ok(&["ps", "-a"]).contains("Dead"));
    assert!(hb.ok(&["-q", "ps"]).is_empty(), "a dead container is not listed as running");
    // rm detaches its stale mounts and deletes the runtime's record of it.
    assert_eq!(hb.ok(&["rm", "-f", "orphan"]), "orphan\n");
    assert!(!hb.ok(&["ps", "-a"]).contains("orphan"));
    let runc = Command::new("runc").args(["state", state["id"].as_str().unwrap()]).output().unwrap();
    assert!(!runc.status.success(), "runc still knows the container");
    assert_cleaned_up(&hb);
}

fn container_dir(hb: &Hb, name: &str) -> std::path::PathBuf {
    let all = hb.json(&["ps", "-a"]);
    let id = all.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["id"].as_str().unwrap().to_string();
    hb.root.join("containers").join(id)
}

#[test]
fn hb_serves_container_commands_itself_and_hands_the_rest_to_hb_engine() {
    let hb = Hb::new();
    // Beside its engine: every command works (`images` is the engine's, `ps` hb's own).
    assert!(hb.ok(&["images"]).starts_with("IMAGE"));
    assert!(hb.ok(&["ps", "-a"]).starts_with("CONTAINER ID"));
    let help = hb.run(&["--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("Pull an image"), "the engine's help lists everything");
    let usage = hb.run(&["no-such-command"]);
    assert_eq!(usage.status.code(), Some(2), "a usage error is the engine's: exit code 2");
    // Alone, `hb` still does what needs no store and names what is missing for the rest.
    let lone = hb.path("lone");
    std::fs::create_dir_all(&lone).unwrap();
    std::fs::copy(hb_bin(), lone.join("hb")).unwrap();
    let run = |args: &[&str]| {
        let c = hb.command(args);
        let argv: Vec<std::ffi::OsString> = c.get_args().map(|a| a.to_os_string()).collect();
        let mut alone = Command::new(lone.join("hb"));
        alone.args(argv);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => alone.env(k, v),
                None => alone.env_remove(k),
            };
        }
        alone.output().unwrap()
    };
    let ps = run(&["ps", "-a"]);
    assert!(ps.status.success(), "{}", String::from_utf8_lossy(&ps.stderr));
    let images = run(&["images"]);
    assert_eq!(images.status.code(), Some(1));
    let err = String::from_utf8_lossy(&images.stderr);
    assert!(err.contains("hb-engine") && err.contains("beside hb"), "{err}");
}

/// Runs `hb ARGS` with `answer` on stdin (a prune's confirmation); returns (code, stdout, stderr).
fn hb_answering(hb: &Hb, args: &[&str], answer: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = hb
        .command(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(answer.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn container_image_and_system_groups_wait_inspect_and_prune_as_docker_does() {
    let registry = open_registry();
    let (latest, zstd) = (format!("{registry}/busybox:latest"), format!("{registry}/busybox:zstd"));
    // As installed: a daemon owns the store (a detached container's monitor then holds none), and
    // every command finds it through the config file. The last prune runs without it.
    let hb = super::daemon::hb_for_daemon("");
    let mut daemon = super::daemon::Daemon::start(&hb);
    hb.ok(&["-q", "pull", &latest]);
    hb.ok(&["-q", "pull", &zstd]);
    // Three containers of one image: running, exited 7, and one `hb wait` waits for.
    hb.ok(&["-q", "run", "-d", "--name", "long", &latest, "sleep", "600"]);
    let o = hb.run(&["-q", "run", "--name", "done", &latest, "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{o:?}");
    hb.ok(&["-q", "run", "-d", "--name", "brief", &latest, "sh", "-c", "sleep 0.5; exit 4"]);
    assert_eq!(hb.ok(&["wait", "brief", "done"]), "4\n7\n", "exit codes in the order asked");
    // An `--rm` container's folder goes as it ends; `hb wait` still gets its exit code.
    hb.ok(&["-q", "run", "-d", "--rm", "--name", "gone", &latest, "sh", "-c", "sleep 0.5; exit 5"]);
    assert_eq!(hb.ok(&["wait", "gone"]), "5\n");
    let err = hb.fails(&["wait", "nosuch"], 1);
    assert!(err.contains("no such container: nosuch"), "{err}");
    // `hb container ls|list` is `hb ps`.
    assert_eq!(hb.ok(&["container", "ls", "--format", "{{.Name}}"]), "long\n");
    let mut all: Vec<String> =
        hb.ok(&["container", "list", "-a", "--format", "{{.Name}}"]).lines().map(String::from).collect();
    all.sort();
    assert_eq!(all, ["brief", "done", "long"]);
    // inspect: docker's shape, for containers by `hb container inspect` and `hb inspect`.
    let v: serde_json::Value = serde_json::from_str(&hb.ok(&["container", "inspect", "long", "done"])).unwrap();
    let (long, done) = (&v[0], &v[1]);
    assert_eq!((long["Name"].as_str(), long["State"]["Status"].as_str()), (Some("/long"), Some("running")), "{long}");
    assert_eq!(long["State"]["Running"], true);
    assert_eq!((long["Path"].as_str(), long["Args"][0].as_str()), (Some("sleep"), Some("600")));
    assert_eq!(long["Image"].as_str(), Some(latest.as_str()));
    assert_eq!(long["State"]["FinishedAt"], "0001-01-01T00:00:00Z", "docker's zero time while it runs");
    assert_eq!((done["State"]["Status"].as_str(), done["State"]["ExitCode"].as_i64()), (Some("exited"), Some(7)));
    let finished = done["State"]["FinishedAt"].as_str().unwrap();
    assert!(finished.ends_with('Z') && !finished.starts_with("0001"), "{finished}");
    let by_inspect: serde_json::Value = serde_json::from_str(&hb.ok(&["inspect", "done"])).unwrap();
    assert_eq!(by_inspect[0]["Id"], done["Id"]);
    let o = hb.run(&["container", "inspect", "done", "nosuch"]);
    assert_eq!(o.status.code(), Some(1), "one missing container fails the command");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such container: nosuch"));
    // Images: `hb image ls|inspect|rm` are `hb images|inspect|rmi`.
    let mut names: Vec<String> = hb.ok(&["image", "ls", "--format", "{{.Name}}"]).lines().map(String::from).collect();
    names.sort();
    assert_eq!(names, [latest.clone(), zstd.clone()]);
    let image: serde_json::Value = serde_json::from_str(&hb.ok(&["image", "inspect", &zstd])).unwrap();
    assert!(image["manifest"]["layers"].is_array(), "{image}");
    let o = hb.run(&["image", "rm", &zstd]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("untagged") && err.contains("`hb gc` frees up to"), "{err}");
    hb.ok(&["-q", "pull", &zstd]);
    // system df: images (one in use), containers (one running), the store on disk.
    let df = hb.json(&["system", "df"]);
    assert_eq!((df["images"]["total"].as_u64(), df["images"]["active"].as_u64()), (Some(2), Some(1)), "{df}");
    assert_eq!((df["containers"]["total"].as_u64(), df["containers"]["active"].as_u64()), (Some(3), Some(1)));
    assert!(df["store"]["pack_bytes"].as_u64().unwrap() > 0, "{df}");
    let table = hb.ok(&["system", "df"]);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("TYPE") && rows[0].ends_with("RECLAIMABLE"), "{table}");
    assert!(rows[2].starts_with("Containers    3       1"), "{table}");
    // A prune asks first: no answer (end of input) removes nothing; "y" removes.
    let (code, out, err) = hb_answering(&hb, &["container", "prune"], "");
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert!(err.contains("WARNING! This will remove all stopped containers.") && err.contains("nothing removed"));
    assert_eq!(hb.ok(&["-q", "ps", "-a"]).lines().count(), 3);
    let brief: serde_json::Value = serde_json::from_str(&hb.ok(&["inspect", "brief"])).unwrap();
    let (code, out, err) = hb_answering(&hb, &["container", "prune"], "y\n");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("Deleted Containers:\n") && out.contains("Total reclaimed space: "), "{out}");
    for gone in [done, &brief[0]] {
        assert!(out.contains(gone["Id"].as_str().unwrap()), "{out}");
    }
    assert_eq!(hb.ok(&["container", "ls", "-a", "--format", "{{.Name}}"]), "long\n");
    // image prune -a: every image no container uses; the running container's image stays.
    let out = hb.ok(&["image", "prune", "-a", "-f"]);
    assert!(out.contains(&format!("Deleted Images:\nuntagged: {zstd}\n")) && !out.contains(&latest), "{out}");
    assert_eq!(hb.ok(&["image", "ls", "--format", "{{.Name}}"]), format!("{latest}\n"));
    // `hb container rm` is `hb rm`: -f kills a running one.
    hb.ok(&["-q", "run", "-d", "--name", "extra", &latest, "sleep", "600"]);
    assert_eq!(hb.ok(&["container", "rm", "-f", "extra"]), "extra\n");
    // system prune -a, here without a daemon: the stopped container, then its image, the data.
    hb.ok(&["stop", "-t", "0", "long"]);
    daemon.stop();
    super::daemon::unmount_all(&hb); // the image mounts it started outlive it
    let out = hb.ok(&["system", "prune", "-a", "-f"]);
    assert!(out.contains("Deleted Containers:\n") && out.contains(&format!("untagged: {latest}")), "{out}");
    assert!(!out.contains("Total reclaimed space: 0B"), "the data went: {out}");
    assert!(hb.ok(&["-q", "images"]).is_empty() && hb.ok(&["-q", "ps", "-a"]).is_empty());
    let df = hb.json(&["system", "df"]);
    assert_eq!(df["store"]["live_pack_bytes"].as_u64(), Some(0), "{df}");
    assert_cleaned_up(&hb);
}

/// The effective capability set of a container run with `flags`, from its /proc/self/status.
fn effective_caps(hb: &Hb, image: &str, flags: &[&str]) -> u64 {
    let mut args = flags.to_vec();
    args.extend([image, "grep", "CapEff", "/proc/self/status"]);
    let (code, out, err) = hb_run(hb, &args);
    assert_eq!(code, 0, "{err}");
    u64::from_str_radix(out.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

#[test]
fn run_takes_env_files_tmpfs_mounts_capabilities_and_rotates_logs() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    // --env-file, with -e winning over it.
    let env = hb.path("app.env");
    std::fs::write(&env, "# settings\nA=1\n\nB=two\n").unwrap();
    let env = env.to_str().unwrap();
    let (code, out, err) = hb_run(&hb, &["--env-file", env, "-e", "B=three", &image, "sh", "-c", "echo $A $B"]);
    assert_eq!((code, out.as_str()), (0, "1 three\n"), "{err}");
    let err = hb.fails(&["run", "--rm", "--env-file", "/nonexistent.env", &image, "true"], 125);
    assert!(err.contains("--env-file /nonexistent.env"), "{err}");
    // --tmpfs: docker's defaults (noexec) under what was asked for.
    let (code, out, err) = hb_run(&hb, &["--tmpfs", "/scratch:size=1m", &image, "grep", " /scratch ", "/proc/mounts"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("tmpfs /scratch tmpfs") && out.contains("noexec") && out.contains("size=1024k"), "{out}");
    // --mount: a read-only bind and a tmpfs; a missing bind source is refused before anything runs.
    let data = hb.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("x"), "from the host\n").unwrap();
    let bind = format!("type=bind,source={},target=/data,readonly", data.display());
    let (code, out, err) = hb_run(
        &hb,
        &[
            "--mount",
            &bind,
            "--mount",
            "type=tmpfs,target=/cache",
            &image,
            "sh",
            "-c",
            "cat /data/x; touch /data/y || echo ro; touch /cache/z && echo rw",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "from the host\nro\nrw\n"), "{err}");
    let err = hb.fails(&["run", "--rm", "--mount", "type=bind,source=/nonexistent,target=/x", &image, "true"], 125);
    assert!(err.contains("bind source path does not exist: /nonexistent"), "{err}");
    let err = hb.fails(&["run", "--rm", "--mount", "type=volume,source=v,target=/x", &image, "true"], 125);
    assert!(err.contains("named volumes are not supported"), "{err}");
    // --cap-add/--cap-drop change the container's effective set.
    const NET_ADMIN: u64 = 1 << 12;
    const CHOWN: u64 = 1;
    let default = effective_caps(&hb, &image, &[]);
    assert!(default & CHOWN != 0 && default & NET_ADMIN == 0, "{default:x}");
    assert_eq!(
        effective_caps(&hb, &image, &["--cap-add", "NET_ADMIN", "--cap-drop", "chown"]),
        (default | NET_ADMIN) & !CHOWN
    );
    assert_eq!(effective_caps(&hb, &image, &["--cap-drop", "ALL"]), 0);
    let err = hb.fails(&["run", "--rm", "--cap-add", "NET_MAGIC", &image, "true"], 125);
    assert!(err.contains("NET_MAGIC"), "{err}");
    // --log-opt: json-file rotation; `hb logs` reads the rotated file first; --since.
    hb.ok(&[
        "-q",
        "run",
        "-d",
        "--name",
        "chatty",
        "--log-opt",
        "max-size=1k",
        "--log-opt",
        "max-file=2",
        &image,
        "sh",
        "-c",
        "for i in $(seq 1 100); do echo line $i; done",
    ]);
    assert_eq!(hb.ok(&["wait", "chatty"]), "0\n");
    let dir = container_dir(&hb, "chatty");
    assert!(dir.join("log.json.1").exists() && !dir.join("log.json.2").exists(), "two files kept");
    let logs = hb.ok(&["logs", "chatty"]);
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.last(), Some(&"line 100"));
    assert!(lines.len() < 100 && lines.len() > 10, "the oldest lines rotated away: {}", lines.len());
    let first: usize = lines[0].strip_prefix("line ").unwrap().parse().unwrap();
    let expected: Vec<String> = (first..=100).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected, "rotated file then current, in order, nothing lost between them");
    assert_eq!(hb.ok(&["logs", "--tail", "2", "chatty"]), "line 99\nline 100\n");
    assert_eq!(hb.ok(&["logs", "--since", "1h", "chatty"]), logs);
    let future = (chrono_now_secs() + 3600).to_string();
    assert_eq!(hb.ok(&["logs", "--since", &future, "chatty"]), "");
    let err = hb.fails(&["logs", "--since", "yesterday", "chatty"], 1);
    assert!(err.contains("--since \"yesterday\""), "{err}");
    let err = hb.fails(&["run", "--rm", "--log-opt", "max-file=2", &image, "true"], 125);
    assert!(err.contains("max-file needs max-size"), "{err}");
    hb.ok(&["rm", "chatty"]);
    assert_cleaned_up(&hb);
}

fn chrono_now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// `skopeo copy` between two references of the open loopback registry.
fn retag(from: &str, to: &str) {
    let o = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{from}"))
        .arg(format!("docker://{to}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo copy {from} {to}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn run_pull_policies_missing_always_never_as_docker() {
    let registry = open_registry();
    let tag = format!("{registry}/hbtest-pull-{}/app:moving", std::process::id());
    retag(&format!("{registry}/busybox:latest"), &tag);
    let hb = Hb::new();
    let digest = |hb: &Hb| hb.ok(&["images", "--format", "{{.Name}} {{.Digest}}"]);
    let err = hb.fails(&["run", "--rm", "--pull", "never", &tag, "true"], 125);
    assert!(err.contains("no such image in the store") && err.contains(&tag), "{err}");
    assert!(hb.ok(&["-q", "images"]).is_empty(), "--pull never pulled nothing");
    assert_eq!(hb_run(&hb, &[&tag, "echo", "one"]).0, 0, "missing: pulled");
    let first = digest(&hb);
    assert_eq!(hb_run(&hb, &["--pull", "never", &tag, "true"]).0, 0, "present: runs");
    // The tag moves to another image: `missing` keeps what is stored, `always` follows it.
    retag(&format!("{registry}/busybox:v2s2"), &tag);
    assert_eq!(hb_run(&hb, &[&tag, "true"]).0, 0);
    assert_eq!(digest(&hb), first, "--pull missing does not look again");
    assert_eq!(hb_run(&hb, &["--pull", "always", &tag, "true"]).0, 0);
    let moved = digest(&hb);
    assert_ne!(moved, first, "--pull always follows the tag");
    let err = hb.fails(&["run", "--rm", "--pull", "sometimes", &tag, "true"], 125);
    assert!(err.contains("--pull") && err.contains("always"), "{err}");
    // Through a daemon too.
    let with_daemon = super::daemon::hb_for_daemon("");
    let mut daemon = super::daemon::Daemon::start(&with_daemon);
    let err = with_daemon.fails(&["run", "--rm", "--pull", "never", &tag, "true"], 125);
    assert!(err.contains("no such image in the store"), "{err}");
    assert_eq!(hb_run(&with_daemon, &["--pull", "always", &tag, "true"]).0, 0);
    assert_eq!(digest(&with_daemon), moved);
    daemon.stop();
    super::daemon::unmount_all(&with_daemon);
    assert_cleaned_up(&hb);
}

#[test]
fn run_init_puts_docker_init_at_pid_1_with_the_command_under_it() {
    let image = format!("{}/busybox:latest", open_registry());
    let hb = Hb::new();
    let (code, out, err) =
        hb_run(&hb, &["--init", &image, "sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].trim(), "/sbin/docker-init -- sh -c tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$", "{out}");
    assert_ne!(lines[1], "1", "the command is not pid 1 under --init");
    // The container's exit code passes through the init; a missing command is still 127.
    assert_eq!(hb_run(&hb, &["--init", &image, "sh", "-c", "exit 7"]).0, 7);
    let err = hb.fails(&["run", "--rm", "--init", &image, "nosuch"], 127);
    assert!(err.contains("executable file not found"), "{err}");
    // Without --init the command is pid 1, as before.
    let (_, out, _) = hb_run(&hb, &[&image, "sh", "-c", "echo $$"]);
    assert_eq!(out, "1\n");
    assert_cleaned_up(&hb);
}

#[test]
fn run_and_mount_take_a_platform_and_pull_again_for_another() {
    let multi = format!("{}/multi:latest", open_registry());
    let hb = Hb::new();
    let platform = |hb: &Hb| {
        let v: serde_json::Value = serde_json::from_str(&hb.ok(&["inspect", &multi])).unwrap();
        v["platform"].as_str().unwrap().to_string()
    };
    // hb mount --platform: the arm64 variant (a one-file layer) on this machine.
    let dir = hb.path("arm");
    std::fs::create_dir_all(&dir).unwrap();
    hb.ok(&["mount", "-d", "--platform", "linux/arm64", &multi, dir.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dir.join("arch")).unwrap(), "arm64\n");
    hb.ok(&["umount", dir.to_str().unwrap()]);
    assert_eq!(platform(&hb), "linux/arm64/v8");
    // Stored for arm64; `--platform linux/amd64` pulls the amd64 variant (busybox) and runs it.
    assert_eq!(hb_run(&hb, &["--platform", "linux/amd64", &multi, "echo", "amd"]), (0, "amd\n".into(), String::new()));
    assert_eq!(platform(&hb), "linux/amd64");
    let err = hb.fails(&["run", "--rm", "--platform", "linux", &multi, "true"], 125);
    assert!(err.contains("os/arch"), "{err}");
    // Through a daemon: the same.
    let with_daemon = super::daemon::hb_for_daemon("");
    let mut daemon = super::daemon::Daemon::start(&with_daemon);
    with_daemon.ok(&["-q", "pull", "--platform", "linux/arm64", &multi]);
    assert_eq!(platform(&with_daemon), "linux/arm64/v8");
    assert_eq!(hb_run(&with_daemon, &["--platform", "linux/amd64", &multi, "echo", "amd"]).1, "amd\n");
    assert_eq!(platform(&with_daemon), "linux/amd64");
    daemon.stop();
    super::daemon::unmount_all(&with_daemon);
    assert_cleaned_up(&hb);
}
