//! `medfastsam selftest --html FILE`: the report as one self-contained HTML page (inline CSS, no
//! script, no external resource; light and dark colour schemes). Every string from the report is
//! escaped.

use medfastsam::selftest::{CheckRecord, Report, Verdict};
use std::fmt::Write;

/// One adapter's part of the page: its label and its report, or why its device did not open.
pub struct Section<'a> {
    pub label: String,
    pub result: Result<&'a Report, String>,
}

/// `s` with the characters that are markup in HTML text and attribute values replaced.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
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

const STYLE: &str = "
:root { color-scheme: light dark; --fg: #1b1b1b; --bg: #ffffff; --muted: #5c5c5c;
  --line: #d0d0d0; --head: #f0f0f0; --pass: #0a6b2c; --fail: #b00020; --skip: #6b6b6b; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e6e6; --bg: #161616; --muted: #a8a8a8; --line: #3c3c3c; --head: #242424;
    --pass: #5fd38a; --fail: #ff7b8a; --skip: #a8a8a8; }
}
body { font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg);
  margin: 1.5rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid var(--line); padding: 0.2rem 0.5rem; text-align: left;
  vertical-align: top; }
th { background: var(--head); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.pass, p.pass { color: var(--pass); font-weight: 600; }
td.fail, p.fail { color: var(--fail); font-weight: 600; }
td.skipped, p.skipped { color: var(--skip); font-weight: 600; }
.muted { color: var(--muted); }
.scroll { overflow-x: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.1rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; }
";

/// The CSS class of a verdict's cell (colour is not the only cue: the verdict is written out).
fn class(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Skipped => "skipped",
        _ => "fail",
    }
}

fn num(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

fn rate(c: &CheckRecord) -> String {
    match (c.gflops, c.gbps) {
        (Some(g), _) => format!("{g:.2} GFLOP/s"),
        (None, Some(b)) => format!("{b:.2} GB/s"),
        _ => "-".into(),
    }
}

fn summary(r: &Report) -> String {
    let skipped = r.checks.len() - r.passed - r.failed;
    format!(
        "{} of {} checks pass, {} fail, {skipped} skipped",
        r.passed,
        r.checks.len(),
        r.failed
    )
}

fn head(out: &mut String, title: &str) {
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
}

/// One report: adapter, limits, features, mode, the checks and the summary.
fn report_body(out: &mut String, r: &Report, level: &str) {
    let a = &r.adapter;
    let _ = writeln!(out, "<dl>");
    for (k, v) in [
        ("adapter", a.name.as_str()),
        ("backend", a.backend.as_str()),
        ("device type", a.device_type.as_str()),
        ("driver", &format!("{} {}", a.driver, a.driver_info)),
        ("mode", r.mode.as_str()),
        ("medfastsam", r.version.as_str()),
        ("schema", r.schema.as_str()),
        (
            "features",
            &if r.features.is_empty() {
                "none".to_string()
            } else {
                r.features.join(", ")
            },
        ),
    ] {
        let _ = writeln!(out, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(v.trim()));
    }
    let _ = writeln!(out, "</dl>");
    let _ = writeln!(out, "<{level}>Limits</{level}>");
    let _ = writeln!(
        out,
        "<table>\n<thead><tr><th scope=\"col\">limit</th><th scope=\"col\">value</th></tr></thead>\n<tbody>"
    );
    if let Some(m) = r.limits.as_object() {
        for (k, v) in m {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"num\">{}</td></tr>",
                escape(k),
                escape(&v.to_string())
            );
        }
    }
    let _ = writeln!(out, "</tbody>\n</table>");
    let _ = writeln!(out, "<{level}>Checks</{level}>");
    let _ = writeln!(
        out,
        "<p class=\"summary\"><strong>{}</strong></p>",
        escape(&summary(r))
    );
    let _ = writeln!(out, "<div class=\"scroll\"><table>\n<thead><tr>");
    for h in [
        "check",
        "family",
        "entry point",
        "shape",
        "max rel err",
        "tolerance",
        "verdict",
        "ms",
        "GFLOP/s or GB/s",
        "ULP max / median",
        "compile ms",
        "message",
    ] {
        let _ = write!(out, "<th scope=\"col\">{h}</th>");
    }
    let _ = writeln!(out, "</tr></thead>\n<tbody>");
    for c in &r.checks {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"{}\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td>{}</td></tr>",
            escape(&c.name),
            escape(&c.family),
            escape(&c.entry),
            escape(&c.shape),
            escape(&num(c.max_rel_err, |e| format!("{e:.2e}"))),
            escape(&format!("{:.0e}", c.tolerance)),
            class(c.verdict),
            escape(c.verdict.name()),
            escape(&num(c.ms, |m| format!("{m:.3}"))),
            escape(&rate(c)),
            escape(&match (c.ulp_max, c.ulp_median) {
                (Some(m), Some(d)) => format!("{m} / {d}"),
                _ => "-".into(),
            }),
            escape(&num(c.compile_ms, |m| format!("{m:.1}"))),
            escape(c.message.as_deref().unwrap_or("")),
        );
    }
    let _ = writeln!(out, "</tbody>\n</table></div>");
}

/// The page of one report.
pub fn single(r: &Report) -> String {
    let mut out = String::new();
    head(
        &mut out,
        &format!(
            "medfastsam selftest: {} ({})",
            r.adapter.name, r.adapter.backend
        ),
    );
    report_body(&mut out, r, "h2");
    out.push_str("</body>\n</html>\n");
    out
}

/// The page of `--all-adapters`: the side-by-side table (one row per check; per adapter its
/// error, verdict and ms), then a section per adapter.
pub fn multi(sections: &[Section]) -> String {
    let mut out = String::new();
    head(&mut out, "medfastsam selftest: every adapter");
    let _ = writeln!(out, "<h2>Side by side</h2>\n<ol start=\"0\">");
    for (i, s) in sections.iter().enumerate() {
        let state = match &s.result {
            Ok(r) => summary(r),
            Err(_) => "device_error: the device did not open".to_string(),
        };
        let _ = writeln!(
            out,
            "<li><a href=\"#adapter-{i}\">{}</a>: {}</li>",
            escape(&s.label),
            escape(&state)
        );
    }
    let _ = writeln!(out, "</ol>");
    let _ = writeln!(
        out,
        "<div class=\"scroll\"><table>\n<thead><tr><th scope=\"col\" rowspan=\"2\">check</th>"
    );
    for (i, s) in sections.iter().enumerate() {
        let _ = write!(
            out,
            "<th scope=\"colgroup\" colspan=\"3\">[{i}] {}</th>",
            escape(&s.label)
        );
    }
    let _ = writeln!(out, "</tr>\n<tr>");
    for _ in sections {
        out.push_str("<th scope=\"col\">max rel err</th><th scope=\"col\">verdict</th><th scope=\"col\">ms</th>");
    }
    let _ = writeln!(out, "</tr></thead>\n<tbody>");
    if sections.iter().any(|s| s.result.is_err()) {
        out.push_str("<tr><td>(open device)</td>");
        for s in sections {
            match &s.result {
                Ok(_) => out.push_str(
                    "<td class=\"num\">-</td><td class=\"pass\">ok</td><td class=\"num\">-</td>",
                ),
                Err(e) => {
                    let _ = write!(
                        out,
                        "<td class=\"num\">-</td><td class=\"fail\" title=\"{}\">device_error</td><td class=\"num\">-</td>",
                        escape(e)
                    );
                }
            }
        }
        out.push_str("</tr>\n");
    }
    let reports: Vec<Option<&Report>> = sections.iter().map(|s| s.result.clone().ok()).collect();
    for name in check_names(&reports) {
        let _ = write!(out, "<tr><td>{}</td>", escape(&name));
        for r in &reports {
            match r.and_then(|r| r.checks.iter().find(|c| c.name == name)) {
                Some(c) => {
                    let _ = write!(
                        out,
                        "<td class=\"num\">{}</td><td class=\"{}\">{}</td><td class=\"num\">{}</td>",
                        escape(&num(c.max_rel_err, |e| format!("{e:.2e}"))),
                        class(c.verdict),
                        escape(c.verdict.name()),
                        escape(&num(c.ms, |m| format!("{m:.3}")))
                    );
                }
                None => out.push_str("<td class=\"num\">-</td><td>-</td><td class=\"num\">-</td>"),
            }
        }
        out.push_str("</tr>\n");
    }
    let _ = writeln!(out, "</tbody>\n</table></div>");
    for (i, s) in sections.iter().enumerate() {
        let _ = writeln!(
            out,
            "<section id=\"adapter-{i}\">\n<h2>[{i}] {}</h2>",
            escape(&s.label)
        );
        match &s.result {
            Ok(r) => report_body(&mut out, r, "h3"),
            Err(e) => {
                let _ = writeln!(
                    out,
                    "<p class=\"fail\"><strong>device_error</strong>: {}</p>",
                    escape(e)
                );
            }
        }
        let _ = writeln!(out, "</section>");
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// The names of the checks of all reports, in the order they first appear.
pub fn check_names(reports: &[Option<&Report>]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in reports.iter().flatten() {
        for c in &r.checks {
            if !names.contains(&c.name) {
                names.push(c.name.clone());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
