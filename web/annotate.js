// Annotation: a binary mask per image, edited on a canvas with a brush, an eraser and polygon fills
// (foreground or background), with undo/redo, zoom (wheel, buttons, + and -) and pan (drag with the
// Pan tool, the middle button, or Space held; arrow keys). Masks are w·h bytes, 0 or 255, at the
// image's own resolution, the format `medfastsam train` reads as <stem>_mask.png.
//
// This module only edits pixels and draws; app.js/train-ui.js decide where images and masks come
// from and where they go. Nothing here blocks for long: a brush dab touches only its square, and a
// polygon is filled in its bounding box.

import { crc32 } from './zip.js';

const UNDO_DEPTH = 30;

/** A mask from the pixels of a grey or RGBA source (a canvas, an ImageBitmap) at w×h: foreground
 * where the red channel is above 127 and the pixel is opaque. */
export function maskFromSource(source, w, h) {
  const c = new OffscreenCanvas(w, h);
  const ctx = c.getContext('2d', { willReadFrequently: true });
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(source, 0, 0, w, h);
  const px = ctx.getImageData(0, 0, w, h).data;
  const m = new Uint8Array(w * h);
  for (let i = 0; i < m.length; i++) m[i] = px[i * 4] > 127 && px[i * 4 + 3] > 127 ? 255 : 0;
  return m;
}

/** Decodes a mask file (PNG, or any image the browser reads) to {width, height, mask}. */
export async function decodeMaskFile(blob) {
  const bmp = await createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  try {
    return { width: bmp.width, height: bmp.height, mask: maskFromSource(bmp, bmp.width, bmp.height) };
  } finally {
    bmp.close();
  }
}

/** An 8-bit greyscale PNG of a mask (the CLI's format), deflated by the browser's
 * CompressionStream (zlib). */
export async function encodeMaskPng(mask, w, h) {
  const raw = new Uint8Array((w + 1) * h);
  for (let y = 0; y < h; y++) raw.set(mask.subarray(y * w, (y + 1) * w), y * (w + 1) + 1); // filter 0
  const z = new Uint8Array(await new Response(new Blob([raw]).stream().pipeThrough(new CompressionStream('deflate'))).arrayBuffer());
  const chunk = (type, data) => {
    const out = new Uint8Array(12 + data.length);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, data.length);
    for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
    out.set(data, 8);
    dv.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
    return out;
  };
  const ihdr = new Uint8Array(13);
  const dv = new DataView(ihdr.buffer);
  dv.setUint32(0, w);
  dv.setUint32(4, h);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 0; // greyscale
  const sig = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  return new Blob([sig, chunk('IHDR', ihdr), chunk('IDAT', z), chunk('IEND', new Uint8Array(0))], { type: 'image/png' });
}

/** `<stem>_mask.png` → `<stem>` (null for other names). */
export function maskStem(name) {
  const m = /^(.*)_mask\.png$/i.exec(name);
  return m ? m[1] : null;
}

/**
 * The editor. `els`: {canvas, viewport} (the canvas fills the viewport); `onChange(item, what)` is
 * called after every edit, undo and redo. Items: {key, name, width, height, image (canvas or
 * bitmap), mask (Uint8Array), heldOut, undo: [], redo: []}.
 */
export class Annotator {
  constructor({ canvas, onChange, onStatus }) {
    this.canvas = canvas;
    this.onChange = onChange || (() => {});
    this.onStatus = onStatus || (() => {});
    this.item = null;
    this.tool = 'brush'; // brush | eraser | poly-fg | poly-bg | pan
    this.size = 12; // brush diameter in image pixels
    this.view = { k: 1, x: 0, y: 0 }; // client px = image px · k + (x, y)
    this.poly = []; // polygon vertices in image pixels, while one is drawn
    this.hover = null;
    this.maskCanvas = null;
    this.space = false;
    this.drag = null;
    this.frame = 0;
    this.wire();
    new ResizeObserver(() => this.redraw()).observe(canvas);
  }

  // ------------------------------------------------------------------ items and edits

  open(item) {
    this.item = item;
    this.poly = [];
    this.maskCanvas = new OffscreenCanvas(item.width, item.height);
    this.paintMask(0, 0, item.width, item.height);
    this.fit();
  }

  close() {
    this.item = null;
    this.maskCanvas = null;
    this.poly = [];
    this.redraw();
  }

  setTool(t) {
    this.tool = t;
    if (!t.startsWith('poly')) this.poly = [];
    this.canvas.dataset.tool = t;
    this.redraw();
  }

  snapshot() {
    const it = this.item;
    it.undo.push(it.mask.slice());
    if (it.undo.length > UNDO_DEPTH) it.undo.shift();
    it.redo.length = 0;
  }

  /** Replaces the whole mask (a new start, a dropped file); undoable. */
  replace(mask, what) {
    const it = this.item;
    if (mask.length !== it.width * it.height) throw new Error(`a mask of ${mask.length} pixels for a ${it.width} × ${it.height} image`);
    this.snapshot();
    it.mask.set(mask);
    this.paintMask(0, 0, it.width, it.height);
    this.changed(what);
  }

  undo() {
    const it = this.item;
    if (!it || !it.undo.length) return false;
    it.redo.push(it.mask.slice());
    it.mask.set(it.undo.pop());
    this.paintMask(0, 0, it.width, it.height);
    this.changed('undo');
    return true;
  }

  redo() {
    const it = this.item;
    if (!it || !it.redo.length) return false;
    it.undo.push(it.mask.slice());
    it.mask.set(it.redo.pop());
    this.paintMask(0, 0, it.width, it.height);
    this.changed('redo');
    return true;
  }

  changed(what) {
    this.item.edited = true;
    this.redraw();
    this.onChange(this.item, what);
  }

  /** A round dab of diameter `this.size` at (x, y), value v; returns its box. */
  dab(x, y, v) {
    const it = this.item;
    const r = Math.max(0.5, this.size / 2);
    const x0 = Math.max(0, Math.floor(x - r)), x1 = Math.min(it.width - 1, Math.ceil(x + r));
    const y0 = Math.max(0, Math.floor(y - r)), y1 = Math.min(it.height - 1, Math.ceil(y + r));
    const r2 = r * r;
    for (let py = y0; py <= y1; py++) {
      const dy = py + 0.5 - y;
      for (let px = x0; px <= x1; px++) {
        const dx = px + 0.5 - x;
        if (dx * dx + dy * dy <= r2) it.mask[py * it.width + px] = v;
      }
    }
    return [x0, y0, x1, y1];
  }

  /** Dabs along the segment a→b (spacing a quarter of the diameter). */
  stroke(a, b, v) {
    const d = Math.hypot(b[0] - a[0], b[1] - a[1]);
    const n = Math.max(1, Math.ceil(d / Math.max(1, this.size / 4)));
    let box = null;
    for (let i = 0; i <= n; i++) {
      const t = i / n;
      const bb = this.dab(a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, v);
      box = box ? [Math.min(box[0], bb[0]), Math.min(box[1], bb[1]), Math.max(box[2], bb[2]), Math.max(box[3], bb[3])] : bb;
    }
    if (box[2] >= box[0] && box[3] >= box[1]) this.paintMask(box[0], box[1], box[2] - box[0] + 1, box[3] - box[1] + 1);
  }

  /** Fills the polygon `pts` (image pixels) with v: a pixel is inside when its centre is (even-odd
   * rule), as a scanline fill in the polygon's bounding box. */
  fillPolygon(pts, v) {
    const it = this.item;
    if (pts.length < 3) return false;
    const ys = pts.map((p) => p[1]);
    const y0 = Math.max(0, Math.floor(Math.min(...ys))), y1 = Math.min(it.height - 1, Math.ceil(Math.max(...ys)));
    let xmin = it.width, xmax = -1;
    for (let py = y0; py <= y1; py++) {
      const cy = py + 0.5;
      const xs = [];
      for (let i = 0; i < pts.length; i++) {
        const [ax, ay] = pts[i];
        const [bx, by] = pts[(i + 1) % pts.length];
        if ((ay <= cy && by > cy) || (by <= cy && ay > cy)) xs.push(ax + ((cy - ay) / (by - ay)) * (bx - ax));
      }
      xs.sort((a, b) => a - b);
      for (let k = 0; k + 1 < xs.length; k += 2) {
        const a = Math.max(0, Math.ceil(xs[k] - 0.5)), b = Math.min(it.width - 1, Math.floor(xs[k + 1] - 0.5));
        for (let px = a; px <= b; px++) it.mask[py * it.width + px] = v;
        if (b >= a) {
          xmin = Math.min(xmin, a);
          xmax = Math.max(xmax, b);
        }
      }
    }
    if (xmax >= xmin) this.paintMask(xmin, y0, xmax - xmin + 1, y1 - y0 + 1);
    return true;
  }

  /** Finishes the polygon being drawn (fills it); false when it has fewer than 3 vertices. */
  closePolygon() {
    if (!this.item || this.poly.length < 3) return false;
    this.snapshot();
    this.fillPolygon(this.poly, this.tool === 'poly-bg' ? 0 : 255);
    this.poly = [];
    this.changed(this.tool);
    return true;
  }

  // ------------------------------------------------------------------ drawing

  /** Copies a box of the mask into the overlay canvas (foreground: teal, background: clear). */
  paintMask(x, y, w, h) {
    if (!this.maskCanvas || w <= 0 || h <= 0) return;
    const it = this.item;
    const img = new ImageData(w, h);
    const d = img.data;
    for (let j = 0; j < h; j++) {
      const row = (y + j) * it.width + x;
      for (let i = 0; i < w; i++) {
        if (it.mask[row + i]) {
          const o = (j * w + i) * 4;
          d[o] = 20;
          d[o + 1] = 220;
          d[o + 2] = 160;
          d[o + 3] = 255;
        }
      }
    }
    this.maskCanvas.getContext('2d').putImageData(img, x, y);
  }

  fit() {
    const it = this.item;
    if (!it) return;
    const r = this.canvas.getBoundingClientRect();
    const k = Math.min(r.width / it.width, r.height / it.height) || 1;
    this.view = { k, x: (r.width - it.width * k) / 2, y: (r.height - it.height * k) / 2 };
    this.redraw();
  }

  zoomAt(cx, cy, f) {
    const v = this.view;
    const k = Math.min(64, Math.max(0.05, v.k * f));
    const ix = (cx - v.x) / v.k, iy = (cy - v.y) / v.k;
    this.view = { k, x: cx - ix * k, y: cy - iy * k };
    this.redraw();
  }

  zoom(f) {
    const r = this.canvas.getBoundingClientRect();
    this.zoomAt(r.width / 2, r.height / 2, f);
  }

  pan(dx, dy) {
    this.view.x += dx;
    this.view.y += dy;
    this.redraw();
  }

  redraw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const c = this.canvas;
    const r = c.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const W = Math.max(1, Math.round(r.width * dpr)), H = Math.max(1, Math.round(r.height * dpr));
    if (c.width !== W || c.height !== H) {
      c.width = W;
      c.height = H;
    }
    const ctx = c.getContext('2d');
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const it = this.item;
    if (!it) return;
    const v = this.view;
    ctx.setTransform(v.k * dpr, 0, 0, v.k * dpr, v.x * dpr, v.y * dpr);
    ctx.imageSmoothingEnabled = v.k < 2;
    ctx.drawImage(it.image, 0, 0, it.width, it.height);
    ctx.globalAlpha = 0.5;
    ctx.drawImage(this.maskCanvas, 0, 0);
    ctx.globalAlpha = 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    if (this.poly.length) {
      ctx.strokeStyle = this.tool === 'poly-bg' ? '#f97316' : '#22d3ee';
      ctx.lineWidth = 2;
      ctx.beginPath();
      this.poly.forEach((p, i) => {
        const [x, y] = this.toClient(p[0], p[1]);
        if (i) ctx.lineTo(x, y);
        else ctx.moveTo(x, y);
      });
      if (this.hover) ctx.lineTo(this.hover[0], this.hover[1]);
      ctx.stroke();
      for (const p of this.poly) {
        const [x, y] = this.toClient(p[0], p[1]);
        ctx.fillStyle = '#fff';
        ctx.fillRect(x - 3, y - 3, 6, 6);
      }
    }
    if (this.hover && (this.tool === 'brush' || this.tool === 'eraser')) {
      ctx.strokeStyle = this.tool === 'eraser' ? '#f97316' : '#22d3ee';
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      ctx.arc(this.hover[0], this.hover[1], Math.max(1, (this.size / 2) * v.k), 0, 2 * Math.PI);
      ctx.stroke();
    }
  }

  /** Image pixels → CSS pixels relative to the canvas. */
  toClient(x, y) {
    return [x * this.view.k + this.view.x, y * this.view.k + this.view.y];
  }

  toImage(ev) {
    const r = this.canvas.getBoundingClientRect();
    const cx = ev.clientX - r.left, cy = ev.clientY - r.top;
    return [(cx - this.view.x) / this.view.k, (cy - this.view.y) / this.view.k, cx, cy];
  }

  // ------------------------------------------------------------------ input

  wire() {
    const c = this.canvas;
    c.addEventListener('contextmenu', (ev) => ev.preventDefault());
    c.addEventListener('wheel', (ev) => {
      if (!this.item) return;
      ev.preventDefault();
      const [, , cx, cy] = this.toImage(ev);
      this.zoomAt(cx, cy, Math.exp(-ev.deltaY * 0.0015));
    }, { passive: false });
    c.addEventListener('pointerdown', (ev) => {
      if (!this.item) return;
      c.focus({ preventScroll: true });
      const [x, y, cx, cy] = this.toImage(ev);
      if (ev.button === 1 || ev.button === 2 || this.space || this.tool === 'pan') {
        ev.preventDefault();
        this.drag = { pan: true, cx, cy };
        c.setPointerCapture(ev.pointerId);
        return;
      }
      if (ev.button !== 0) return;
      if (this.tool === 'brush' || this.tool === 'eraser') {
        ev.preventDefault();
        this.snapshot();
        this.drag = { last: [x, y], v: this.tool === 'eraser' ? 0 : 255 };
        this.stroke([x, y], [x, y], this.drag.v);
        this.redraw();
        c.setPointerCapture(ev.pointerId);
      } else if (this.tool.startsWith('poly')) {
        ev.preventDefault();
        const first = this.poly[0];
        if (first && this.poly.length >= 3) {
          const [fx, fy] = this.toClient(first[0], first[1]);
          if (Math.hypot(fx - cx, fy - cy) < 8) {
            this.closePolygon();
            return;
          }
        }
        // Vertices snap to pixel corners, so a polygon covers whole pixels predictably.
        this.poly.push([Math.round(x), Math.round(y)]);
        this.redraw();
      }
    });
    c.addEventListener('pointermove', (ev) => {
      if (!this.item) return;
      const [x, y, cx, cy] = this.toImage(ev);
      this.hover = [cx, cy];
      const d = this.drag;
      if (d?.pan) {
        this.pan(cx - d.cx, cy - d.cy);
        d.cx = cx;
        d.cy = cy;
      } else if (d) {
        this.stroke(d.last, [x, y], d.v);
        d.last = [x, y];
      }
      this.redraw();
    });
    const end = () => {
      const d = this.drag;
      this.drag = null;
      if (d && !d.pan) this.changed(this.tool);
    };
    c.addEventListener('pointerup', end);
    c.addEventListener('pointercancel', end);
    c.addEventListener('pointerleave', () => {
      this.hover = null;
      this.redraw();
    });
    c.addEventListener('dblclick', (ev) => {
      if (this.tool.startsWith('poly')) {
        ev.preventDefault();
        // The double click's two clicks added the same vertex twice: drop one.
        if (this.poly.length >= 2) {
          const [a, b] = this.poly.slice(-2);
          if (Math.hypot(a[0] - b[0], a[1] - b[1]) * this.view.k < 4) this.poly.pop();
        }
        this.closePolygon();
      }
    });
    c.addEventListener('keydown', (ev) => {
      if (!this.item) return;
      const step = 40;
      const keys = {
        ArrowLeft: () => this.pan(step, 0),
        ArrowRight: () => this.pan(-step, 0),
        ArrowUp: () => this.pan(0, step),
        ArrowDown: () => this.pan(0, -step),
        '+': () => this.zoom(1.25),
        '=': () => this.zoom(1.25),
        '-': () => this.zoom(0.8),
        '0': () => this.fit(),
        Enter: () => this.closePolygon(),
        Escape: () => {
          this.poly = [];
          this.redraw();
        },
      };
      const f = keys[ev.key];
      if (f && !ev.ctrlKey && !ev.metaKey) {
        ev.preventDefault();
        f();
      }
      if (ev.key === ' ') {
        ev.preventDefault();
        this.space = true;
      }
    });
    c.addEventListener('keyup', (ev) => {
      if (ev.key === ' ') this.space = false;
    });
  }
}

/** Foreground pixel count of a mask. */
export function countForeground(mask) {
  let n = 0;
  for (let i = 0; i < mask.length; i++) if (mask[i]) n++;
  return n;
}
