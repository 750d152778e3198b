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
