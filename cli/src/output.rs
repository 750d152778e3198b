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
}
