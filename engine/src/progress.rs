//! Progress bars on stderr for the store's long work (pulls, imports, exports, gc, fsck).

use std::io::{self, IsTerminal};

use hb_cli::output::Out;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar on stderr, drawn only on a terminal and when not quiet or JSON.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn hidden() -> Self {
        Bar(ProgressBar::hidden())
    }

    pub fn bytes(out: &Out, msg: &str, total: Option<u64>) -> Self {
        if out.quiet || out.json || !io::stderr().is_terminal() {
            return Self::hidden();
        }
        let pb = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .expect("valid template"),
        );
        pb.set_message(msg.to_string());
        Bar(pb)
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl hb_store::Progress for Bar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}

/// Where image work reports: notes through [`Out`], one bar per layer download.
pub struct Report {
    out: Out,
    multi: indicatif::MultiProgress,
}

impl Report {
    pub fn new(out: &Out) -> Report {
        Report { out: *out, multi: indicatif::MultiProgress::with_draw_target(ProgressDrawTarget::stderr()) }
    }
}

/// A layer's bar; cleared when dropped.
struct LayerBar(ProgressBar);

impl hb_store::Progress for LayerBar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}

impl Drop for LayerBar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

impl hb_images::Reporter for Report {
    fn note(&self, line: &str) {
        self.out.note(line);
    }

    fn transfer(&self, label: &str, size: u64) -> Box<dyn hb_store::Progress + Send + Sync> {
        if self.out.quiet || self.out.json {
            return Box::new(hb_store::NoProgress);
        }
        let pb = self.multi.add(ProgressBar::new(size));
        pb.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec}")
                .expect("template"),
        );
        pb.set_message(label.to_string());
        Box::new(LayerBar(pb))
    }
}
