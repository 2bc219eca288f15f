// The page's annotation panel and training view. Annotations (a mask per image, held-out flags, the
// image files) and the training state (the worker's checkpoint: weights, Adam moments, step; the
// loss history) are kept in IndexedDB, so a reload offers to resume. All training runs in the worker
// (worker.js: trainMemory, trainStart, trainClearExamples, trainAddExample, trainStep, trainEval,
// trainCheckpoint, trainWeights, trainStop); this thread sends one step at a time and draws.

import { Annotator, countForeground, decodeMaskFile, encodeMaskPng, maskFromSource, maskStem } from './annotate.js';
import { makeZip } from './zip.js';

const $ = (sel) => document.querySelector(sel);
// The training state is saved after every step while a save costs at most a quarter of a step's
// time (so closing the tab loses at most the step in flight); for models whose checkpoint is slow
// to save relative to a step, every k steps, k chosen to keep that share (and on every pause).
const SAVE_SHARE = 0.25;

function stemOf(name) {
  return name.replace(/\.[^.]*$/, '') || 'image';
}

function errText(e) {
  return e && e.message ? e.message : String(e);
}

function quotaText(e) {
  const quota = e && (e.name === 'QuotaExceededError' || /quota/i.test(e.message || ''));
  return quota
    ? `this browser's storage for the page is full (${e.name}): free space (forget saved weights, clear results) or download the weights and annotations now`
    : `${e?.name || 'Error'}: ${errText(e)}`;
}

/**
 * `env`: {call(op, args, onProgress, transfer), cards() → the page's cards, prepared() → the prepared
 * model or null, weights() → {name, info} or null, idbRequest(mode, fn, store), saveBlob(blob, name),
 * announce(text), channel() → the channel setting ('' = the model's)}.
 */
export function initTraining(env) {
  const ui = {
    image: $('#ann-image'),
    fromModel: $('#ann-from-model'),
    fromOtsu: $('#ann-from-otsu'),
    clear: $('#ann-clear'),
    heldOut: $('#ann-heldout'),
    tools: [...document.querySelectorAll('#annotate button.tool')],
    size: $('#ann-size'),
    sizeValue: $('#ann-size-value'),
    undo: $('#ann-undo'),
    redo: $('#ann-redo'),
    zoomIn: $('#ann-zoom-in'),
    zoomOut: $('#ann-zoom-out'),
    fit: $('#ann-fit'),
    canvas: $('#ann-canvas'),
    status: $('#ann-status'),
    masksInput: $('#ann-masks-input'),
    download: $('#ann-download'),
    alert: $('#ann-alert'),
    list: $('#ann-list'),
    mode: $('#train-mode'),
    batch: $('#train-batch'),
    accum: $('#train-accum'),
    lr: $('#train-lr'),
    seed: $('#train-seed'),
    evalEvery: $('#train-eval-every'),
    memory: $('#train-memory'),
    start: $('#train-start'),
    pause: $('#train-pause'),
    resume: $('#train-resume'),
    weightsBtn: $('#train-weights'),
    forget: $('#train-forget'),
    saved: $('#train-saved'),
    trainAlert: $('#train-alert'),
    trainStatus: $('#train-status'),
    plot: $('#train-plot'),
    pred: $('#train-pred'),
    predCaption: $('#train-pred-caption'),
  };

  const items = new Map(); // image name -> annotation item
  const t = {
    session: false, // the worker holds a training session (trainStart succeeded)
    running: false,
    step: 0,
    losses: [], // {step, loss, focal, dice, ms}
    dice: [], // {step, dice}
    times: [], // performance.now() at each finished step (the last 20)
    savedStep: null,
    savedAt: null,
    saved: null, // the record found at start (resume offer)
    fits: null,
    weightsName: null,
    saveMs: 0, // how long the last save of the training state took
  };

  function showAlert(el, text) {
    el.textContent = text || '';
    el.hidden = !text;
  }

  // ------------------------------------------------------------------ annotation

  const annotator = new Annotator({
    canvas: ui.canvas,
    onChange: (item, what) => {
      refreshAnnotation();
      scheduleSave(`edit: ${what}`);
    },
  });

  function cardFor(name) {
    return env.cards().find((c) => c.file.name === name && c.result && !c.prompts);
  }

  function refreshImageList() {
    const names = [];
    for (const c of env.cards()) if (c.result && !c.prompts && !names.includes(c.file.name)) names.push(c.file.name);
    for (const n of items.keys()) if (!names.includes(n)) names.push(n);
    const cur = ui.image.value;
    ui.image.replaceChildren();
    if (!names.length) {
      const o = document.createElement('option');
      o.value = '';
      o.textContent = 'No segmented image yet';
      ui.image.append(o);
    }
    for (const n of names) {
      const o = document.createElement('option');
      o.value = n;
      o.textContent = items.has(n) ? `${n} (annotated${items.get(n).heldOut ? ', held out' : ''})` : n;
      ui.image.append(o);
    }
    ui.image.disabled = !names.length;
    if (names.includes(cur)) ui.image.value = cur;
    if (!annotator.item && names.length) openImage(ui.image.value || names[0]);
    refreshAnnotation();
  }

  async function modelMask(card) {
    if (!card?.maskBlob) return null;
    const m = await decodeMaskFile(card.maskBlob);
    return m.width === card.orig.width && m.height === card.orig.height ? m.mask : null;
  }

  async function openImage(name) {
    if (!name) return;
    let item = items.get(name);
    if (!item) {
      const card = cardFor(name);
      if (!card) return;
      const w = card.orig.width, h = card.orig.height;
      item = { name, file: card.file, image: card.orig, width: w, height: h, mask: new Uint8Array(w * h), heldOut: false, undo: [], redo: [], edited: false };
      const m = await modelMask(card).catch(() => null);
      if (m) item.mask.set(m);
      items.set(name, item);
      scheduleSave('new annotation');
    } else if (!item.image) {
      const card = cardFor(name);
      if (card) item.image = card.orig;
      else if (item.preview) item.image = await createImageBitmap(item.preview);
    }
    ui.image.value = name;
    annotator.open(item);
    refreshImageList();
  }

  function refreshAnnotation() {
    const it = annotator.item;
    const card = it ? cardFor(it.name) : null;
    ui.fromModel.disabled = !card?.maskBlob;
    ui.fromOtsu.disabled = !card?.coarse?.width;
    ui.clear.disabled = ui.heldOut.disabled = !it;
    ui.undo.disabled = !it?.undo.length;
    ui.redo.disabled = !it?.redo.length;
    ui.heldOut.checked = Boolean(it?.heldOut);
    if (it) {
      const fg = countForeground(it.mask);
      ui.status.textContent = `${it.name}: ${it.width} × ${it.height}, ${((100 * fg) / (it.width * it.height)).toFixed(1)}% foreground${it.heldOut ? ', held out' : ''}.`;
    } else ui.status.textContent = 'Segment an image first (step 3); its mask is where annotation starts.';
    ui.list.replaceChildren(
      ...[...items.values()].map((i) => {
        const li = document.createElement('li');
        li.textContent = i.name;
        li.dataset.heldOut = String(i.heldOut);
        return li;
      }),
    );
    ui.download.disabled = items.size === 0;
    refreshButtons();
  }

  ui.image.addEventListener('change', () => openImage(ui.image.value));
  ui.fromModel.addEventListener('click', async () => {
    const it = annotator.item;
    const m = await modelMask(cardFor(it?.name)).catch((e) => showAlert(ui.alert, `Could not read the model's mask: ${errText(e)}`));
    if (m) annotator.replace(m, 'from-model');
  });
  ui.fromOtsu.addEventListener('click', () => {
    const it = annotator.item;
    const card = cardFor(it?.name);
    if (card?.coarse?.width) annotator.replace(maskFromSource(card.coarse, it.width, it.height), 'from-otsu');
  });
  ui.clear.addEventListener('click', () => annotator.item && annotator.replace(new Uint8Array(annotator.item.mask.length), 'clear'));
  ui.heldOut.addEventListener('change', () => {
    const it = annotator.item;
    if (!it) return;
    it.heldOut = ui.heldOut.checked;
    refreshImageList();
    scheduleSave('held out');
  });
  for (const b of ui.tools) {
    b.addEventListener('click', () => {
      for (const o of ui.tools) o.setAttribute('aria-pressed', String(o === b));
      annotator.setTool(b.dataset.tool);
    });
  }
  const applySize = () => {
    annotator.size = Number(ui.size.value);
    ui.sizeValue.textContent = `${ui.size.value} px`;
  };
  ui.size.addEventListener('input', applySize);
  applySize();
  ui.undo.addEventListener('click', () => annotator.undo());
  ui.redo.addEventListener('click', () => annotator.redo());
  ui.zoomIn.addEventListener('click', () => annotator.zoom(1.25));
  ui.zoomOut.addEventListener('click', () => annotator.zoom(0.8));
  ui.fit.addEventListener('click', () => annotator.fit());
  // Ctrl+Z / Ctrl+Shift+Z (and Ctrl+Y) while the focus is in the annotation panel or on the page.
  document.addEventListener('keydown', (ev) => {
    if (!(ev.ctrlKey || ev.metaKey) || !annotator.item) return;
    const a = document.activeElement;
    const inPanel = !a || a === document.body || a.closest('#annotate');
    if (!inPanel || (a && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName) && a.type !== 'range' && a.type !== 'checkbox')) return;
    const k = ev.key.toLowerCase();
    if (k === 'z' && !ev.shiftKey) {
      ev.preventDefault();
      annotator.undo();
    } else if ((k === 'z' && ev.shiftKey) || k === 'y') {
      ev.preventDefault();
      annotator.redo();
    }
  });
  ui.masksInput.addEventListener('change', () => {
    const files = [...ui.masksInput.files];
    ui.masksInput.value = '';
    takeMasks(files);
  });
  ui.download.addEventListener('click', () => downloadAnnotations());

  /** Masks dropped or chosen as `<stem>_mask.png`: each replaces the mask of the image `<stem>.*`;
   * a mask of another size than its image, or without an image, is refused with a message. */
  let pendingMasks = []; // masks whose image is still being segmented
  function refreshImages() {
    refreshImageList();
    if (!pendingMasks.length) return;
    const ready = pendingMasks.filter((f) => cardFor(env.cards().find((c) => stemOf(c.file.name) === maskStem(f.name))?.file.name));
    const waiting = env.cards().some((c) => !c.result && c.el.dataset.state !== 'error');
    pendingMasks = pendingMasks.filter((f) => !ready.includes(f));
    if (ready.length || !waiting) {
      const rest = waiting ? [] : pendingMasks;
      pendingMasks = waiting ? pendingMasks : [];
      takeMasks([...ready, ...rest]);
    }
  }

  async function takeMasks(files) {
    // A mask for an image that is queued or being segmented waits for its result.
    const queued = (f) => env.cards().some((c) => stemOf(c.file.name) === maskStem(f.name) && !c.result && c.el.dataset.state !== 'error');
    const later = files.filter(queued);
    if (later.length) {
      pendingMasks.push(...later);
      files = files.filter((f) => !later.includes(f));
    }
    const msgs = [];
    let took = 0;
    for (const f of files) {
      const s = maskStem(f.name);
      if (s === null) {
        msgs.push(`${f.name}: not a mask name (expected <stem>_mask.png)`);
        continue;
      }
      const names = new Set([...env.cards().filter((c) => c.result && !c.prompts).map((c) => c.file.name), ...items.keys()]);
      const target = [...names].find((n) => stemOf(n) === s);
      if (!target) {
        msgs.push(`${f.name}: no image named ${s}.* is loaded and segmented (add the image first)`);
        continue;
      }
      let m;
      try {
        m = await decodeMaskFile(f);
      } catch (e) {
        msgs.push(`${f.name}: cannot be read as an image (${errText(e)})`);
        continue;
      }
      await openImage(target);
      const it = items.get(target);
      if (!it) continue;
      if (m.width !== it.width || m.height !== it.height) {
        msgs.push(`${f.name} is ${m.width} × ${m.height} but ${target} is ${it.width} × ${it.height}: refused (a mask must have its image's size)`);
        continue;
      }
      annotator.replace(m.mask, 'file');
      took++;
    }
    showAlert(ui.alert, msgs.join('\n'));
    ui.alert.classList.toggle('error', msgs.length > 0);
    if (took) env.announce(`${took} mask${took === 1 ? '' : 's'} added from files.`);
    return { took, refused: msgs };
  }

  async function downloadAnnotations() {
    if (!items.size) return;
    ui.download.disabled = true;
    try {
      const entries = [];
      const meta = [];
      for (const it of items.values()) {
        const name = `${stemOf(it.name)}_mask.png`;
        entries.push({ name, data: new Uint8Array(await (await encodeMaskPng(it.mask, it.width, it.height)).arrayBuffer()) });
        meta.push({ image: it.name, mask: name, width: it.width, height: it.height, held_out: it.heldOut, foreground_pixels: countForeground(it.mask) });
      }
      entries.push({ name: 'annotations.json', data: JSON.stringify({ made_by: 'Med-FastSAM web page', images: meta }, null, 2) + '\n' });
      env.saveBlob(makeZip(entries), 'medfastsam-annotations.zip');
    } catch (e) {
      showAlert(ui.alert, `Could not make the annotations ZIP: ${errText(e)}`);
    } finally {
      ui.download.disabled = items.size === 0;
    }
  }

  // ------------------------------------------------------------------ persistence

  // Two records in the 'training' store: 'annotations' (images, masks, held-out flags; written
  // when they change) and 'checkpoint' (the worker's checkpoint, step, loss history, options;
  // written after steps). Neither save reads the other back, so a save per step moves only the
  // checkpoint's bytes through this thread.
  const ANN_KEY = 'annotations';
  const CKPT_KEY = 'checkpoint';
  let saveTimer = null;
  let saving = Promise.resolve();
  let annotationsDirty = false;
  function scheduleSave() {
    annotationsDirty = true;
    clearTimeout(saveTimer);
    saveTimer = setTimeout(() => persist({ checkpoint: false }), 800);
  }

  async function previewPng(it) {
    if (it.preview) return it.preview;
    const c = new OffscreenCanvas(it.width, it.height);
    c.getContext('2d').drawImage(it.image, 0, 0);
    it.preview = await c.convertToBlob({ type: 'image/png' });
    return it.preview;
  }

  /** Writes the annotations (when changed) and, with `checkpoint`, the worker's training state to
   * IndexedDB. A failure (storage full) is shown, never dropped. */
  function persist({ checkpoint }) {
    if (!checkpoint) clearTimeout(saveTimer);
    const job = saving.then(async () => {
      try {
        if (annotationsDirty) {
          annotationsDirty = false;
          const rec = { savedAt: Date.now(), items: [] };
          for (const it of items.values()) {
            rec.items.push({ name: it.name, file: it.file, preview: await previewPng(it), width: it.width, height: it.height, mask: it.mask.slice(), heldOut: it.heldOut });
          }
          try {
            await env.idbRequest('readwrite', (s) => s.put(rec, ANN_KEY), 'training');
          } catch (e) {
            annotationsDirty = true;
            throw e;
          }
        }
        if (checkpoint && t.session) {
          const meta = { step: t.step, losses: t.losses, dice: t.dice, options: options(), weights: t.weightsName };
          const r = await env.call('saveTrainingCheckpoint', { meta });
          const rec = { ...meta, savedAt: r.savedAt, checkpointBytes: r.bytes };
          t.savedStep = t.step;
          t.savedAt = rec.savedAt;
          t.saved = rec;
        }
        if (!t.saved) t.saved = { savedAt: Date.now() };
        document.body.dataset.trainSaved = String(t.savedStep ?? '');
        refreshButtons();
        return true;
      } catch (e) {
        showAlert(ui.trainAlert, `The training state could not be saved: ${quotaText(e)}. Training goes on, but a reload would lose what is not saved${t.savedStep != null ? ` (last saved: step ${t.savedStep})` : ''}.`);
        env.announce('The training state could not be saved.');
        return false;
      }
    });
    saving = job.catch(() => {});
    return job;
  }

  async function loadSaved() {
    let ann = null;
    let rec = null;
    try {
      ann = await env.idbRequest('readonly', (s) => s.get(ANN_KEY), 'training');
      rec = await env.idbRequest('readonly', (s) => s.get(CKPT_KEY), 'training');
    } catch (e) {
      console.warn('training storage unavailable:', e);
      return;
    }
    for (const r of ann?.items || []) {
      const file = r.file instanceof File ? r.file : new File([r.file], r.name);
      const mask = r.mask instanceof Uint8Array ? r.mask : new Uint8Array(r.mask);
      items.set(r.name, { name: r.name, file, preview: r.preview, image: null, width: r.width, height: r.height, mask, heldOut: Boolean(r.heldOut), undo: [], redo: [], edited: true });
    }
    if (ann || rec) t.saved = rec || { savedAt: ann.savedAt };
    if (rec?.checkpoint) {
      t.losses = rec.losses || [];
      t.dice = rec.dice || [];
      t.step = rec.step || 0;
      t.savedStep = t.step;
      if (rec.options) setOptions(rec.options);
      const n = items.size;
      ui.saved.textContent = `A training run was saved in this browser at step ${rec.step} (${new Date(rec.savedAt).toLocaleString()}, ${n} annotated image${n === 1 ? '' : 's'}${rec.weights ? `, from ${rec.weights}` : ''}). With those weights loaded, press Resume to continue it.`;
      ui.saved.hidden = false;
      drawPlot();
    }
    if (items.size) {
      const first = items.keys().next().value;
      await openImage(first);
    }
    refreshImageList();
    refreshButtons();
  }

  ui.forget.addEventListener('click', async () => {
    if (t.running) return;
    try {
      await env.idbRequest('readwrite', (s) => s.clear(), 'training');
    } catch (e) {
      showAlert(ui.trainAlert, `Could not delete the saved training: ${errText(e)}`);
      return;
    }
    t.saved = null;
    t.savedStep = null;
    ui.saved.hidden = true;
    ui.forget.disabled = true;
    env.announce('The saved training was removed from this browser.');
    refreshButtons();
  });

  // ------------------------------------------------------------------ training

  // The run's options; it trains at the prepared model's input size and variant.
  function options() {
    const p = env.prepared();
    const o = {
      mode: ui.mode.value,
      batch: Number(ui.batch.value),
      accum: Number(ui.accum.value),
      lr: Number(ui.lr.value),
      seed: Number(ui.seed.value),
      weight_decay: 0,
    };
    if (p && !p.prompted) {
      o.size = p.image_size;
      o.variant = p.variant;
    }
    return o;
  }

  function setOptions(o) {
    if (o.mode) ui.mode.value = o.mode;
    if (o.batch) ui.batch.value = String(o.batch);
    if (o.accum) ui.accum.value = String(o.accum);
    if (Number.isFinite(o.lr)) ui.lr.value = String(o.lr);
    if (Number.isFinite(o.seed)) ui.seed.value = String(o.seed);
  }

  function badOptions(o) {
    if (!['semi', 'full'].includes(o.mode)) return 'the mode must be semi or full';
    if (!(o.batch >= 1 && o.batch <= 4)) return 'the batch must be 1 to 4';
    if (!(Number.isInteger(o.accum) && o.accum >= 1 && o.accum <= 16)) return 'accumulation must be a whole number from 1 to 16';
    if (!(o.lr > 0 && o.lr < 1)) return 'the learning rate must be a number above 0 and below 1 (e.g. 0.0001)';
    if (!(Number.isInteger(o.seed) && o.seed >= 0)) return 'the seed must be a whole number ≥ 0';
    if (o.mode === 'full' && o.batch < 2) return 'full mode trains the BatchNorm layers on batch statistics, which needs a batch of at least 2';
    return null;
  }

  function modelReady() {
    const p = env.prepared();
    return Boolean(p && !p.prompted);
  }

  function refreshButtons() {
    const ready = modelReady();
    const trainable = [...items.values()].filter((i) => !i.heldOut).length > 0;
    ui.start.disabled = !ready || t.running || t.fits === false || !trainable;
    ui.start.title = !ready ? 'Load Med-FastSAM weights first' : !trainable ? 'Annotate at least one image that is not held out' : '';
    ui.pause.disabled = !t.running;
    ui.resume.disabled = t.running || !ready || !(t.session || t.saved?.checkpoint || t.saved?.checkpointBytes);
    ui.weightsBtn.disabled = t.running || !t.session;
    ui.forget.disabled = t.running || !t.saved;
    document.body.dataset.training = t.running ? 'running' : t.session ? 'paused' : 'idle';
  }

  let memSeq = 0;
  async function refreshMemory() {
    if (!modelReady()) {
      ui.memory.textContent = 'Load Med-FastSAM weights (step 1) to train; prompted models (MobileSAM) are not trained here.';
      t.fits = null;
      refreshButtons();
      return;
    }
    const o = options();
    const seq = ++memSeq;
    try {
      const m = await env.call('trainMemory', { mode: o.mode, batch: o.batch, options: { size: o.size } });
      if (seq !== memSeq) return;
      t.fits = Boolean(m.fits);
      ui.memory.textContent = m.fits ? `Memory estimate: ${m.detail}: fits.` : `Does not fit: ${m.detail}. Choose a smaller batch or semi mode.`;
      ui.memory.dataset.fits = String(m.fits);
    } catch (e) {
      if (seq !== memSeq) return;
      t.fits = null;
      ui.memory.textContent = `No memory estimate: ${errText(e)}`;
    }
    refreshButtons();
  }
  for (const el of [ui.mode, ui.batch]) el.addEventListener('change', refreshMemory);

  function status(text) {
    ui.trainStatus.textContent = text;
  }

  function stepsPerSecond() {
    const n = t.times.length;
    return n >= 2 ? ((n - 1) * 1000) / (t.times[n - 1] - t.times[0]) : null;
  }

  function statusLine() {
    const last = t.losses[t.losses.length - 1];
    const sps = stepsPerSecond();
    const d = t.dice[t.dice.length - 1];
    return [
      `Step ${t.step}`,
      last ? `loss ${last.loss.toFixed(4)}` : null,
      sps ? `${sps.toFixed(sps < 1 ? 3 : 2)} steps/s` : null,
      d ? `held-out Dice ${d.dice.toFixed(3)} (step ${d.step})` : null,
      t.savedStep != null ? `saved at step ${t.savedStep}` : null,
    ].filter(Boolean).join(' · ');
  }

  /** Sends the session the annotated images (file bytes and mask bytes). */
  async function sendExamples() {
    await env.call('trainClearExamples');
    for (const it of items.values()) {
      const image = new Uint8Array(await it.file.arrayBuffer());
      await env.call('trainAddExample', { name: it.name, image, mask: it.mask.slice(), maskWidth: it.width, maskHeight: it.height, heldOut: it.heldOut });
    }
  }

  async function begin({ resume }) {
    showAlert(ui.trainAlert, '');
    if (!modelReady()) return showAlert(ui.trainAlert, 'Load Med-FastSAM weights first (step 1).');
    const trainable = [...items.values()].filter((i) => !i.heldOut);
    if (!trainable.length) return showAlert(ui.trainAlert, items.size ? 'Every annotated image is held out: un-tick "Hold out" on at least one, so there is something to train on.' : 'There are no annotations yet: annotate at least one image (or drop its <stem>_mask.png) before training.');
    const o = options();
    const bad = badOptions(o);
    if (bad) return showAlert(ui.trainAlert, `Cannot train: ${bad}.`);
    if (!resume || !t.session) {
      t.running = true;
      refreshButtons();
      status(resume ? `Restoring the saved state (step ${t.saved?.step ?? 0})…` : 'Starting: sending the annotated images to the worker…');
      try {
        const m = await env.call('trainMemory', { mode: o.mode, batch: o.batch, options: { size: o.size } });
        if (!m.fits) throw new Error(`${m.detail}`);
        let checkpoint = resume ? t.saved?.checkpoint : undefined;
        if (resume && !checkpoint) checkpoint = (await env.idbRequest('readonly', (s) => s.get(CKPT_KEY), 'training'))?.checkpoint;
        if (resume && !checkpoint) throw new Error('no saved training state was found in this browser');
        const started = await env.call('trainStart', { options: o, checkpoint });
        t.session = true;
        if (resume && Number.isFinite(started?.step)) t.step = started.step;
        t.weightsName = env.weights()?.name || null;
        if (!resume) {
          t.step = 0;
          t.losses = [];
          t.dice = [];
        }
        await sendExamples();
      } catch (e) {
        t.running = false;
        t.session = false;
        refreshButtons();
        status('');
        return showAlert(ui.trainAlert, `Training could not start: ${errText(e)}`);
      }
    }
    ui.saved.hidden = true;
    t.running = true;
    t.times = [];
    refreshButtons();
    env.announce(`Training ${resume ? 'resumed' : 'started'} at step ${t.step}.`);
    loop();
  }

  async function loop() {
    const evalEvery = Math.max(1, Number(ui.evalEvery.value) || 5);
    const heldOut = [...items.values()].some((i) => i.heldOut);
    status(statusLine() || 'Training…');
    while (t.running) {
      let got = 0;
      const tStep = performance.now();
      try {
        const r = await env.call('trainStep', { steps: 1 }, (p) => {
          if (p.phase !== 'train') return;
          got++;
          record(p);
        });
        if (!got && r?.last) record(r.last);
      } catch (e) {
        t.running = false;
        const lost = e.fatal || /lost|device/i.test(e.message);
        showAlert(ui.trainAlert, lost
          ? `The GPU stopped during training (${errText(e)}). Reload the page and press Resume: training continues from the last saved state${t.savedStep != null ? ` (step ${t.savedStep})` : ''}.`
          : `The training step failed: ${errText(e)}`);
        if (lost) t.session = false;
        break;
      }
      if (heldOut && t.step % evalEvery === 0) await evaluate();
      const stepMs = t.losses[t.losses.length - 1]?.ms || performance.now() - tStep;
      const every = Math.max(1, Math.ceil(t.saveMs / (SAVE_SHARE * Math.max(1, stepMs))));
      if (t.savedStep == null || t.step - t.savedStep >= every) {
        const s0 = performance.now();
        await persist({ checkpoint: true });
        t.saveMs = performance.now() - s0;
      }
      status(statusLine());
    }
    if (t.session) await persist({ checkpoint: true });
    status(statusLine() + (t.session ? ' · paused' : ''));
    refreshButtons();
  }

  function record(p) {
    t.step = Number.isFinite(p.step) ? p.step : t.step + 1;
    t.losses.push({ step: t.step, loss: p.loss, focal: p.focal, dice: p.dice, ms: p.ms });
    const now = performance.now();
    t.times.push(now);
    if (t.times.length > 20) t.times.shift();
    document.body.dataset.trainStep = String(t.step);
    drawPlot();
  }

  async function evaluate() {
    try {
      const r = await env.call('trainEval');
      t.dice.push({ step: t.step, dice: r.dice });
      await drawPrediction(r);
      drawPlot();
    } catch (e) {
      showAlert(ui.trainAlert, `The held-out evaluation failed: ${errText(e)}`);
    }
  }

  async function drawPrediction(r) {
    const ctx = ui.pred.getContext('2d');
    const it = [...items.values()].find((i) => i.heldOut);
    const W = ui.pred.width, H = ui.pred.height;
    ctx.clearRect(0, 0, W, H);
    if (it?.image) ctx.drawImage(it.image, 0, 0, W, H);
    let src = null;
    if (typeof ImageBitmap !== 'undefined' && r.mask instanceof ImageBitmap) src = r.mask;
    else if (r.mask && r.width && r.height) {
      const bytes = r.mask instanceof Uint8Array ? r.mask : new Uint8Array(r.mask);
      if (bytes.length === r.width * r.height * 4) src = await createImageBitmap(new ImageData(new Uint8ClampedArray(bytes), r.width, r.height));
      else if (bytes.length === r.width * r.height) {
        const rgba = new Uint8ClampedArray(bytes.length * 4);
        for (let i = 0; i < bytes.length; i++) rgba.fill(bytes[i], i * 4, i * 4 + 4);
        src = await createImageBitmap(new ImageData(rgba, r.width, r.height));
      } else src = await createImageBitmap(new Blob([bytes], { type: 'image/png' }));
    }
    if (src) {
      // The predicted mask (white on transparent, at the model's size) as a teal layer over the
      // image, so both stay visible.
      const tint = new OffscreenCanvas(W, H);
      const tc = tint.getContext('2d');
      tc.drawImage(src, 0, 0, W, H);
      tc.globalCompositeOperation = 'source-in';
      tc.fillStyle = 'rgb(20, 220, 160)';
      tc.fillRect(0, 0, W, H);
      ctx.globalAlpha = it?.image ? 0.6 : 1;
      ctx.drawImage(tint, 0, 0);
      ctx.globalAlpha = 1;
      src.close?.();
    }
    ui.predCaption.textContent = `Held-out prediction for ${it?.name || 'the held-out image'} at step ${t.step}: Dice ${Number(r.dice).toFixed(3)}`;
    ui.pred.dataset.step = String(t.step);
  }

  function drawPlot() {
    const c = ui.plot;
    const ctx = c.getContext('2d');
    const W = c.width, H = c.height;
    const m = { l: 48, r: 40, t: 12, b: 28 };
    ctx.clearRect(0, 0, W, H);
    const style = getComputedStyle(document.documentElement);
    const ink = style.getPropertyValue('--ink').trim() || '#000';
    const muted = style.getPropertyValue('--muted').trim() || '#666';
    ctx.font = '11px system-ui, sans-serif';
    ctx.strokeStyle = muted;
    ctx.lineWidth = 1;
    ctx.strokeRect(m.l, m.t, W - m.l - m.r, H - m.t - m.b);
    const L = t.losses;
    if (!L.length) {
      ctx.fillStyle = muted;
      ctx.fillText('The loss appears here once training runs.', m.l + 10, H / 2);
      return;
    }
    const s0 = Math.min(L[0].step, t.dice[0]?.step ?? Infinity) - 1;
    const s1 = Math.max(L[L.length - 1].step, s0 + 2);
    let lo = Infinity, hi = -Infinity;
    for (const p of L) if (Number.isFinite(p.loss)) (lo = Math.min(lo, p.loss)), (hi = Math.max(hi, p.loss));
    if (!(hi > lo)) (hi = lo + 1e-3), (lo = lo - 1e-3);
    const pad = (hi - lo) * 0.08;
    lo -= pad;
    hi += pad;
    const X = (s) => m.l + ((s - s0) / (s1 - s0)) * (W - m.l - m.r);
    const Y = (v) => m.t + (1 - (v - lo) / (hi - lo)) * (H - m.t - m.b);
    const Yd = (d) => m.t + (1 - d) * (H - m.t - m.b);
    ctx.fillStyle = muted;
    ctx.textAlign = 'right';
    for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) ctx.fillText(v.toPrecision(3), m.l - 4, Y(v) + 4);
    ctx.textAlign = 'left';
    for (const d of [0, 0.5, 1]) ctx.fillText(String(d), W - m.r + 4, Yd(d) + 4);
    ctx.textAlign = 'center';
    ctx.fillText(`step ${s0 + 1}`, X(s0 + 1), H - 8);
    ctx.fillText(`step ${s1}`, X(s1) - 20, H - 8);
    ctx.strokeStyle = '#1668b8';
    ctx.lineWidth = 2;
    ctx.beginPath();
    L.forEach((p, i) => (i ? ctx.lineTo(X(p.step), Y(p.loss)) : ctx.moveTo(X(p.step), Y(p.loss))));
    ctx.stroke();
    if (L.length === 1) {
      ctx.fillStyle = '#1668b8';
      ctx.fillRect(X(L[0].step) - 2, Y(L[0].loss) - 2, 4, 4);
    }
    ctx.fillStyle = '#d97706';
    for (const d of t.dice) {
      ctx.beginPath();
      ctx.arc(X(d.step), Yd(d.dice), 4, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.fillStyle = ink;
    ctx.textAlign = 'left';
    ctx.fillText(`loss ${L[L.length - 1].loss.toFixed(4)}`, m.l + 6, m.t + 14);
    c.dataset.points = String(L.length);
  }

  ui.start.addEventListener('click', () => begin({ resume: false }));
  ui.resume.addEventListener('click', () => begin({ resume: true }));
  ui.pause.addEventListener('click', () => {
    if (!t.running) return;
    t.running = false;
    ui.pause.disabled = true;
    // Answered at once by the worker: a multi-step request stops before its next step.
    env.call('trainPause').catch(() => {});
    status(statusLine() + ' · pausing after this step…');
    env.announce('Training pauses after the current step.');
  });
  ui.weightsBtn.addEventListener('click', async () => {
    if (!t.session) return;
    ui.weightsBtn.disabled = true;
    try {
      const { bytes } = await env.call('trainWeights');
      const base = stemOf(t.weightsName || 'medfastsam');
      env.saveBlob(new Blob([bytes], { type: 'application/octet-stream' }), `${base}-finetuned-step${t.step}.safetensors`);
    } catch (e) {
      showAlert(ui.trainAlert, `Could not get the weights: ${errText(e)}`);
    } finally {
      refreshButtons();
    }
  });

  drawPlot();
  refreshButtons();
  refreshAnnotation();

  return {
    ready: loadSaved(),
    /** The page's cards or model changed (a new result, weights, preparation). */
    refresh() {
      refreshImages();
      refreshMemory();
    },
    refreshImages,
    takeMasks,
    /** For tests and the console: what the panel holds. */
    api: {
      annotation() {
        const it = annotator.item;
        return it ? { name: it.name, width: it.width, height: it.height, foreground: countForeground(it.mask), undo: it.undo.length, redo: it.redo.length, heldOut: it.heldOut, tool: annotator.tool } : null;
      },
      maskAt(x, y) {
        const it = annotator.item;
        return it ? it.mask[Math.floor(y) * it.width + Math.floor(x)] : null;
      },
      /** Image pixel → page (client) coordinates of the editor canvas. */
      toPage(x, y) {
        const r = ui.canvas.getBoundingClientRect();
        const [cx, cy] = annotator.toClient(x, y);
        return [r.left + cx, r.top + cy];
      },
      items: () => [...items.values()].map((i) => ({ name: i.name, width: i.width, height: i.height, foreground: countForeground(i.mask), heldOut: i.heldOut })),
      training: () => ({ running: t.running, session: t.session, step: t.step, losses: t.losses.length, lastLoss: t.losses[t.losses.length - 1]?.loss ?? null, stepsPerSecond: stepsPerSecond(), dice: t.dice.slice(), savedStep: t.savedStep, fits: t.fits, memory: ui.memory.textContent }),
      open: (name) => openImage(name),
      persist: () => persist({ checkpoint: true }),
    },
  };
}
