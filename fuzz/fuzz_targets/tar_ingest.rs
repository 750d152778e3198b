//! Layer ingest: a tar, tar+gzip or tar+zstd blob through `Store::import_blob`, the real path
//! of `hb pull` and `hb layer import` (magic detection, decompression with the bomb limits, tar
//! parsing, PAX records, the tree builder, chunking, pack append and the synced commit).
//!
//! One store per process on `$HB_FUZZ_TMP` (else the temp dir; `scripts/fuzz.sh` uses a tmpfs),
//! replaced by a fresh one every 20,000 inputs so it does not grow without bound. Bomb limits
//! are the defaults but for `ratio_grace` (1 MiB instead of 64 MiB), so the ratio check is
//! reached within libFuzzer's input sizes.
#![no_main]

use std::cell::RefCell;
use std::path::PathBuf;

use hb_store::{ImportOptions, Limits, NoProgress, Store, StoreOptions};
use libfuzzer_sys::fuzz_target;

const RENEW_AFTER: u32 = 20_000;

struct Scratch {
    base: PathBuf,
    generation: u32,
    uses: u32,
    store: Option<Store>,
}

impl Scratch {
    fn store(&mut self) -> &Store {
        if self.uses >= RENEW_AFTER {
            self.store = None;
            let _ = std::fs::remove_dir_all(self.dir());
            self.generation += 1;
            self.uses = 0;
        }
        self.uses += 1;
        if self.store.is_none() {
            let opts = StoreOptions {
                limits: Limits { ratio_grace: 1 << 20, ..Limits::default() },
                ..StoreOptions::default()
            };
            self.store = Some(Store::open(&self.dir(), opts).expect("opening the scratch store"));
        }
        self.store.as_ref().expect("opened")
    }

    fn dir(&self) -> PathBuf {
        self.base.join(format!("store-{}", self.generation))
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        base: std::env::var_os("HB_FUZZ_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("hb-fuzz-ingest-{}", std::process::id())),
        generation: 0,
        uses: 0,
        store: None,
    });
}

fuzz_target!(|data: &[u8]| {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let store = s.store();
        let opts = ImportOptions { expect_digest: None, pin: false };
        if let Ok(report) = store.import_blob(data, &opts, &NoProgress) {
            assert_eq!(report.compressed_bytes, data.len() as u64);
            let index = store.layer(&report.diff_id).expect("reading the layer").expect("the imported layer");
            assert_eq!(index.diff_id, report.diff_id);
        }
    });
});
