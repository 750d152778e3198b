//! Configuration files hb reads: a containerd-style `hosts.toml` (`config::host_settings`) and
//! the config file `hb.toml` (`config::load`). Both take a path, so each input is written to
//! `<scratch>/certs.d/registry.test/hosts.toml` first (scratch: `$HB_FUZZ_TMP`, else the temp
//! dir; `scripts/fuzz.sh` points it at a tmpfs). A `ca` it names is read relative to that folder
//! (a `ca.pem` holding a certificate is there).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use hb_cli::config::{host_settings, load};
use libfuzzer_sys::fuzz_target;

const REGISTRY: &str = "registry.test";

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("HB_FUZZ_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("hb-fuzz-config-{}", std::process::id())).join("certs.d");
        std::fs::create_dir_all(dir.join(REGISTRY)).expect("scratch folder");
        std::fs::write(
            dir.join(REGISTRY).join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("ca.pem");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let file = dir.join(REGISTRY).join("hosts.toml");
    std::fs::write(&file, data).expect("writing the input");
    let _ = host_settings(Some(dir), REGISTRY);
    let _ = load(Some(&file));
});
