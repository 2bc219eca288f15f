// The page's compute worker: loads the wasm build of medfastsam, owns the WebGPU device, and runs
// every heavy step (reading and parsing weights, uploading them, compiling pipelines, decoding,
// segmenting, PNG encoding) off the page's main thread, so the page never freezes.
//
// Protocol: the page posts {id, op, ...}; the worker answers {id, type: 'progress', ...} zero or more
// times, then {id, type: 'result', ok, value | error}. Requests run one at a time, in order.

import init, * as wasm from './pkg/medfastsam.js';

let wasmReady = null;
let browserAdapter = {}; // the adapter as the browser describes it (WebGPU gives wgpu no name)
let broken = null; // set after a panic: the wasm instance is no longer usable

function errorInfo(e) {
  if (e instanceof WebAssembly.RuntimeError) {
    broken = 'an internal error stopped the segmentation engine (' + e.message + '); reload the page';
    return { name: 'InternalError', message: broken, fatal: true };
  }
  if (e && typeof e === 'object' && 'message' in e) {
    return { name: e.name || 'Error', message: String(e.message) };
  }
  return { name: 'Error', message: String(e) };
}

async function readBlob(blob, progress) {
  // Streams the file so the page can show how far reading has got.
  const total = blob.size;
  const out = new Uint8Array(total);
  let loaded = 0;
  const reader = blob.stream().getReader();
  let lastReport = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (loaded + value.length > total) throw new Error('the file changed while it was being read');
    out.set(value, loaded);
    loaded += value.length;
    const now = performance.now();
    if (now - lastReport > 50) {
      progress({ phase: 'read', loaded, total });
      lastReport = now;
    }
  }
  progress({ phase: 'read', loaded, total });
  return loaded === total ? out : out.subarray(0, loaded);
}

function bitmap(rgba, w, h) {
  return createImageBitmap(new ImageData(new Uint8ClampedArray(rgba.buffer, rgba.byteOffset, rgba.length), w, h));
}

let trainPaused = false; // set by trainPause (and trainStop); read by trainStep between steps

// The bytes of a Blob, ArrayBuffer, typed array or DataView.
async function bytesOf(x) {
  if (x instanceof Uint8Array) return x;
  if (x instanceof ArrayBuffer) return new Uint8Array(x);
  if (ArrayBuffer.isView(x)) return new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
  if (x && typeof x.arrayBuffer === 'function') return new Uint8Array(await x.arrayBuffer());
  throw new Error('expected file bytes (a Blob, ArrayBuffer or Uint8Array)');
}

// The memory budget of a training step when the page gives none: half of what the browser says
// the machine has (navigator.deviceMemory, in GiB, rounded and capped by the browser), else none.
function defaultBudget() {
  const gib = self.navigator && self.navigator.deviceMemory;
  return gib ? (gib * 1024 * 1024 * 1024) / 2 : undefined;
}

const ops = {
  async init(msg) {
    if (!self.navigator.gpu) {
      const e = new Error('this browser offers no WebGPU inside workers');
      e.name = 'NoWebGPU';
      throw e;
    }
    const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
    if (!adapter) {
      const e = new Error('WebGPU is present but the browser offered no adapter');
      e.name = 'NoAdapterError';
      throw e;
    }
    const info = adapter.info || {};
    const browser = {
      vendor: info.vendor || '',
      architecture: info.architecture || '',
      device: info.device || '',
      description: info.description || '',
      fallback: Boolean(info.isFallbackAdapter ?? adapter.isFallbackAdapter),
    };
    if (!wasmReady) wasmReady = init({ module_or_path: new URL('./pkg/medfastsam_bg.wasm', import.meta.url) });
    await wasmReady;
    const maxBinding = msg.maxBindingMiB ? msg.maxBindingMiB * 1024 * 1024 : undefined;
    const gpu = JSON.parse(await wasm.init_engine(maxBinding));
    browserAdapter = browser;
    return { value: { gpu, browser } };
  },

  // One weights file (safetensors, or a PyTorch .pth/.pt converted here), or MobileSAM's two ONNX
  // exports (msg.blobs). Converted weights come back as a safetensors file for the page's cache.
  async weights(msg, progress) {
    const files = msg.blobs || [{ blob: msg.blob, name: msg.name }];
    const bytes = [];
    for (const f of files) bytes.push(await readBlob(f.blob, progress));
    progress({ phase: 'parse' });
    const t0 = performance.now();
    const info =
      files.length === 2
        ? JSON.parse(wasm.load_weights_onnx(bytes[0], files[0].name, bytes[1], files[1].name))
        : JSON.parse(wasm.load_weights(bytes[0], files[0].name));
    info.parse_ms = performance.now() - t0;
    if (info.converted) {
      const st = wasm.weights_safetensors();
      info.safetensors = st.buffer;
      return { value: info, transfer: [st.buffer] };
    }
    return { value: info };
  },

  // Prompted models: the image encoder once per image.
  async encode(msg) {
    const t0 = performance.now();
    const bytes = new Uint8Array(await msg.blob.arrayBuffer());
    const r = await wasm.encode_image(bytes, msg.name);
    try {
      const orig = await bitmap(r.take_rgba(), r.width, r.height);
      const value = { width: r.width, height: r.height, decode_ms: r.decode_ms, encoder_ms: r.gpu_ms, total_ms: performance.now() - t0, orig };
      return { value, transfer: [orig] };
    } finally {
      r.free();
    }
  },

  // Prompted models: the mask decoder for the prompts on the image encoded last.
  async decode(msg) {
    const t0 = performance.now();
    const r = await wasm.decode_prompt(JSON.stringify(msg.prompts));
    try {
      const w = r.width, h = r.height;
      const [fill, edge] = await Promise.all([bitmap(r.take_fill_rgba(), w, h), bitmap(r.take_edge_rgba(), w, h)]);
      const maskPng = r.take_mask_png();
      const value = {
        width: w,
        height: h,
        foreground: r.foreground,
        decoder_ms: r.gpu_ms,
        total_ms: performance.now() - t0,
        info: JSON.parse(r.prompt_info),
        fill,
        edge,
        maskPng: maskPng.buffer,
      };
      return { value, transfer: [fill, edge, maskPng.buffer] };
    } finally {
      r.free();
    }
  },

  async prepare(msg, progress) {
    progress({ phase: 'upload' });
    const t0 = performance.now();
    const cfg = JSON.parse(wasm.prepare(msg.size || 0, msg.variant || ''));
    const t1 = performance.now();
    progress({ phase: 'compile', image_size: cfg.image_size });
    // The engine calls back once per pipeline it creates (k = created so far in this warm-up).
    const warm = JSON.parse(await wasm.warm_up((k) => progress({ phase: 'pipeline', k })));
    const t2 = performance.now();
    return { value: { ...cfg, ...warm, upload_ms: t1 - t0, warmup_ms: t2 - t1 } };
  },

  // Med-FastSAM: one image, stretched to the input size or (larger than it, unless msg.stretch)
  // in windows at its own scale, with a progress message after each window; then its objects.
  // msg.channel: '' for the model's recorded channel, else rgb|grey|invert|hematoxylin|eosin|dab;
  // msg.macenko: stain vectors estimated per image. The CSV and GeoJSON go to the page with the
  // result (transferred, not kept here).
  async segment(msg, progress) {
    const t0 = performance.now();
    const bytes = new Uint8Array(await msg.blob.arrayBuffer());
    const onTile = (done, total, rate) => progress({ phase: 'tiles', done, total, rate });
    const r = await wasm.segment_image(bytes, msg.name, msg.base || msg.name, Boolean(msg.stretch), msg.channel || '', Boolean(msg.macenko), onTile);
    try {
      const w = r.width, h = r.height;
      const inputRgba = r.take_input_rgba();
      const [orig, coarse, fill, edge, input] = await Promise.all([
        bitmap(r.take_rgba(), w, h),
        bitmap(r.take_coarse_rgba(), w, h),
        bitmap(r.take_fill_rgba(), w, h),
        bitmap(r.take_edge_rgba(), w, h),
        inputRgba.length ? bitmap(inputRgba, w, h) : null,
      ]);
      const maskPng = r.take_mask_png();
      const csv = r.take_objects_csv();
      const geojson = r.take_objects_geojson();
      const value = {
        width: w,
        height: h,
        mode: r.mode,
        tiles: r.tiles,
        tiles_per_s: r.tiles_per_s,
        threshold: r.threshold,
        foreground: r.foreground,
        decode_ms: r.decode_ms,
        gpu_ms: r.gpu_ms,
        encode_ms: r.encode_ms,
        objects: JSON.parse(r.objects),
        warnings: JSON.parse(r.warnings),
        channel: r.channel,
        total_ms: performance.now() - t0,
        orig,
        coarse,
        fill,
        edge,
        input,
        maskPng: maskPng.buffer,
        csv: csv.buffer,
        geojson: geojson.buffer,
      };
      const transfer = [orig, coarse, fill, edge, maskPng.buffer, csv.buffer, geojson.buffer];
      if (input) transfer.push(input);
      return { value, transfer };
    } finally {
      r.free();
    }
  },

  // "Check this GPU": medfastsam selftest's checks on this device; a progress message before each
  // check (its name) and after it (its record). The report is returned as the engine wrote it.
  async selftest(msg, progress) {
    const full = Boolean(msg.full);
    const names = JSON.parse(wasm.selftest_names(full));
    const t0 = performance.now();
    progress({ phase: 'start', names });
    const b = browserAdapter;
    const name = [b.vendor, b.architecture, b.device].filter(Boolean).join(' ');
    // Each check's wall time (its reference, dispatches, reads and, in a browser, the shader
    // compilation the GPU process does after createComputePipeline has returned).
    // The model checks' fixture (the tiny preset's weights, an image and the authors' outputs,
    // 18 MB; web/build.sh writes it beside the bindings). Without it they report "skipped".
    let fixture;
    try {
      const res = await fetch(new URL('./pkg/selftest-tiny.safetensors', import.meta.url));
      if (res.ok) fixture = new Uint8Array(await res.arrayBuffer());
    } catch (_) {
      fixture = undefined;
    }
    let last = t0;
    const report = await wasm.selftest(full, name, b.description || '', fixture, (rec, k, n) => {
      const now = performance.now();
      progress({ phase: 'check', record: JSON.parse(rec), k, n, next: names[k + 1] ?? null, wall_ms: now - last });
      last = now;
    });
    return { value: { report, ms: performance.now() - t0 } };
  },

  // ---------------------------------------------------------------------------------------------
  // Fine-tuning (docs/browser-training.md). Ops, fields and results:
  //   trainMemory {mode, batch, budgetBytes?, options?}      -> {bytes, device_bytes, host_bytes, limit_bytes, fits, detail, image_size, batch, mode}
  //   trainStart {options, checkpoint?: ArrayBuffer|Uint8Array} -> {mode, batch, accum, lr, weight_decay, seed, augment, step, epoch,
  //                                                            step_in_epoch, image_size, variant, tuned_parameters, parameters}
  //       options: {mode: 'semi'|'full', batch 1-4, accum, lr, seed, weight_decay, augment, variant, config, size, budget_bytes}
  //   trainClearExamples {}                                  -> {train: 0, held_out: 0}
  //   trainAddExample {name, image: Blob|ArrayBuffer|Uint8Array, mask: Blob|ArrayBuffer|Uint8Array, maskWidth?, maskHeight?, heldOut?}
  //       mask: a mask file (PNG/TIFF...), or raw 0/255 bytes when maskWidth x maskHeight equals its length -> {train, held_out}
  //   trainStep {steps = 1}: one progress {type:'progress', phase:'train', step, epoch, loss, focal, dice, ms} per step;
  //       stops early (between steps) after a trainPause        -> {steps, paused, last: <the last step's record> | null}
  //   trainPause {}: handled at once (outside the queue)      -> {pausing: true}
  //   trainEval {}                                           -> {count, dice, iou, per_example, width, height, step, mask: ImageBitmap|null}
  //   trainCheckpoint {}                                     -> {bytes: ArrayBuffer} (a checkpoint safetensors file; give back to trainStart)
  //   trainWeights {}                                        -> {bytes: ArrayBuffer} (a weights safetensors file the CLI loads)
  //   trainGradients {images: [...], masks: [...], mode, options?} -> {bytes: ArrayBuffer} (what `medfastsam gradients` writes)
  //   trainStop {}                                           -> {stopped: bool}
  // Errors come back as results with ok: false and {name, message} (ConfigError, LimitError, ImageError, StateError, ...).
  async trainMemory(msg) {
    const budget = msg.budgetBytes ?? defaultBudget();
    return { value: JSON.parse(wasm.train_memory(msg.mode || 'semi', msg.batch || 1, budget, JSON.stringify(msg.options || {}))) };
  },

  async trainStart(msg) {
    const options = { ...(msg.options || {}) };
    if (options.budget_bytes === undefined) options.budget_bytes = defaultBudget();
    const ck = msg.checkpoint ? await bytesOf(msg.checkpoint) : undefined;
    trainPaused = false;
    return { value: JSON.parse(wasm.train_start(JSON.stringify(options), ck)) };
  },

  async trainClearExamples() {
    wasm.train_clear_examples();
    return { value: { train: 0, held_out: 0 } };
  },

  async trainAddExample(msg) {
    const image = await bytesOf(msg.image);
    const mask = await bytesOf(msg.mask);
    const counts = wasm.train_add_example(msg.name || 'image', image, mask, msg.maskWidth || 0, msg.maskHeight || 0, Boolean(msg.heldOut));
    return { value: JSON.parse(counts) };
  },

  async trainStep(msg, progress) {
    const n = Math.max(1, Math.floor(msg.steps || 1));
    trainPaused = false;
    let last = null;
    let done = 0;
    for (let i = 0; i < n; i++) {
      if (trainPaused) break;
      last = JSON.parse(await wasm.train_step());
      done++;
      progress({ phase: 'train', ...last });
    }
    const paused = trainPaused;
    trainPaused = false;
    return { value: { steps: done, paused, last } };
  },

  async trainEval() {
    const r = await wasm.train_eval();
    const { rgba, ...info } = r;
    const mask = rgba.length ? await bitmap(rgba, info.width, info.height) : null;
    return { value: { ...info, mask }, transfer: mask ? [mask] : [] };
  },

  async trainCheckpoint() {
    const b = await wasm.train_checkpoint();
    return { value: { bytes: b.buffer }, transfer: [b.buffer] };
  },

  async trainWeights() {
    const b = await wasm.train_weights();
    return { value: { bytes: b.buffer }, transfer: [b.buffer] };
  },

  async trainGradients(msg) {
    const images = await Promise.all((msg.images || []).map(bytesOf));
    const masks = await Promise.all((msg.masks || []).map(bytesOf));
    const b = await wasm.gradients(images, masks, msg.mode || 'full', JSON.stringify(msg.options || {}));
    return { value: { bytes: b.buffer }, transfer: [b.buffer] };
  },

  async trainStop() {
    trainPaused = true;
    return { value: JSON.parse(wasm.train_stop()) };
  },

  async fixture(msg) {
    const res = await fetch(msg.url);
    if (!res.ok) throw new Error(`${msg.url}: HTTP ${res.status}`);
    const bytes = new Uint8Array(await res.arrayBuffer());
    const t0 = performance.now();
    const out = JSON.parse(await wasm.fixture_check(bytes));
    out.ms = performance.now() - t0;
    return { value: out };
  },

  // The page's training view (web/train-ui.js): the run's checkpoint written to the page's
  // IndexedDB from here, so its bytes (tens of MB) never pass through the page's main thread.
  // msg.meta: what the page keeps beside it (step, loss history, options). -> {bytes}
  async saveTrainingCheckpoint(msg) {
    const ck = await wasm.train_checkpoint();
    const rec = { ...(msg.meta || {}), checkpoint: new Blob([ck]), savedAt: Date.now() };
    await new Promise((resolve, reject) => {
      const req = indexedDB.open('medfastsam');
      req.onerror = () => reject(req.error);
      req.onsuccess = () => {
        const db = req.result;
        if (!db.objectStoreNames.contains('training')) {
          db.close();
          reject(new Error("the page's storage has no 'training' store"));
          return;
        }
        const tx = db.transaction('training', 'readwrite');
        tx.objectStore('training').put(rec, 'checkpoint');
        tx.oncomplete = () => (db.close(), resolve());
        tx.onerror = () => (db.close(), reject(tx.error));
        tx.onabort = () => (db.close(), reject(tx.error || new Error('storage transaction aborted')));
      };
    });
    return { value: { bytes: ck.length, savedAt: rec.savedAt } };
  },

  // Teaching mode: the prepared Med-FastSAM's inner maps for one image (src/web_teach.rs), each
  // as an ImageBitmap: input, coarse prompt, PCA of the embedding and of msf.r2/msf.r1, low-res
  // logits, mask.
  async teachMaps(msg) {
    const t0 = performance.now();
    const bytes = new Uint8Array(await msg.blob.arrayBuffer());
    const r = await wasm.teach_maps(bytes, msg.name, msg.channel || '', Boolean(msg.macenko));
    const maps = await Promise.all(
      r.maps.map(async (m) => ({ ...m, rgba: undefined, bitmap: await bitmap(m.rgba, m.width, m.height) })),
    );
    const value = { ...r, maps, ms: performance.now() - t0 };
    return { value, transfer: maps.map((m) => m.bitmap) };
  },
};

let chain = Promise.resolve();

self.onmessage = (ev) => {
  const msg = ev.data;
  // A pause must reach a multi-step trainStep that is running, so it skips the queue: it sets the
  // flag the step loop reads between steps and answers at once.
  if (msg && msg.op === 'trainPause') {
    trainPaused = true;
    self.postMessage({ id: msg.id, type: 'result', ok: true, value: { pausing: true } });
    return;
  }
  chain = chain.then(() => handle(msg));
};

async function handle(msg) {
  const progress = (p) => self.postMessage({ id: msg.id, type: 'progress', ...p });
  try {
    if (broken) throw new Error(broken);
    const op = ops[msg.op];
    if (!op) throw new Error(`unknown request '${msg.op}'`);
    const { value, transfer } = await op(msg, progress);
    self.postMessage({ id: msg.id, type: 'result', ok: true, value }, transfer || []);
  } catch (e) {
    self.postMessage({ id: msg.id, type: 'result', ok: false, error: errorInfo(e) });
  }
}
