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

/// Asks before a prune removes `what`, as docker does (the question on stderr, the answer on
/// stdin); anything but y/yes (an empty line, end of input) declines and says so.
pub fn confirm(what: &[&str], out: &Out) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    match what {
        [one] => writeln!(err, "WARNING! This will remove {one}.")?,
        many => {
            writeln!(err, "WARNING! This will remove:")?;
            for w in many {
                writeln!(err, "  - {w}")?;
            }
        }
    }
    write!(err, "Are you sure you want to continue? [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    let yes = matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes");
    if !yes {
        out.note("nothing removed");
    }
    Ok(yes)
}

/// A size as docker prints one: decimal units, four significant digits ("0B", "1.5kB", "12.35MB").
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    let digits = match v {
        _ if unit == 0 => 0,
        v if v >= 100.0 => 1,
        v if v >= 10.0 => 2,
        _ => 3,
    };
    let text = format!("{v:.digits$}");
    let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
    format!("{text}{}", UNITS[unit])
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
        // Colours only for a terminal: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
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

/// `--format` of listing commands, as docker takes it: `json` (one object per line, the fields
/// of `--json`), or a template line with `{{.Field}}` placeholders (`\t` is a tab).
pub enum Format {
    Json,
    Template(String),
}

impl Format {
    pub fn parse(s: &str) -> Format {
        match s.trim() {
            "json" | "{{json .}}" => Format::Json,
            t => Format::Template(t.replace("\\t", "\t").replace("\\n", "\n")),
        }
    }

    /// One row as a line (no newline).
    pub fn line(&self, row: &serde_json::Value) -> anyhow::Result<String> {
        match self {
            Format::Json => Ok(row.to_string()),
            Format::Template(t) => render_template(t, row),
        }
    }
}

/// `{{.Name}}`: the field `name` (docker's `.ID` finds `id`, `.BlobBytes` finds `blob_bytes`);
/// `{{json .Field}}` its JSON; `{{.}}` or `{{json .}}` the whole row.
fn render_template(t: &str, row: &serde_json::Value) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find("}}") else {
            anyhow::bail!("--format {t:?}: a `{{{{` without its `}}}}`");
        };
        let inner = rest[start + 2..start + len].trim();
        let (json, path) = match inner.strip_prefix("json ") {
            Some(p) => (true, p.trim()),
            None => (false, inner),
        };
        let Some(field) = path.strip_prefix('.') else {
            anyhow::bail!("--format {t:?}: {{{{{inner}}}}} is not a field (write {{{{.Name}}}})");
        };
        let value = if field.is_empty() { Some(row) } else { lookup(row, field) };
        let Some(value) = value else {
            let fields: Vec<&str> = row.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
            anyhow::bail!("--format: no field {field:?} (fields: {})", fields.join(", "));
        };
        match value {
            serde_json::Value::String(s) if !json => out.push_str(s),
            v => out.push_str(&v.to_string()),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup<'a>(row: &'a serde_json::Value, field: &str) -> Option<&'a serde_json::Value> {
    let o = row.as_object()?;
    let snake: String = field
        .char_indices()
        .flat_map(|(i, c)| {
            let sep = (i > 0 && c.is_ascii_uppercase() && !field[..i].ends_with(|p: char| p.is_ascii_uppercase()))
                .then_some('_');
            sep.into_iter().chain(std::iter::once(c.to_ascii_lowercase()))
        })
        .collect();
    o.get(field)
        .or_else(|| o.get(&snake))
        .or_else(|| o.iter().find(|(k, _)| k.eq_ignore_ascii_case(field)).map(|(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_print_rows_as_docker_users_write_them() {
        let row = serde_json::json!({"id": "abc", "name": "web", "blob_bytes": 12, "labels": {"a": "b"}});
        let f = Format::parse("{{.ID}}\\t{{ .Name }} {{.BlobBytes}} {{json .Labels}}");
        assert_eq!(f.line(&row).unwrap(), "abc\tweb 12 {\"a\":\"b\"}");
        assert_eq!(Format::parse("json").line(&row).unwrap(), row.to_string());
        assert_eq!(Format::parse("{{json .}}").line(&row).unwrap(), row.to_string());
        let err = Format::parse("{{.Nope}}").line(&row).unwrap_err().to_string();
        assert!(err.contains("no field \"Nope\"") && err.contains("blob_bytes"), "{err}");
        assert!(Format::parse("{{.ID").line(&row).is_err());
        assert!(Format::parse("{{ID}}").line(&row).is_err());
    }

    #[test]
    fn sizes_print_as_docker_prints_them() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1500), "1.5kB");
        assert_eq!(human_size(12_345_678), "12.35MB");
        assert_eq!(human_size(123_456_789), "123.5MB");
        assert_eq!(human_size(2_000_000_000), "2GB");
    }
}
