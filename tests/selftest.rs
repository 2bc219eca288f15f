//! `medfastsam selftest`: the quick checks pass on the test adapter, the JSON report follows
//! docs/selftest.schema.json, an injected fault is named out_of_tolerance with a non-zero exit, and
//! `--compare` prints two reports side by side.

mod common;

use common::cli::{repo, run_split, tmpdir};
use serde_json::Value;

/// Whether `v` is of the JSON Schema type `t` (a name or a list of names).
fn has_type(v: &Value, t: &Value) -> bool {
    match t {
        Value::Array(ts) => ts.iter().any(|t| has_type(v, t)),
        Value::String(t) => match t.as_str() {
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_u64() || v.is_i64(),
            "object" => v.is_object(),
            "array" => v.is_array(),
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            other => panic!("schema type {other} not handled by this test"),
        },
        _ => panic!("schema type {t} is neither a name nor a list"),
    }
}

/// Checks `v` against the subset of JSON Schema the report's schema uses: type, required,
/// properties, items, const, enum.
fn validate(what: &str, v: &Value, schema: &Value) {
    if let Some(t) = schema.get("type") {
        assert!(has_type(v, t), "{what}: {v} is not of type {t}");
    }
    if let Some(c) = schema.get("const") {
        assert_eq!(v, c, "{what}");
    }
    if let Some(Value::Array(e)) = schema.get("enum") {
        assert!(e.contains(v), "{what}: {v} is not one of {e:?}");
    }
    if let Some(Value::Array(req)) = schema.get("required") {
        for k in req {
            let k = k.as_str().unwrap();
            assert!(v.get(k).is_some(), "{what}: required key {k} missing");
        }
    }
    if let Some(Value::Object(props)) = schema.get("properties") {
        for (k, s) in props {
            if let Some(x) = v.get(k) {
                validate(&format!("{what}.{k}"), x, s);
            }
        }
    }
    if let (Some(s), Some(items)) = (schema.get("items"), v.as_array()) {
        for (i, x) in items.iter().enumerate() {
            validate(&format!("{what}[{i}]"), x, s);
        }
    }
}

fn schema() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo("docs/selftest.schema.json")).unwrap())
        .unwrap()
}

fn report(p: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn quick_passes_and_its_report_follows_the_schema() {
    let d = tmpdir("selftest_quick");
    let json = d.join("report.json");
    let r = run_split(&["selftest", "--quick", "--json", json.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("checks pass"), "{}", r.stdout);
    let v = report(&json);
    validate("report", &v, &schema());
    assert_eq!(v["schema"], "medfastsam-selftest/1");
    assert_eq!(v["mode"], "quick");
    let checks = v["checks"].as_array().unwrap();
    assert!(checks.len() >= 10, "{} checks", checks.len());
    for c in checks {
        assert_eq!(c["verdict"], "pass", "{c}");
        assert!(c["max_rel_err"].as_f64().unwrap() <= c["tolerance"].as_f64().unwrap());
    }
    for family in [
        "gemm",
        "attention",
        "norm",
        "elementwise",
        "otsu",
        "conv",
        "depthwise",
        "resize",
        "optim",
        "model",
    ] {
        assert!(
            checks.iter().any(|c| c["family"] == family),
            "no {family} check"
        );
    }
    // ULP statistics where they mean something (elementwise families), not for sums.
    let by = |n: &str| checks.iter().find(|c| c["name"] == n).unwrap();
    assert!(
        by("gelu.wide_range")["ulp_max"].is_u64(),
        "{}",
        by("gelu.wide_range")
    );
    assert!(by("gelu.wide_range")["ulp_median"].is_u64());
    assert!(by("gemm.tiled")["ulp_max"].is_null());
    // Every check lists the pipelines it dispatched, and its entry column names them.
    for c in checks
        .iter()
        .filter(|c| c["verdict"] == "pass" && c["family"] != "f16")
    {
        let p = c["pipelines"].as_array().unwrap();
        assert!(!p.is_empty(), "{c}");
        let entry = c["entry"].as_str().unwrap();
        let first = p[0]["entry"].as_str().unwrap();
        assert!(
            entry.contains(first) || entry.contains("entry points"),
            "{entry} / {first}"
        );
    }
    // Written atomically: no temporary file left beside the report.
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn an_injected_fault_is_named_out_of_tolerance_and_fails_the_command() {
    let d = tmpdir("selftest_fault");
    let json = d.join("report.json");
    let r = run_split(&[
        "selftest",
        "--only",
        "gelu",
        "--inject-fault",
        "gelu.wide_range",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains("gelu.wide_range out_of_tolerance"),
        "{}",
        r.stdout
    );
    let v = report(&json);
    validate("report", &v, &schema());
    let c = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gelu.wide_range")
        .unwrap();
    assert_eq!(c["verdict"], "out_of_tolerance", "{c}");
    assert_eq!(v["failed"], 1);
}

#[test]
fn compare_prints_two_reports_side_by_side() {
    let d = tmpdir("selftest_compare");
    let (a, b) = (d.join("a.json"), d.join("b.json"));
    for (p, fault) in [(&a, "none"), (&b, "layer_norm.odd_c")] {
        let r = run_split(&[
            "selftest",
            "--only",
            "layer_norm",
            "--inject-fault",
            fault,
            "--json",
            p.to_str().unwrap(),
        ]);
        assert!(p.exists(), "{}", r.all());
    }
    let r = run_split(&[
        "selftest",
        "--compare",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("layer_norm.odd_c"))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(
        line.contains("pass") && line.contains("out_of_tolerance"),
        "{line}"
    );
    // A file that is not a report is refused with a message naming it.
    let r = run_split(&["selftest", "--compare", a.to_str().unwrap(), "Cargo.toml"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("Cargo.toml"), "{}", r.stderr);
}

#[test]
fn a_missing_fixture_is_skipped_with_its_path_not_failed() {
    let d = tmpdir("selftest_skip");
    let missing = d.join("no-fixtures");
    let r = run_split(&[
        "selftest",
        "--only",
        "model.tiny_paper",
        "--fixtures",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("model.tiny_paper skipped: fixture not found"))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(line.contains("no-fixtures"), "{line}");
}

/// `--write-fixture` writes the embedded compact fixture (what the page fetches as
/// pkg/selftest-tiny.safetensors): a safetensors file whose tensors include the weights and the
/// authors' logits, equal to what `--fixtures` reads from the source tree; a missing folder is
/// refused naming the file, leaving nothing behind.
#[test]
fn write_fixture_writes_the_embedded_compact_fixture() {
    let d = tmpdir("selftest_write_fixture");
    let f = d.join("selftest-tiny.safetensors");
    let r = run_split(&["selftest", "--write-fixture", f.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let bytes = std::fs::read(&f).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let names = st.names();
    assert!(names.contains(&"fixture.forward.paper.logits"), "{names:?}");
    // The weights are the parity fixture's, byte for byte.
    let w = std::fs::read(repo("tests/data/fixtures/tiny.weights.safetensors")).unwrap();
    let w = safetensors::SafeTensors::deserialize(&w).unwrap();
    for (k, t) in w.tensors() {
        let e = st
            .tensor(&k)
            .unwrap_or_else(|_| panic!("{k} missing from the compact fixture"));
        assert_eq!(e.data(), t.data(), "{k}");
    }
    let bad = d.join("no-such-folder").join("x.safetensors");
    let r = run_split(&["selftest", "--write-fixture", bad.to_str().unwrap()]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("x.safetensors"), "{}", r.all());
    assert!(!d.join("no-such-folder").exists());
}

/// Lines of `selftest --all-adapters`' output that announce an adapter.
fn adapter_headers(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("== adapter "))
        .collect()
}

/// The side-by-side table that `--all-adapters` prints last.
fn side_by_side(stdout: &str) -> &str {
    stdout
        .split("side by side:")
        .nth(1)
        .unwrap_or_else(|| panic!("no side-by-side table in:\n{stdout}"))
}

/// `selftest --all-adapters --only gelu --json D/r.json --html D/r.html` plus `extra`; returns the
/// run and the HTML report's path.
fn all_adapters_gelu(
    d: &std::path::Path,
    extra: &[&str],
) -> (common::cli::Run, std::path::PathBuf) {
    let (json, html) = (d.join("r.json"), d.join("r.html"));
    let mut args = vec![
        "selftest",
        "--all-adapters",
        "--only",
        "gelu",
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    (run_split(&args), html)
}

/// The positional encoding passes on every adapter found (Vulkan/lavapipe and, where Mesa's GL is
/// installed, GL/llvmpipe): its argument reduction once took `%` of a negative i32, which WGSL
/// defines and GLSL does not; on GL/llvmpipe `pe.random` was 1.87 relative off (found by
/// `selftest --all-adapters`).
#[test]
fn the_positional_encoding_passes_on_every_adapter() {
    let r = run_split(&["selftest", "--all-adapters", "--only", "pe."]);
    assert_eq!(r.code, 0, "{}", r.all());
    let adapters = adapter_headers(&r.stdout);
    eprintln!("{adapters:?}");
    assert!(!adapters.is_empty(), "{}", r.stdout);
    let rows: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("pe.random "))
        .collect();
    // One row per adapter as it runs, then one in the side-by-side table.
    assert_eq!(rows.len(), adapters.len() + 1, "{}", r.stdout);
    for row in &rows[..adapters.len()] {
        assert!(row.contains(" pass "), "{row}");
    }
}

/// The text of every `<td>` cell of `html` (a cell holds text only, no markup of ours).
fn cells(html: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find("<td") {
        let open = &rest[i..];
        let start = open.find('>').unwrap() + 1;
        let end = open.find("</td>").unwrap();
        out.push(&open[start..end]);
        rest = &open[end..];
    }
    out
}

#[test]
fn html_report_has_every_check_and_verdict_of_the_json_and_escapes_text() {
    let d = tmpdir("selftest_html");
    let (json, html) = (d.join("r.json"), d.join("r.html"));
    let r = run_split(&[
        "selftest",
        "--only",
        "norm",
        "--inject-fault",
        "layer_norm.odd_c",
        "--json",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1, "{}", r.all());
    let v = report(&json);
    validate("report", &v, &schema());
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    // Self-contained: nothing fetched from elsewhere.
    for external in ["<link", "<script", "src=", "http://", "https://", "@import"] {
        assert!(!page.contains(external), "{external} in the page");
    }
    let cells = cells(&page);
    let checks = v["checks"].as_array().unwrap();
    assert!(checks.len() >= 3, "{} checks", checks.len());
    for c in checks {
        let name = c["name"].as_str().unwrap();
        let at = cells
            .iter()
            .position(|&x| x == name)
            .unwrap_or_else(|| panic!("no cell {name}"));
        // The row's cells: name, family, entry, shape, error, tolerance, verdict, ...
        assert_eq!(cells[at + 6], c["verdict"].as_str().unwrap(), "{name}");
    }
    // The fault's message ("relative error ... > tolerance ...") is escaped; no cell holds markup.
    assert!(page.contains("&gt; tolerance"), "{page}");
    for c in &cells {
        assert!(
            !c.contains('<') && !c.contains('>'),
            "raw markup in cell {c:?}"
        );
    }
    assert!(page.contains("3 of 4 checks pass, 1 fail, 0 skipped") || checks.len() != 4);
    // Written atomically: only the two reports in the folder.
    assert_eq!(common::cli::files_in(&d), ["r.html", "r.json"]);
}

#[test]
fn an_html_report_in_a_missing_folder_is_refused_before_running_naming_the_file() {
    let d = tmpdir("selftest_html_missing");
    let html = d.join("no-such-folder").join("r.html");
    let r = run_split(&[
        "selftest",
        "--only",
        "gelu",
        "--html",
        html.to_str().unwrap(),
    ]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("no-such-folder"), "{}", r.stderr);
    assert!(!r.stdout.contains("checks pass"), "{}", r.stdout);
}

#[test]
fn all_adapters_runs_each_adapter_and_prints_them_side_by_side() {
    let d = tmpdir("selftest_all");
    let (r, html) = all_adapters_gelu(&d, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let n = adapter_headers(&r.stdout).len();
    assert!(n >= 1, "{}", r.stdout);
    let table = side_by_side(&r.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("gelu.wide_range"))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.matches("pass").count(), n, "{row}");
    // One report per adapter, <stem>.<i>-<backend>.json, each following the schema.
    let files = common::cli::files_in(&d);
    let reports: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("r.") && f.ends_with(".json"))
        .collect();
    assert_eq!(reports.len(), n, "{files:?}");
    for (i, f) in reports.iter().enumerate() {
        assert!(f.starts_with(&format!("r.{i}-")), "{f}");
        let v = report(&d.join(f));
        validate(f, &v, &schema());
        let backend = f
            .trim_start_matches(&format!("r.{i}-"))
            .trim_end_matches(".json");
        assert_eq!(
            v["adapter"]["backend"]
                .as_str()
                .unwrap()
                .to_ascii_lowercase(),
            backend,
            "{f}"
        );
    }
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("<section id=\"adapter-").count(), n);
    assert!(page.contains("gelu.wide_range"));
    // Not with --adapter.
    let r = run_split(&[
        "--adapter",
        "0",
        "selftest",
        "--all-adapters",
        "--only",
        "gelu",
    ]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("--all-adapters"), "{}", r.stderr);
}

#[test]
fn all_adapters_reports_a_device_that_does_not_open_as_a_device_error_row() {
    let d = tmpdir("selftest_all_open");
    let (r, html) = all_adapters_gelu(&d, &["--inject-open-failure", "0"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let table = side_by_side(&r.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("(open device)"))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = row.split(" | ").collect();
    assert!(cols[1].contains("device_error"), "{row}");
    assert!(cols[2..].iter().all(|c| c.contains("ok")), "{row}");
    assert!(
        table.lines().any(|l| l.starts_with("gelu.wide_range")),
        "{table}"
    );
    // No report for the adapter that did not open; the others' are written.
    let files = common::cli::files_in(&d);
    assert!(!files.iter().any(|f| f.starts_with("r.0-")), "{files:?}");
    assert_eq!(files.len(), cols.len() - 1, "{files:?}"); // the page + one report per other adapter
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("injected failure &lt;test&gt; &amp; co"),
        "{page}"
    );
    assert!(!page.contains("<test>"));
}
