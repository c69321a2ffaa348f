//! Bar charts drawn on the server as SVG: no script, no chart library, and one mark
//! (`class="mark"`) per point, so a page shows the same series as its table.

use std::fmt::Write;

/// Width and height of the drawing, in SVG user units.
const W: f64 = 640.0;
const H: f64 = 200.0;
const PAD: f64 = 28.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A bar chart of `points` (label, value): one `<rect class="mark">` per point, in order,
/// each with its value in `data-value` and a `<title>`. An empty series draws a note.
pub fn bar_chart(title: &str, points: &[(String, f64)]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" role="img" aria-label="{t}" data-points="{n}" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg"><title>{t}</title>"#,
        t = esc(title),
        n = points.len()
    );
    let _ = write!(
        out,
        r##"<line x1="{PAD}" y1="{y}" x2="{x2}" y2="{y}" stroke="#888" stroke-width="1"/>"##,
        y = H - PAD,
        x2 = W - 4.0
    );
    if points.is_empty() {
        let _ = write!(
            out,
            r##"<text x="{x}" y="{y}" text-anchor="middle" fill="#666" font-size="14">no data yet</text></svg>"##,
            x = W / 2.0,
            y = H / 2.0
        );
        return out;
    }
    let max = points
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let slot = (W - PAD - 4.0) / points.len() as f64;
    let bar = (slot * 0.7).max(1.0);
    for (i, (label, value)) in points.iter().enumerate() {
        let v = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        let h = if max > 0.0 {
            v / max * (H - 2.0 * PAD)
        } else {
            0.0
        };
        let x = PAD + i as f64 * slot + (slot - bar) / 2.0;
        let y = H - PAD - h;
        let _ = write!(
            out,
            r##"<rect class="mark" x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{h:.1}" fill="#3b6ea5" data-value="{v}"><title>{l}: {v}</title></rect>"##,
            l = esc(label),
        );
    }
    let _ = write!(
        out,
        r##"<text x="{PAD}" y="14" fill="#444" font-size="12">max {max}</text></svg>"##
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_mark_per_point_with_its_value_and_escaped_labels() {
        let pts: Vec<(String, f64)> = (0..7).map(|i| (format!("<b>{i}"), f64::from(i))).collect();
        let svg = bar_chart("t & t", &pts);
        assert_eq!(svg.matches(r#"class="mark""#).count(), 7);
        assert!(svg.contains(r#"data-points="7""#));
        assert!(svg.contains(r#"data-value="6""#));
        assert!(!svg.contains("<b>"), "labels are escaped");
        assert!(svg.contains("t &amp; t"));
        // The tallest bar is the largest value.
        assert!(
            svg.contains(r##"height="144.0" fill="#3b6ea5" data-value="6""##),
            "{svg}"
        );
    }

    #[test]
    fn an_empty_series_draws_no_mark_and_says_so() {
        let svg = bar_chart("none", &[]);
        assert_eq!(svg.matches(r#"class="mark""#).count(), 0);
        assert!(svg.contains("no data yet"));
        assert!(svg.contains(r#"data-points="0""#));
    }

    #[test]
    fn all_zero_and_non_finite_values_draw_flat_bars() {
        let svg = bar_chart("z", &[("a".into(), 0.0), ("b".into(), f64::NAN)]);
        assert_eq!(svg.matches(r#"height="0.0""#).count(), 2);
    }
}
