//! Link flags for `hb`, whose start-up time is part of every container start: relative
//! relocations packed (DT_RELR, glibc 2.36+ and binutils 2.38+), so the loader reads a few KB of
//! them instead of ~370 KB. Skipped where the linker cannot.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") && linker_packs_relocs() {
        println!("cargo:rustc-link-arg-bin=hb=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether `cc` links a program with `-z pack-relative-relocs` (an old linker refuses it).
fn linker_packs_relocs() -> bool {
    let Ok(dir) = std::env::var("OUT_DIR") else { return false };
    let src = std::path::Path::new(&dir).join("relr.c");
    if std::fs::write(&src, "int main(void) { return 0; }\n").is_err() {
        return false;
    }
    std::process::Command::new("cc")
        .arg(&src)
        .args(["-Wl,-z,pack-relative-relocs", "-o"])
        .arg(std::path::Path::new(&dir).join("relr"))
        .output()
        .is_ok_and(|o| o.status.success())
}
