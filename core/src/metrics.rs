//! Prometheus text exposition (format 0.0.4), the one writer for the daemon's and the mirror's
//! `/metrics`: every family with its HELP and TYPE lines, label values escaped, histograms with
//! cumulative buckets, and `hb_build_info`. Label sets are the caller's to keep bounded.

use std::fmt::Write;

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One sample: its labels (name, value) and value.
pub type Sample<'a> = (Vec<(&'a str, String)>, f64);

/// A `/metrics` answer being written.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(l: &[(&str, String)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", parts.join(","))
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// `hb_build_info{program, version} 1`.
    pub fn build_info(&mut self, program: &str, version: &str) {
        self.family(
            "hb_build_info",
            Kind::Gauge,
            "The running hb: program and version (always 1).",
            vec![(vec![("program", program.to_string()), ("version", version.to_string())], 1.0)],
        );
    }

    /// A counter or gauge family and its samples.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str, samples: Vec<Sample<'_>>) {
        self.head(name, if kind == Kind::Counter { "counter" } else { "gauge" }, help);
        for (l, v) in samples {
            let _ = writeln!(self.text, "{name}{} {v}", labels(&l));
        }
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help, vec![(Vec::new(), value)]);
    }

    /// A histogram: `counts` per bucket of upper bounds `bounds` (seconds), then the overflow;
    /// `sum` in seconds. Buckets are written cumulatively, `+Inf` last.
    pub fn histogram(&mut self, name: &str, help: &str, bounds: &[f64], counts: &[u64], sum: f64) {
        self.head(name, "histogram", help);
        let mut cumulative = 0;
        for (i, le) in bounds.iter().enumerate() {
            cumulative += counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(self.text, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += counts.get(bounds.len()).copied().unwrap_or(0);
        let _ = writeln!(self.text, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(self.text, "{name}_sum {sum}\n{name}_count {cumulative}");
    }

    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_and_type_labels_are_escaped_and_histograms_cumulate() {
        let mut e = Exposition::new();
        e.build_info("hb", "0.1.0");
        e.family("x_total", Kind::Counter, "Xs.", vec![(vec![("tier", "mirror \"a\"\\b\nc".into())], 2.0)]);
        e.histogram("lat_seconds", "Latency.", &[0.1, 1.0], &[1, 2, 3], 4.5);
        let t = e.finish();
        assert!(t.contains("# HELP hb_build_info "), "{t}");
        assert!(t.contains("hb_build_info{program=\"hb\",version=\"0.1.0\"} 1\n"), "{t}");
        assert!(t.contains("# HELP x_total Xs.\n# TYPE x_total counter\n"), "{t}");
        assert!(t.contains(r#"x_total{tier="mirror \"a\"\\b\nc"} 2"#), "{t}");
        assert!(t.contains("lat_seconds_bucket{le=\"0.1\"} 1\nlat_seconds_bucket{le=\"1\"} 3\n"), "{t}");
        assert!(t.contains("lat_seconds_bucket{le=\"+Inf\"} 6\nlat_seconds_sum 4.5\nlat_seconds_count 6\n"), "{t}");
        // Every sample line belongs to a family announced before it.
        let mut declared = std::collections::HashSet::new();
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
                assert!(declared.contains(family) || declared.contains(name), "{l}");
            }
        }
    }
}
