//! `tapnat bench --svg FILE`: the same-run medians as a chart, one panel
//! per metric, one bar per setup with its min–max range, tapnat's bar
//! marked and its ratio to kernel MASQUERADE in the panel's title.
//!
//! Plain SVG text, written here rather than with a plotting crate: a bar
//! chart is a few rectangles, and the file stays readable and diffable.
use std::fmt::Write as _;

use super::{fmt_num, stats, BenchOptions, Outcome, METRICS};

const COLUMNS: usize = 3;
const PANEL_W: f64 = 440.0;
const LABEL_W: f64 = 130.0;
const VALUE_W: f64 = 70.0;
const BAR_H: f64 = 16.0;
const ROW_H: f64 = 22.0;
const PANEL_HEAD: f64 = 46.0;
const PAGE_HEAD: f64 = 50.0;

/// `&`, `<`, `>` and `"` escaped for SVG text and attributes.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn colour(name: &str) -> &'static str {
    match name {
        "tapnat" => "#d9480f",
        "kernel" => "#1c7ed6",
        n if n.starts_with("tapnat-w") || n == "baseline" => "#f08c00",
        _ => "#868e96",
    }
}

/// The panel title's ratio: tapnat's median over the kernel's.
fn ratio_note(outcomes: &[Outcome], i: usize) -> String {
    let med = |name: &str| outcomes.iter().find(|o| o.name == name)?.median(i);
    match (med("tapnat"), med("kernel")) {
        (Some(a), Some(b)) if b != 0.0 => format!("tapnat = {:.2}× kernel", a / b),
        _ => String::new(),
    }
}

/// The whole chart.
pub fn svg(outcomes: &[Outcome], opts: &BenchOptions, command: &str) -> String {
    let rows = outcomes.len().max(1) as f64;
    let panel_h = PANEL_HEAD + rows * ROW_H + 10.0;
    let panels = METRICS.len();
    let grid_rows = panels.div_ceil(COLUMNS);
    let width = COLUMNS as f64 * PANEL_W;
    let height = PAGE_HEAD + grid_rows as f64 * panel_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">tapnat bench: medians of {} rep(s), {:.1} s each</text>"#,
        opts.reps,
        opts.seconds.as_secs_f64()
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" fill="#555">{}</text>"##,
        esc(command)
    );
    for (i, (_, title, higher)) in METRICS.iter().enumerate() {
        let x0 = (i % COLUMNS) as f64 * PANEL_W;
        let y0 = PAGE_HEAD + (i / COLUMNS) as f64 * panel_h;
        let better = if *higher {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
            x0 + 10.0,
            y0 + 16.0,
            esc(title)
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="#555">{better}{}</text>"##,
            x0 + 10.0,
            y0 + 32.0,
            match ratio_note(outcomes, i) {
                n if n.is_empty() => n,
                n => format!("; {n}"),
            }
        );
        let max = outcomes
            .iter()
            .filter_map(|o| stats(&o.samples[i]).map(|s| s.2))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let bar_w = PANEL_W - LABEL_W - VALUE_W - 20.0;
        let scale = if max > 0.0 { bar_w / max } else { 0.0 };
        for (r, o) in outcomes.iter().enumerate() {
            let y = y0 + PANEL_HEAD + r as f64 * ROW_H;
            let bx = x0 + 10.0 + LABEL_W;
            let weight = if o.name == "tapnat" { "bold" } else { "normal" };
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-weight="{weight}">{}</text>"#,
                x0 + 10.0,
                y + BAR_H - 3.0,
                esc(&o.name)
            );
            let Some((med, lo, hi)) = stats(&o.samples[i]).filter(|s| s.0.is_finite()) else {
                let _ = writeln!(
                    s,
                    r##"<text x="{bx}" y="{}" fill="#999">–</text>"##,
                    y + BAR_H - 3.0
                );
                continue;
            };
            let _ = writeln!(
                s,
                r#"<rect x="{bx}" y="{y}" width="{:.1}" height="{BAR_H}" fill="{}"/>"#,
                (med * scale).max(0.5),
                colour(&o.name)
            );
            let wy = y + BAR_H / 2.0;
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{wy}" x2="{:.1}" y2="{wy}" stroke="#222" stroke-width="1"/>"##,
                bx + lo * scale,
                bx + hi * scale
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" font-weight="{weight}">{}</text>"#,
                bx + bar_w + 6.0,
                y + BAR_H - 3.0,
                fmt_num(med)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_metric_and_marks_tapnat() {
        let outcome = |name: &str, v: f64| Outcome {
            name: name.into(),
            note: String::new(),
            samples: vec![vec![v, v * 1.1, v * 0.9]; METRICS.len()],
            errors: vec![],
        };
        let text = svg(
            &[
                outcome("kernel", 10.0),
                outcome("tapnat", 5.0),
                outcome("a<b", 1.0),
            ],
            &BenchOptions::default(),
            "tapnat bench --only kernel,tapnat",
        );
        assert!(text.starts_with("<svg "));
        assert!(text.ends_with("</svg>\n"));
        for (_, title, _) in METRICS {
            assert!(text.contains(&esc(title)), "{title}");
        }
        assert!(text.contains("tapnat = 0.50× kernel"));
        assert!(text.contains("a&lt;b"));
        assert_eq!(text.matches("<rect ").count(), 1 + 3 * METRICS.len());
    }
}
