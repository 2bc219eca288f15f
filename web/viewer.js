// Full-viewport image viewer for the medfastsam page: one base layer (radio group) under any
// number of overlay layers (checkboxes; the mask with an opacity slider), zoom and pan with the
// wheel, pointer drag, pinch, buttons and keys. Self-contained ES module, no dependencies, no
// inline styles in markup (the page's CSP), styles in viewer.css.
//
// Drawing: one visible canvas the size of the viewport in device pixels. Each frame draws, per
// layer, only the part of the source that is on screen (drawImage with a source rectangle), so
// the cost of a frame follows the viewport, not the image. Sources are never copied.
//
// See VIEWER.md for the API.

const ZOOM_MAX = 32; // screen px per image px
const ZOOM_FLOOR = 1 / 64; // the lowest zoom-out limit is fit/4, and never above this
const STEP = 1.25; // zoom factor of one key press / button click
const SHARP_ABOVE = 2; // smoothing off above this zoom: the image's pixels show as squares
const LABEL_DELAY_MS = 500; // the canvas area's accessible name follows the view after a pause

let current = null;
let serial = 0;

/** Opens the viewer (closing one already open) and returns its handle. */
export function openViewer(options) {
  if (current) current.close();
  const v = createViewer(options);
  current = v;
  return v;
}

/** Closes whichever viewer is open; does nothing when none is. */
export function closeViewer() {
  if (current) current.close();
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

function sizeOf(source) {
  const w = source.naturalWidth || source.videoWidth || source.width;
  const h = source.naturalHeight || source.videoHeight || source.height;
  return { w, h };
}

function createViewer(options) {
  const { title = 'Image', width, height, layers = [], opener = null, onClose = null } = options || {};
  if (!(width > 0 && height > 0)) throw new RangeError('openViewer: width and height must be positive');
  const id = ++serial;
  const dark = matchMedia('(prefers-color-scheme: dark)');

  // ---------------------------------------------------------------------------------------------
  // Layers

  const all = layers.map((l, i) => ({
    id: l.id || `layer${i}`,
    label: l.label || l.id || `Layer ${i + 1}`,
    source: l.source,
    kind: l.kind === 'overlay' ? 'overlay' : 'base',
    opacity: typeof l.opacity === 'number' ? Math.min(1, Math.max(0, l.opacity)) : 1,
    slider: l.id === 'mask' || typeof l.opacity === 'number',
    visible: l.visible !== false,
    explicit: l.visible === true,
  }));
  const bases = all.filter((l) => l.kind === 'base');
  const overlays = all.filter((l) => l.kind === 'overlay');
  let base = bases.find((l) => l.explicit) || bases[0] || null;

  // ---------------------------------------------------------------------------------------------
  // DOM

  const titleId = `mfv-title-${id}`;
  const dialog = el('dialog', { class: 'mfv', 'aria-labelledby': titleId });
  const heading = el('h2', { class: 'mfv-title', id: titleId, title, text: title });
  const toolbar = el('div', { class: 'mfv-tools' });

  if (bases.length > 1) {
    const group = el('fieldset', { class: 'mfv-group mfv-bases' }, el('legend', { class: 'mfv-sr', text: 'Image layer' }));
    for (const l of bases) {
      const input = el('input', { type: 'radio', name: `mfv-base-${id}`, value: l.id, checked: l === base });
      input.checked = l === base;
      input.addEventListener('change', () => {
        if (!input.checked) return;
        base = l;
        changed();
      });
      group.append(el('label', { class: 'mfv-choice' }, input, el('span', { text: l.label })));
    }
    toolbar.append(group);
  }

  if (overlays.length) {
    const group = el('fieldset', { class: 'mfv-group mfv-overlays' }, el('legend', { class: 'mfv-sr', text: 'Overlays' }));
    for (const l of overlays) {
      const box = el('input', { type: 'checkbox', value: l.id });
      box.checked = l.visible;
      box.addEventListener('change', () => {
        l.visible = box.checked;
        if (slider) slider.disabled = !box.checked;
        changed();
      });
      group.append(el('label', { class: 'mfv-choice' }, box, el('span', { text: l.label })));
      let slider = null;
      if (l.slider) {
        const pct = Math.round(l.opacity * 100);
        slider = el('input', {
          type: 'range', min: 0, max: 100, step: 1, value: pct, class: 'mfv-opacity',
          'aria-label': `${l.label} opacity`, 'aria-valuetext': `${pct}%`,
        });
        slider.value = String(pct);
        const shown = el('span', { class: 'mfv-value', 'aria-hidden': 'true', text: `${pct}%` });
        slider.addEventListener('input', () => {
          const v = Math.min(100, Math.max(0, Number(slider.value) || 0));
          l.opacity = v / 100;
          shown.textContent = `${v}%`;
          slider.setAttribute('aria-valuetext', `${v}%`);
          changed();
        });
        slider.disabled = !l.visible;
        group.append(el('span', { class: 'mfv-slider' }, slider, shown));
      }
    }
    toolbar.append(group);
  }

  const button = (cls, text, name, keys) =>
    el('button', { type: 'button', class: `mfv-btn ${cls}`, 'aria-label': name, title: keys ? `${name} (${keys})` : name, text });
  const zoomOutBtn = button('mfv-zoom-out', '\u2212', 'Zoom out', '\u2212');
  const zoomInBtn = button('mfv-zoom-in', '+', 'Zoom in', '+');
  const fitBtn = button('mfv-fit', 'Fit', 'Fit to window', '0');
  const oneBtn = button('mfv-one', '1:1', '1:1, actual size (100%)', '1');
  // Plain text, not a live region: zoom changes are not announced as they happen (the canvas
  // area's name carries the zoom for whoever asks).
  const zoomText = el('span', { class: 'mfv-zoom-value', text: '100%' });
  toolbar.append(el('div', { class: 'mfv-group mfv-zoom', role: 'group', 'aria-label': 'Zoom' }, zoomOutBtn, zoomText, zoomInBtn, fitBtn, oneBtn));
  const closeBtn = button('mfv-close', '\u00d7', 'Close viewer', 'Escape');

  const canvas = el('canvas', { class: 'mfv-canvas' });
  const area = el('div', { class: 'mfv-area', tabindex: 0, role: 'application', 'aria-roledescription': 'image viewer' }, canvas);
  dialog.append(el('div', { class: 'mfv-head' }, heading, closeBtn, toolbar), area);
  const ctx = canvas.getContext('2d', { alpha: true });

  // ---------------------------------------------------------------------------------------------
  // View state: zoom = CSS px per image px; (cx, cy) = the image point at the centre of the area.

  let zoom = 1;
  let cx = width / 2;
  let cy = height / 2;
  let fitted = true; // the view follows the area's size until the user zooms or pans
  let vw = 0; // area size, CSS px
  let vh = 0;
  let closed = false;
  let raf = 0;
  let labelTimer = 0;

  const fitZoom = () => (vw > 0 && vh > 0 ? Math.min(vw / width, vh / height) : 1);
  const minZoom = () => Math.min(fitZoom() / 4, ZOOM_FLOOR);
  const maxZoom = () => Math.max(ZOOM_MAX, fitZoom());
  const clampZoom = (z) => Math.min(maxZoom(), Math.max(minZoom(), z));

  function setViewRaw(z, x, y) {
    zoom = clampZoom(Number.isFinite(z) ? z : zoom);
    cx = Math.min(width, Math.max(0, Number.isFinite(x) ? x : cx));
    cy = Math.min(height, Math.max(0, Number.isFinite(y) ? y : cy));
    changed();
  }

  function fit() {
    fitted = true;
    setViewRaw(fitZoom(), width / 2, height / 2);
  }

  // Zoom by `factor` keeping the image point under (px, py) (area CSS px) where it is.
  function zoomAt(factor, px = vw / 2, py = vh / 2) {
    const ix = cx + (px - vw / 2) / zoom;
    const iy = cy + (py - vh / 2) / zoom;
    const z = clampZoom(zoom * factor);
    fitted = false;
    setViewRaw(z, ix - (px - vw / 2) / z, iy - (py - vh / 2) / z);
  }

  function panBy(dxCss, dyCss) {
    fitted = false;
    setViewRaw(zoom, cx + dxCss / zoom, cy + dyCss / zoom);
  }

  // ---------------------------------------------------------------------------------------------
  // Drawing

  let checker = null;
  function makeChecker() {
    const cs = getComputedStyle(dialog);
    const a = cs.getPropertyValue('--mfv-check-a').trim() || '#ffffff';
    const b = cs.getPropertyValue('--mfv-check-b').trim() || '#cccccc';
    const tile = document.createElement('canvas');
    tile.width = tile.height = 16;
    const t = tile.getContext('2d');
    t.fillStyle = a;
    t.fillRect(0, 0, 16, 16);
    t.fillStyle = b;
    t.fillRect(0, 0, 8, 8);
    t.fillRect(8, 8, 8, 8);
    checker = ctx.createPattern(tile, 'repeat');
  }

  function changed() {
    if (closed) return;
    zoomText.textContent = zoomLabel();
    zoomInBtn.disabled = zoom >= maxZoom() - 1e-9;
    zoomOutBtn.disabled = zoom <= minZoom() + 1e-9;
    clearTimeout(labelTimer);
    labelTimer = setTimeout(updateLabel, LABEL_DELAY_MS);
    schedule();
  }

  function schedule() {
    if (!raf && !closed) raf = requestAnimationFrame(frame);
  }

  function frame() {
    raf = 0;
    draw();
  }

  function draw() {
    if (closed) return;
    const W = canvas.width;
    const H = canvas.height;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.globalAlpha = 1;
    ctx.clearRect(0, 0, W, H);
    if (!W || !H || !vw || !vh) return;
    // Device px per image px (x and y apart: the canvas may round differently on each axis).
    const zx = zoom * (W / vw);
    const zy = zoom * (H / vh);
    const ox = W / 2 - cx * zx; // device position of the image's (0, 0)
    const oy = H / 2 - cy * zy;
    // The visible part of the image, in whole image pixels.
    const x0 = Math.max(0, Math.floor(-ox / zx));
    const y0 = Math.max(0, Math.floor(-oy / zy));
    const x1 = Math.min(width, Math.ceil((W - ox) / zx));
    const y1 = Math.min(height, Math.ceil((H - oy) / zy));
    if (x1 <= x0 || y1 <= y0) return;
    const dx = ox + x0 * zx;
    const dy = oy + y0 * zy;
    const dw = (x1 - x0) * zx;
    const dh = (y1 - y0) * zy;
    ctx.imageSmoothingEnabled = zoom <= SHARP_ABOVE;
    ctx.imageSmoothingQuality = 'medium';
    const put = (l) => {
      const { w, h } = sizeOf(l.source);
      if (!w || !h) return;
      // Sources are normally width x height; another size is mapped onto the same rectangle.
      const kx = w / width;
      const ky = h / height;
      ctx.drawImage(l.source, x0 * kx, y0 * ky, (x1 - x0) * kx, (y1 - y0) * ky, dx, dy, dw, dh);
    };
    if (base && base.source) {
      if (!checker) makeChecker();
      checker.setTransform(new DOMMatrix([1, 0, 0, 1, ox, oy])); // the squares move with the image
      ctx.fillStyle = checker;
      const fx0 = Math.max(0, dx);
      const fy0 = Math.max(0, dy);
      ctx.fillRect(fx0, fy0, Math.min(W, dx + dw) - fx0, Math.min(H, dy + dh) - fy0);
      put(base);
    }
    for (const l of overlays) {
      if (!l.visible || !l.source || l.opacity <= 0) continue;
      ctx.globalAlpha = l.opacity;
      put(l);
      ctx.globalAlpha = 1;
    }
  }

  function zoomLabel() {
    const p = zoom * 100;
    return `${p >= 10 ? Math.round(p) : p.toFixed(1)}%`;
  }

  function updateLabel() {
    if (closed) return;
    const shown = [];
    if (base) shown.push(base.label);
    for (const l of overlays) {
      if (!l.visible) continue;
      shown.push(l.slider ? `${l.label} at ${Math.round(l.opacity * 100)}% opacity` : l.label);
    }
    area.setAttribute(
      'aria-label',
      `${title}, ${width} × ${height} pixels, zoom ${zoomLabel()}, showing ${shown.join(', ') || 'nothing'}. ` +
        'Arrow keys pan (with Shift, farther), plus and minus zoom, 0 fits the image, 1 shows it at 100%, Escape closes.',
    );
  }

  // ---------------------------------------------------------------------------------------------
  // Size: the canvas follows the area in device pixels.

  function resize(cssW, cssH, devW, devH) {
    vw = cssW;
    vh = cssH;
    if (canvas.width !== devW || canvas.height !== devH) {
      canvas.width = devW;
      canvas.height = devH;
      checker = null; // a new canvas size keeps the context, but re-make the pattern anyway
    }
    if (fitted) {
      zoom = fitZoom();
      cx = width / 2;
      cy = height / 2;
    } else {
      zoom = clampZoom(zoom);
    }
    changed();
    // Drawn at once: resizing cleared the canvas and the browser is about to paint it.
    cancelAnimationFrame(raf);
    raf = 0;
    draw();
  }

  const ro = new ResizeObserver((entries) => {
    const e = entries[entries.length - 1];
    const cssW = e.contentRect.width;
    const cssH = e.contentRect.height;
    let devW = Math.round(cssW * devicePixelRatio);
    let devH = Math.round(cssH * devicePixelRatio);
    // The exact device-pixel size where the browser reports it (it knows how the box snaps to
    // pixels); ignored when it disagrees with devicePixelRatio by more than a pixel, as under
    // an emulated device scale factor, where it reports CSS px.
    const d = e.devicePixelContentBoxSize && e.devicePixelContentBoxSize[0];
    if (d && Math.abs(d.inlineSize - devW) <= 1 && Math.abs(d.blockSize - devH) <= 1) {
      devW = d.inlineSize;
      devH = d.blockSize;
    }
    resize(cssW, cssH, devW, devH);
  });

  // ---------------------------------------------------------------------------------------------
  // Input

  const local = (e) => {
    const r = area.getBoundingClientRect();
    return { x: e.clientX - r.left, y: e.clientY - r.top };
  };

  area.addEventListener(
    'wheel',
    (e) => {
      e.preventDefault();
      const scale = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? vh : 1;
      const dY = Math.max(-400, Math.min(400, e.deltaY * scale));
      const dX = e.deltaX * scale;
      const p = local(e);
      if (!e.ctrlKey && Math.abs(dX) > Math.abs(dY)) {
        panBy(dX, 0);
        return;
      }
      // ctrl+wheel is how browsers report a touchpad pinch: small deltas, so a larger gain.
      zoomAt(Math.exp(-dY * (e.ctrlKey ? 0.01 : 0.002)), p.x, p.y);
    },
    { passive: false },
  );

  const pointers = new Map();
  area.addEventListener('pointerdown', (e) => {
    if (e.pointerType === 'mouse' && e.button !== 0) return;
    area.focus({ preventScroll: true });
    try {
      area.setPointerCapture(e.pointerId);
    } catch {
      // A synthetic pointer (or one already gone) cannot be captured; tracking still works.
    }
    pointers.set(e.pointerId, local(e));
    area.classList.add('mfv-dragging');
    e.preventDefault();
  });
  area.addEventListener('pointermove', (e) => {
    const prev = pointers.get(e.pointerId);
    if (!prev) return;
    const now = local(e);
    if (pointers.size === 1) {
      pointers.set(e.pointerId, now);
      panBy(prev.x - now.x, prev.y - now.y);
      return;
    }
    // Pinch: the first two pointers. The image point under their old midpoint goes to the new
    // midpoint, and the zoom follows their distance.
    const ids = [...pointers.keys()].slice(0, 2);
    if (!ids.includes(e.pointerId)) return;
    const [a0, b0] = ids.map((k) => pointers.get(k));
    pointers.set(e.pointerId, now);
    const [a1, b1] = ids.map((k) => pointers.get(k));
    const d0 = Math.hypot(a0.x - b0.x, a0.y - b0.y);
    const d1 = Math.hypot(a1.x - b1.x, a1.y - b1.y);
    const m0 = { x: (a0.x + b0.x) / 2, y: (a0.y + b0.y) / 2 };
    const m1 = { x: (a1.x + b1.x) / 2, y: (a1.y + b1.y) / 2 };
    const ix = cx + (m0.x - vw / 2) / zoom;
    const iy = cy + (m0.y - vh / 2) / zoom;
    const z = clampZoom(d0 > 0 ? (zoom * d1) / d0 : zoom);
    fitted = false;
    setViewRaw(z, ix - (m1.x - vw / 2) / z, iy - (m1.y - vh / 2) / z);
  });
  const release = (e) => {
    pointers.delete(e.pointerId);
    if (!pointers.size) area.classList.remove('mfv-dragging');
  };
  area.addEventListener('pointerup', release);
  area.addEventListener('pointercancel', release);
  area.addEventListener('lostpointercapture', release);

  zoomInBtn.addEventListener('click', () => zoomAt(STEP));
  zoomOutBtn.addEventListener('click', () => zoomAt(1 / STEP));
  fitBtn.addEventListener('click', fit);
  oneBtn.addEventListener('click', () => {
    fitted = false;
    setViewRaw(1, cx, cy);
  });
  closeBtn.addEventListener('click', () => close());

  // Tab stops inside the dialog, in order (one per radio group: the checked radio).
  function tabStops() {
    const list = [...dialog.querySelectorAll('button, input, select, textarea, a[href], [tabindex]')].filter((n) => {
      if (n.disabled || n.tabIndex < 0 || n.closest('[hidden], [inert]')) return false;
      if (!n.getClientRects().length) return false;
      if (n.type === 'radio' && n.name) {
        const group = [...dialog.querySelectorAll('input[type="radio"]')].filter((r) => r.name === n.name && !r.disabled);
        const on = group.find((r) => r.checked);
        return n === (on || group[0]);
      }
      return true;
    });
    return list;
  }

  dialog.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      e.preventDefault();
      e.stopPropagation();
      close();
      return;
    }
    if (e.key === 'Tab') {
      const stops = tabStops();
      if (!stops.length) return;
      const i = stops.indexOf(document.activeElement);
      const next = e.shiftKey ? (i <= 0 ? stops.length - 1 : i - 1) : i < 0 || i === stops.length - 1 ? 0 : i + 1;
      e.preventDefault();
      stops[next].focus();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    const field = t instanceof HTMLInputElement && (t.type === 'range' || t.type === 'radio' || t.type === 'text' || t.type === 'number');
    const textField = t instanceof HTMLInputElement && (t.type === 'text' || t.type === 'number');
    let done = true;
    switch (e.key) {
      case '+':
      case '=':
        if (textField) return;
        zoomAt(STEP);
        break;
      case '-':
      case '_':
      case '\u2212':
        if (textField) return;
        zoomAt(1 / STEP);
        break;
      case '0':
        if (textField) return;
        fit();
        break;
      case '1':
        if (textField) return;
        fitted = false;
        setViewRaw(1, cx, cy);
        break;
      case 'ArrowLeft':
      case 'ArrowRight':
      case 'ArrowUp':
      case 'ArrowDown': {
        if (field) return;
        const f = e.shiftKey ? 0.5 : 0.1;
        const sx = e.key === 'ArrowLeft' ? -1 : e.key === 'ArrowRight' ? 1 : 0;
        const sy = e.key === 'ArrowUp' ? -1 : e.key === 'ArrowDown' ? 1 : 0;
        panBy(sx * f * vw, sy * f * vh);
        break;
      }
      default:
        done = false;
    }
    if (done) e.preventDefault();
  });
  // The browser's own close request (Escape when the keydown did not reach us, or a back
  // gesture): close the same way.
  dialog.addEventListener('cancel', (e) => {
    e.preventDefault();
    close();
  });
  dialog.addEventListener('close', () => close());

  const onScheme = () => {
    checker = null;
    schedule();
  };
  dark.addEventListener('change', onScheme);

  // ---------------------------------------------------------------------------------------------
  // Open / close

  function close() {
    if (closed) return;
    closed = true;
    cancelAnimationFrame(raf);
    raf = 0;
    clearTimeout(labelTimer);
    ro.disconnect();
    dark.removeEventListener('change', onScheme);
    pointers.clear();
    if (dialog.open) dialog.close();
    dialog.remove();
    document.documentElement.classList.remove('mfv-open');
    if (current === api) current = null;
    if (opener && opener.isConnected && typeof opener.focus === 'function') opener.focus();
    if (typeof onClose === 'function') onClose();
  }

  const api = {
    element: dialog,
    toolbar,
    setView(view = {}) {
      fitted = false;
      setViewRaw(view.zoom, view.cx, view.cy);
    },
    getView() {
      return { zoom, cx, cy };
    },
    /** Fits the image to the area (the `0` key). */
    fit,
    /** Draws again on the next frame: call after a layer's source canvas changed. */
    redraw: schedule,
    close,
    get closed() {
      return closed;
    },
  };

  document.body.append(dialog);
  document.documentElement.classList.add('mfv-open');
  dialog.showModal();
  area.focus({ preventScroll: true });
  try {
    ro.observe(area, { box: 'device-pixel-content-box' });
  } catch {
    ro.observe(area);
  }
  // Lay out now so the first fit is right even before the observer reports.
  const r = area.getBoundingClientRect();
  resize(r.width, r.height, Math.round(r.width * devicePixelRatio), Math.round(r.height * devicePixelRatio));
  updateLabel();
  return api;
}
