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
    let (code, out, err) = hb_run(&hb, &[&image, "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
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
    let err = hb.fails(&["run", "--memory", "lots", &image, "true"], 2);
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
