//! Status pages: one server-rendered HTML page builder for the daemon's and the mirror's
//! `/status` (no script, no external asset; it reloads itself every few seconds). Every text put
//! in is escaped here, so a caller cannot forget to.

use std::fmt::Write;

/// `s` safe inside HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Bytes as people read them: `0 B`, `512 B`, `1.5 KiB`, `12.3 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `part` of `whole` as a percentage with one decimal, `-` when there is no whole.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:24px 32px;color:#1c2330;background:#f7f8fa}\
h1{font-size:22px;margin:0 0 2px}h2{font-size:16px;margin:26px 0 8px;color:#34405a}\
.sub{color:#5b6577;margin:0 0 12px}.cards{display:flex;gap:12px;flex-wrap:wrap}\
.card{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:10px 14px;min-width:150px}\
.card b{display:block;font-size:20px}.card span{color:#5b6577;font-size:13px}\
table{border-collapse:collapse;background:#fff;border:1px solid #dde2ea;min-width:480px}\
th,td{text-align:left;padding:6px 12px;border-bottom:1px solid #eef1f5}th{background:#eef1f5;font-weight:600}\
td.num{text-align:right;font-variant-numeric:tabular-nums}.bar{background:#e6ebf3;border-radius:4px;width:260px;height:12px}\
.bar i{display:block;height:12px;border-radius:4px;background:#3f7fd9}.none{color:#8a93a3}";

/// A status page being written.
pub struct Page {
    html: String,
}

impl Page {
    /// A page titled `title`, with `subtitle` under the heading; it reloads every
    /// `refresh_seconds`.
    pub fn new(title: &str, subtitle: &str, refresh_seconds: u32) -> Page {
        let mut html = String::new();
        let _ = write!(
            html,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"{refresh_seconds}\"><title>{t}</title><style>{STYLE}</style>\
             </head><body><h1>{t}</h1><p class=\"sub\">{s}</p>",
            t = escape(title),
            s = escape(subtitle)
        );
        Page { html }
    }

    pub fn section(&mut self, heading: &str) {
        let _ = write!(self.html, "<h2>{}</h2>", escape(heading));
    }

    /// Figures as cards: (value, what it is).
    pub fn cards(&mut self, items: &[(String, &str)]) {
        self.html.push_str("<div class=\"cards\">");
        for (value, label) in items {
            let _ =
                write!(self.html, "<div class=\"card\"><b>{}</b><span>{}</span></div>", escape(value), escape(label));
        }
        self.html.push_str("</div>");
    }

    /// A table; `numeric` marks right-aligned columns; `bar` (a column index and the values)
    /// adds a bar of each row's share of the largest value. No rows: `empty` in its place.
    pub fn table(&mut self, head: &[&str], numeric: &[usize], rows: &[Vec<String>], bar: Option<&[u64]>, empty: &str) {
        if rows.is_empty() {
            let _ = write!(self.html, "<p class=\"none\">{}</p>", escape(empty));
            return;
        }
        self.html.push_str("<table><tr>");
        for h in head {
            let _ = write!(self.html, "<th>{}</th>", escape(h));
        }
        if bar.is_some() {
            self.html.push_str("<th></th>");
        }
        self.html.push_str("</tr>");
        let max = bar.and_then(|b| b.iter().copied().max()).unwrap_or(0).max(1);
        for (i, row) in rows.iter().enumerate() {
            self.html.push_str("<tr>");
            for (c, cell) in row.iter().enumerate() {
                let class = if numeric.contains(&c) { " class=\"num\"" } else { "" };
                let _ = write!(self.html, "<td{class}>{}</td>", escape(cell));
            }
            if let Some(b) = bar {
                let width = b.get(i).copied().unwrap_or(0) * 100 / max;
                let _ = write!(self.html, "<td><div class=\"bar\"><i style=\"width:{width}%\"></i></div></td>");
            }
            self.html.push_str("</tr>");
        }
        self.html.push_str("</table>");
    }

    pub fn finish(mut self) -> String {
        self.html.push_str("</body></html>\n");
        self.html
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_they_are_given_and_draw_shares() {
        let mut p = Page::new("hb <daemon>", "store \"/x\"", 5);
        p.section("Sources");
        p.cards(&[("97.5 %".into(), "hit ratio")]);
        p.table(
            &["source", "bytes"],
            &[1],
            &[vec!["<script>".into(), "10".into()], vec!["b".into(), "5".into()]],
            Some(&[10, 5]),
            "none",
        );
        p.table(&["x"], &[], &[], None, "no mounts");
        let html = p.finish();
        assert!(html.contains("<title>hb &lt;daemon&gt;</title>") && html.contains("store &quot;/x&quot;"));
        assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"));
        assert!(html.contains("width:100%") && html.contains("width:50%"));
        assert!(html.contains("<p class=\"none\">no mounts</p>"));
        assert_eq!((bytes(0), bytes(1536), bytes(5 << 20)), ("0 B".into(), "1.5 KiB".into(), "5.0 MiB".into()));
        assert_eq!((percent(1, 4), percent(1, 0)), ("25.0 %".into(), "-".into()));
    }
}
