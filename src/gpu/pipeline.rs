//! Shader families (one .wgsl per op family, prefixed by `common.wgsl`) and the pipeline cache.
//! A kernel is a family, an entry point and values for the family's WGSL `override` constants, so
//! variants such as transposed matmuls or fused activations are separate cached pipelines of one
//! shader module per family.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ShaderFamily {
    Matmul,
    /// `matmul.wgsl` + `matmul_sg.wgsl`: the GEMM kernel that needs the `subgroups` feature.
    MatmulSg,
    /// `Matmul` with B stored as f16 (`//#if BH == 1`: two elements per word, widened on load).
    MatmulH,
    /// `MatmulSg` with B stored as f16.
    MatmulSgH,
    Elementwise,
    Norm,
    Conv,
    Attention,
    /// `attention.wgsl` with its subgroup lines (`//#if SG == 1`): needs the `subgroups` feature.
    AttentionSg,
    Resize,
    Otsu,
    Pe,
    Loss,
    Optim,
}

const COMMON: &str = include_str!("../../shaders/common.wgsl");

impl ShaderFamily {
    pub fn name(self) -> &'static str {
        match self {
            ShaderFamily::Matmul => "matmul",
            ShaderFamily::MatmulSg => "matmul_sg",
            ShaderFamily::MatmulH => "matmul_h",
            ShaderFamily::MatmulSgH => "matmul_sg_h",
            ShaderFamily::Elementwise => "elementwise",
            ShaderFamily::Norm => "norm",
            ShaderFamily::Conv => "conv",
            ShaderFamily::Attention => "attention",
            ShaderFamily::AttentionSg => "attention_sg",
            ShaderFamily::Resize => "resize",
            ShaderFamily::Otsu => "otsu",
            ShaderFamily::Pe => "pe",
            ShaderFamily::Loss => "loss",
            ShaderFamily::Optim => "optim",
        }
    }
    /// The family's own file (without `common.wgsl`); `MatmulSg` builds on `Matmul`'s.
    pub fn source(self) -> &'static str {
        match self {
            ShaderFamily::Matmul | ShaderFamily::MatmulH => {
                include_str!("../../shaders/matmul.wgsl")
            }
            ShaderFamily::MatmulSg | ShaderFamily::MatmulSgH => {
                include_str!("../../shaders/matmul_sg.wgsl")
            }
            ShaderFamily::Elementwise => include_str!("../../shaders/elementwise.wgsl"),
            ShaderFamily::Norm => include_str!("../../shaders/norm.wgsl"),
            ShaderFamily::Conv => include_str!("../../shaders/conv.wgsl"),
            ShaderFamily::Attention | ShaderFamily::AttentionSg => {
                include_str!("../../shaders/attention.wgsl")
            }
            ShaderFamily::Resize => include_str!("../../shaders/resize.wgsl"),
            ShaderFamily::Otsu => include_str!("../../shaders/otsu.wgsl"),
            ShaderFamily::Pe => include_str!("../../shaders/pe.wgsl"),
            ShaderFamily::Loss => include_str!("../../shaders/loss.wgsl"),
            ShaderFamily::Optim => include_str!("../../shaders/optim.wgsl"),
        }
    }
}

/// A compile-time constant of a kernel variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Const {
    U(u32),
    I(i32),
    F(f32),
    B(bool),
}

/// One compute entry point of a shader family, specialised by constants.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub family: ShaderFamily,
    pub entry: &'static str,
    pub consts: Vec<(&'static str, Const)>,
    /// Workgroup size (x*y*z), checked against the device limit before the first dispatch.
    pub invocations: u32,
}

impl Kernel {
    pub fn new(family: ShaderFamily, entry: &'static str, invocations: u32) -> Self {
        Kernel {
            family,
            entry,
            consts: Vec::new(),
            invocations,
        }
    }
    pub fn u(mut self, name: &'static str, v: u32) -> Self {
        self.consts.push((name, Const::U(v)));
        self
    }
    pub fn i(mut self, name: &'static str, v: i32) -> Self {
        self.consts.push((name, Const::I(v)));
        self
    }
    pub fn f(mut self, name: &'static str, v: f32) -> Self {
        self.consts.push((name, Const::F(v)));
        self
    }
    pub fn b(mut self, name: &'static str, v: bool) -> Self {
        self.consts.push((name, Const::B(v)));
        self
    }
    fn constants(&self) -> Vec<(&'static str, f64)> {
        self.consts
            .iter()
            .map(|(n, c)| {
                let v = match c {
                    Const::U(v) => *v as f64,
                    Const::I(v) => *v as f64,
                    Const::F(v) => *v as f64,
                    Const::B(v) => *v as u32 as f64,
                };
                (*n, v)
            })
            .collect()
    }
    pub fn key(&self) -> String {
        format!("{}#{}|{:?}", self.family.name(), self.entry, self.consts)
    }
}

/// Full WGSL source of a family's module: `common.wgsl`, then the family's file, with the
/// kernel-variant directives expanded (see [`ShaderFamily::expand`]).
pub fn family_source(f: ShaderFamily) -> String {
    let own = match f {
        // One GEMM text, B's storage chosen by the expander's `BH` (0: f32, 1: f16).
        ShaderFamily::Matmul => format!("//#for BH in 0\n{}\n//#end", f.source()),
        ShaderFamily::MatmulH => format!("//#for BH in 1\n{}\n//#end", f.source()),
        ShaderFamily::MatmulSg | ShaderFamily::MatmulSgH => {
            let bh = if f == ShaderFamily::MatmulSgH { 1 } else { 0 };
            format!(
                "//#for BH in {bh}\n{}\n{}\n//#end",
                ShaderFamily::Matmul.source(),
                f.source()
            )
        }
        // One file, its subgroup lines kept or dropped by the expander's `SG`.
        ShaderFamily::Attention => format!("//#for SG in 0\n{}\n//#end", f.source()),
        ShaderFamily::AttentionSg => format!("//#for SG in 1\n{}\n//#end", f.source()),
        _ => f.source().to_string(),
    };
    match ShaderFamily::expand(&format!("{COMMON}\n{own}")) {
        Ok(s) => s,
        // The shaders are compiled into the binary and every family is expanded by the tests.
        Err(e) => panic!("shaders/{}.wgsl: {e}", f.name()),
    }
}

impl ShaderFamily {
    /// Checks the uniform params struct `P` against the binding-0 uniform struct that entry point
    /// `entry` of this family uses (naga reflection of the expanded source): member count, names,
    /// byte offsets, types and size. The error names the kernel and the first differing field.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn check_uniform<P: crate::gpu::Params>(self, entry: &str) -> Result<(), String> {
        reflect::Reflected::new(self)?.check::<P>(self, entry)
    }

    pub const ALL: [ShaderFamily; 14] = [
        ShaderFamily::Matmul,
        ShaderFamily::MatmulSg,
        ShaderFamily::MatmulH,
        ShaderFamily::MatmulSgH,
        ShaderFamily::Elementwise,
        ShaderFamily::Norm,
        ShaderFamily::Conv,
        ShaderFamily::Attention,
        ShaderFamily::AttentionSg,
        ShaderFamily::Resize,
        ShaderFamily::Otsu,
        ShaderFamily::Pe,
        ShaderFamily::Loss,
        ShaderFamily::Optim,
    ];

    /// Whether this family's GEMM reads its B operand (binding 2) as f16 ([`crate::gpu::DType::F16`]).
    pub fn b_is_f16(self) -> bool {
        matches!(self, ShaderFamily::MatmulH | ShaderFamily::MatmulSgH)
    }

    /// The module source as compiled: `common.wgsl` + the family's file, directives expanded.
    pub fn wgsl(self) -> String {
        family_source(self)
    }

    /// Expands the kernel-variant directives of a WGSL text. A directive is a line whose first
    /// non-blank characters are `//#`; blocks end with `//#end` and nest:
    ///
    /// - `//#for NAME in A..B` (integers, B excluded) or `//#for NAME in w1 w2 ..` (words): the
    ///   block once per value, in order, with `$NAME` (or `${NAME}`) replaced by the value.
    /// - `//#width`: the block twice, scalar then vec4, binding `$W` (`1` / `4`), `$T` (`f32` /
    ///   `vec4<f32>`) and `$S` (name suffix: empty / `4`, e.g. `fn unary$S` is `unary`, `unary4`).
    /// - `//#if NAME == VALUE` (or `!=`), optional `//#else`: lines kept by a loop variable's value.
    ///
    /// Every `$` must name a variable of an enclosing block. Errors name the line (1-based).
    pub fn expand(src: &str) -> Result<String, String> {
        expand::expand(src)
    }
}

mod expand {
    enum Node<'a> {
        Line(usize, &'a str),
        /// Variables bound per pass (name, value), one list per pass.
        Repeat(Vec<Vec<(String, String)>>, Vec<Node<'a>>),
        If {
            line: usize,
            var: String,
            eq: bool,
            value: String,
            then: Vec<Node<'a>>,
            els: Vec<Node<'a>>,
        },
    }

    enum Open<'a> {
        Repeat(Vec<Vec<(String, String)>>),
        If {
            line: usize,
            var: String,
            eq: bool,
            value: String,
            then: Option<Vec<Node<'a>>>,
        },
    }

    fn is_ident(s: &str) -> bool {
        let mut c = s.chars();
        matches!(c.next(), Some(ch) if ch == '_' || ch.is_ascii_alphabetic())
            && c.all(|ch| ch == '_' || ch.is_ascii_alphanumeric())
    }

    fn parse_for(line: usize, args: &str) -> Result<Vec<Vec<(String, String)>>, String> {
        let bad = || {
            format!(
                "line {line}: expected `//#for NAME in A..B` or `//#for NAME in WORD ..`, got `//#for {args}`"
            )
        };
        let mut it = args.split_whitespace();
        let name = it.next().filter(|n| is_ident(n)).ok_or_else(bad)?;
        if it.next() != Some("in") {
            return Err(bad());
        }
        let rest: Vec<&str> = it.collect();
        let values: Vec<String> = match rest.as_slice() {
            [] => return Err(bad()),
            [r] if r.contains("..") => {
                let (a, b) = r.split_once("..").unwrap();
                let (a, b) = (
                    a.parse::<u32>().map_err(|_| bad())?,
                    b.parse::<u32>().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(format!("line {line}: empty range {a}..{b}"));
                }
                (a..b).map(|v| v.to_string()).collect()
            }
            words => words.iter().map(|w| w.to_string()).collect(),
        };
        Ok(values
            .into_iter()
            .map(|v| vec![(name.to_string(), v)])
            .collect())
    }

    fn parse_width(line: usize, args: &str) -> Result<Vec<Vec<(String, String)>>, String> {
        if !args.is_empty() {
            return Err(format!("line {line}: `//#width` takes no arguments"));
        }
        let pass = |w: &str, t: &str, s: &str| {
            vec![
                ("W".into(), w.into()),
                ("T".into(), t.into()),
                ("S".into(), s.into()),
            ]
        };
        Ok(vec![pass("1", "f32", ""), pass("4", "vec4<f32>", "4")])
    }

    fn parse_if(line: usize, args: &str) -> Result<(String, bool, String), String> {
        let words: Vec<&str> = args.split_whitespace().collect();
        match words.as_slice() {
            [var, op @ ("==" | "!="), value] if is_ident(var) => {
                Ok((var.to_string(), *op == "==", value.to_string()))
            }
            _ => Err(format!(
                "line {line}: expected `//#if NAME == VALUE` or `//#if NAME != VALUE`, got `//#if {args}`"
            )),
        }
    }

    fn parse(src: &str) -> Result<Vec<Node<'_>>, String> {
        // Stack of (open block, its line, nodes collected so far); the root has no block.
        let mut stack: Vec<(Option<Open>, usize, Vec<Node>)> = vec![(None, 0, Vec::new())];
        for (i, text) in src.lines().enumerate() {
            let line = i + 1;
            let Some(d) = text.trim_start().strip_prefix("//#") else {
                stack.last_mut().unwrap().2.push(Node::Line(line, text));
                continue;
            };
            let d = d.trim();
            let (kw, args) = d.split_once(char::is_whitespace).unwrap_or((d, ""));
            let args = args.trim();
            match kw {
                "for" => stack.push((Some(Open::Repeat(parse_for(line, args)?)), line, Vec::new())),
                "width" => stack.push((
                    Some(Open::Repeat(parse_width(line, args)?)),
                    line,
                    Vec::new(),
                )),
                "if" => {
                    let (var, eq, value) = parse_if(line, args)?;
                    stack.push((
                        Some(Open::If {
                            line,
                            var,
                            eq,
                            value,
                            then: None,
                        }),
                        line,
                        Vec::new(),
                    ));
                }
                "else" | "end" if !args.is_empty() => {
                    return Err(format!("line {line}: `//#{kw}` takes no arguments"));
                }
                "else" => match stack.last_mut() {
                    Some((Some(Open::If { then, .. }), _, nodes)) if then.is_none() => {
                        *then = Some(std::mem::take(nodes))
                    }
                    _ => return Err(format!("line {line}: `//#else` without an open `//#if`")),
                },
                "end" => {
                    if stack.len() == 1 {
                        return Err(format!("line {line}: `//#end` without an open block"));
                    }
                    let (open, _, nodes) = stack.pop().unwrap();
                    let node = match open.unwrap() {
                        Open::Repeat(passes) => Node::Repeat(passes, nodes),
                        Open::If {
                            line,
                            var,
                            eq,
                            value,
                            then,
                        } => match then {
                            Some(then) => Node::If {
                                line,
                                var,
                                eq,
                                value,
                                then,
                                els: nodes,
                            },
                            None => Node::If {
                                line,
                                var,
                                eq,
                                value,
                                then: nodes,
                                els: Vec::new(),
                            },
                        },
                    };
                    stack.last_mut().unwrap().2.push(node);
                }
                _ => {
                    return Err(format!(
                        "line {line}: unknown directive `//#{kw}` (for, width, if, else, end)"
                    ));
                }
            }
        }
        if stack.len() > 1 {
            return Err(format!(
                "line {}: block not closed by `//#end`",
                stack.last().unwrap().1
            ));
        }
        Ok(stack.pop().unwrap().2)
    }

    fn lookup<'e>(env: &'e [(String, String)], name: &str) -> Option<&'e str> {
        env.iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn substitute(
        line: usize,
        text: &str,
        env: &[(String, String)],
        out: &mut String,
    ) -> Result<(), String> {
        let mut rest = text;
        while let Some(p) = rest.find('$') {
            out.push_str(&rest[..p]);
            let after = &rest[p + 1..];
            let (name, tail) = if let Some(b) = after.strip_prefix('{') {
                let e = b
                    .find('}')
                    .ok_or_else(|| format!("line {line}: `${{` without `}}`"))?;
                (&b[..e], &b[e + 1..])
            } else {
                let e = after
                    .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
                    .unwrap_or(after.len());
                (&after[..e], &after[e..])
            };
            if !is_ident(name) {
                return Err(format!(
                    "line {line}: `$` must be followed by a variable name"
                ));
            }
            let v = lookup(env, name).ok_or_else(|| {
                format!("line {line}: `${name}` is not a variable of an enclosing block")
            })?;
            out.push_str(v);
            rest = tail;
        }
        out.push_str(rest);
        out.push('\n');
        Ok(())
    }

    fn emit(
        nodes: &[Node],
        env: &mut Vec<(String, String)>,
        out: &mut String,
    ) -> Result<(), String> {
        for n in nodes {
            match n {
                Node::Line(line, text) => substitute(*line, text, env, out)?,
                Node::Repeat(passes, body) => {
                    for vars in passes {
                        let depth = env.len();
                        env.extend(vars.iter().cloned());
                        emit(body, env, out)?;
                        env.truncate(depth);
                    }
                }
                Node::If {
                    line,
                    var,
                    eq,
                    value,
                    then,
                    els,
                } => {
                    let v = lookup(env, var).ok_or_else(|| {
                        format!("line {line}: `//#if {var}`: not a variable of an enclosing block")
                    })?;
                    emit(if (v == value) == *eq { then } else { els }, env, out)?;
                }
            }
        }
        Ok(())
    }

    pub fn expand(src: &str) -> Result<String, String> {
        let nodes = parse(src)?;
        let mut out = String::with_capacity(src.len() * 2);
        emit(&nodes, &mut Vec::new(), &mut out)?;
        Ok(out)
    }
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<ShaderFamily, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Natively: each family's module as naga reflects it, and the (family, entry point, Rust
    /// params type) combinations whose uniform layout has been checked.
    #[cfg(not(target_arch = "wasm32"))]
    reflected: Mutex<HashMap<ShaderFamily, Arc<reflect::Reflected>>>,
    #[cfg(not(target_arch = "wasm32"))]
    checked: Mutex<std::collections::HashSet<(ShaderFamily, &'static str, std::any::TypeId)>>,
    /// While tracing ([`PipelineCache::trace`]): every pipeline used, in order of first use.
    trace: Mutex<Option<Vec<PipelineUse>>>,
}

/// One pipeline a traced piece of work used: its family and WGSL entry point, and how long its
/// creation took when it was created during the trace (shader module included when that was new
/// too); `None` when it came from the cache.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineUse {
    pub family: &'static str,
    pub entry: &'static str,
    pub compile_ms: Option<f64>,
}

/// Wall-clock milliseconds from an arbitrary origin (performance.now() in a browser).
pub fn now_ms() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        T0.get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
            * 1e3
    }
    #[cfg(all(target_arch = "wasm32", feature = "web"))]
    {
        js_now()
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "web")))]
    {
        0.0
    }
}

#[cfg(all(target_arch = "wasm32", feature = "web"))]
#[wasm_bindgen::prelude::wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn js_now() -> f64;
}

impl PipelineCache {
    /// Checks `P` against the binding-0 uniform struct of kernel `k`'s entry point, once per
    /// (family, entry point, `P`).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn check_uniform<P: crate::gpu::Params>(&self, k: &Kernel) -> crate::error::Result<()> {
        let key = (k.family, k.entry, std::any::TypeId::of::<P>());
        if self.checked.lock().unwrap().contains(&key) {
            return Ok(());
        }
        let r = {
            let mut r = self.reflected.lock().unwrap();
            match r.get(&k.family) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(
                        reflect::Reflected::new(k.family).map_err(crate::error::Error::Invalid)?,
                    );
                    r.insert(k.family, m.clone());
                    m
                }
            }
        };
        r.check::<P>(k.family, k.entry)
            .map_err(crate::error::Error::Invalid)?;
        self.checked.lock().unwrap().insert(key);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    /// Starts recording the pipelines used (`true`), or stops and returns them (`false`).
    pub fn trace(&self, on: bool) -> Vec<PipelineUse> {
        let mut t = self.trace.lock().unwrap();
        let out = t.take().unwrap_or_default();
        if on {
            *t = Some(Vec::new());
        }
        out
    }

    fn traced(&self, k: &Kernel, compile_ms: Option<f64>) {
        if let Some(t) = self.trace.lock().unwrap().as_mut() {
            let family = k.family.name();
            match t
                .iter_mut()
                .find(|u| u.family == family && u.entry == k.entry)
            {
                Some(u) => {
                    if let Some(ms) = compile_ms {
                        u.compile_ms = Some(u.compile_ms.unwrap_or(0.0) + ms);
                    }
                }
                None => t.push(PipelineUse {
                    family,
                    entry: k.entry,
                    compile_ms,
                }),
            }
        }
    }

    /// The pipeline of `k` if it has been created.
    pub fn cached(&self, k: &Kernel) -> Option<Arc<wgpu::ComputePipeline>> {
        let p = self.pipelines.lock().unwrap().get(&k.key()).cloned();
        if p.is_some() {
            self.traced(k, None);
        }
        p
    }

    /// The shader module of family `f`, created on first use. The lock is not held while naga
    /// parses the source, so threads creating different families' modules do not wait for each
    /// other (two threads racing for one family both build it and the first one kept wins).
    fn module(&self, device: &wgpu::Device, f: ShaderFamily) -> Arc<wgpu::ShaderModule> {
        if let Some(m) = self.modules.lock().unwrap().get(&f) {
            return m.clone();
        }
        let m = Arc::new(device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(f.name()),
            source: wgpu::ShaderSource::Wgsl(family_source(f).into()),
        }));
        self.modules.lock().unwrap().entry(f).or_insert(m).clone()
    }

    pub fn get(&self, device: &wgpu::Device, k: &Kernel) -> Arc<wgpu::ComputePipeline> {
        if let Some(p) = self.cached(k) {
            return p;
        }
        let t0 = now_ms();
        let module = self.module(device, k.family);
        let constants = k.constants();
        #[cfg(not(target_arch = "wasm32"))]
        dump_pipeline(k, &constants);
        let pipeline = Arc::new(
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(k.entry),
                layout: None,
                module: &module,
                entry_point: Some(k.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            }),
        );
        self.traced(k, Some(now_ms() - t0));
        let (pipeline, n) = {
            let mut p = self.pipelines.lock().unwrap();
            let kept = p.entry(k.key()).or_insert(pipeline).clone();
            (kept, p.len())
        };
        #[cfg(target_arch = "wasm32")]
        ON_CREATE.with(|h| {
            if let Some(f) = h.borrow().as_ref() {
                f(n)
            }
        });
        let _ = n;
        pipeline
    }

    /// Creates the pipelines of `kernels` that do not exist yet. Natively they are compiled on
    /// up to [`compile_threads`] threads at once (drivers compile a pipeline on the calling
    /// thread: lavapipe spends about 0.1 s per pipeline even with Mesa's disk cache warm, so a
    /// first forward compiles for seconds); in a browser, one after the other.
    pub fn prepare(&self, device: &wgpu::Device, kernels: &[&Kernel]) {
        // A trace lists pipelines in order of first use, whatever order the threads finish in.
        for k in kernels {
            self.traced(k, None);
        }
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<&Kernel> = {
            let have = self.pipelines.lock().unwrap();
            kernels
                .iter()
                .copied()
                .filter(|k| {
                    let key = k.key();
                    !have.contains_key(&key) && seen.insert(key)
                })
                .collect()
        };
        #[cfg(not(target_arch = "wasm32"))]
        if let threads @ 2.. = compile_threads().min(missing.len()) {
            let next = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(k) = missing.get(i) else { break };
                            self.get(device, k);
                        }
                    });
                }
            });
            return;
        }
        for k in missing {
            self.get(device, k);
        }
    }
}

/// How many threads [`PipelineCache::prepare`] compiles on natively: `MEDFASTSAM_COMPILE_THREADS`
/// if set (1 compiles one pipeline at a time), else the number of CPU threads. A value that is not
/// a positive whole number is reported once on stderr and the default used. (A browser's worker
/// compiles on its one thread.)
#[cfg(not(target_arch = "wasm32"))]
pub fn compile_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        match std::env::var("MEDFASTSAM_COMPILE_THREADS") {
            Err(_) => cpus,
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    eprintln!(
                        "warning: MEDFASTSAM_COMPILE_THREADS={v:?} is not a positive whole number; compiling pipelines on {cpus} threads"
                    );
                    cpus
                }
            },
        }
    })
}

/// What [`on_pipeline_created`] calls.
#[cfg(target_arch = "wasm32")]
pub type PipelineHook = Box<dyn Fn(usize)>;

#[cfg(target_arch = "wasm32")]
thread_local! {
    /// The page's progress report: called with the number of pipelines after each one is created
    /// (the worker is single-threaded; set only while the page's warm-up runs).
    static ON_CREATE: std::cell::RefCell<Option<PipelineHook>> =
        const { std::cell::RefCell::new(None) };
}

/// Sets (or clears) the function told the pipeline count after each pipeline is created.
#[cfg(target_arch = "wasm32")]
pub fn on_pipeline_created(f: Option<PipelineHook>) {
    ON_CREATE.with(|h| *h.borrow_mut() = f);
}

/// Debugging aid: with `MEDFASTSAM_DUMP_PIPELINES=DIR`, every pipeline created is appended to
/// `DIR/pipelines.jsonl` (family, entry point, override constants) and each family's full WGSL
/// source is written to `DIR/<family>.wgsl`, so a driver or browser that fails on one of them can
/// be tested pipeline by pipeline (web/test/pipelines.mjs does that in Chromium).
#[cfg(not(target_arch = "wasm32"))]
fn dump_pipeline(k: &Kernel, constants: &[(&'static str, f64)]) {
    use std::io::Write;
    let Some(dir) = std::env::var_os("MEDFASTSAM_DUMP_PIPELINES") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::create_dir_all(&dir);
    let src = dir.join(format!("{}.wgsl", k.family.name()));
    if !src.exists() {
        let _ = std::fs::write(&src, family_source(k.family));
    }
    let consts: serde_json::Map<String, serde_json::Value> = constants
        .iter()
        .map(|(n, v)| (n.to_string(), serde_json::json!(v)))
        .collect();
    let line =
        serde_json::json!({"family": k.family.name(), "entry": k.entry, "constants": consts});
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pipelines.jsonl"))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// naga reflection of a family's module for the uniform layout check (native builds only: the
/// check needs naga's WGSL front end, which the web build does not carry).
#[cfg(not(target_arch = "wasm32"))]
mod reflect {
    use super::{ShaderFamily, family_source};

    pub struct Reflected {
        module: naga::Module,
        info: naga::valid::ModuleInfo,
    }

    /// A naga type written as in WGSL (the subset uniform structs use).
    fn type_name(module: &naga::Module, ty: naga::Handle<naga::Type>) -> String {
        use naga::{ScalarKind, TypeInner, VectorSize};
        let scalar = |s: naga::Scalar| match (s.kind, s.width) {
            (ScalarKind::Uint, 4) => "u32".to_string(),
            (ScalarKind::Sint, 4) => "i32".to_string(),
            (ScalarKind::Float, 4) => "f32".to_string(),
            (k, w) => format!("{k:?}{}", w * 8),
        };
        match &module.types[ty].inner {
            TypeInner::Scalar(s) => scalar(*s),
            TypeInner::Vector { size, scalar: s } => {
                let n = match size {
                    VectorSize::Bi => 2,
                    VectorSize::Tri => 3,
                    VectorSize::Quad => 4,
                };
                format!("vec{n}<{}>", scalar(*s))
            }
            TypeInner::Array {
                base,
                size: naga::ArraySize::Constant(n),
                ..
            } => {
                format!("array<{}, {n}>", type_name(module, *base))
            }
            other => format!("{other:?}"),
        }
    }

    impl Reflected {
        pub fn new(family: ShaderFamily) -> Result<Self, String> {
            let module = naga::front::wgsl::parse_str(&family_source(family))
                .map_err(|e| format!("shaders/{}.wgsl: {e}", family.name()))?;
            let info = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .map_err(|e| format!("shaders/{}.wgsl: {}", family.name(), e.into_inner()))?;
            Ok(Reflected { module, info })
        }

        pub fn check<P: crate::gpu::Params>(
            &self,
            family: ShaderFamily,
            entry: &str,
        ) -> Result<(), String> {
            let rust = std::any::type_name::<P>()
                .rsplit("::")
                .next()
                .unwrap_or("?");
            let kernel = format!("kernel {}::{entry}", family.name());
            let m = &self.module;
            let ei = m
                .entry_points
                .iter()
                .position(|e| e.name == entry)
                .ok_or_else(|| format!("{kernel}: no such entry point"))?;
            let uses = self.info.get_entry_point(ei);
            let global = m
                .global_variables
                .iter()
                .find(|(h, g)| {
                    g.space == naga::AddressSpace::Uniform
                        && g.binding
                            == Some(naga::ResourceBinding {
                                group: 0,
                                binding: 0,
                            })
                        && !uses[*h].is_empty()
                })
                .map(|(_, g)| g)
                .ok_or_else(|| {
                    format!("{kernel}: uses no uniform struct at binding 0 (Rust {rust})")
                })?;
            let naga::TypeInner::Struct { members, span } = &m.types[global.ty].inner else {
                return Err(format!("{kernel}: binding 0 is not a struct"));
            };
            let wgsl = m.types[global.ty].name.as_deref().unwrap_or("?");
            let what = format!("{kernel}: Rust {rust} vs WGSL {wgsl}");
            for (i, mem) in members.iter().enumerate() {
                let mname = mem.name.as_deref().unwrap_or("?");
                let mty = type_name(m, mem.ty);
                let Some(&(name, ty, off)) = P::FIELDS.get(i) else {
                    return Err(format!(
                        "{what}: WGSL field {i} `{mname}: {mty}` is missing in Rust"
                    ));
                };
                if name != mname || ty != mty || off != mem.offset as usize {
                    return Err(format!(
                        "{what}: field {i} is `{name}: {ty}` at byte {off} in Rust but `{mname}: {mty}` at byte {} in WGSL",
                        mem.offset
                    ));
                }
            }
            if let Some((name, ty, _)) = P::FIELDS.get(members.len()) {
                return Err(format!(
                    "{what}: Rust field {} `{name}: {ty}` is not in WGSL",
                    members.len()
                ));
            }
            if std::mem::size_of::<P>() != *span as usize {
                return Err(format!(
                    "{what}: {} bytes in Rust, {span} in WGSL",
                    std::mem::size_of::<P>()
                ));
            }
            Ok(())
        }
    }
}
