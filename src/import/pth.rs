//! Reader of PyTorch checkpoints (`torch.save` files, `.pth` / `.pt`) that executes nothing.
//!
//! # API
//! [`read_pth`]`(bytes, file)` returns a [`PthCheckpoint`]: the tensors of the state_dict in file
//! order, each as row-major contiguous values converted to f32 ([`PthTensor::data`]) plus the exact
//! integers for integer and bool storages ([`PthTensor::raw_i64`]), the names of the entries that
//! were skipped, and how the state_dict was found. Every error is one line that starts with `file`.
//!
//! # Formats
//! - The zip format (default since PyTorch 1.6): `<dir>/data.pkl` (any top folder name) plus one
//!   entry `<dir>/data/<key>` per storage. Stored (uncompressed, as PyTorch writes them) and
//!   deflated entries; the CRC of every entry read is checked; `<dir>/byteorder` must be `little`
//!   when present.
//! - The legacy format (before 1.6, or `_use_new_zipfile_serialization=False`): the magic-number
//!   pickle, the protocol-version pickle (1001), the sys-info pickle (must be little-endian), the
//!   main pickle, the pickled list of storage keys, then per key in that order a u64
//!   little-endian element count and the raw elements. Storage views (the sixth field of a legacy
//!   persistent id) are supported. The pre-0.4 tar format is refused.
//!
//! # Which dict is the state_dict
//! If the top-level object is a dict holding tensors, it is the state_dict. Otherwise the nested
//! dicts are searched level by level (at most three levels down) for dicts whose values include
//! tensors; at the shallowest level that has any, the one under the key `state_dict`,
//! `model_state_dict`, `model`, `module`, `net`, `network`, `params` or `weights` (first in that
//! order) wins, else the one with the most tensors (ties: first in the file). Its dotted path is
//! [`PthCheckpoint::nested_under`]; everything beside it (`epoch`, `optimizer`, ...) and every
//! non-tensor entry inside it is listed in [`PthCheckpoint::skipped`]. When every tensor name
//! starts with `module.` (`nn.DataParallel` / DDP) that prefix is stripped
//! ([`PthCheckpoint::prefix_stripped`]).
//!
//! # Storages and views
//! f32, f16, bf16, f64 (rounded to f32), i64, i32, i16, i8, u8, bool storages (and
//! `UntypedStorage`, read as u8); [`PthDtype`] tells which, so a caller can skip or convert
//! integer tensors such as `num_batches_tracked`. Tensors are views: a storage offset and
//! arbitrary non-negative strides (transposed, broadcast, overlapping, several tensors sharing one
//! storage) are honoured; the output is always row-major contiguous.
//!
//! # Security
//! A checkpoint is an untrusted file. Python's pickle runs arbitrary callables named in the file;
//! this module runs a minimal pickle virtual machine of its own that only builds values: no
//! callable is ever invoked. Globals are resolved against a fixed list
//! (`torch._utils._rebuild_tensor_v2` and `_rebuild_tensor`, `torch._utils._rebuild_parameter` and
//! `_rebuild_parameter_with_state`, `collections.OrderedDict`, `torch.<T>Storage` and
//! `torch.cuda.<T>Storage` for the dtypes above, `torch.UntypedStorage`); any other global is an
//! error naming it. The REDUCE opcode is interpreted for those globals only (building a tensor
//! description or an empty dict), BINPERSID only for PyTorch's `('storage', type, key, location,
//! numel[, view])` ids; NEWOBJ, INST, OBJ, EXT*, PERSID and out-of-band buffers are refused.
//!
//! Why not a crate: `serde-pickle` (1.2, the maintained pickle crate) does not implement the
//! persistent-id opcodes at all (a torch checkpoint is then an "unsupported opcode" error), and it
//! turns unknown globals into placeholders instead of refusing them; the other pickle readers that
//! understand torch files live inside large ML frameworks. A state_dict needs only ~40 opcodes.
//!
//! Everything is bounded: objects (4 Mi), stack (1 Mi entries), marks (4096), memo (4 Mi
//! entries), lengths by the bytes actually present, a zip entry's declared size by the file size
//! (stored) or 32 x the file size + 64 MiB in total (deflated) and by what it really holds, each
//! tensor's extent by its storage, shape products by overflow checks, and the values of all
//! tensors together by the file size + 16 Mi (so only broadcast or overlapping views can exceed
//! the file, and only a little). The VM has no recursion; nested data is an arena of objects.

use anyhow::{Result, anyhow};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Cursor, Read};

/// Element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PthDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl PthDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            PthDtype::F64 | PthDtype::I64 => 8,
            PthDtype::F32 | PthDtype::I32 => 4,
            PthDtype::F16 | PthDtype::BF16 | PthDtype::I16 => 2,
            PthDtype::I8 | PthDtype::U8 | PthDtype::Bool => 1,
        }
    }

    /// Floating-point types (whose values are in [`PthTensor::data`] only).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            PthDtype::F32 | PthDtype::F16 | PthDtype::BF16 | PthDtype::F64
        )
    }

    /// The safetensors-style name: `F32`, `F16`, `BF16`, `F64`, `I64`, `I32`, `I16`, `I8`, `U8`,
    /// `BOOL`.
    pub fn name(self) -> &'static str {
        match self {
            PthDtype::F32 => "F32",
            PthDtype::F16 => "F16",
            PthDtype::BF16 => "BF16",
            PthDtype::F64 => "F64",
            PthDtype::I64 => "I64",
            PthDtype::I32 => "I32",
            PthDtype::I16 => "I16",
            PthDtype::I8 => "I8",
            PthDtype::U8 => "U8",
            PthDtype::Bool => "BOOL",
        }
    }

    fn from_storage_name(name: &str) -> Option<PthDtype> {
        Some(match name {
            "FloatStorage" => PthDtype::F32,
            "HalfStorage" => PthDtype::F16,
            "BFloat16Storage" => PthDtype::BF16,
            "DoubleStorage" => PthDtype::F64,
            "LongStorage" => PthDtype::I64,
            "IntStorage" => PthDtype::I32,
            "ShortStorage" => PthDtype::I16,
            "CharStorage" => PthDtype::I8,
            "ByteStorage" | "UntypedStorage" => PthDtype::U8,
            "BoolStorage" => PthDtype::Bool,
            _ => return None,
        })
    }
}

/// One tensor of the state_dict.
#[derive(Clone, Debug, PartialEq)]
pub struct PthTensor {
    /// Key in the state_dict, without the stripped prefix.
    pub name: String,
    /// Element type of its storage.
    pub dtype: PthDtype,
    /// Shape (empty for a 0-d tensor).
    pub shape: Vec<usize>,
    /// The values, row-major contiguous, converted to f32 (f64 rounded to nearest, integers as
    /// `as f32`, bool as 0/1).
    pub data: Vec<f32>,
    /// For integer and bool storages: the exact values (bool as 0/1); `None` for floats.
    pub raw_i64: Option<Vec<i64>>,
}

/// A state_dict read from a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct PthCheckpoint {
    /// The tensors, in the order of the state_dict.
    pub tensors: Vec<PthTensor>,
    /// Entries that are not tensors (state_dict entries by key, entries beside a nested
    /// state_dict by dotted path), in file order.
    pub skipped: Vec<String>,
    /// `"zip"` or `"legacy"`.
    pub format: &'static str,
    /// `Some("module.")` when that prefix was removed from every tensor name.
    pub prefix_stripped: Option<String>,
    /// Dotted path of the state_dict inside the top-level dict (`Some("model")`), `None` when
    /// the top-level dict is the state_dict.
    pub nested_under: Option<String>,
}

impl PthCheckpoint {
    /// The tensor named `name` (after prefix stripping).
    pub fn get(&self, name: &str) -> Option<&PthTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Reads the state_dict of a `torch.save` file held in `bytes`; `file` names it in errors.
pub fn read_pth(bytes: &[u8], file: &str) -> Result<PthCheckpoint> {
    read_inner(bytes).map_err(|e| {
        let msg = e.replace(['\n', '\r'], " ");
        anyhow!("{file}: {msg}")
    })
}

// ---------------------------------------------------------------------------------------------
// Limits

const MAX_OBJECTS: usize = 4 << 20;
const MAX_STACK: usize = 1 << 20;
const MAX_MARKS: usize = 4096;
const MAX_MEMO: usize = 4 << 20;
const MAX_RANK: usize = 64;
/// Values allowed beyond the file size (broadcast / overlapping views).
const EXTRA_VALUES: u64 = 16 << 20;
/// Inflated bytes allowed for deflated zip entries: this many times the file size, plus 64 MiB.
const INFLATE_RATIO: u64 = 32;
const INFLATE_EXTRA: u64 = 64 << 20;

type R<T> = std::result::Result<T, String>;

/// Shows a string from the file in a message: control characters escaped, at most 80 chars.
fn show(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 80 {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Pickle virtual machine

type Id = u32;
const NONE: Id = 0;
const TRUE: Id = 1;
const FALSE: Id = 2;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    OrderedDict,
    Storage(PthDtype),
}

#[derive(Debug)]
struct StorageRef {
    key: String,
    dtype: PthDtype,
    /// Legacy view into the root storage: (element offset, element count).
    view: Option<(u64, u64)>,
}

#[derive(Debug)]
struct TensorRef {
    storage: Id,
    offset: u64,
    shape: Vec<u64>,
    stride: Vec<u64>,
}

#[derive(Debug, Default)]
struct Dict {
    items: Vec<(Id, Id)>,
    index: HashMap<DictKey, usize>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
enum DictKey {
    Str(String),
    Int(i128),
}

#[derive(Debug)]
enum Obj {
    None,
    Bool(bool),
    Int(i128),
    BigInt,
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Box<Dict>),
    Global(Global),
    Storage(Box<StorageRef>),
    Tensor(Box<TensorRef>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) | Obj::BigInt => "int",
            Obj::Float => "float",
            Obj::Str(_) => "str",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Global(_) => "global",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the current opcode started (for messages).
    at: usize,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

/// The objects a pickle built, and its result.
struct Unpickled {
    objs: Vec<Obj>,
    root: Id,
    /// Byte just past the STOP opcode.
    end: usize,
}

fn unpickle(data: &[u8], start: usize, what: &str) -> R<Unpickled> {
    let mut vm = Vm {
        data,
        pos: start,
        at: start,
        objs: vec![Obj::None, Obj::Bool(true), Obj::Bool(false)],
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = vm.run().map_err(|e| format!("{what}: {e}"))?;
    Ok(Unpickled {
        objs: vm.objs,
        root,
        end: vm.pos,
    })
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let data = self.data;
        if n > data.len() - self.pos {
            return Err(format!(
                "truncated: opcode at byte {} needs {n} bytes, {} left",
                self.at,
                data.len() - self.pos
            ));
        }
        let s = &data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A length field: must fit in what is left of the data.
    fn len(&mut self, n: u64) -> R<usize> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "truncated: opcode at byte {} declares {n} bytes, {left} left",
                self.at
            ));
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> R<&'a [u8]> {
        let data = self.data;
        let rest = &data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None => Err(format!(
                "truncated: text opcode at byte {} has no end of line",
                self.at
            )),
        }
    }

    fn line_str(&mut self) -> R<String> {
        Ok(String::from_utf8_lossy(self.line()?).into_owned())
    }

    fn alloc(&mut self, o: Obj) -> R<Id> {
        if self.objs.len() >= MAX_OBJECTS {
            return Err(format!("more than {MAX_OBJECTS} objects"));
        }
        self.objs.push(o);
        Ok((self.objs.len() - 1) as Id)
    }

    fn push(&mut self, id: Id) -> R<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("stack deeper than {MAX_STACK}"));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, o: Obj) -> R<()> {
        let id = self.alloc(o)?;
        self.push(id)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> R<Id> {
        if self.stack.len() <= self.floor() {
            return Err(format!("stack underflow at byte {}", self.at));
        }
        Ok(self.stack.pop().unwrap())
    }

    fn top(&self) -> R<Id> {
        if self.stack.len() <= self.floor() {
            return Err(format!("stack underflow at byte {}", self.at));
        }
        Ok(*self.stack.last().unwrap())
    }

    fn pop_mark(&mut self) -> R<Vec<Id>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("no MARK for the opcode at byte {}", self.at))?;
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, key: u32) -> R<()> {
        let top = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(format!("memo larger than {MAX_MEMO} entries"));
        }
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> R<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo key {key} not set (byte {})", self.at))?;
        self.push(id)
    }

    fn int_of(&self, id: Id) -> Option<i128> {
        match self.objs[id as usize] {
            Obj::Int(v) => Some(v),
            Obj::Bool(b) => Some(b as i128),
            _ => None,
        }
    }

    fn str_of(&self, id: Id) -> Option<&str> {
        match &self.objs[id as usize] {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    fn kind(&self, id: Id) -> &'static str {
        self.objs[id as usize].kind()
    }

    fn dict_key(&self, id: Id) -> Option<DictKey> {
        match &self.objs[id as usize] {
            Obj::Str(s) => Some(DictKey::Str(s.clone())),
            Obj::Int(v) => Some(DictKey::Int(*v)),
            Obj::Bool(b) => Some(DictKey::Int(*b as i128)),
            _ => None,
        }
    }

    fn set_items(&mut self, dict: Id, items: &[Id]) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return Err(format!(
                "odd number of items for a dict at byte {}",
                self.at
            ));
        }
        let keys: Vec<Option<DictKey>> = items.chunks(2).map(|kv| self.dict_key(kv[0])).collect();
        let at = self.at;
        let kind = self.kind(dict);
        let Obj::Dict(d) = &mut self.objs[dict as usize] else {
            return Err(format!("SETITEM(S) on a {kind} at byte {at}"));
        };
        for (kv, key) in items.chunks(2).zip(keys) {
            match key {
                Some(k) => match d.index.get(&k) {
                    Some(&i) => d.items[i].1 = kv[1],
                    None => {
                        d.index.insert(k, d.items.len());
                        d.items.push((kv[0], kv[1]));
                    }
                },
                None => d.items.push((kv[0], kv[1])),
            }
        }
        Ok(())
    }

    fn append(&mut self, list: Id, items: Vec<Id>) -> R<()> {
        let at = self.at;
        let kind = self.kind(list);
        match &mut self.objs[list as usize] {
            Obj::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(format!("APPEND(S) on a {kind} at byte {at}")),
        }
    }

    fn global(&self, module: &str, name: &str) -> R<Global> {
        let g = match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor),
            ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
            ("torch._utils", "_rebuild_parameter_with_state") => {
                Some(Global::RebuildParameterWithState)
            }
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch" | "torch.cuda", n) if n != "UntypedStorage" => {
                PthDtype::from_storage_name(n).map(Global::Storage)
            }
            ("torch" | "torch.storage", "UntypedStorage") => Some(Global::Storage(PthDtype::U8)),
            _ => None,
        };
        g.ok_or_else(|| {
            format!(
                "refuses pickle global '{}.{}' (a checkpoint needs only tensors)",
                show(module),
                show(name)
            )
        })
    }

    fn run(&mut self) -> R<Id> {
        loop {
            self.at = self.pos;
            if self.pos == self.data.len() {
                return Err(format!(
                    "truncated: the pickle ends at byte {} without its STOP opcode",
                    self.pos
                ));
            }
            let op = self.u8()?;
            match op {
                // PROTO
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(format!("unsupported pickle protocol {v}"));
                    }
                }
                // FRAME
                0x95 => {
                    let n = self.u64()?;
                    self.len(n)?;
                }
                // STOP
                b'.' => return self.pop(),
                // MARK
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(format!("more than {MAX_MARKS} nested MARKs"));
                    }
                    self.marks.push(self.stack.len());
                }
                // POP
                b'0' => {
                    if self.stack.len() > self.floor() {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                // POP_MARK
                b'1' => {
                    self.pop_mark()?;
                }
                // DUP
                b'2' => {
                    let t = self.top()?;
                    self.push(t)?;
                }
                b'N' => self.push(NONE)?,
                0x88 => self.push(TRUE)?,
                0x89 => self.push(FALSE)?,
                // INT (text; "01"/"00" are bools)
                b'I' => {
                    let l = self.line_str()?;
                    match l.as_str() {
                        "01" => self.push(TRUE)?,
                        "00" => self.push(FALSE)?,
                        s => {
                            let v = parse_int(s).ok_or_else(|| {
                                format!("bad INT {:?} at byte {}", show(s), self.at)
                            })?;
                            self.push_new(v)?
                        }
                    }
                }
                // LONG (text)
                b'L' => {
                    let l = self.line_str()?;
                    let s = l.strip_suffix('L').unwrap_or(&l);
                    let v = parse_int(s)
                        .ok_or_else(|| format!("bad LONG {:?} at byte {}", show(s), self.at))?;
                    self.push_new(v)?
                }
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push_new(Obj::Int(v as i128))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_new(Obj::Int(v as i128))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push_new(Obj::Int(v as i128))?
                }
                // LONG1, LONG4
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        let n = self.u32()? as i32;
                        if n < 0 {
                            return Err(format!("negative LONG4 length at byte {}", self.at));
                        }
                        n as u64
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?;
                    let v = if n <= 16 {
                        let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                            [0xFF; 16]
                        } else {
                            [0; 16]
                        };
                        buf[..n].copy_from_slice(b);
                        Obj::Int(i128::from_le_bytes(buf))
                    } else {
                        Obj::BigInt
                    };
                    self.push_new(v)?
                }
                // FLOAT (text), BINFLOAT
                b'F' => {
                    let l = self.line_str()?;
                    l.trim()
                        .parse::<f64>()
                        .map_err(|_| format!("bad FLOAT {:?} at byte {}", show(&l), self.at))?;
                    self.push_new(Obj::Float)?
                }
                b'G' => {
                    self.take(8)?;
                    self.push_new(Obj::Float)?
                }
                // STRING (text, quoted; escapes kept as written)
                b'S' => {
                    let l = self.line()?;
                    let inner = match l {
                        [q, mid @ .., e] if (*q == b'\'' || *q == b'"') && q == e => mid,
                        _ => return Err(format!("bad STRING at byte {}", self.at)),
                    };
                    let s = String::from_utf8_lossy(inner).into_owned();
                    self.push_new(Obj::Str(s))?
                }
                // UNICODE (text, raw-unicode-escape kept as written)
                b'V' => {
                    let s = self.line_str()?;
                    self.push_new(Obj::Str(s))?
                }
                // BINSTRING, SHORT_BINSTRING (Python 2 str: latin-1)
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        let n = self.u32()? as i32;
                        if n < 0 {
                            return Err(format!("negative BINSTRING length at byte {}", self.at));
                        }
                        n as u64
                    } else {
                        self.u8()? as u64
                    };
                    let n = self.len(n)?;
                    let s: String = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.push_new(Obj::Str(s))?
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.push_new(Obj::Str(s))?
                }
                // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8 (content not kept)
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    self.take(n)?;
                    self.push_new(Obj::Bytes)?
                }
                // EMPTY_TUPLE, TUPLE, TUPLE1..3
                b')' => self.push_new(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = vec![0; n];
                    for i in (0..n).rev() {
                        items[i] = self.pop()?;
                    }
                    self.push_new(Obj::Tuple(items))?
                }
                // EMPTY_LIST, LIST, APPEND, APPENDS; sets as lists
                b']' | 0x8f => self.push_new(Obj::List(Vec::new()))?,
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::List(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.append(l, vec![v])?
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.append(l, items)?
                }
                // EMPTY_DICT, DICT, SETITEM, SETITEMS
                b'}' => self.push_new(Obj::Dict(Box::default()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = self.alloc(Obj::Dict(Box::default()))?;
                    self.set_items(d, &items)?;
                    self.push(d)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, &[k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, &items)?
                }
                // PUT, BINPUT, LONG_BINPUT, MEMOIZE
                b'p' => {
                    let l = self.line_str()?;
                    let k = l
                        .parse::<u32>()
                        .map_err(|_| format!("bad PUT {:?} at byte {}", show(&l), self.at))?;
                    self.memo_put(k)?
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                // GET, BINGET, LONG_BINGET
                b'g' => {
                    let l = self.line_str()?;
                    let k = l
                        .parse::<u32>()
                        .map_err(|_| format!("bad GET {:?} at byte {}", show(&l), self.at))?;
                    self.memo_get(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                // GLOBAL, STACK_GLOBAL
                b'c' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let g = self.global(&module, &name)?;
                    self.push_new(Obj::Global(g))?
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    let (Some(module), Some(name)) = (self.str_of(m), self.str_of(n)) else {
                        return Err(format!(
                            "STACK_GLOBAL on a {} and a {} at byte {}",
                            self.kind(m),
                            self.kind(n),
                            self.at
                        ));
                    };
                    let g = self.global(module, name)?;
                    self.push_new(Obj::Global(g))?
                }
                // REDUCE
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let r = self.reduce(f, args)?;
                    self.push(r)?
                }
                // BUILD: instance state of an OrderedDict (its `_metadata`) or a tensor: ignored.
                b'b' => {
                    let _state = self.pop()?;
                    let t = self.top()?;
                    if !matches!(self.objs[t as usize], Obj::Dict(_) | Obj::Tensor(_)) {
                        return Err(format!(
                            "BUILD on a {} at byte {} (only dicts and tensors take state)",
                            self.kind(t),
                            self.at
                        ));
                    }
                }
                // BINPERSID
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent(pid)?;
                    self.push_new(Obj::Storage(Box::new(s)))?
                }
                _ => {
                    let name = match op {
                        b'P' => "PERSID",
                        0x81 => "NEWOBJ",
                        0x92 => "NEWOBJ_EX",
                        b'o' => "OBJ",
                        b'i' => "INST",
                        0x82..=0x84 => "EXT",
                        0x97 => "NEXT_BUFFER",
                        0x98 => "READONLY_BUFFER",
                        _ => "unknown",
                    };
                    return Err(format!(
                        "unsupported pickle opcode 0x{op:02x} ({name}) at byte {}",
                        self.at
                    ));
                }
            }
        }
    }

    fn seq(&self, id: Id) -> Option<&[Id]> {
        match &self.objs[id as usize] {
            Obj::Tuple(v) | Obj::List(v) => Some(v),
            _ => None,
        }
    }

    /// A tuple/list of non-negative ints (a shape or strides).
    fn dims(&self, id: Id, what: &str) -> R<Vec<u64>> {
        let items = self
            .seq(id)
            .ok_or_else(|| format!("tensor {what} is a {}, not a tuple", self.kind(id)))?;
        if items.len() > MAX_RANK {
            return Err(format!(
                "tensor {what} has {} dimensions (at most {MAX_RANK})",
                items.len()
            ));
        }
        items
            .iter()
            .map(|&i| match self.int_of(i) {
                Some(v) if (0..=i64::MAX as i128).contains(&v) => Ok(v as u64),
                Some(v) => Err(format!("tensor {what} holds {v}")),
                None => Err(format!("tensor {what} holds a {}", self.kind(i))),
            })
            .collect()
    }

    fn reduce(&mut self, f: Id, args: Id) -> R<Id> {
        let Obj::Global(g) = self.objs[f as usize] else {
            return Err(format!(
                "REDUCE calls a {} at byte {} (only allowed globals are callable)",
                self.kind(f),
                self.at
            ));
        };
        let Obj::Tuple(a) = &self.objs[args as usize] else {
            return Err(format!(
                "REDUCE arguments are a {} at byte {}",
                self.kind(args),
                self.at
            ));
        };
        let a = a.clone();
        let arity = |ok: &[usize]| -> R<()> {
            if ok.contains(&a.len()) {
                Ok(())
            } else {
                Err(format!(
                    "{g:?} called with {} arguments at byte {}",
                    a.len(),
                    self.at
                ))
            }
        };
        match g {
            Global::OrderedDict => {
                arity(&[0, 1])?;
                let d = self.alloc(Obj::Dict(Box::default()))?;
                if let Some(&init) = a.first() {
                    let pairs = self.seq(init).ok_or_else(|| {
                        format!("OrderedDict of a {} at byte {}", self.kind(init), self.at)
                    })?;
                    let mut items = Vec::with_capacity(pairs.len() * 2);
                    for &p in pairs {
                        match self.seq(p) {
                            Some([k, v]) => items.extend([*k, *v]),
                            _ => return Err(format!("OrderedDict item at byte {}", self.at)),
                        }
                    }
                    self.set_items(d, &items)?;
                }
                Ok(d)
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                if g == Global::RebuildTensor {
                    arity(&[4])?;
                } else {
                    arity(&[6, 7])?;
                }
                let storage = a[0];
                if !matches!(self.objs[storage as usize], Obj::Storage(_)) {
                    return Err(format!(
                        "tensor built on a {}, not a storage, at byte {}",
                        self.kind(storage),
                        self.at
                    ));
                }
                let offset = match self.int_of(a[1]) {
                    Some(v) if (0..=i64::MAX as i128).contains(&v) => v as u64,
                    _ => return Err(format!("bad tensor storage offset at byte {}", self.at)),
                };
                let shape = self.dims(a[2], "shape")?;
                let stride = self.dims(a[3], "strides")?;
                if shape.len() != stride.len() {
                    return Err(format!(
                        "tensor shape has {} dimensions but strides {} at byte {}",
                        shape.len(),
                        stride.len(),
                        self.at
                    ));
                }
                self.alloc(Obj::Tensor(Box::new(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                arity(if g == Global::RebuildParameter {
                    &[3]
                } else {
                    &[4]
                })?;
                if !matches!(self.objs[a[0] as usize], Obj::Tensor(_)) {
                    return Err(format!(
                        "parameter of a {} at byte {}",
                        self.kind(a[0]),
                        self.at
                    ));
                }
                Ok(a[0])
            }
            Global::Storage(_) => Err(format!(
                "REDUCE calls a storage type at byte {} (storages come from persistent ids)",
                self.at
            )),
        }
    }

    /// PyTorch's persistent id: ('storage', storage type, key, location, numel[, view]).
    fn persistent(&self, pid: Id) -> R<StorageRef> {
        let bad = |why: &str| format!("persistent id at byte {}: {why}", self.at);
        let items = match &self.objs[pid as usize] {
            Obj::Tuple(v) => v,
            o => return Err(bad(&format!("a {}, not a tuple", o.kind()))),
        };
        if !(5..=6).contains(&items.len()) {
            return Err(bad(&format!("{} fields", items.len())));
        }
        if self.str_of(items[0]) != Some("storage") {
            return Err(bad("not a storage"));
        }
        let Obj::Global(Global::Storage(dtype)) = self.objs[items[1] as usize] else {
            return Err(bad("no storage type"));
        };
        let key = match &self.objs[items[2] as usize] {
            Obj::Str(s) => s.clone(),
            Obj::Int(v) => v.to_string(),
            o => return Err(bad(&format!("key is a {}", o.kind()))),
        };
        match self.int_of(items[4]) {
            Some(n) if n >= 0 => {}
            _ => return Err(bad("bad element count")),
        }
        let view = match items.get(5).map(|&v| &self.objs[v as usize]) {
            None | Some(Obj::None) => None,
            Some(Obj::Tuple(v)) if v.len() == 3 => {
                let (o, n) = (self.int_of(v[1]), self.int_of(v[2]));
                match (o, n) {
                    (Some(o), Some(n))
                        if (0..=i64::MAX as i128).contains(&o)
                            && (0..=i64::MAX as i128).contains(&n) =>
                    {
                        Some((o as u64, n as u64))
                    }
                    _ => return Err(bad("bad storage view")),
                }
            }
            Some(o) => return Err(bad(&format!("storage view is a {}", o.kind()))),
        };
        Ok(StorageRef { key, dtype, view })
    }
}

fn parse_int(s: &str) -> Option<Obj> {
    let t = s.trim();
    let digits = t.strip_prefix('-').unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match t.parse::<i128>() {
        Ok(v) => Obj::Int(v),
        Err(_) => Obj::BigInt,
    })
}

// ---------------------------------------------------------------------------------------------
// Finding the state_dict

const PREFERRED: &[&str] = &[
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "params",
    "weights",
];

fn key_name(objs: &[Obj], k: Id) -> String {
    match &objs[k as usize] {
        Obj::Str(s) => s.clone(),
        Obj::Int(v) => v.to_string(),
        Obj::Bool(b) => if *b { "True" } else { "False" }.into(),
        o => format!("<{} key>", o.kind()),
    }
}

fn dict_of(objs: &[Obj], id: Id) -> Option<&Dict> {
    match &objs[id as usize] {
        Obj::Dict(d) => Some(d),
        _ => None,
    }
}

fn n_tensors(objs: &[Obj], d: &Dict) -> usize {
    d.items
        .iter()
        .filter(|(_, v)| matches!(objs[*v as usize], Obj::Tensor(_)))
        .count()
}

struct Found {
    dict: Id,
    path: Vec<String>,
    skipped: Vec<String>,
}

fn find_state_dict(objs: &[Obj], root: Id) -> R<Found> {
    let Some(d) = dict_of(objs, root) else {
        return Err(format!(
            "the pickle's top-level object is of type {}, not a dict of tensors (a state_dict)",
            objs[root as usize].kind()
        ));
    };
    if n_tensors(objs, d) > 0 {
        return Ok(Found {
            dict: root,
            path: Vec::new(),
            skipped: Vec::new(),
        });
    }
    // Level by level: each dict with its path of (key, dict id) from the root.
    let mut level: Vec<(Id, Vec<(String, Id)>)> = vec![(root, Vec::new())];
    let mut seen = std::collections::HashSet::from([root]);
    for _depth in 0..3 {
        let mut next = Vec::new();
        for (id, path) in &level {
            let d = dict_of(objs, *id).unwrap();
            for &(k, v) in &d.items {
                if dict_of(objs, v).is_some() && seen.insert(v) {
                    let mut p = path.clone();
                    p.push((key_name(objs, k), v));
                    next.push((v, p));
                }
            }
        }
        let best = next
            .iter()
            .filter_map(|(id, p)| {
                let n = n_tensors(objs, dict_of(objs, *id).unwrap());
                let last = &p.last().unwrap().0;
                let rank = PREFERRED
                    .iter()
                    .position(|&k| *last == k)
                    .unwrap_or(PREFERRED.len());
                (n > 0).then_some((rank, std::cmp::Reverse(n), *id, p))
            })
            .min_by_key(|c| (c.0, c.1));
        if let Some((_, _, id, path)) = best {
            // Everything beside the path, as dotted paths.
            let mut skipped = Vec::new();
            let mut cur = root;
            for (i, (_, into)) in path.iter().enumerate() {
                let prefix: Vec<&str> = path[..i].iter().map(|(k, _)| k.as_str()).collect();
                let prefix = prefix.join(".");
                for &(k, v) in &dict_of(objs, cur).unwrap().items {
                    if v == *into {
                        continue;
                    }
                    let name = key_name(objs, k);
                    skipped.push(if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}.{name}")
                    });
                }
                cur = *into;
            }
            return Ok(Found {
                dict: id,
                path: path.iter().map(|(k, _)| k.clone()).collect(),
                skipped,
            });
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    Err("holds no dict of tensors (no state_dict at the top or nested up to 3 levels)".into())
}

// ---------------------------------------------------------------------------------------------
// Containers

/// Where storage bytes come from.
enum Source<'a> {
    Zip {
        archive: zip::ZipArchive<Cursor<&'a [u8]>>,
        prefix: String,
        inflate_budget: u64,
    },
    /// Root key -> (dtype, element count, bytes).
    Legacy(HashMap<String, (PthDtype, u64, &'a [u8])>),
}

fn zip_err(e: zip::result::ZipError) -> String {
    format!("bad zip archive: {e}")
}

/// Reads a whole zip entry, checking its declared size against what it holds.
fn read_entry(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    index: usize,
    name: &str,
    file_len: u64,
    inflate_budget: &mut u64,
) -> R<Vec<u8>> {
    let f = archive
        .by_index(index)
        .map_err(|e| format!("entry '{}': {e}", show(name)))?;
    let declared = f.size();
    let stored = f.compression() == zip::CompressionMethod::Stored;
    if stored {
        if declared > file_len {
            return Err(format!(
                "entry '{}' declares {declared} bytes, more than the whole {file_len}-byte file",
                show(name)
            ));
        }
        if declared != f.compressed_size() {
            return Err(format!(
                "entry '{}' declares {declared} bytes but stores {} (uncompressed)",
                show(name),
                f.compressed_size()
            ));
        }
    } else {
        if declared > *inflate_budget {
            return Err(format!(
                "entry '{}' declares {declared} bytes inflated, more than this file may hold",
                show(name)
            ));
        }
        *inflate_budget -= declared;
    }
    let mut v = Vec::with_capacity(declared.min(file_len) as usize);
    f.take(declared + 1)
        .read_to_end(&mut v)
        .map_err(|e| format!("entry '{}': {e}", show(name)))?;
    if v.len() as u64 != declared {
        return Err(format!(
            "entry '{}' declares {declared} bytes but holds {}",
            show(name),
            v.len()
        ));
    }
    Ok(v)
}

fn open_zip(bytes: &[u8]) -> R<(Unpickled, Source<'_>)> {
    let file_len = bytes.len() as u64;
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(zip_err)?;
    let mut best: Option<(usize, String)> = None;
    for i in 0..archive.len() {
        let Some(Ok(name)) = archive.name_for_index(i) else {
            continue;
        };
        if (name == "data.pkl" || name.ends_with("/data.pkl"))
            && best.as_ref().is_none_or(|(_, b)| name.len() < b.len())
        {
            best = Some((i, name.into_owned()));
        }
    }
    let (index, name) =
        best.ok_or("zip archive without a data.pkl entry (not a torch.save file)")?;
    let prefix = name[..name.len() - "data.pkl".len()].to_string();
    let mut inflate_budget = file_len
        .saturating_mul(INFLATE_RATIO)
        .saturating_add(INFLATE_EXTRA);
    if let Some(i) = archive.index_for_name(&format!("{prefix}byteorder")) {
        let b = read_entry(
            &mut archive,
            i,
            &format!("{prefix}byteorder"),
            file_len,
            &mut inflate_budget,
        )?;
        if b.trim_ascii() != b"little" {
            return Err(format!(
                "byte order {:?} is not supported (only little-endian)",
                show(&String::from_utf8_lossy(&b))
            ));
        }
    }
    let pkl = read_entry(&mut archive, index, &name, file_len, &mut inflate_budget)?;
    let u = unpickle(&pkl, 0, &format!("pickle '{}'", show(&name)))?;
    Ok((
        u,
        Source::Zip {
            archive,
            prefix,
            inflate_budget,
        },
    ))
}

const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;

fn open_legacy(bytes: &[u8]) -> R<(Unpickled, Source<'_>)> {
    let magic = unpickle(bytes, 0, "magic number pickle")?;
    if !matches!(magic.objs[magic.root as usize], Obj::Int(LEGACY_MAGIC)) {
        return Err(
            "a pickle stream without PyTorch's magic number (not a torch.save file)".into(),
        );
    }
    let proto = unpickle(bytes, magic.end, "protocol version pickle")?;
    match proto.objs[proto.root as usize] {
        Obj::Int(1001) => {}
        Obj::Int(v) => return Err(format!("legacy protocol version {v} (expected 1001)")),
        ref o => return Err(format!("legacy protocol version is a {}", o.kind())),
    }
    let info = unpickle(bytes, proto.end, "sys info pickle")?;
    if let Some(d) = dict_of(&info.objs, info.root) {
        for &(k, v) in &d.items {
            if key_name(&info.objs, k) == "little_endian"
                && matches!(info.objs[v as usize], Obj::Bool(false))
            {
                return Err("big-endian legacy checkpoint is not supported".into());
            }
        }
    }
    let main = unpickle(bytes, info.end, "main pickle")?;
    let keys = unpickle(bytes, main.end, "storage key list pickle")?;
    let key_ids = match &keys.objs[keys.root as usize] {
        Obj::List(v) | Obj::Tuple(v) => v.clone(),
        o => return Err(format!("storage key list is a {}", o.kind())),
    };
    // The dtype of each root key, from the persistent ids.
    let mut dtypes: HashMap<&str, PthDtype> = HashMap::new();
    for o in &main.objs {
        if let Obj::Storage(s) = o
            && *dtypes.entry(&s.key).or_insert(s.dtype) != s.dtype
        {
            return Err(format!(
                "storage '{}' referenced with two element types",
                show(&s.key)
            ));
        }
    }
    let mut map = HashMap::new();
    let mut pos = keys.end;
    for k in key_ids {
        let key = match &keys.objs[k as usize] {
            Obj::Str(s) => s.clone(),
            Obj::Int(v) => v.to_string(),
            o => return Err(format!("storage key is a {}", o.kind())),
        };
        let Some(&dtype) = dtypes.get(key.as_str()) else {
            return Err(format!(
                "storage '{}' in the key list is not referenced by the pickle",
                show(&key)
            ));
        };
        let count = bytes
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| {
                format!(
                    "truncated: storage '{}' has no size at byte {pos}",
                    show(&key)
                )
            })?;
        pos += 8;
        let left = (bytes.len() - pos) as u64;
        let need = count
            .checked_mul(dtype.size() as u64)
            .filter(|&n| n <= left);
        let Some(need) = need else {
            return Err(format!(
                "truncated: storage '{}' declares {count} {} elements, {left} bytes left",
                show(&key),
                dtype.name()
            ));
        };
        let data = &bytes[pos..pos + need as usize];
        pos += need as usize;
        if map.insert(key.clone(), (dtype, count, data)).is_some() {
            return Err(format!("storage '{}' listed twice", show(&key)));
        }
    }
    Ok((main, Source::Legacy(map)))
}

// ---------------------------------------------------------------------------------------------
// Reading

fn read_inner(bytes: &[u8]) -> R<PthCheckpoint> {
    if bytes.is_empty() {
        return Err("empty file (not a PyTorch checkpoint)".into());
    }
    let (u, mut source, format) = if bytes.starts_with(b"PK\x03\x04")
        || bytes.starts_with(b"PK\x05\x06")
    {
        let (u, s) = open_zip(bytes)?;
        (u, s, "zip")
    } else if bytes[0] == 0x80 {
        let (u, s) = open_legacy(bytes)?;
        (u, s, "legacy")
    } else if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
        return Err(
            "tar checkpoint (PyTorch before 0.4) is not supported; re-save it with torch.save"
                .into(),
        );
    } else {
        return Err("not a PyTorch checkpoint (neither a zip archive nor a pickle stream)".into());
    };
    let objs = &u.objs;
    let found = find_state_dict(objs, u.root)?;
    let d = dict_of(objs, found.dict).unwrap();
    let mut skipped = found.skipped;
    // (name, tensor) in file order.
    let mut entries: Vec<(String, &TensorRef)> = Vec::new();
    for &(k, v) in &d.items {
        let name = key_name(objs, k);
        match (&objs[k as usize], &objs[v as usize]) {
            (Obj::Str(_), Obj::Tensor(t)) => entries.push((name, t)),
            _ => skipped.push(name),
        }
    }
    // Shapes and the value budget before reading any storage.
    let budget = bytes.len() as u64 + EXTRA_VALUES;
    let mut total: u64 = 0;
    let mut numels = Vec::with_capacity(entries.len());
    for (name, t) in &entries {
        let n = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                format!(
                    "tensor '{}': shape {:?} has more elements than fit in 64 bits",
                    show(name),
                    t.shape
                )
            })?;
        total = total.saturating_add(n);
        if total > budget {
            return Err(format!(
                "tensor '{}': the tensors declare more values ({total} so far) than a {}-byte file can hold",
                show(name),
                bytes.len()
            ));
        }
        numels.push(n as usize);
    }
    // Read each storage once, materialising every tensor on it.
    let storage_of = |t: &TensorRef| -> &StorageRef {
        match &objs[t.storage as usize] {
            Obj::Storage(s) => s,
            _ => unreachable!("checked at REDUCE"),
        }
    };
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| {
        let s = storage_of(entries[i].1);
        (&s.key, s.view)
    });
    let mut out: Vec<Option<PthTensor>> = vec![None; entries.len()];
    type Loaded<'a> = ((String, Option<(u64, u64)>), Cow<'a, [u8]>);
    let mut loaded: Option<Loaded> = None;
    for i in order {
        let (name, t) = &entries[i];
        let s = storage_of(t);
        if loaded
            .as_ref()
            .is_none_or(|((k, v), _)| *k != s.key || *v != s.view)
        {
            // The previous storage is dropped before the next is read.
            drop(loaded.take());
            let data = load_storage(&mut source, s, bytes.len() as u64)?;
            loaded = Some(((s.key.clone(), s.view), data));
        }
        let data = &loaded.as_ref().unwrap().1;
        out[i] = Some(materialise(name, t, s, data, numels[i])?);
    }
    drop(loaded);
    let mut tensors: Vec<PthTensor> = out.into_iter().map(Option::unwrap).collect();
    let prefix_stripped =
        if !tensors.is_empty() && tensors.iter().all(|t| t.name.starts_with("module.")) {
            for t in &mut tensors {
                t.name.drain(.."module.".len());
            }
            Some("module.".to_string())
        } else {
            None
        };
    Ok(PthCheckpoint {
        tensors,
        skipped,
        format,
        prefix_stripped,
        nested_under: (!found.path.is_empty()).then(|| found.path.join(".")),
    })
}

/// The bytes of the storage `s` refers to (for a legacy view, only the viewed part).
fn load_storage<'a>(source: &mut Source<'a>, s: &StorageRef, file_len: u64) -> R<Cow<'a, [u8]>> {
    match source {
        Source::Zip {
            archive,
            prefix,
            inflate_budget,
        } => {
            let name = format!("{prefix}data/{}", s.key);
            let i = archive.index_for_name(&name).ok_or_else(|| {
                format!("storage '{}' has no entry '{}'", show(&s.key), show(&name))
            })?;
            let v = read_entry(archive, i, &name, file_len, inflate_budget)?;
            Ok(Cow::Owned(v))
        }
        Source::Legacy(map) => {
            let &(dtype, count, data) = map
                .get(&s.key)
                .ok_or_else(|| format!("storage '{}' is not in the key list", show(&s.key)))?;
            if dtype != s.dtype {
                return Err(format!(
                    "storage '{}' referenced with two element types",
                    show(&s.key)
                ));
            }
            match s.view {
                None => Ok(Cow::Borrowed(data)),
                Some((off, n)) => {
                    let end = off.checked_add(n).filter(|&e| e <= count).ok_or_else(|| {
                        format!(
                            "storage view [{off}, +{n}) of '{}' exceeds its {count} elements",
                            show(&s.key)
                        )
                    })?;
                    let es = dtype.size();
                    Ok(Cow::Borrowed(&data[off as usize * es..end as usize * es]))
                }
            }
        }
    }
}

fn materialise(
    name: &str,
    t: &TensorRef,
    s: &StorageRef,
    data: &[u8],
    numel: usize,
) -> R<PthTensor> {
    let dtype = s.dtype;
    let es = dtype.size();
    let avail = (data.len() / es) as u64;
    let shape = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| {
            format!(
                "tensor '{}': shape {:?} does not fit in memory",
                show(name),
                t.shape
            )
        })?;
    if numel > 0 {
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |a, (&d, &st)| {
                (d - 1).checked_mul(st).and_then(|x| x.checked_add(a))
            });
        if last.is_none_or(|l| l >= avail) {
            return Err(format!(
                "tensor '{}': shape {:?}, strides {:?}, offset {} reach past storage '{}' ({avail} {} elements)",
                show(name),
                t.shape,
                t.stride,
                t.offset,
                show(&s.key),
                dtype.name()
            ));
        }
    }
    let at = |i: usize| &data[i * es..i * es + es];
    let (values, ints): (Vec<f32>, Option<Vec<i64>>) = match dtype {
        PthDtype::F32 => (
            gather(t, numel, |i| f32::from_le_bytes(at(i).try_into().unwrap())),
            None,
        ),
        PthDtype::F16 => (
            gather(t, numel, |i| {
                half::f16::from_le_bytes(at(i).try_into().unwrap()).to_f32()
            }),
            None,
        ),
        PthDtype::BF16 => (
            gather(t, numel, |i| {
                half::bf16::from_le_bytes(at(i).try_into().unwrap()).to_f32()
            }),
            None,
        ),
        PthDtype::F64 => (
            gather(t, numel, |i| {
                f64::from_le_bytes(at(i).try_into().unwrap()) as f32
            }),
            None,
        ),
        _ => {
            let ints: Vec<i64> = gather(t, numel, |i| {
                let b = at(i);
                match dtype {
                    PthDtype::I64 => i64::from_le_bytes(b.try_into().unwrap()),
                    PthDtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i64,
                    PthDtype::I16 => i16::from_le_bytes(b.try_into().unwrap()) as i64,
                    PthDtype::I8 => b[0] as i8 as i64,
                    PthDtype::U8 => b[0] as i64,
                    _ => (b[0] != 0) as i64,
                }
            });
            (ints.iter().map(|&v| v as f32).collect(), Some(ints))
        }
    };
    Ok(PthTensor {
        name: name.to_string(),
        dtype,
        shape,
        data: values,
        raw_i64: ints,
    })
}

/// `f` of each storage element index of `t`, in row-major order (the extent was checked).
fn gather<T>(t: &TensorRef, numel: usize, mut f: impl FnMut(usize) -> T) -> Vec<T> {
    let mut out = Vec::with_capacity(numel);
    let rank = t.shape.len();
    let mut contiguous = true;
    let mut expect = 1u64;
    for k in (0..rank).rev() {
        if t.shape[k] != 1 && t.stride[k] != expect {
            contiguous = false;
        }
        expect = expect.saturating_mul(t.shape[k]);
    }
    if contiguous {
        let start = t.offset as usize;
        out.extend((start..start + numel).map(f));
        return out;
    }
    // Odometer over the index; wrapping arithmetic since a size-1 dimension may carry any stride
    // (the net offset is always back in range).
    let mut pos = vec![0u64; rank];
    let mut cur = t.offset;
    for _ in 0..numel {
        out.push(f(cur as usize));
        for k in (0..rank).rev() {
            pos[k] += 1;
            cur = cur.wrapping_add(t.stride[k]);
            if pos[k] < t.shape[k] {
                break;
            }
            cur = cur.wrapping_sub(t.stride[k].wrapping_mul(t.shape[k]));
            pos[k] = 0;
        }
    }
    out
}
