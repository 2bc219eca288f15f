//! Dense random-Fourier positional encoding vs the authors' fixture (tests/data) and the CPU f64
//! reference.

use medfastsam::ops::pe::dense_pe;
use medfastsam::ops::reference::pe as reference;
use medfastsam::testutil::{Rng, max_abs, test_gpu, to_f64};
use safetensors::SafeTensors;

fn run(gauss: &[f32], h: usize, w: usize) -> Vec<f32> {
    let gpu = test_gpu();
    let g = gpu.upload(gauss, &[2, 128]).unwrap();
    let mut rec = gpu.new_recorder();
    let out = dense_pe(&mut rec, &g, h, w).unwrap();
    assert_eq!(out.shape, vec![h, w, 256]);
    rec.submit().unwrap();
    gpu.read(&out).unwrap()
}

#[test]
fn pe_tiny_fixture() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/otsu_pe_tiny.safetensors"
    ))
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let gauss: Vec<f32> =
        bytemuck::pod_collect_to_vec(st.tensor("pe.gaussian_matrix").unwrap().data());
    let want_nchw: Vec<f32> = bytemuck::pod_collect_to_vec(st.tensor("pe.dense").unwrap().data());
    assert_eq!(st.tensor("pe.dense").unwrap().shape(), &[256, 16, 16]);
    let got = run(&gauss, 16, 16);
    // fixture [256, 16, 16] (C, H, W) -> [16, 16, 256]
    let mut want = vec![0.0f64; 16 * 16 * 256];
    for c in 0..256 {
        for p in 0..256 {
            want[p * 256 + c] = want_nchw[c * 256 + p] as f64;
        }
    }
    let e = max_abs(&got, &want);
    let e_ref = max_abs(&got, &reference::dense_pe(&to_f64(&gauss), 16, 16));
    let r = reference::dense_pe(&to_f64(&gauss), 16, 16);
    let mut r_nchw = vec![0.0; r.len()];
    for c in 0..256 {
        for p in 0..256 {
            r_nchw[c * 256 + p] = r[p * 256 + c];
        }
    }
    let e_fix_ref = max_abs(&want_nchw, &r_nchw);
    eprintln!(
        "pe 16x16: max abs err vs fixture {e:.2e}, vs f64 reference {e_ref:.2e} (fixture vs reference {e_fix_ref:.2e})"
    );
    assert!(e <= 2e-6, "pe vs fixture: {e:.3e}");
    assert!(e_ref <= 2e-6, "pe vs reference: {e_ref:.3e}");
}

#[test]
fn pe_random_vs_reference() {
    let mut rng = Rng::new(11);
    // 64x64 (the paper's grid) with N(0,1) entries, then entries scaled so |z| reaches ~40 rad,
    // and odd non-square grids.
    for (h, w, scale) in [
        (64, 64, 1.0),
        (64, 64, 3.0),
        (37, 53, 1.5),
        (1, 1, 1.0),
        (5, 200, 2.0),
    ] {
        let gauss: Vec<f32> = (0..256).map(|_| (scale * rng.normal()) as f32).collect();
        let zmax = (0..128)
            .map(|k| 2.0 * std::f64::consts::PI * (gauss[k].abs() + gauss[128 + k].abs()) as f64)
            .fold(0.0, f64::max);
        let got = run(&gauss, h, w);
        let want = reference::dense_pe(&to_f64(&gauss), h, w);
        let e = max_abs(&got, &want);
        eprintln!("pe {h}x{w} scale {scale}: max |z| {zmax:.1} rad, max abs err {e:.2e}");
        assert!(e <= 2e-6, "pe {h}x{w}: {e:.3e}");
    }
}

#[test]
fn pe_rejects_bad_matrix() {
    let gpu = test_gpu();
    let g = gpu.upload(&[0.0; 128], &[1, 128]).unwrap();
    let mut rec = gpu.new_recorder();
    assert!(dense_pe(&mut rec, &g, 4, 4).is_err());
}
