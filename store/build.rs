//! With `ROCKSDB_STATIC` set (see .cargo/config.toml), `librocksdb-sys` links Debian's
//! librocksdb.a; its compression and flag libraries then have to be linked here. A static
//! RocksDB saves every hb process the ~4 ms the dynamic loader spends on librocksdb.so.
fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    if let Some(dir) = std::env::var_os("ROCKSDB_LIB_DIR").map(std::path::PathBuf::from) {
        if !dir.join("librocksdb.a").exists() && !dir.join("librocksdb.so").exists() {
            panic!(
                "no librocksdb in {} (ROCKSDB_LIB_DIR, from .cargo/config.toml): run scripts/setup.sh, \
                 which installs librocksdb-dev and links .cargo/lib to this machine's library folder",
                dir.display()
            );
        }
    }
    if std::env::var_os("ROCKSDB_STATIC").is_some() {
        // Statically too (not bundled into this crate's rlib: they are placed after every rlib,
        // so they resolve librocksdb.a's references): a cold `hb-engine` start (page cache
        // dropped, as after a reboot) otherwise reads each of these shared libraries from disk,
        // ~8 ms of a cold `hb run` with libstdc++'s 2 MB. libstdc++ by file name: librocksdb-sys
        // asks for `-lstdc++`, which the linker then finds already resolved (and drops, as
        // needed). Debian's archives are position-independent (its gcc defaults to PIE).
        for lib in ["snappy", "lz4", "bz2", "z", "gflags"] {
            println!("cargo:rustc-link-lib=static:-bundle={lib}");
        }
        println!("cargo:rustc-link-lib=static:-bundle,+verbatim=libstdc++.a");
        // By file name: `-lzstd` would find the zstd crate's own static build first (its folder
        // comes earlier on the search path), which lacks the dictionary builder RocksDB uses.
        println!("cargo:rustc-link-lib=dylib:+verbatim=libzstd.so.1");
    }
}
