//! The PyTorch checkpoint reader (src/import/pth.rs): the zip and legacy formats, f16/bf16 storages,
//! non-contiguous and shared views, nested checkpoints, the tiny parity weights saved with
//! `torch.save` (bit-identical; needs MEDFASTSAM_FIXTURES, listed as ignored without it), and
//! hostile inputs (refused globals, lying sizes, short storages, overflowing shapes, truncation,
//! random bytes), each a one-line error naming the file.

use medfastsam::import::pth::{PthCheckpoint, PthDtype, read_pth};
use safetensors::SafeTensors;
use std::io::Write;
use std::path::PathBuf;

fn data(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/pth")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const NBT: &str = "image_encoder.patch_embed.seq.0.bn.num_batches_tracked";

/// (name, shape, f32 values) of formats.expected.safetensors.
fn expected() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let b = data("formats.expected.safetensors");
    let st = SafeTensors::deserialize(&b).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            let vals = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, t.shape().to_vec(), vals)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn check_formats(file: &str, dtype: PthDtype, round: fn(f32) -> f32) -> PthCheckpoint {
    let ck = read_pth(&data(file), file).unwrap_or_else(|e| panic!("{e}"));
    for (k, shape, vals) in expected() {
        let t = ck
            .get(&k)
            .unwrap_or_else(|| panic!("{file}: no tensor {k}"));
        assert_eq!(t.shape, shape, "{file}: {k}");
        assert_eq!(t.dtype, dtype, "{file}: {k}");
        assert!(t.raw_i64.is_none(), "{file}: {k}");
        assert_eq!(t.data.len(), vals.len(), "{file}: {k}");
        for (i, (&got, &want)) in t.data.iter().zip(&vals).enumerate() {
            assert_eq!(
                got.to_bits(),
                round(want).to_bits(),
                "{file}: {k}[{i}] = {got}, want {} ({want} rounded)",
                round(want)
            );
        }
    }
    let n = ck.get(NBT).unwrap_or_else(|| panic!("{file}: no {NBT}"));
    assert_eq!(n.dtype, PthDtype::I64);
    assert!(n.shape.is_empty());
    assert_eq!(n.raw_i64.as_deref(), Some(&[12345i64][..]));
    assert_eq!(n.data, vec![12345.0]);
    assert_eq!(ck.prefix_stripped, None);
    ck
}

#[test]
fn legacy_format_f32() {
    let ck = check_formats("formats.legacy.pth", PthDtype::F32, |x| x);
    assert_eq!(ck.format, "legacy");
    assert_eq!(ck.tensors.len(), 7);
    assert_eq!(ck.nested_under, None);
    assert!(ck.skipped.is_empty(), "{:?}", ck.skipped);
}

#[test]
fn nested_f16_reports_skipped_entries() {
    let ck = check_formats("formats.nested-f16.pth", PthDtype::F16, |x| {
        half::f16::from_f32(x).to_f32()
    });
    assert_eq!(ck.format, "zip");
    assert_eq!(ck.tensors.len(), 7);
    assert_eq!(ck.nested_under.as_deref(), Some("model"));
    assert_eq!(ck.skipped, vec!["epoch", "optimizer"]);
}

#[test]
fn bf16_transposed_and_shared_views() {
    let ck = check_formats("formats.bf16-views.pth", PthDtype::BF16, |x| {
        half::bf16::from_f32(x).to_f32()
    });
    assert_eq!(ck.format, "zip");
    assert_eq!(ck.tensors.len(), 9);
    let a = ck.get("shared_a").unwrap();
    let b = ck.get("shared_b").unwrap();
    assert_eq!(
        (a.shape.as_slice(), b.shape.as_slice()),
        (&[10][..], &[2, 3][..])
    );
    assert!(a.data.iter().chain(&b.data).all(|&v| v == 0.0));
    // File order.
    let names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names[0], "image_encoder.patch_embed.seq.0.c.weight");
    assert_eq!(names[1], NBT);
    assert_eq!(&names[7..], ["shared_a", "shared_b"]);
}

#[test]
#[cfg_attr(
    not(full_fixtures),
    ignore = "needs MEDFASTSAM_FIXTURES (folder with pretrained/pth/tiny.zip.pth)"
)]
fn tiny_zip_bit_identical_to_safetensors() {
    let dir = std::env::var_os("MEDFASTSAM_FIXTURES")
        .expect("MEDFASTSAM_FIXTURES must name the fixtures folder");
    let p = PathBuf::from(dir).join("pretrained/pth/tiny.zip.pth");
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let ck = read_pth(&bytes, "tiny.zip.pth").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.format, "zip");
    let sb = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fixtures/tiny.weights.safetensors"),
    )
    .unwrap();
    let st = SafeTensors::deserialize(&sb).unwrap();
    let want = st.tensors();
    assert_eq!(ck.tensors.len(), want.len());
    assert!(ck.skipped.is_empty(), "{:?}", ck.skipped);
    for (k, w) in want {
        let t = ck.get(&k).unwrap_or_else(|| panic!("no tensor {k}"));
        assert_eq!(t.shape, w.shape(), "{k}");
        match w.dtype() {
            safetensors::Dtype::F32 => {
                assert_eq!(t.dtype, PthDtype::F32, "{k}");
                let bits: Vec<u32> = w
                    .data()
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let got: Vec<u32> = t.data.iter().map(|v| v.to_bits()).collect();
                assert!(got == bits, "{k}: values differ");
            }
            safetensors::Dtype::I64 => {
                assert_eq!(t.dtype, PthDtype::I64, "{k}");
                let v: Vec<i64> = w
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(t.raw_i64.as_ref(), Some(&v), "{k}");
            }
            d => panic!("{k}: unexpected dtype {d:?} in the reference"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-made checkpoints

/// Pickle bytes, written opcode by opcode (protocol 2, as torch.save writes).
struct P(Vec<u8>);

impl P {
    fn new() -> P {
        P(vec![0x80, 2])
    }
    fn op(&mut self, b: &[u8]) -> &mut P {
        self.0.extend_from_slice(b);
        self
    }
    fn s(&mut self, x: &str) -> &mut P {
        self.0.push(b'X');
        self.0.extend_from_slice(&(x.len() as u32).to_le_bytes());
        self.0.extend_from_slice(x.as_bytes());
        self
    }
    fn int(&mut self, v: i64) -> &mut P {
        if let Ok(v) = i32::try_from(v) {
            self.0.push(b'J');
            self.0.extend_from_slice(&v.to_le_bytes());
        } else {
            self.0.extend_from_slice(&[0x8a, 8]);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        self
    }
    fn global(&mut self, m: &str, n: &str) -> &mut P {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
        self
    }
    fn ints(&mut self, v: &[i64]) -> &mut P {
        self.op(b"(");
        for &x in v {
            self.int(x);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2(storage(key), offset, shape, stride, False, OrderedDict())`.
    fn tensor(
        &mut self,
        ty: &str,
        key: &str,
        numel: i64,
        offset: i64,
        shape: &[i64],
        stride: &[i64],
    ) -> &mut P {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(")
            .s("storage")
            .global("torch", ty)
            .s(key)
            .s("cpu");
        self.int(numel)
            .op(b"tQ")
            .int(offset)
            .ints(shape)
            .ints(stride);
        self.op(b"\x89")
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }
}

fn zip_of(entries: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let opt = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, b) in entries {
        w.start_file(*name, opt).unwrap();
        w.write_all(b).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A checkpoint with one f32 storage of 0..24 and views into it, OrderedDict state and
/// DataParallel names; protocol-4 opcodes in the tensors' dict.
fn views_pickle() -> Vec<u8> {
    let mut p = P::new();
    p.global("collections", "OrderedDict")
        .op(b")R")
        .op(b"q\x00(");
    p.s("module.t")
        .tensor("FloatStorage", "0", 24, 2, &[2, 3], &[1, 2]);
    p.s("module.row")
        .tensor("FloatStorage", "0", 24, 5, &[4], &[3]);
    p.s("module.bcast")
        .tensor("FloatStorage", "0", 24, 7, &[3, 2], &[0, 1]);
    // A Parameter around a 0-d tensor.
    p.s("module.p")
        .global("torch._utils", "_rebuild_parameter")
        .op(b"(")
        .tensor("FloatStorage", "0", 24, 23, &[], &[])
        .op(b"\x88")
        .global("collections", "OrderedDict")
        .op(b")RtR");
    p.s("module.size1")
        .tensor("FloatStorage", "0", 24, 1, &[1, 2], &[1_000_000_000_000, 4]);
    p.s("module.empty")
        .tensor("FloatStorage", "0", 24, 999, &[0, 5], &[5, 1]);
    p.s("module.count")
        .tensor("IntStorage", "1", 2, 1, &[1], &[1]);
    p.s("module.note").s("hello");
    // Protocol-4 style: SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL.
    p.op(b"\x8c\x0amodule.u8s\x94");
    p.op(b"\x8c\x0ctorch._utils\x8c\x12_rebuild_tensor_v2\x93(");
    p.op(b"(")
        .s("storage")
        .global("torch", "ByteStorage")
        .s("2")
        .s("cpu")
        .int(3);
    p.op(b"tQ").int(0).ints(&[3]).ints(&[1]).op(b"\x89}tR");
    p.op(b"u");
    // BUILD with the state_dict's _metadata.
    p.op(b"}").s("_metadata").op(b"}sb.");
    p.0
}

#[test]
fn views_parameters_prefix_and_opcodes() {
    let pkl = views_pickle();
    let st0 = f32_bytes((0..24).map(|i| i as f32));
    let st1: Vec<u8> = [-7i32, 42].iter().flat_map(|x| x.to_le_bytes()).collect();
    let st2 = [0u8, 200, 255];
    for deflate in [false, true] {
        let z = zip_of(
            &[
                ("arc/data.pkl", &pkl),
                ("arc/byteorder", b"little"),
                ("arc/data/0", &st0),
                ("arc/data/1", &st1),
                ("arc/data/2", &st2),
            ],
            deflate,
        );
        let ck = read_pth(&z, "views.pth").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ck.prefix_stripped.as_deref(), Some("module."));
        assert_eq!(ck.skipped, vec!["module.note"]);
        let names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["t", "row", "bcast", "p", "size1", "empty", "count", "u8s"]
        );
        let g = |n: &str| ck.get(n).unwrap();
        assert_eq!(g("t").data, [2., 4., 6., 3., 5., 7.]);
        assert_eq!(g("t").shape, [2, 3]);
        assert_eq!(g("row").data, [5., 8., 11., 14.]);
        assert_eq!(g("bcast").data, [7., 8., 7., 8., 7., 8.]);
        assert_eq!(g("p").data, [23.]);
        assert!(g("p").shape.is_empty());
        assert_eq!(g("size1").data, [1., 5.]);
        assert_eq!(g("empty").shape, [0, 5]);
        assert!(g("empty").data.is_empty());
        assert_eq!(g("count").dtype, PthDtype::I32);
        assert_eq!(g("count").raw_i64.as_deref(), Some(&[42i64][..]));
        assert_eq!(g("u8s").dtype, PthDtype::U8);
        assert_eq!(g("u8s").raw_i64.as_deref(), Some(&[0i64, 200, 255][..]));
        assert_eq!(g("u8s").data, [0., 200., 255.]);
    }
}

/// Legacy stream: magic, protocol, sys info, `main`, key list, storages (count + raw bytes).
fn legacy_of(main: &[u8], storages: &[(&str, u64, &[u8])]) -> Vec<u8> {
    let mut b = vec![0x80, 2, 0x8a, 10];
    b.extend_from_slice(&0x1950a86a20f9469cfc6cu128.to_le_bytes()[..10]);
    b.push(b'.');
    b.extend_from_slice(b"\x80\x02M\xe9\x03.");
    let mut info = P::new();
    info.op(b"}(")
        .s("protocol_version")
        .int(1001)
        .s("little_endian");
    info.op(b"\x88u.");
    b.extend_from_slice(&info.0);
    b.extend_from_slice(main);
    let mut keys = P::new();
    keys.op(b"](");
    for (k, _, _) in storages {
        keys.s(k);
    }
    keys.op(b"e.");
    b.extend_from_slice(&keys.0);
    for (_, n, d) in storages {
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(d);
    }
    b
}

#[test]
fn legacy_storage_views() {
    // Legacy persistent ids carry an optional view: (view key, offset, size) into the root.
    let mut p = P::new();
    p.op(b"}(")
        .s("v")
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(b"((");
    p.s("storage")
        .global("torch", "DoubleStorage")
        .s("root")
        .s("cpu")
        .int(6);
    p.op(b"(").s("view").int(2).int(3).op(b"ttQ");
    p.int(1).ints(&[2]).ints(&[1]).op(b"\x89}tR");
    p.s("w")
        .tensor("DoubleStorage", "root", 6, 0, &[3, 2], &[1, 3]);
    p.op(b"u.");
    let root: Vec<u8> = (0..6)
        .flat_map(|i| (i as f64 * 1.5).to_le_bytes())
        .collect();
    let b = legacy_of(&p.0, &[("root", 6, &root)]);
    let ck = read_pth(&b, "old.pt").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.format, "legacy");
    assert_eq!(ck.get("v").unwrap().data, [4.5, 6.0]);
    assert_eq!(ck.get("w").unwrap().data, [0.0, 4.5, 1.5, 6.0, 3.0, 7.5]);
    assert_eq!(ck.get("w").unwrap().dtype, PthDtype::F64);
}

// ---------------------------------------------------------------------------------------------
// Hostile inputs

/// Runs the reader on `b` named `file`: it must fail with one line starting with `file: `.
fn refused(b: &[u8], file: &str) -> String {
    let r = std::panic::catch_unwind(|| read_pth(b, file));
    let e = match r {
        Err(_) => panic!("{file}: panicked"),
        Ok(Ok(_)) => panic!("{file}: accepted"),
        Ok(Err(e)) => e.to_string(),
    };
    assert!(e.starts_with(&format!("{file}: ")), "{e}");
    assert!(!e.contains('\n'), "{e:?}");
    e
}

fn sd_zip(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let names: Vec<String> = storages
        .iter()
        .map(|(k, _)| format!("m/data/{k}"))
        .collect();
    let mut e: Vec<(&str, &[u8])> = vec![("m/data.pkl", pkl)];
    for (n, (_, d)) in names.iter().zip(storages) {
        e.push((n, d));
    }
    zip_of(&e, false)
}

#[test]
fn refuses_code_execution_globals() {
    // os.system('ls') with GLOBAL + REDUCE.
    let mut p = P::new();
    p.global("os", "system").s("ls").op(b"\x85R.");
    let e = refused(&sd_zip(&p.0, &[]), "model.pth");
    assert!(
        e.contains("refuses pickle global 'os.system' (a checkpoint needs only tensors)"),
        "{e}"
    );
    // builtins.eval with STACK_GLOBAL, inside a state_dict value.
    let mut p = P::new();
    p.op(b"}(")
        .s("x")
        .s("builtins")
        .s("eval")
        .op(b"\x93")
        .s("1")
        .op(b"\x85Ru.");
    let e = refused(&sd_zip(&p.0, &[]), "evil.pt");
    assert!(e.contains("'builtins.eval'"), "{e}");
    // The same in a legacy stream.
    let mut p = P::new();
    p.global("subprocess", "Popen").op(b"(").s("sh").op(b"tR.");
    let e = refused(&legacy_of(&p.0, &[]), "old.pth");
    assert!(e.contains("'subprocess.Popen'"), "{e}");
    // Object construction opcodes are refused even with an allowed class.
    let mut p = P::new();
    p.global("collections", "OrderedDict").op(b")\x81.");
    let e = refused(&sd_zip(&p.0, &[]), "newobj.pth");
    assert!(e.contains("NEWOBJ"), "{e}");
    // A control character in a global name is escaped, keeping one line.
    let mut p = P::new();
    p.s("os\nx").s("system").op(b"\x93.");
    let e = refused(&sd_zip(&p.0, &[]), "nl.pth");
    assert!(e.contains("'os\\nx.system'"), "{e}");
}

fn one_tensor(numel: i64, shape: &[i64], stride: &[i64]) -> Vec<u8> {
    let mut p = P::new();
    p.op(b"}(")
        .s("w")
        .tensor("FloatStorage", "0", numel, 0, shape, stride);
    p.op(b"u.");
    p.0
}

#[test]
fn refuses_short_storages_and_overflowing_shapes() {
    let st = f32_bytes((0..10).map(|i| i as f32));
    // 4x4 needs 16 elements, the storage holds 10.
    let e = refused(
        &sd_zip(&one_tensor(10, &[4, 4], &[4, 1]), &[("0", &st)]),
        "short.pth",
    );
    assert!(
        e.contains("tensor 'w'") && e.contains("reach past storage '0'"),
        "{e}"
    );
    // Strides that reach past the end.
    let e = refused(
        &sd_zip(&one_tensor(10, &[2, 2], &[9, 1]), &[("0", &st)]),
        "stride.pth",
    );
    assert!(e.contains("reach past"), "{e}");
    // Shape product overflow, and a product that fits but exceeds what the file can hold.
    let big = 1i64 << 40;
    let e = refused(
        &sd_zip(&one_tensor(10, &[big, big, 16], &[0, 0, 0]), &[("0", &st)]),
        "overflow.pth",
    );
    assert!(e.contains("more elements than fit"), "{e}");
    let e = refused(
        &sd_zip(&one_tensor(10, &[big], &[0]), &[("0", &st)]),
        "huge.pth",
    );
    assert!(e.contains("more values"), "{e}");
    // A storage entry that is missing.
    let e = refused(&sd_zip(&one_tensor(10, &[2], &[1]), &[]), "missing.pth");
    assert!(e.contains("storage '0' has no entry"), "{e}");
    // Legacy: a storage count larger than the bytes that follow.
    let e = refused(
        &legacy_of(&one_tensor(10, &[2], &[1]), &[("0", 1 << 60, &st)]),
        "legacy.pth",
    );
    assert!(e.contains("truncated") && e.contains("storage '0'"), "{e}");
}

/// Offsets of the central directory records of `b` (zip).
fn central_records(b: &[u8]) -> Vec<usize> {
    b.windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"PK\x01\x02")
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn refuses_zip_entries_that_lie_about_their_size() {
    let st = f32_bytes((0..16).map(|i| i as f32));
    let good = sd_zip(&one_tensor(16, &[4, 4], &[4, 1]), &[("0", &st)]);
    read_pth(&good, "good.pth").unwrap();
    let cd = central_records(&good);
    assert_eq!(cd.len(), 2);
    for (rec, size, name) in [
        (cd[1], 64u32 + 100, "bigger.pth"),
        (cd[1], 1 << 31, "huge.pth"),
        (cd[1], 8, "smaller.pth"),
        (cd[0], u32::MAX - 1, "pickle.pth"),
    ] {
        // Both sizes (compressed at +20, uncompressed at +24) lie alike.
        let mut b = good.clone();
        b[rec + 20..rec + 24].copy_from_slice(&size.to_le_bytes());
        b[rec + 24..rec + 28].copy_from_slice(&size.to_le_bytes());
        refused(&b, name);
        // Only the uncompressed size lies.
        let mut b = good.clone();
        b[rec + 24..rec + 28].copy_from_slice(&size.to_le_bytes());
        let e = refused(&b, name);
        assert!(e.contains("declares"), "{e}");
    }
    // Deflated: the declared inflated size is larger than what inflates.
    let z = zip_of(
        &[
            ("m/data.pkl", &one_tensor(16, &[4, 4], &[4, 1])),
            ("m/data/0", &st),
        ],
        true,
    );
    let cd = central_records(&z);
    let mut b = z.clone();
    b[cd[1] + 24..cd[1] + 28].copy_from_slice(&100u32.to_le_bytes());
    refused(&b, "inflate.pth");
    let mut b = z;
    b[cd[1] + 24..cd[1] + 28].copy_from_slice(&u32::MAX.to_le_bytes());
    refused(&b, "bomb.pth");
}

#[test]
fn refuses_truncated_empty_and_random_files() {
    let e = refused(b"", "empty.pth");
    assert!(e.contains("empty"), "{e}");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for n in [1usize, 7, 100, 5000] {
        let b: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        refused(&b, "random.pth");
        // Random bytes behind each format's magic.
        let mut z = b"PK\x03\x04".to_vec();
        z.extend_from_slice(&b);
        refused(&z, "random-zip.pth");
        let mut l = vec![0x80, 2];
        l.extend_from_slice(&b);
        refused(&l, "random-pickle.pth");
    }
    for f in [
        "formats.legacy.pth",
        "formats.nested-f16.pth",
        "formats.bf16-views.pth",
    ] {
        let b = data(f);
        for cut in [
            1,
            2,
            4,
            15,
            30,
            100,
            700,
            1000,
            1200,
            5000,
            b.len() / 2,
            b.len() - 30,
            b.len() - 1,
        ] {
            refused(&b[..cut], f);
        }
    }
    // A pickle truncated inside the pickle opcodes (zip) and a stack underflow.
    let pkl = one_tensor(16, &[4, 4], &[4, 1]);
    let st = f32_bytes((0..16).map(|i| i as f32));
    for cut in [1, 3, 10, 50, pkl.len() - 1] {
        let e = refused(&sd_zip(&pkl[..cut], &[("0", &st)]), "cut.pth");
        assert!(e.contains("pickle"), "{e}");
    }
    refused(&sd_zip(b"\x80\x02R.", &[]), "underflow.pth");
    refused(&sd_zip(b"\x80\x02(((((((.", &[]), "marks.pth");
    // A top level that is not a dict of tensors.
    let e = refused(&sd_zip(b"\x80\x02K\x05.", &[]), "int.pth");
    assert!(e.contains("of type int, not a dict of tensors"), "{e}");
    let e = refused(
        &sd_zip(b"\x80\x02}(X\x01\x00\x00\x00aK\x01u.", &[]),
        "nodict.pth",
    );
    assert!(e.contains("no dict of tensors"), "{e}");
}
