//! `hb-bench plot`: SVG charts of what hb-bench printed, for docs/benchmarks.md. It reads the
//! markdown tables a run wrote (so a chart is made again from a saved run, never from figures
//! typed by hand) and draws horizontal bars, one group per table.

use hb_core::status::escape;

/// One table: its title and (row label, value) pairs.
pub type Group = (String, Vec<(String, f64)>);

/// The cold-start tables (`| IMAGE: pull start to first output | first output | ...`): per image,
/// each variant's time to first output in seconds.
pub fn coldstart_tables(md: &str) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut open = false;
    for line in md.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if !line.trim_start().starts_with('|') {
            open = false;
            continue;
        }
        if let Some(image) = cells.first().and_then(|c| c.strip_suffix(": pull start to first output")) {
            groups.push((image.to_string(), Vec::new()));
            open = true;
            continue;
        }
        if !open || cells.first().is_some_and(|c| c.starts_with("---")) {
            continue;
        }
        let seconds = cells.get(1).and_then(|c| c.strip_suffix(" s")).and_then(|v| v.parse::<f64>().ok());
        if let (Some(group), Some(s)) = (groups.last_mut(), seconds) {
            // The tool, not the commands after its colon.
            let label = cells[0].replace('`', "");
            let label = label.split_once(": ").map_or(label.as_str(), |(tool, _)| tool).to_string();
            group.1.push((label, s));
        }
    }
    groups.retain(|g| !g.1.is_empty());
    groups
}

const COLOURS: [&str; 8] = ["#8a93a3", "#e0a030", "#c7791a", "#6fa8dc", "#3f7fd9", "#7fbf7f", "#2e8b57", "#b05fc0"];

/// Horizontal bars, one group per table, each row's colour by its place in the group (the same
/// variant keeps its colour across groups); `unit` follows each value.
pub fn bars_svg(title: &str, note: &str, groups: &[Group], unit: &str) -> String {
    const LABEL: f64 = 470.0;
    const BAR: f64 = 360.0;
    const ROW: f64 = 22.0;
    let width = LABEL + BAR + 90.0;
    let max = groups.iter().flat_map(|g| g.1.iter().map(|r| r.1)).fold(0.0_f64, f64::max).max(f64::EPSILON);
    let mut y = 70.0;
    let mut body = String::new();
    for (name, rows) in groups {
        body.push_str(&format!(
            "<text x=\"16\" y=\"{y}\" font-weight=\"600\" font-size=\"14\">{}</text>\n",
            escape(name)
        ));
        y += 10.0;
        for (i, (label, v)) in rows.iter().enumerate() {
            let w = (v / max * BAR).max(1.0);
            let colour = COLOURS[i % COLOURS.len()];
            body.push_str(&format!(
                "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\" font-size=\"12\">{}</text>\
                 <rect x=\"{bx}\" y=\"{y}\" width=\"{w:.1}\" height=\"15\" rx=\"3\" fill=\"{colour}\"/>\
                 <text x=\"{vx:.1}\" y=\"{ty}\" font-size=\"12\">{v:.2} {unit}</text>\n",
                escape(label),
                lx = LABEL - 8.0,
                ty = y + 12.0,
                bx = LABEL,
                vx = LABEL + w + 6.0,
                unit = escape(unit),
            ));
            y += ROW;
        }
        y += 22.0;
    }
    let height = y + 10.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
         font-family=\"system-ui, sans-serif\" fill=\"#1c2330\">\n<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n\
         <text x=\"16\" y=\"24\" font-size=\"16\" font-weight=\"600\">{}</text>\n\
         <text x=\"16\" y=\"42\" font-size=\"12\" fill=\"#5b6577\">{}</text>\n{body}</svg>\n",
        escape(title),
        escape(note)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coldstart_tables_become_bar_groups() {
        let md = "Cold starts...\n\n| r/bench/a:v1: pull start to first output | first output | exit |\n|---|---|---|\n\
                  | containerd + overlayfs: `ctr run` | 4.55 s | 4.92 s |\n| `hb run --rm` | 0.49 s | 0.62 s |\n\ntext\n\
                  | r/bench/b:v1: pull start to first output | first output |\n|---|---|\n| x <y> | 1.00 s |\n";
        let g = coldstart_tables(md);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].0, "r/bench/a:v1");
        assert_eq!(g[0].1, vec![("containerd + overlayfs".to_string(), 4.55), ("hb run --rm".to_string(), 0.49)]);
        let svg = bars_svg("Cold starts", "medians", &g, "s");
        assert!(svg.starts_with("<svg") && svg.contains("4.55 s") && svg.contains("x &lt;y&gt;"));
        // The longest bar is the full width; the others in proportion.
        assert!(svg.contains("width=\"360.0\"") && svg.contains("width=\"38.8\""), "{svg}");
    }
}
