//! What people see: notes and logs on stderr, JSON or tables on stdout (progress bars: the
//! engine's `progress.rs`).

use std::io;

/// Output settings shared by every command.
#[derive(Clone, Copy)]
pub struct Out {
    pub json: bool,
    pub quiet: bool,
}

impl Out {
    pub fn new(json: bool, quiet: bool) -> Self {
        Out { json, quiet }
    }

    /// A message for people (stderr), unless quiet or printing JSON. A stderr that takes no more
    /// (a log file on a full disk, a closed pipe) loses the message, never the process.
    pub fn note(&self, msg: impl AsRef<str>) {
        if !self.quiet && !self.json {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "{}", msg.as_ref());
        }
    }

    /// Prints `v` as JSON on stdout when `--json` is set.
    pub fn json_value<T: serde::Serialize>(&self, v: &T) -> anyhow::Result<()> {
        if self.json {
            serde_json::to_writer_pretty(io::stdout().lock(), v)?;
            println!();
        }
        Ok(())
    }
}

/// Logs go to stderr: warnings by default, `-v` info, `-vv` debug, or `HB_LOG` as a filter;
/// `HB_LOG_FORMAT=json` writes them as JSON lines.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = std::env::var(crate::config::env::LOG).unwrap_or_else(|_| default.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| default.into()))
        .with_writer(io::stderr)
        // A stderr that takes no more (a mount server's log on a full disk) loses the event;
        // reporting that on the same stderr would panic and end the process.
        .log_internal_errors(false)
        .with_target(false);
    // One JSON object per event (time, level, message, fields): for the journal and log shippers.
    if std::env::var(crate::config::env::LOG_FORMAT).is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
