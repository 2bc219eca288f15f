//! Buffer pool. Intermediate tensors take storage buffers from size classes (≤ 12.5 % waste) and give
//! them back when dropped, so a forward pass reuses memory instead of allocating. Recording order
//! makes reuse safe: a buffer freed after its last use in a recording is only written by commands
//! recorded later, which the GPU executes later. A buffer freed by one thread stays private to that
//! thread until its recording is submitted, so a recording of another thread that is submitted
//! first can never have its tensor clobbered by the older, still unsubmitted commands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Memory accounting, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolStats {
    /// Bytes held by live tensors (weights and activations).
    pub in_use: u64,
    /// Highest `in_use` since the last reset.
    pub peak_in_use: u64,
    /// Bytes allocated from the device (in use + cached free buffers).
    pub allocated: u64,
    /// Highest `allocated` since the last reset.
    pub peak_allocated: u64,
    pub buffers_created: u64,
}

#[derive(Default)]
pub(crate) struct Pool {
    /// Free buffers any recording may take (their last users have been submitted).
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    /// Buffers freed by a thread since its last submission: reusable by that thread only.
    pending: HashMap<std::thread::ThreadId, HashMap<u64, Vec<wgpu::Buffer>>>,
    stats: PoolStats,
    /// Highest `in_use` since the last [`Pool::take_window_peak`] (memory marks of a recording).
    window_peak: u64,
}

/// A request with no free buffer of its size class takes a free buffer of up to 1.5 times its
/// class before allocating a new one (measured on the paper preset's 1024² batch 4 training
/// step: at most 2 times allocates 8.6 GiB, at most 1.5 times 8.6 GiB with less held in larger
/// buffers, at most 1.25 times 8.8 GiB, exact classes only 9.3 GiB).
fn reuse_limit(class: u64) -> u64 {
    class.saturating_mul(3) / 2
}

pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(16);
    let p = bytes.next_power_of_two();
    let step = (p / 16).max(256);
    bytes.div_ceil(step) * step
}

impl Pool {
    pub fn stats(&self) -> PoolStats {
        self.stats
    }
    pub fn reset_peak(&mut self) {
        self.stats.peak_in_use = self.stats.in_use;
        self.stats.peak_allocated = self.stats.allocated;
    }
    /// The highest `in_use` since the previous call (or since the pool was made), and restarts
    /// the window at the current `in_use`.
    pub fn take_window_peak(&mut self) -> u64 {
        let p = self.window_peak.max(self.stats.in_use);
        self.window_peak = self.stats.in_use;
        p
    }
    /// Called when `thread` submits: what it freed becomes available to everyone.
    pub fn release_pending(&mut self, thread: std::thread::ThreadId) {
        if let Some(p) = self.pending.remove(&thread) {
            for (class, mut bufs) in p {
                self.free.entry(class).or_default().append(&mut bufs);
            }
        }
    }
    /// Releases every cached free buffer, those freed since a thread's last submission too (a
    /// recording dropped without being submitted leaves its buffers there).
    pub fn trim(&mut self) {
        let pending = self.pending.drain().flat_map(|(_, m)| m);
        for (class, bufs) in self.free.drain().chain(pending).collect::<Vec<_>>() {
            // Dropping (not destroying) lets wgpu free a buffer once no work that uses it is left.
            self.stats.allocated -= class * bufs.len() as u64;
            drop(bufs);
        }
    }
    /// A free buffer of exactly `class`: this thread's own released ones first.
    fn take_free(&mut self, t: std::thread::ThreadId, class: u64) -> Option<wgpu::Buffer> {
        let own = self
            .pending
            .get_mut(&t)
            .and_then(|m| m.get_mut(&class))
            .and_then(|v| v.pop());
        own.or_else(|| self.free.get_mut(&class).and_then(|v| v.pop()))
    }
    /// The smallest class above `class` (up to [`reuse_limit`]) with a free buffer
    /// this thread may take.
    fn smallest_free_above(&self, t: std::thread::ThreadId, class: u64) -> Option<u64> {
        let max = reuse_limit(class);
        let own = self.pending.get(&t);
        own.into_iter()
            .chain([&self.free])
            .flat_map(|m| m.iter())
            .filter(|(c, v)| **c > class && **c <= max && !v.is_empty())
            .map(|(c, _)| *c)
            .min()
    }
    fn note_use(&mut self, bytes: u64) {
        self.stats.in_use += bytes;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        self.window_peak = self.window_peak.max(self.stats.in_use);
    }
    fn note_alloc(&mut self, bytes: u64) {
        self.stats.allocated += bytes;
        self.stats.buffers_created += 1;
        self.stats.peak_allocated = self.stats.peak_allocated.max(self.stats.allocated);
    }
}

/// A storage buffer owned by one tensor; returns to the pool on drop.
pub(crate) struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    class: u64,
    pooled: bool,
    pool: Weak<Mutex<Pool>>,
}

impl PooledBuffer {
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().unwrap()
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let Some(buf) = self.buffer.take() else {
            return;
        };
        match self.pool.upgrade() {
            Some(pool) => {
                let mut p = pool.lock().unwrap();
                p.stats.in_use -= self.class;
                if self.pooled {
                    let t = std::thread::current().id();
                    p.pending
                        .entry(t)
                        .or_default()
                        .entry(self.class)
                        .or_default()
                        .push(buf);
                } else {
                    // Not destroyed: recorded commands may still use it; wgpu frees it after them.
                    p.stats.allocated -= self.class;
                    drop(buf);
                }
            }
            None => drop(buf),
        }
    }
}

pub(crate) const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A pooled buffer of at least `bytes` bytes (contents undefined).
pub(crate) fn acquire(device: &wgpu::Device, pool: &Arc<Mutex<Pool>>, bytes: u64) -> PooledBuffer {
    let want = size_class(bytes);
    let mut p = pool.lock().unwrap();
    let t = std::thread::current().id();
    let mut class = want;
    let mut found = p.take_free(t, want);
    if found.is_none() {
        // No buffer of this class: the smallest free one up to 1.5 times as large,
        // rather than a new allocation while memory sits idle in other classes.
        let larger = p.smallest_free_above(t, want);
        if let Some(c) = larger {
            class = c;
            found = p.take_free(t, c);
        }
    }
    let buf = match found {
        Some(b) => b,
        None => {
            p.note_alloc(class);
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("pooled"),
                size: class,
                usage: STORAGE_USAGE,
                mapped_at_creation: false,
            })
        }
    };
    p.note_use(class);
    PooledBuffer {
        buffer: Some(buf),
        class,
        pooled: true,
        pool: Arc::downgrade(pool),
    }
}

/// A dedicated buffer initialised with `data` (weights, inputs); released on drop, never reused,
/// so no recorded command can observe a later upload into it. Fails (instead of panicking) when
/// the device cannot map the new buffer, which happens once the device is lost.
pub(crate) fn create_init(
    device: &wgpu::Device,
    pool: &Arc<Mutex<Pool>>,
    data: &[u8],
) -> Result<PooledBuffer, wgpu::MapRangeError> {
    let class = size_class(data.len() as u64);
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("data"),
        size: class,
        usage: STORAGE_USAGE,
        mapped_at_creation: true,
    });
    {
        let mut view = buf.slice(..).get_mapped_range_mut()?;
        view.slice(..data.len()).copy_from_slice(data);
    }
    buf.unmap();
    let mut p = pool.lock().unwrap();
    p.note_alloc(class);
    p.note_use(class);
    Ok(PooledBuffer {
        buffer: Some(buf),
        class,
        pooled: false,
        pool: Arc::downgrade(pool),
    })
}

#[cfg(test)]
mod tests {
    use super::size_class;
    #[test]
    fn size_classes_waste_little() {
        for n in [
            1u64,
            15,
            16,
            17,
            255,
            256,
            1000,
            4096,
            4097,
            1 << 20,
            (1 << 20) + 1,
            67_108_864,
        ] {
            let c = size_class(n);
            assert!(c >= n, "{n} -> {c}");
            assert!(c.is_multiple_of(16));
            if n > 4096 {
                assert!((c - n) as f64 <= n as f64 * 0.125 + 1.0, "{n} -> {c}");
            }
        }
    }
}
