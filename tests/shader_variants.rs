//! The WGSL kernel-variant expander of the pipeline cache (`ShaderFamily::expand`) and the
//! uniform-struct layout check against the WGSL source (naga reflection, native builds).

use medfastsam::gpu::ShaderFamily;

fn expand(s: &str) -> Result<String, String> {
    ShaderFamily::expand(s)
}

#[test]
fn plain_text_is_unchanged() {
    let src = "fn f() -> f32 {\n    return 1.0;\n}\n// comment # with { braces }";
    assert_eq!(expand(src).unwrap(), format!("{src}\n"));
}

#[test]
fn for_over_a_range_unrolls() {
    let src = "fn xa(r: u32) {\n    xc(r, 0u);\n    //#for k in 1..4\n    if (${k}u < D4) { xc(r, $ku); }\n    //#end\n}";
    // `$ku` is the variable `ku`, which does not exist.
    assert!(expand(src).unwrap_err().contains("`$ku`"));
    let src = src.replace("$ku", "${k}u");
    let want = "fn xa(r: u32) {\n    xc(r, 0u);\n    if (1u < D4) { xc(r, 1u); }\n    if (2u < D4) { xc(r, 2u); }\n    if (3u < D4) { xc(r, 3u); }\n}\n";
    assert_eq!(expand(&src).unwrap(), want);
    // An empty range emits nothing.
    assert_eq!(
        expand("a\n//#for k in 3..3\nx$k\n//#end\nb").unwrap(),
        "a\nb\n"
    );
}

#[test]
fn for_over_words_nests() {
    let src = "//#for op in f_init dot\nfn xa_$op(r: u32) {\n//#for c in 0..2\n    xc_$op(r, ${c}u);\n//#end\n}\n//#end";
    let want = "fn xa_f_init(r: u32) {\n    xc_f_init(r, 0u);\n    xc_f_init(r, 1u);\n}\n\
                fn xa_dot(r: u32) {\n    xc_dot(r, 0u);\n    xc_dot(r, 1u);\n}\n";
    assert_eq!(expand(src).unwrap(), want);
}

#[test]
fn width_emits_scalar_then_vec4() {
    let src = "//#width\n@group(0) @binding(1) var<storage, read> a$S: array<$T>;\nfn unary$S() { let z = $T(0.0); let w = ${W}u; }\n//#end";
    let want = "@group(0) @binding(1) var<storage, read> a: array<f32>;\nfn unary() { let z = f32(0.0); let w = 1u; }\n\
                @group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;\nfn unary4() { let z = vec4<f32>(0.0); let w = 4u; }\n";
    assert_eq!(expand(src).unwrap(), want);
}

#[test]
fn if_else_selects_by_variable() {
    let src = "//#width\n//#if W == 4\nvec $S\n//#else\nscalar $S\n//#end\n//#if W != 1\nonly4\n//#end\n//#end";
    assert_eq!(expand(src).unwrap(), "scalar \nvec 4\nonly4\n");
}

#[test]
fn malformed_directives_are_errors_naming_the_line() {
    let cases: &[(&str, &str)] = &[
        ("a\n//#for k in\nb\n//#end", "line 2"),
        ("//#for k 0..3\n//#end", "line 1"),
        ("//#for 1k in 0..3\n//#end", "line 1"),
        ("//#for k in 3..1\n//#end", "empty range"),
        ("//#for k in 0..x\n//#end", "line 1"),
        ("a\nb\n//#for k in 0..2\nx", "line 3: block not closed"),
        ("a\n//#end", "line 2: `//#end` without"),
        ("//#else", "without an open `//#if`"),
        ("//#for k in 0..2\n//#else\n//#end", "line 2"),
        (
            "//#width\n//#if W == 4\n//#else\n//#else\n//#end\n//#end",
            "line 4",
        ),
        ("//#width\n//#if W < 4\n//#end\n//#end", "line 2"),
        ("//#if W == 4\n//#end", "not a variable"),
        ("//#unroll k 0..4\n//#end", "unknown directive `//#unroll`"),
        (
            "//#width 4\n//#end",
            "line 1: `//#width` takes no arguments",
        ),
        ("//#end x", "takes no arguments"),
        ("fn f() { let a = $x; }", "`$x` is not a variable"),
        ("let a = $ 1;", "must be followed by a variable name"),
        ("//#for k in 0..2\nlet a = ${k;\n//#end", "line 2"),
    ];
    for (src, want) in cases {
        let e = expand(src).expect_err(src);
        assert!(
            e.contains(want),
            "{src:?}: error {e:?} does not contain {want:?}"
        );
    }
}

#[test]
fn every_family_expands_without_leftover_directives() {
    for f in ShaderFamily::ALL {
        let s = f.wgsl();
        let directive = s.lines().any(|l| l.trim_start().starts_with("//#"));
        assert!(
            !directive && !s.contains('$'),
            "{}: unexpanded directive",
            f.name()
        );
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod uniform_layout {
    use medfastsam::gpu::ShaderFamily;

    medfastsam::uniform! {
        /// elementwise.wgsl `EwParams`, as the elementwise wrappers declare it.
        struct EwParams { n: u32, nb: u32, c2: u32, pad: u32 }
    }
    medfastsam::uniform! {
        /// Two fields swapped.
        struct Swapped { nb: u32, n: u32, c2: u32, pad: u32 }
    }
    medfastsam::uniform! {
        /// A field of the wrong type.
        struct WrongType { n: u32, nb: f32, c2: u32, pad: u32 }
    }
    medfastsam::uniform! {
        /// A field missing.
        struct Short { n: u32, nb: u32, c2: u32 }
    }
    medfastsam::uniform! {
        /// A field too many.
        struct Long { n: u32, nb: u32, c2: u32, pad: u32, extra: u32 }
    }
    medfastsam::uniform! {
        /// norm.wgsl `LnParams`.
        struct LnParams { rows: u32, c: u32, eps: f32, pad: u32 }
    }

    #[test]
    fn matching_struct_passes() {
        ShaderFamily::Elementwise
            .check_uniform::<EwParams>("unary4")
            .unwrap();
        ShaderFamily::Elementwise
            .check_uniform::<EwParams>("binary")
            .unwrap();
        ShaderFamily::Norm
            .check_uniform::<LnParams>("ln_fwd")
            .unwrap();
    }

    #[test]
    fn mismatches_name_the_kernel_and_the_field() {
        let e = ShaderFamily::Elementwise
            .check_uniform::<Swapped>("unary")
            .unwrap_err();
        assert!(
            e.contains("elementwise::unary") && e.contains("field 0") && e.contains("`nb: u32`"),
            "{e}"
        );
        let e = ShaderFamily::Elementwise
            .check_uniform::<WrongType>("binary4")
            .unwrap_err();
        assert!(
            e.contains("elementwise::binary4")
                && e.contains("`nb: f32`")
                && e.contains("`nb: u32`"),
            "{e}"
        );
        let e = ShaderFamily::Elementwise
            .check_uniform::<Short>("concat_last")
            .unwrap_err();
        assert!(
            e.contains("concat_last") && e.contains("`pad: u32` is missing in Rust"),
            "{e}"
        );
        let e = ShaderFamily::Elementwise
            .check_uniform::<Long>("concat_last4")
            .unwrap_err();
        assert!(
            e.contains("concat_last4") && e.contains("`extra: u32` is not in WGSL"),
            "{e}"
        );
        // The struct an entry point uses decides: slice_mid binds SliceParams.
        let e = ShaderFamily::Elementwise
            .check_uniform::<EwParams>("slice_mid")
            .unwrap_err();
        assert!(e.contains("slice_mid") && e.contains("SliceParams"), "{e}");
        let e = ShaderFamily::Norm
            .check_uniform::<EwParams>("ln_fwd")
            .unwrap_err();
        assert!(
            e.contains("norm::ln_fwd") && e.contains("`rows: u32`"),
            "{e}"
        );
        let e = ShaderFamily::Norm
            .check_uniform::<LnParams>("no_such_kernel")
            .unwrap_err();
        assert!(e.contains("no such entry point"), "{e}");
    }

    /// Every family parses and validates with naga after expansion (the same front end wgpu uses
    /// natively), so an expansion mistake fails here without a GPU.
    #[test]
    fn every_family_validates() {
        for f in ShaderFamily::ALL {
            let ok = ShaderFamily::check_uniform::<EwParams>(f, "no_such_kernel").unwrap_err();
            assert!(ok.contains("no such entry point"), "{}: {ok}", f.name());
        }
    }
}
