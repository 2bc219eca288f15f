// Standalone check of web/viewer.js in headless Chromium (playwright-core); needs no wasm build.
// Serves web/ from a local static server, opens test/viewer.html (the page's CSP, viewer.css and
// viewer.js, nothing else) and drives the viewer with real keys, wheel, mouse drag and touch,
// checking the drawn canvas's pixels and the view after each step.
//
// Usage: node web/test/viewer.mjs [--chromium PATH]      exits 1 on any failure

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const webRoot = path.resolve(here, '..');
const args = process.argv.slice(2);
const ci = args.indexOf('--chromium');
const chromiumPath = ci >= 0 ? args[ci + 1] : process.env.CHROMIUM || '/usr/bin/chromium';

const t0 = Date.now();
const log = (...m) => console.log(`[viewer-test ${((Date.now() - t0) / 1000).toFixed(1).padStart(5)}s]`, ...m);
let failures = 0;
let checks = 0;
function check(ok, what, detail) {
  checks++;
  if (ok) log(`ok   ${what}`);
  else {
    failures++;
    log(`FAIL ${what}${detail !== undefined ? ` -- ${typeof detail === 'string' ? detail : JSON.stringify(detail)}` : ''}`);
  }
  return ok;
}
const near = (a, b, tol) => Math.abs(a - b) <= tol;
const rgbNear = (p, q, tol) => p && near(p[0], q[0], tol) && near(p[1], q[1], tol) && near(p[2], q[2], tol);

// ---------------------------------------------------------------------------------------------
// Static server for web/

const MIME = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8' };
function startServer() {
  const server = http.createServer((req, res) => {
    const p = decodeURIComponent(new URL(req.url, 'http://localhost').pathname);
    const abs = path.resolve(webRoot, p.slice(1));
    if (!abs.startsWith(webRoot + path.sep) || !fs.existsSync(abs) || !fs.statSync(abs).isFile()) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': MIME[path.extname(abs)] || 'application/octet-stream', 'cache-control': 'no-store' });
    fs.createReadStream(abs).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, origin: `http://127.0.0.1:${server.address().port}` })));
}

// ---------------------------------------------------------------------------------------------
// In-page helpers (installed with page.evaluate; the page's CSP does not apply to it).

async function install(page) {
  await page.evaluate(async () => {
    const mod = await import('/viewer.js');
    const violations = [];
    document.addEventListener('securitypolicyviolation', (e) => violations.push(`${e.violatedDirective} ${e.blockedURI}`));
    // drawImage calls on the viewer's canvas: [sx, sy, sw, sh, dx, dy, dw, dh, source w, source h]
    const draws = [];
    const orig = CanvasRenderingContext2D.prototype.drawImage;
    CanvasRenderingContext2D.prototype.drawImage = function (...a) {
      if (this.canvas.classList.contains('mfv-canvas')) draws.push([...a.slice(1), a[0].width, a[0].height]);
      return orig.apply(this, a);
    };
    const canvas = (w, h, paint) => {
      const c = document.createElement('canvas');
      c.width = w;
      c.height = h;
      paint(c.getContext('2d'), w, h);
      return c;
    };
    // 4000 x 3000: left half red, right half blue, a 1-px white grid every 100 px.
    const orig4k = () =>
      canvas(4000, 3000, (g, w, h) => {
        g.fillStyle = '#ff0000';
        g.fillRect(0, 0, w / 2, h);
        g.fillStyle = '#0000ff';
        g.fillRect(w / 2, 0, w / 2, h);
        g.fillStyle = '#ffffff';
        for (let x = 0; x < w; x += 100) g.fillRect(x, 0, 1, h);
        for (let y = 0; y < h; y += 100) g.fillRect(0, y, w, 1);
      });
    // A second base: left half opaque grey, right half transparent (the checkerboard shows).
    const coarse4k = () =>
      canvas(4000, 3000, (g, w, h) => {
        g.fillStyle = 'rgb(128,128,128)';
        g.fillRect(0, 0, w / 2, h);
      });
    // Overlays: a green square (2600..3200, 600..1200) and a yellow 20-px frame around it.
    const mask4k = () =>
      canvas(4000, 3000, (g) => {
        g.fillStyle = '#00ff00';
        g.fillRect(2600, 600, 600, 600);
      });
    const edge4k = () =>
      canvas(4000, 3000, (g) => {
        g.strokeStyle = '#ffff00';
        g.lineWidth = 20;
        g.strokeRect(2590, 590, 620, 620);
      });
    const state = { closes: 0 };
    window.T = {
      mod,
      state,
      violations,
      draws,
      v: null,
      open4k(extra = {}) {
        this.v = mod.openViewer({
          title: 'synthetic-4000x3000.tif',
          width: 4000,
          height: 3000,
          layers: [
            { id: 'orig', label: 'Original', source: orig4k(), kind: 'base' },
            { id: 'coarse', label: 'Otsu coarse prompt', source: coarse4k(), kind: 'base' },
            { id: 'mask', label: 'Mask', source: mask4k(), kind: 'overlay', opacity: 0.45 },
            { id: 'edge', label: 'Outline', source: edge4k(), kind: 'overlay' },
          ],
          opener: document.getElementById('opener'),
          onClose: () => state.closes++,
          ...extra,
        });
        return true;
      },
      openWide() {
        // 20000 x 200: 1000-px bands, red on even bands, blue on odd ones.
        const src = canvas(20000, 200, (g, w, h) => {
          for (let x = 0; x < w; x += 1000) {
            g.fillStyle = (x / 1000) % 2 ? '#0000ff' : '#ff0000';
            g.fillRect(x, 0, 1000, h);
          }
        });
        this.v = mod.openViewer({
          title: 'wide-20000x200.png',
          width: 20000,
          height: 200,
          layers: [{ id: 'orig', label: 'Original', source: src, kind: 'base' }],
          opener: document.getElementById('opener'),
        });
        return true;
      },
      frames: (n = 2) => new Promise((r) => {
        const step = (k) => (k ? requestAnimationFrame(() => step(k - 1)) : r());
        step(n);
      }),
      geom() {
        const area = this.v.element.querySelector('.mfv-area');
        const c = this.v.element.querySelector('canvas');
        const r = area.getBoundingClientRect();
        return { left: r.left, top: r.top, vw: r.width, vh: r.height, W: c.width, H: c.height, ...this.v.getView() };
      },
      // The canvas's pixel at device coordinates.
      dev(x, y) {
        const c = this.v.element.querySelector('canvas');
        return [...c.getContext('2d').getImageData(Math.floor(x), Math.floor(y), 1, 1).data];
      },
      // The canvas's pixel where image point (ix, iy) is drawn.
      at(ix, iy) {
        const g = this.geom();
        const k = g.W / g.vw;
        return this.dev(((ix - g.cx) * g.zoom + g.vw / 2) * k, ((iy - g.cy) * g.zoom + g.vh / 2) * k);
      },
      // The canvas's pixel at area CSS coordinates.
      css(x, y) {
        const g = this.geom();
        return this.dev((x * g.W) / g.vw, (y * g.H) / g.vh);
      },
      row(y, x0, x1) {
        const c = this.v.element.querySelector('canvas');
        const d = c.getContext('2d').getImageData(x0, y, x1 - x0, 1).data;
        const out = [];
        for (let i = 0; i < d.length; i += 4) out.push([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        return out;
      },
      css_var(name) {
        return getComputedStyle(this.v.element).getPropertyValue(name).trim();
      },
    };
  });
}

// Parses 'rgb(r, g, b)' / 'rgba(...)' / '#rrggbb'.
function parseColour(s) {
  s = s.trim();
  if (s.startsWith('#')) return [1, 3, 5].map((i) => parseInt(s.slice(i, i + 2), 16));
  const m = s.match(/rgba?\(([^)]+)\)/);
  return m ? m[1].split(/[ ,/]+/).filter(Boolean).slice(0, 3).map(Number) : null;
}
function contrast(a, b) {
  const lum = (c) => {
    const [r, g, bl] = c.map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * bl;
  };
  const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
  return (x + 0.05) / (y + 0.05);
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const { server, origin } = await startServer();
  const browser = await chromium.launch({ executablePath: chromiumPath, headless: true });
  const errors = [];
  try {
    const context = await browser.newContext({ viewport: { width: 1000, height: 700 }, deviceScaleFactor: 1, hasTouch: true });
    const page = await context.newPage();
    page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
    page.on('console', (m) => {
      // (a failed request is reported below with its address)
      if (m.type() === 'error' && !/^Failed to load resource/.test(m.text())) errors.push(`console: ${m.text()}`);
    });
    page.on('response', (r) => {
      if (r.status() >= 400 && !r.url().endsWith('/favicon.ico')) errors.push(`HTTP ${r.status()} ${r.url()}`);
    });
    await page.goto(`${origin}/test/viewer.html`);
    await install(page);
    const ev = (fn, arg) => page.evaluate(fn, arg);

    // --- open, fit, first pixels -----------------------------------------------------------
    await page.focus('#opener');
    await ev(() => T.open4k());
    await ev(() => T.frames());
    let g = await ev(() => T.geom());
    const fit = Math.min(g.vw / 4000, g.vh / 3000);
    log(`area ${g.vw} x ${g.vh} CSS px, canvas ${g.W} x ${g.H}, fit zoom ${fit.toFixed(4)}`);
    check(await ev(() => T.v.element.open && T.v.element.matches(':modal')), 'the viewer is an open modal <dialog>');
    check(await ev(() => document.activeElement === T.v.element.querySelector('.mfv-area')), 'opening focuses the canvas area');
    check(g.W === Math.round(g.vw) && g.H === Math.round(g.vh), 'the canvas is the area size in device pixels (dpr 1)', g);
    check(near(g.zoom, fit, 1e-9) && g.cx === 2000 && g.cy === 1500, 'opening fits the image: zoom = min(area / image), centred', g);
    check(rgbNear(await ev(() => T.at(1050, 1450)), [255, 0, 0], 8), 'fit view: red on the left', await ev(() => T.at(1050, 1450)));
    check(rgbNear(await ev(() => T.at(3050, 2050)), [0, 0, 255], 8), 'fit view: blue on the right', await ev(() => T.at(3050, 2050)));
    const tint = await ev(() => T.at(2850, 850));
    check(rgbNear(tint, [0, 0.45 * 255, 0.55 * 255], 6), 'the mask overlay at 45 % over blue = 0.45 green + 0.55 blue', tint);
    const surround = parseColour(await ev(() => T.css_var('--mfv-surround')));
    const checkA = parseColour(await ev(() => T.css_var('--mfv-check-a')));
    const checkB = parseColour(await ev(() => T.css_var('--mfv-check-b')));
    // The letterbox (outside the image) shows the surround colour, not the checkerboard.
    const sideX = g.vw / g.vh > 4 / 3 ? 2 : g.vw / 2;
    const sideY = g.vw / g.vh > 4 / 3 ? g.vh / 2 : 2;
    const outside = await ev(([x, y]) => T.css(x, y), [sideX, sideY]);
    check(rgbNear(outside, surround, 1) || outside[3] === 0, 'outside the image: no checkerboard, the area background', { outside, surround });

    // --- coalescing: five setView calls in one task draw one frame ----------------------------
    const perFrame = await ev(async () => {
      await T.frames();
      T.draws.length = 0;
      for (let i = 1; i <= 5; i++) T.v.setView({ zoom: 0.1 * i, cx: 2000, cy: 1500 });
      await T.frames(3);
      return T.draws.slice();
    });
    check(perFrame.length === 3, 'five setView calls in one task: one frame, one drawImage per visible layer (3)', perFrame.length);
    await ev(() => T.v.fit());
    await ev(() => T.frames());

    // --- the opacity slider (keyboard: Home = 0, End = 100) ---------------------------------
    const slider = page.locator('.mfv input[type=range]');
    check((await slider.getAttribute('aria-label')) === 'Mask opacity', 'the opacity slider is named "Mask opacity"');
    await slider.focus();
    await page.keyboard.press('Home');
    await ev(() => T.frames());
    check(rgbNear(await ev(() => T.at(2850, 850)), [0, 0, 255], 6), 'opacity 0: the green is gone (blue below)', await ev(() => T.at(2850, 850)));
    await page.keyboard.press('End');
    await ev(() => T.frames());
    check(rgbNear(await ev(() => T.at(2850, 850)), [0, 255, 0], 2), 'opacity 100: pure green', await ev(() => T.at(2850, 850)));
    check(rgbNear(await ev(() => T.at(1050, 1450)), [255, 0, 0], 8), 'opacity 100: red still red away from the mask');

    // --- overlay checkbox --------------------------------------------------------------------
    const maskBox = page.getByRole('checkbox', { name: 'Mask' });
    await maskBox.click();
    await ev(() => T.frames());
    check(rgbNear(await ev(() => T.at(2850, 850)), [0, 0, 255], 6), 'Mask unchecked: the green is gone', await ev(() => T.at(2850, 850)));
    check(await slider.isDisabled(), 'Mask unchecked: its opacity slider is disabled');
    const edgeOn = await ev(() => T.at(2590, 900));
    const edgeBox = page.getByRole('checkbox', { name: 'Outline' });
    await edgeBox.click();
    await ev(() => T.frames());
    const edgeOff = await ev(() => T.at(2590, 900));
    // (off: blue, a little lighter from the smoothed white grid line 10 image px away)
    const blueish = (p) => p[2] >= 220 && p[0] <= 100 && p[1] <= 100;
    check(rgbNear(edgeOn, [255, 255, 0], 10) && blueish(edgeOff), 'Outline checkbox: yellow edge on, blue when off', { edgeOn, edgeOff });
    await maskBox.click();
    await edgeBox.click();
    await ev(() => T.frames());
    check(rgbNear(await ev(() => T.at(2850, 850)), [0, 255, 0], 2), 'Mask checked again: green (at the 100 % set before)');

    // --- base layer radio ---------------------------------------------------------------------
    await page.getByRole('radio', { name: 'Otsu coarse prompt' }).check();
    await ev(() => T.frames());
    const grey = await ev(() => T.at(1050, 1450));
    check(rgbNear(grey, [128, 128, 128], 6), 'base radio "Otsu coarse prompt": grey where it was red', grey);
    // Its right half is transparent: the checkerboard shows there (under the overlays only where
    // they are transparent), and the mask still covers its square.
    const under = await ev(() => [T.at(3050, 2050), T.at(3070, 2050), T.at(3050, 2070), T.at(3030, 2030)]);
    check(under.every((p) => rgbNear(p, checkA, 2) || rgbNear(p, checkB, 2)), 'transparent base pixels show the checkerboard', { under, checkA, checkB });
    check(rgbNear(await ev(() => T.at(2850, 850)), [0, 255, 0], 2), 'the checkerboard is not painted over the mask');
    const outside2 = await ev(([x, y]) => T.css(x, y), [sideX, sideY]);
    check(rgbNear(outside2, surround, 1) || outside2[3] === 0, 'outside the image still no checkerboard', outside2);
    await page.getByRole('radio', { name: 'Original' }).check();
    await ev(() => T.frames());
    check(rgbNear(await ev(() => T.at(1050, 1450)), [255, 0, 0], 8), 'base radio back to "Original": red again');

    // --- keys: + 0 1 - ------------------------------------------------------------------------
    await page.locator('.mfv-area').focus();
    let before = await ev(() => T.v.getView());
    await page.keyboard.press('+');
    let after = await ev(() => T.v.getView());
    check(near(after.zoom, before.zoom * 1.25, 1e-9) && after.cx === before.cx && after.cy === before.cy, '"+" zooms in 1.25x about the centre', { before, after });
    await page.keyboard.press('=');
    check(near((await ev(() => T.v.getView())).zoom, before.zoom * 1.5625, 1e-9), '"=" zooms in too');
    await page.keyboard.press('-');
    check(near((await ev(() => T.v.getView())).zoom, before.zoom * 1.25, 1e-9), '"-" zooms out 1.25x');
    await page.keyboard.press('1');
    check((await ev(() => T.v.getView())).zoom === 1, '"1" = 100 %');
    check((await page.locator('.mfv-zoom-value').textContent()) === '100%', 'the header shows 100%');
    await page.keyboard.press('0');
    check(near((await ev(() => T.v.getView())).zoom, fit, 1e-9), '"0" fits again');
    await page.getByRole('button', { name: 'Zoom in' }).click();
    check(near((await ev(() => T.v.getView())).zoom, fit * 1.25, 1e-9), 'the + button zooms in');
    await page.getByRole('button', { name: 'Zoom out' }).click();
    check(near((await ev(() => T.v.getView())).zoom, fit, 1e-9), 'the − button zooms out');
    await page.getByRole('button', { name: /actual size/ }).click();
    check((await ev(() => T.v.getView())).zoom === 1, 'the 1:1 button = 100 %');
    await page.getByRole('button', { name: 'Fit to window' }).click();
    check(near((await ev(() => T.v.getView())).zoom, fit, 1e-9), 'the Fit button fits');

    // --- wheel at a point: that image point stays under the cursor ---------------------------
    g = await ev(() => T.geom());
    // Whole client px: a WheelEvent's clientX/Y are integers.
    const px = Math.round(g.left + 300);
    const py = Math.round(g.top + 200);
    const lx = px - g.left;
    const ly = py - g.top;
    const under0 = { x: g.cx + (lx - g.vw / 2) / g.zoom, y: g.cy + (ly - g.vh / 2) / g.zoom };
    await page.mouse.move(px, py);
    await page.mouse.wheel(0, -300);
    await page.waitForFunction((z) => T.v.getView().zoom > z, g.zoom);
    g = await ev(() => T.geom());
    const under1 = { x: g.cx + (lx - g.vw / 2) / g.zoom, y: g.cy + (ly - g.vh / 2) / g.zoom };
    check(g.zoom > fit * 1.5 && near(under0.x, under1.x, 1e-6) && near(under0.y, under1.y, 1e-6), 'wheel zooms in around the cursor: the image point under it stays', { zoom: g.zoom, under0, under1 });
    // and the pixel under the cursor is the same colour region
    await page.mouse.wheel(0, 300);
    await page.waitForFunction((z) => T.v.getView().zoom < z, g.zoom);
    g = await ev(() => T.geom());
    const under2 = { x: g.cx + (lx - g.vw / 2) / g.zoom, y: g.cy + (ly - g.vh / 2) / g.zoom };
    check(near(under0.x, under2.x, 1e-6) && near(under0.y, under2.y, 1e-6), 'wheel zooms out around the cursor too', under2);

    // --- arrows -------------------------------------------------------------------------------
    await ev(() => T.v.setView({ zoom: 1, cx: 2000, cy: 1500 }));
    await page.locator('.mfv-area').focus();
    g = await ev(() => T.geom());
    await page.keyboard.press('ArrowRight');
    let v = await ev(() => T.v.getView());
    check(near(v.cx - 2000, 0.1 * g.vw, 1e-9) && v.cy === 1500, `ArrowRight pans 10 % of the view (${(0.1 * g.vw).toFixed(1)} image px at 100 %)`, v);
    await page.keyboard.press('Shift+ArrowDown');
    v = await ev(() => T.v.getView());
    check(near(v.cy - 1500, 0.5 * g.vh, 1e-9), 'Shift+ArrowDown pans 50 % of the view', v);
    await page.keyboard.press('ArrowLeft');
    await page.keyboard.press('Shift+ArrowUp');
    v = await ev(() => T.v.getView());
    check(near(v.cx, 2000, 1e-9) && near(v.cy, 1500, 1e-9), 'ArrowLeft and Shift+ArrowUp pan back', v);
    await ev(() => T.v.setView({ zoom: 0.5 }));
    await page.keyboard.press('ArrowRight');
    v = await ev(() => T.v.getView());
    check(near(v.cx - 2000, (0.1 * g.vw) / 0.5, 1e-9), 'at 50 %, ArrowRight pans 10 % of the view = twice the image px', v);

    // --- drag ---------------------------------------------------------------------------------
    await ev(() => T.v.setView({ zoom: 2, cx: 2000, cy: 1500 }));
    g = await ev(() => T.geom());
    await page.mouse.move(g.left + 500, g.top + 300);
    await page.mouse.down();
    await page.mouse.move(g.left + 450, g.top + 280, { steps: 4 });
    await page.mouse.move(g.left + 400, g.top + 250, { steps: 4 });
    await page.mouse.up();
    v = await ev(() => T.v.getView());
    check(near(v.cx, 2000 + 100 / 2, 1e-6) && near(v.cy, 1500 + 50 / 2, 1e-6), 'dragging 100, 50 px left/up at 200 % moves the centre 50, 25 image px', v);
    // A drag that leaves the area keeps panning (pointer capture).
    await page.mouse.move(g.left + 500, g.top + 300);
    await page.mouse.down();
    await page.mouse.move(g.left + 500, g.top - 20, { steps: 5 }); // onto the header
    await page.mouse.up();
    const v2 = await ev(() => T.v.getView());
    check(near(v2.cy, v.cy + 320 / 2, 1e-6), 'a drag continues outside the area (pointer capture)', v2);

    // --- pinch (two touch points through CDP) ------------------------------------------------
    await ev(() => T.v.setView({ zoom: 1, cx: 2000, cy: 1500 }));
    g = await ev(() => T.geom());
    const cdp = await context.newCDPSession(page);
    const touch = (type, pts) =>
      cdp.send('Input.dispatchTouchEvent', { type, touchPoints: pts.map(([x, y], id) => ({ x: g.left + x, y: g.top + y, id })) });
    const pinchUnder0 = { x: 2000 + (500 - g.vw / 2), y: 1500 + (300 - g.vh / 2) };
    await touch('touchStart', [[400, 300], [600, 300]]);
    for (let s = 1; s <= 5; s++) await touch('touchMove', [[400 - 10 * s, 300], [600 + 10 * s, 300]]);
    await touch('touchEnd', []);
    v = await ev(() => T.v.getView());
    const pinchUnder1 = { x: v.cx + (500 - g.vw / 2) / v.zoom, y: v.cy + (300 - g.vh / 2) / v.zoom };
    check(near(v.zoom, 1.5, 1e-6) && near(pinchUnder0.x, pinchUnder1.x, 1e-6) && near(pinchUnder0.y, pinchUnder1.y, 1e-6), 'pinch 200 -> 300 px apart: zoom x1.5 about the fingers\' midpoint', { v, pinchUnder0, pinchUnder1 });
    check((await ev(() => getComputedStyle(T.v.element.querySelector('.mfv-area')).touchAction)) === 'none', 'touch-action: none on the canvas area');

    // --- pixels are squares above 2x (no smoothing) ------------------------------------------
    await ev(() => T.v.setView({ zoom: 8, cx: 1000, cy: 1050 }));
    await ev(() => T.frames());
    g = await ev(() => T.geom());
    const y = Math.floor(g.H / 2) + 4; // image row 1050.5: between grid rows
    const row = await ev(([yy, w]) => T.row(yy, 0, w), [y, g.W]);
    const white = row.filter((p) => rgbNear(p, [255, 255, 255], 0)).length;
    const red = row.filter((p) => rgbNear(p, [255, 0, 0], 0)).length;
    check(white === 8 && red === g.W - 8, 'at 800 % a 1-px white grid line is exactly 8 device px, the rest pure red (no smoothing)', { white, red, W: g.W });
    await ev(() => T.v.setView({ zoom: 1, cx: 1000, cy: 1050 }));
    await ev(() => T.frames());
    check(await ev(() => T.v.element.querySelector('canvas').getContext('2d').imageSmoothingEnabled), 'at 100 % smoothing is on');

    // --- zoom limits --------------------------------------------------------------------------
    await page.locator('.mfv-area').focus();
    for (let i = 0; i < 40; i++) await page.keyboard.press('-');
    v = await ev(() => T.v.getView());
    check(near(v.zoom, Math.min(fit / 4, 1 / 64), 1e-12), `zoom-out limit min(fit/4, 1/64) = ${Math.min(fit / 4, 1 / 64).toFixed(5)}`, v);
    check(await page.getByRole('button', { name: 'Zoom out' }).isDisabled(), 'at the limit the zoom-out button is disabled');
    for (let i = 0; i < 40; i++) await page.keyboard.press('+');
    v = await ev(() => T.v.getView());
    check(v.zoom === 32, 'zoom-in limit 32 (3200 %)', v);
    check(await page.getByRole('button', { name: 'Zoom in' }).isDisabled(), 'at the limit the zoom-in button is disabled');
    await page.keyboard.press('0');

    // --- accessibility: names, roles, no live regions ----------------------------------------
    check((await page.getByRole('dialog', { name: 'synthetic-4000x3000.tif' }).count()) === 1, 'the dialog\'s accessible name is the title');
    const unnamed = await ev(() =>
      [...T.v.element.querySelectorAll('button, input')].filter((b) => !(b.getAttribute('aria-label') || b.textContent.trim() || b.closest('label')?.textContent.trim())).length,
    );
    check(unnamed === 0, 'every button and input has an accessible name', unnamed);
    for (const name of ['Zoom in', 'Zoom out', 'Fit to window', 'Close viewer']) {
      check((await page.getByRole('button', { name, exact: true }).count()) === 1, `button "${name}" found by role and name`);
    }
    await page.waitForTimeout(600); // the area's name follows the view after 0.5 s
    const areaLabel = await page.locator('.mfv-area').getAttribute('aria-label');
    check(
      (await page.locator('.mfv-area').getAttribute('role')) === 'application' &&
        /synthetic-4000x3000\.tif/.test(areaLabel) && /zoom \d/.test(areaLabel) && /Original/.test(areaLabel) && /Mask/.test(areaLabel) && /Outline/.test(areaLabel) && /Arrow keys/.test(areaLabel),
      'the canvas area (role application) is named with the image, zoom, visible layers and keys',
      areaLabel,
    );
    check((await ev(() => T.v.element.querySelectorAll('[aria-live], [role=status], [role=log], [role=alert], [role=timer], output').length)) === 0, 'no live regions (zoom changes are not announced)');

    // --- Tab stays in the dialog and cycles ---------------------------------------------------
    const desc = () => ev(() => {
      const a = document.activeElement;
      return { inside: T.v.element.contains(a), what: `${a.tagName.toLowerCase()}${a.className ? '.' + a.className.split(' ').join('.') : ''}${a.type ? `[${a.type}]` : ''}${a.getAttribute('aria-label') ? ` "${a.getAttribute('aria-label')}"` : ''}` };
    });
    await page.locator('.mfv-area').focus();
    const fwd = [];
    for (let i = 0; i < 24; i++) {
      await page.keyboard.press('Tab');
      fwd.push(await desc());
    }
    const period = fwd.findIndex((d, i) => i > 0 && d.what === fwd[0].what);
    check(fwd.every((d) => d.inside), 'Tab x24: focus never leaves the dialog', fwd.filter((d) => !d.inside));
    check(period > 3 && fwd.every((d, i) => d.what === fwd[i % period].what) && fwd[period - 1].what.includes('mfv-area'), `Tab cycles through ${period} stops and wraps (area last)`, fwd.slice(0, period + 1).map((d) => d.what));
    log(`     tab order: ${fwd.slice(0, period).map((d) => d.what).join(' | ')}`);
    await page.locator('.mfv-area').focus();
    const back = [];
    for (let i = 0; i < period + 1; i++) {
      await page.keyboard.press('Shift+Tab');
      back.push(await desc());
    }
    check(back.every((d) => d.inside), 'Shift+Tab: focus never leaves the dialog', back.filter((d) => !d.inside));
    const backOrder = back.slice(0, period).map((d) => d.what);
    const expected = [];
    for (let i = period - 2; i >= -1; i--) expected.push(fwd[(i + period) % period].what);
    check(backOrder.join('|') === expected.join('|'), 'Shift+Tab walks the same stops backwards', { backOrder, expected });

    // --- Escape closes, focus returns to the opener --------------------------------------------
    await page.locator('.mfv-area').focus();
    await page.keyboard.press('Escape');
    check((await ev(() => document.querySelectorAll('dialog').length)) === 0, 'Escape closes the viewer (dialog removed)');
    check((await ev(() => document.activeElement.id)) === 'opener', 'focus is back on the opener');
    check((await ev(() => T.state.closes)) === 1, 'onClose ran once');
    check((await ev(() => document.documentElement.classList.contains('mfv-open'))) === false, 'the page scroll lock is released');

    // --- 20000 x 200: only the visible region is drawn; resize follows ------------------------
    await ev(() => T.open4k());
    await ev(() => T.openWide());
    check((await ev(() => document.querySelectorAll('dialog').length)) === 1, 'opening a second viewer closes the first');
    await ev(async () => {
      await T.frames();
      T.draws.length = 0;
      T.v.redraw();
      await T.frames();
    });
    g = await ev(() => T.geom());
    let draws = await ev(() => T.draws.slice());
    const fitWide = Math.min(g.vw / 20000, g.vh / 200);
    check(draws.length === 1 && draws[0][2] === 20000 && draws[0][6] <= g.W + 1e-6, `20000 x 200 at fit (${(fitWide * 100).toFixed(2)} %): one drawImage, dest ${draws[0]?.[6].toFixed(1)} px <= canvas ${g.W}`, draws);
    check(rgbNear(await ev(() => T.at(500, 100)), [255, 0, 0], 8) && rgbNear(await ev(() => T.at(1500, 100)), [0, 0, 255], 8), 'wide image at fit: band 0 red, band 1 blue');
    await ev(async () => {
      T.draws.length = 0;
      T.v.setView({ zoom: 1, cx: 10500, cy: 100 });
      await T.frames();
    });
    g = await ev(() => T.geom());
    draws = await ev(() => T.draws.slice());
    const [sx, , sw, sh, , , dw] = draws[0] || [];
    check(draws.length === 1 && sw <= g.vw + 2 && sh === 200 && sx >= 10500 - g.vw / 2 - 1 && dw <= g.W + 2, `at 100 % only the visible ${sw} x ${sh} of 20000 x 200 is drawn (source x ${sx})`, draws);
    check(rgbNear(await ev(() => T.css(T.geom().vw / 2 - 5, T.geom().vh / 2)), [255, 0, 0], 2), 'wide image at 100 %: centre band 10 is red');
    await ev(() => T.v.fit());
    await page.setViewportSize({ width: 700, height: 500 });
    await ev(() => T.frames(3));
    g = await ev(() => T.geom());
    check(g.W === Math.round(g.vw) && g.vw <= 700 && near(g.zoom, Math.min(g.vw / 20000, g.vh / 200), 1e-9), 'window resize: the canvas follows the area and a fitted view refits', g);
    await page.setViewportSize({ width: 1000, height: 700 });
    await ev(() => T.mod.closeViewer());
    check((await ev(() => document.querySelectorAll('dialog').length)) === 0 && (await ev(() => document.activeElement.id)) === 'opener', 'closeViewer() closes it and refocuses the opener');

    // --- colours: contrast in light and dark; reduced motion -----------------------------------
    for (const scheme of ['light', 'dark']) {
      await page.emulateMedia({ colorScheme: scheme, reducedMotion: 'no-preference' });
      await ev(() => T.open4k());
      const c = await ev(() => {
        const q = (s) => getComputedStyle(T.v.element.querySelector(s));
        return {
          bg: q('.mfv-head').backgroundColor,
          title: q('.mfv-title').color,
          label: q('.mfv-choice span').color,
          value: q('.mfv-zoom-value').color,
          btnInk: q('.mfv-btn').color,
          btnBorder: q('.mfv-btn').borderTopColor,
          btnBg: q('.mfv-btn').backgroundColor,
          accent: getComputedStyle(T.v.element).getPropertyValue('--mfv-accent'),
          transition: q('.mfv-btn').transitionDuration,
        };
      });
      const bg = parseColour(c.bg);
      const ratios = {
        title: contrast(parseColour(c.title), bg),
        label: contrast(parseColour(c.label), bg),
        zoomValue: contrast(parseColour(c.value), bg),
        buttonText: contrast(parseColour(c.btnInk), parseColour(c.btnBg)),
        buttonBorder: contrast(parseColour(c.btnBorder), bg),
        focusRing: contrast(parseColour(c.accent), bg),
      };
      const txt = Object.entries(ratios).map(([k, r]) => `${k} ${r.toFixed(2)}`).join(', ');
      check(
        ratios.title >= 4.5 && ratios.label >= 4.5 && ratios.zoomValue >= 4.5 && ratios.buttonText >= 4.5 && ratios.buttonBorder >= 3 && ratios.focusRing >= 3,
        `${scheme} scheme: text >= 4.5:1, borders and focus ring >= 3:1 (${txt})`,
      );
      check(c.transition === '0.12s', `${scheme}, no reduced-motion preference: the button hover transition is on (${c.transition})`);
      await ev(() => T.v.close());
    }
    await page.emulateMedia({ colorScheme: 'dark', reducedMotion: 'reduce' });
    await ev(() => T.open4k());
    const tr = await ev(() => getComputedStyle(T.v.element.querySelector('.mfv-btn')).transitionDuration);
    check(tr === '0s', `prefers-reduced-motion: reduce: no transitions (${tr})`);
    // Dark scheme: the checkerboard's colours follow (read when drawing).
    await page.getByRole('radio', { name: 'Otsu coarse prompt' }).check();
    await ev(() => T.frames());
    const darkA = parseColour(await ev(() => T.css_var('--mfv-check-a')));
    const darkB = parseColour(await ev(() => T.css_var('--mfv-check-b')));
    const dk = await ev(() => [T.at(3050, 2050), T.at(3070, 2050)]);
    check(dk.every((p) => rgbNear(p, darkA, 2) || rgbNear(p, darkB, 2)), 'dark scheme: the checkerboard uses the dark colours', { dk, darkA, darkB });
    await ev(() => T.v.close());
    await page.emulateMedia({ colorScheme: 'light', reducedMotion: 'no-preference' });

    // With the page's own style.css as well: its element rules (button, input[type=range], h2)
    // do not override the viewer's.
    await page.addStyleTag({ url: '/style.css' });
    await ev(() => T.open4k());
    const styled = await ev(() => {
      const q = (s) => getComputedStyle(T.v.element.querySelector(s));
      return {
        slider: q('.mfv-opacity').width,
        title: q('.mfv-title').display,
        btnH: q('.mfv-btn').height,
        btnBorder: q('.mfv-btn').borderTopColor,
        line: getComputedStyle(T.v.element).getPropertyValue('--mfv-line').trim(),
        areaH: T.v.element.querySelector('.mfv-area').getBoundingClientRect().height,
      };
    });
    check(
      styled.slider === '110px' && styled.title === 'block' && styled.btnH === '34px' && rgbNear(parseColour(styled.btnBorder), parseColour(styled.line), 0) && styled.areaH > 500,
      'with web/style.css loaded too, the viewer keeps its own layout and colours',
      styled,
    );
    await ev(() => T.v.close());

    const violations = await ev(() => T.violations.slice());
    check(violations.length === 0, 'no Content-Security-Policy violations', violations);
    await context.close();

    // --- device pixel ratio 2 -------------------------------------------------------------------
    const ctx2 = await browser.newContext({ viewport: { width: 800, height: 600 }, deviceScaleFactor: 2 });
    const p2 = await ctx2.newPage();
    p2.on('pageerror', (e) => errors.push(`pageerror (dpr 2): ${e.message}`));
    await p2.goto(`${origin}/test/viewer.html`);
    await install(p2);
    await p2.evaluate(() => T.open4k());
    await p2.evaluate(() => T.frames());
    const g2 = await p2.evaluate(() => T.geom());
    check(Math.abs(g2.W - g2.vw * 2) <= 1 && Math.abs(g2.H - g2.vh * 2) <= 1, `dpr 2: the canvas is ${g2.W} x ${g2.H} for a ${g2.vw} x ${g2.vh} CSS px area`, g2);
    const r2 = await p2.evaluate(() => [T.at(1050, 1450), T.at(3050, 2050), T.at(2850, 850)]);
    check(rgbNear(r2[0], [255, 0, 0], 8) && rgbNear(r2[1], [0, 0, 255], 8) && rgbNear(r2[2], [0, 0.45 * 255, 0.55 * 255], 6), 'dpr 2: red left, blue right, mask tint where expected', r2);
    await ctx2.close();

    check(errors.length === 0, 'no page errors or console errors', errors);
  } finally {
    await browser.close();
    server.close();
  }
  log(`${checks - failures} of ${checks} checks passed in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  process.exit(failures ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
