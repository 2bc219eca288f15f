//! Commands recorded while their pipelines do not exist yet are held and encoded at submission,
//! after the missing pipelines have been compiled together (on several threads natively). These
//! tests use a device of their own, so that nothing is compiled before they start, and check
//! against CPU references that the held commands (dispatches, zero fills, copies) run in the
//! order they were recorded, across the switch from direct encoding to holding, that a recording
//! never submitted compiles nothing, and that a trace lists pipelines in order of first use.

use medfastsam::gpu::{AdapterRequest, Gpu, Tensor};
use medfastsam::ops::Act;
use medfastsam::ops::elementwise::{BinOp, accumulate, activation, binary};
use medfastsam::testutil::{Rng, assert_close};

fn fresh_gpu() -> Gpu {
    let req = AdapterRequest::default().with_env();
    let gpu = Gpu::new(&req).unwrap_or_else(|e| {
        panic!(
            "GPU tests need a wgpu adapter and none was found: {e}\n\
             On Debian/Ubuntu without a GPU install the software Vulkan driver: \
             apt-get install -y mesa-vulkan-drivers libvulkan1"
        )
    });
    eprintln!("test adapter: {}", gpu.summary());
    gpu
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Records, on `t` (zeroed first: encoded at once, since holding starts at the first dispatch
/// whose pipeline is missing) and a copy `u`: t += a; u = t; t += a; r = relu(u); m = t * u.
/// Expected: t = 2a, u = a, r = relu(a), m = 2a².
fn record_chain(gpu: &Gpu, a: &Tensor, t: &Tensor, u: &Tensor) -> (Tensor, Tensor) {
    let mut rec = gpu.new_recorder();
    rec.zero(t);
    accumulate(&mut rec, t, a).unwrap();
    rec.copy(t, u);
    accumulate(&mut rec, t, a).unwrap();
    let r = activation(&mut rec, u, Act::Relu).unwrap();
    let m = binary(&mut rec, t, u, BinOp::Mul).unwrap();
    rec.submit().unwrap();
    (r, m)
}

fn check_chain(gpu: &Gpu, what: &str, a: &[f32], t: &Tensor, u: &Tensor, r: &Tensor, m: &Tensor) {
    let a = f64s(a);
    let twice: Vec<f64> = a.iter().map(|x| 2.0 * x).collect();
    let relu: Vec<f64> = a.iter().map(|x| x.max(0.0)).collect();
    let prod: Vec<f64> = a.iter().map(|x| 2.0 * x * x).collect();
    assert_close(&format!("{what}: t"), &gpu.read(t).unwrap(), &twice, 1e-6);
    assert_close(&format!("{what}: u"), &gpu.read(u).unwrap(), &a, 1e-6);
    assert_close(
        &format!("{what}: relu(u)"),
        &gpu.read(r).unwrap(),
        &relu,
        1e-6,
    );
    assert_close(
        &format!("{what}: t * u"),
        &gpu.read(m).unwrap(),
        &prod,
        1e-6,
    );
}

#[test]
fn held_commands_run_in_recorded_order() {
    let gpu = fresh_gpu();
    let mut rng = Rng::new(11);
    // 4099 elements: the scalar kernels; 4100: the vec4 ones (other pipelines).
    for n in [4099usize, 4100] {
        let a: Vec<f32> = (0..n).map(|_| rng.range(-3.0, 3.0) as f32).collect();
        let ta = gpu.upload(&a, &[n]).unwrap();
        // t starts with garbage that the held zero fill must clear before the first accumulate.
        let t = gpu.upload(&vec![7.0; n], &[n]).unwrap();
        let u = gpu.upload(&vec![-5.0; n], &[n]).unwrap();
        let before = gpu.pipeline_count();
        let (r, m) = record_chain(&gpu, &ta, &t, &u);
        assert!(
            gpu.pipeline_count() > before,
            "n={n}: the first recording should have compiled its pipelines"
        );
        check_chain(&gpu, &format!("n={n}, all held"), &a, &t, &u, &r, &m);
        // The same again with every pipeline compiled: encoded as recorded, nothing held.
        let compiled = gpu.pipeline_count();
        let (r, m) = record_chain(&gpu, &ta, &t, &u);
        assert_eq!(gpu.pipeline_count(), compiled);
        check_chain(&gpu, &format!("n={n}, none held"), &a, &t, &u, &r, &m);
    }
}

#[test]
fn holding_starts_mid_recording() {
    let gpu = fresh_gpu();
    let mut rng = Rng::new(12);
    let n = 1000;
    let a: Vec<f32> = (0..n).map(|_| rng.range(-2.0, 2.0) as f32).collect();
    let ta = gpu.upload(&a, &[n]).unwrap();
    let t = gpu.upload(&vec![3.0; n], &[n]).unwrap();
    let u = gpu.upload(&vec![0.0; n], &[n]).unwrap();
    // Compile accumulate only.
    {
        let mut rec = gpu.new_recorder();
        accumulate(&mut rec, &u, &ta).unwrap();
        rec.submit().unwrap();
    }
    // Encoded directly: zero, accumulate (compiled), copy; then held from the sigmoid (new) on:
    // accumulate again, zero of u, copy back into u.
    let mut rec = gpu.new_recorder();
    rec.zero(&t);
    accumulate(&mut rec, &t, &ta).unwrap();
    rec.copy(&t, &u);
    let s = activation(&mut rec, &t, Act::Sigmoid).unwrap();
    accumulate(&mut rec, &t, &s).unwrap();
    rec.zero(&u);
    let g = activation(&mut rec, &u, Act::Gelu).unwrap();
    rec.copy(&t, &u);
    rec.submit().unwrap();
    let sig: Vec<f64> = a
        .iter()
        .map(|&x| 1.0 / (1.0 + (-(x as f64)).exp()))
        .collect();
    let want_t: Vec<f64> = a.iter().zip(&sig).map(|(&x, s)| x as f64 + s).collect();
    assert_close("sigmoid(t)", &gpu.read(&s).unwrap(), &sig, 1e-6);
    assert_close("t", &gpu.read(&t).unwrap(), &want_t, 1e-6);
    assert_close("u (copied last)", &gpu.read(&u).unwrap(), &want_t, 1e-6);
    assert_close("gelu(zeroed u)", &gpu.read(&g).unwrap(), &vec![0.0; n], 0.0);
}

#[test]
fn unsubmitted_recording_compiles_nothing_and_traces_keep_first_use_order() {
    let gpu = fresh_gpu();
    let n = 64;
    let x = gpu.upload(&vec![1.0; n], &[n]).unwrap();
    let before = gpu.pipeline_count();
    {
        let mut rec = gpu.new_recorder();
        let y = activation(&mut rec, &x, Act::Gelu).unwrap();
        binary(&mut rec, &x, &y, BinOp::Sub).unwrap();
        // Dropped: the recording is discarded and its pipelines were never needed.
    }
    assert_eq!(
        gpu.pipeline_count(),
        before,
        "a recording that is never submitted should compile nothing"
    );
    // The entry points of the two kernels, each traced alone on a device of its own.
    let alone = |binary_op: bool| {
        let g = fresh_gpu();
        let x = g.upload(&[1.0; 64], &[64]).unwrap();
        g.trace_pipelines(true);
        let mut rec = g.new_recorder();
        if binary_op {
            binary(&mut rec, &x, &x, BinOp::Sub).unwrap();
        } else {
            activation(&mut rec, &x, Act::Gelu).unwrap();
        }
        rec.submit().unwrap();
        let used = g.trace_pipelines(false);
        assert_eq!(used.len(), 1, "{used:?}");
        used[0].entry
    };
    let (act_entry, bin_entry) = (alone(false), alone(true));
    assert_ne!(act_entry, bin_entry);
    gpu.trace_pipelines(true);
    let mut rec = gpu.new_recorder();
    let y = activation(&mut rec, &x, Act::Gelu).unwrap();
    let z = binary(&mut rec, &x, &y, BinOp::Sub).unwrap();
    let w = activation(&mut rec, &z, Act::Sigmoid).unwrap();
    let v = binary(&mut rec, &w, &x, BinOp::Add).unwrap();
    rec.submit().unwrap();
    let used = gpu.trace_pipelines(false);
    let entries: Vec<&str> = used.iter().map(|u| u.entry).collect();
    // Compiled together (on two threads where there are two cores), listed in order of first use.
    assert_eq!(entries, [act_entry, bin_entry], "{used:?}");
    assert!(
        used.iter().all(|u| u.compile_ms.is_some()),
        "every pipeline was compiled during the trace: {used:?}"
    );
    // v = sigmoid(1 - gelu(1)) + 1, gelu(1) = Φ(1) = 0.841344746068543.
    let z = 1.0 - 0.841_344_746_068_543_f64;
    let want = 1.0 + 1.0 / (1.0 + (-z).exp());
    assert_close(
        "sigmoid(1 - gelu(1)) + 1",
        &gpu.read(&v).unwrap(),
        &vec![want; n],
        1e-6,
    );
}
