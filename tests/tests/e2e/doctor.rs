//! `hb doctor`: the machine's findings, a store held by the daemon, and an image's reachability
//! and lazy start, against the real kernel, runtimes, registry and daemon.

use hb_tests::*;

use super::daemon::{with_socket, Daemon};
use super::lazy::convert;
use super::pull::open_registry;

fn finding<'a>(report: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check:?} finding in {report:#}"))
}

#[test]
fn doctor_checks_the_machine_the_store_the_daemon_and_an_images_lazy_start() {
    let hb = Hb::new();
    // A fresh machine state: no store yet, no daemon.
    let r = hb.json(&["doctor"]);
    assert_eq!(r["version"], 1, "{r:#}");
    for check in ["kernel", "FUSE", "/dev/fuse", "FUSE passthrough", "overlayfs", "EROFS", "cgroups"] {
        let f = finding(&r, check);
        assert!(["ok", "warn", "info", "fail"].contains(&f["status"].as_str().unwrap()), "{f}");
    }
    // The suite runs containers through FUSE and runc here: doctor must say these work.
    for check in ["/dev/fuse", "FUSE", "overlayfs", "runtime runc"] {
        assert_eq!(finding(&r, check)["status"], "ok", "{r:#}");
    }
    assert!(finding(&r, "store")["detail"].as_str().unwrap().contains("does not exist yet"), "{r:#}");
    assert_eq!(finding(&r, "daemon")["status"], "info", "{r:#}");
    assert_eq!(r["ok"], true, "{r:#}");

    // The store exists and the daemon owns it: both are named, with its pid and version.
    let reg = open_registry();
    let image = format!("{reg}/busybox:latest");
    hb.ok(&["pull", &image]);
    let d = Daemon::start(&hb);
    let args = with_socket(&hb, &["--json", "doctor"]);
    let r: serde_json::Value =
        serde_json::from_str(&hb.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    let store = finding(&r, "store")["detail"].as_str().unwrap().to_string();
    assert!(store.contains(&format!("owned by the hb daemon (pid {})", d.pid())), "{store}");
    let daemon = finding(&r, "daemon");
    assert_eq!(daemon["status"], "ok", "{daemon}");
    assert!(daemon["detail"].as_str().unwrap().contains(&format!("pid {}", d.pid())), "{daemon}");
    drop(d);

    // An image without an accelerated form starts after a whole pull: said, with the fix.
    let r = hb.json(&["doctor", &image]);
    let reach = finding(&r, &format!("image {image}"));
    assert_eq!(reach["status"], "ok", "{reach}");
    assert!(reach["detail"].as_str().unwrap().contains("1 layers"), "{reach}");
    let lazy = finding(&r, "lazy start");
    assert_eq!(lazy["status"], "warn", "{lazy}");
    assert!(lazy["fix"].as_str().unwrap().contains("hb convert"), "{lazy}");
    assert!(finding(&r, "credentials")["detail"].as_str().unwrap().contains("anonymous"), "{r:#}");
    // With one, it starts lazily.
    let accelerated = convert(&format!("{reg}/debian-app:v1"), "doctor");
    let r = hb.json(&["doctor", &accelerated]);
    assert_eq!(finding(&r, "lazy start")["status"], "ok", "{r:#}");

    // A registry that is not there: a failed check, its fix, exit code 1 (people's output too).
    let gone = "127.0.0.1:1/nothing:latest";
    let out = hb.fails(&["doctor", gone], 1);
    let text = String::from_utf8(hb.run(&["doctor", gone]).stdout).unwrap();
    assert!(text.contains(&format!("FAIL  image {gone}")) && text.contains("fix: "), "{text}\n{out}");
    assert!(text.contains("check(s) failed"), "{text}");
}
