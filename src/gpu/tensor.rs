//! A tensor is a shape and a storage buffer of 4-byte elements (f32, or u32 for packed pixels and
//! counters), or of 2-byte f16 elements packed two to a 32-bit word (weights uploaded at reduced
//! precision, which only the GEMM reads: see [`DType`]). Feature maps are channels-last
//! (B, H, W, C) = tokens (B, L, C), row-major.

use super::Gpu;
use super::pool::{self, PooledBuffer};
use crate::error::{Error, Result};
use std::sync::Arc;

/// How a tensor's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 4 bytes per element: f32 (or u32 where a kernel says so).
    F32,
    /// IEEE binary16, element `i` in the low (even `i`) or high (odd `i`) half of word `i / 2`,
    /// as WGSL's `unpack2x16float` reads it. Only the GEMM's B operand (a weight) may be f16.
    F16,
}

/// The first finite value of `data` beyond f16's range (±65504), with its index.
pub fn beyond_f16(data: &[f32]) -> Option<(usize, f32)> {
    data.iter()
        .copied()
        .enumerate()
        .find(|(_, v)| v.is_finite() && v.abs() > 65504.0)
}

impl DType {
    /// Bytes a tensor of `n` elements occupies (at least one 4-byte word).
    pub fn bytes(self, n: usize) -> u64 {
        match self {
            DType::F32 => (n.max(1) * 4) as u64,
            DType::F16 => (n.div_ceil(2).max(1) * 4) as u64,
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub(crate) buf: Arc<PooledBuffer>,
    /// Byte offset of this tensor inside its buffer (views such as one image of a batch).
    pub(crate) offset: u64,
    pub(crate) dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dtype {
            DType::F32 => write!(f, "Tensor{:?}", self.shape),
            DType::F16 => write!(f, "Tensor{:?}<f16>", self.shape),
        }
    }
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(self.numel())
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buf.buffer()
    }
    /// The same storage seen with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            self.numel(),
            "reshape {:?} -> {:?}",
            self.shape,
            shape
        );
        Tensor {
            shape: shape.to_vec(),
            buf: self.buf.clone(),
            offset: self.offset,
            dtype: self.dtype,
        }
    }

    /// Byte offset inside the underlying buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// A view of rows `[start, start + len)` of the first axis (no copy). The byte offset must be a
    /// multiple of the device's storage offset alignment (256 on every adapter we know) for the view
    /// to be bound; `Recorder::dispatch` checks this.
    pub fn narrow(&self, start: usize, len: usize) -> Tensor {
        assert!(
            start + len <= self.shape[0],
            "narrow {start}+{len} of {:?}",
            self.shape
        );
        let per: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = len;
        let skip = match self.dtype {
            DType::F32 => start * per * 4,
            DType::F16 => {
                assert!(
                    (start * per).is_multiple_of(2),
                    "narrow of f16 {:?} at an odd element",
                    self.shape
                );
                start * per * 2
            }
        };
        Tensor {
            shape,
            buf: self.buf.clone(),
            offset: self.offset + skip as u64,
            dtype: self.dtype,
        }
    }
    /// Size of dimension `i`, negative indices from the end.
    pub fn dim(&self, i: isize) -> usize {
        let n = self.shape.len() as isize;
        self.shape[if i < 0 { (n + i) as usize } else { i as usize }]
    }
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }
}

impl Gpu {
    fn check_alloc(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.limits.max_buffer_size {
            return Err(Error::Limit {
                what: what.to_string(),
                needed: bytes,
                limit_name: "max_buffer_size",
                limit: self.limits.max_buffer_size,
                hint: "use a smaller image size or batch".into(),
            });
        }
        Ok(())
    }

    /// An uninitialised pooled tensor (every kernel writing it must cover all elements).
    // wgpu's buffers are not Send/Sync on wasm32 (one thread there); the Arc only shares them.
    #[cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]
    pub fn empty(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = (n.max(1) * 4) as u64;
        self.check_alloc(&format!("tensor {shape:?}"), bytes)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            buf: Arc::new(pool::acquire(&self.device, &self.pool, bytes)),
            offset: 0,
            dtype: DType::F32,
        })
    }

    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes(bytemuck::cast_slice(data), data.len(), shape)
    }

    pub fn upload_u32(&self, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes(bytemuck::cast_slice(data), data.len(), shape)
    }

    /// Uploads `data` rounded to f16 (to nearest, ties to even), two elements per 32-bit word
    /// ([`DType::F16`]). Values beyond f16's range (±65504) are refused rather than turned into
    /// infinities.
    pub fn upload_f16(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        if let Some((i, v)) = beyond_f16(data) {
            return Err(Error::Invalid(format!(
                "upload of {shape:?} as f16: element {i} = {v} is outside f16's range (±65504)"
            )));
        }
        let words: Vec<u32> = data
            .chunks(2)
            .map(|p| {
                let lo = half::f16::from_f32(p[0]).to_bits() as u32;
                let hi = p
                    .get(1)
                    .map_or(0, |v| half::f16::from_f32(*v).to_bits() as u32);
                lo | (hi << 16)
            })
            .collect();
        let want: usize = shape.iter().product();
        if want != data.len() {
            return Err(Error::Invalid(format!(
                "upload: {} values for shape {shape:?}",
                data.len()
            )));
        }
        let mut t = self.upload_bytes(bytemuck::cast_slice(&words), words.len(), &[words.len()])?;
        t.shape = shape.to_vec();
        t.dtype = DType::F16;
        Ok(t)
    }

    #[cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]
    fn upload_bytes(&self, bytes: &[u8], n: usize, shape: &[usize]) -> Result<Tensor> {
        let want: usize = shape.iter().product();
        if want != n {
            return Err(Error::Invalid(format!(
                "upload: {n} values for shape {shape:?}"
            )));
        }
        self.check_alloc(&format!("tensor {shape:?}"), bytes.len() as u64)?;
        let data: std::borrow::Cow<[u8]> = if bytes.is_empty() {
            vec![0u8; 4].into()
        } else {
            bytes.into()
        };
        let buf = pool::create_init(&self.device, &self.pool, &data).map_err(|e| {
            // A buffer that cannot be mapped at creation follows an earlier error (usually a lost
            // device, whose callback runs on the next poll): report that cause first.
            #[cfg(not(target_arch = "wasm32"))]
            let _ = self.device.poll(wgpu::PollType::Poll);
            self.take_errors().err().unwrap_or_else(|| {
                Error::Gpu(super::one_line(&format!("upload of {shape:?}: {e}")))
            })
        })?;
        Ok(Tensor {
            shape: shape.to_vec(),
            buf: Arc::new(buf),
            offset: 0,
            dtype: DType::F32,
        })
    }

    /// Copies a tensor back to the CPU as raw 4-byte words.
    pub async fn read_u32_async(&self, t: &Tensor) -> Result<Vec<u32>> {
        let bytes = t.bytes();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(t.buffer(), t.offset, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("poll: {e}")))?;
        let mapped = rx
            .await
            .map_err(|_| Error::Gpu("readback cancelled".into()))?;
        // A failed map is usually the consequence of an earlier error (an invalid pipeline or
        // bind group, a lost device): report that cause first.
        self.take_errors()?;
        mapped.map_err(|e| Error::Gpu(format!("readback map failed: {e}")))?;
        let out = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("readback view: {e}")))?;
            let mut v = bytemuck::cast_slice::<u8, u32>(&view).to_vec();
            v.truncate(match t.dtype {
                DType::F32 => t.numel(),
                DType::F16 => t.numel().div_ceil(2),
            });
            v
        };
        staging.unmap();
        staging.destroy();
        Ok(out)
    }

    /// Copies a tensor back to the CPU as f32 (an f16 tensor widened exactly).
    pub async fn read_async(&self, t: &Tensor) -> Result<Vec<f32>> {
        let words = self.read_u32_async(t).await?;
        Ok(match t.dtype {
            DType::F32 => words.into_iter().map(f32::from_bits).collect(),
            DType::F16 => (0..t.numel())
                .map(|i| half::f16::from_bits((words[i / 2] >> (16 * (i % 2))) as u16).to_f32())
                .collect(),
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        pollster::block_on(self.read_async(t))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        pollster::block_on(self.read_u32_async(t))
    }
}
