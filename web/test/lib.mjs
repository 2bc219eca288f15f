// Shared helpers of the browser tests and harness commands: Chromium with WebGPU (SwiftShader when
// headless), a static server of web/ with extra routes, and a handle on the page's compute worker
// (web/worker.js) driven through its own {id, op, ...} protocol from a blank page of the same origin.

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const here = path.dirname(fileURLToPath(import.meta.url));
export const webRoot = path.resolve(here, '..');
export const repoRoot = path.resolve(webRoot, '..');

export const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.wasm': 'application/wasm',
  '.svg': 'image/svg+xml',
  '.json': 'application/json',
  '.safetensors': 'application/octet-stream',
  '.md': 'text/plain; charset=utf-8',
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.tif': 'image/tiff',
};

// The command line: --name value options and bare flags; `list(name)` takes every value after
// --name up to the next --option.
export function parseArgs(argv) {
  const opt = (name, dflt) => {
    const i = argv.indexOf(name);
    return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt;
  };
  const flag = (name) => argv.includes(name);
  const list = (name) => {
    const i = argv.indexOf(name);
    if (i < 0) return [];
    const out = [];
    for (let k = i + 1; k < argv.length && !argv[k].startsWith('--'); k++) out.push(argv[k]);
    return out;
  };
  return { opt, flag, list };
}

export function logger(tag) {
  const t0 = Date.now();
  let failures = 0;
  const log = (...m) => console.log(`[${tag} ${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s]`, ...m);
  const check = (ok, what, detail) => {
    if (ok) log(`ok   ${what}`);
    else {
      failures++;
      log(`FAIL ${what}${detail !== undefined ? ` -- ${typeof detail === 'string' ? detail : JSON.stringify(detail)}` : ''}`);
    }
    return ok;
  };
  return { log, check, failures: () => failures, fail: () => failures++, seconds: () => (Date.now() - t0) / 1000 };
}

export async function launch(chromiumPath) {
  return chromium.launch({
    executablePath: chromiumPath || process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--enable-unsafe-webgpu',
      '--no-first-run',
      '--no-default-browser-check',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-quic',
      '--disable-dev-shm-usage',
      // Extra flags for debugging, e.g. MEDFASTSAM_CHROMIUM_ARGS='--enable-logging=stderr --v=1'
      ...(process.env.MEDFASTSAM_CHROMIUM_ARGS || '').split(' ').filter(Boolean),
    ],
  });
}

// A static server of web/ (not web/test/) plus, for harness use: /__files__/<k> serves the k-th
// file registered with `addFile(path)`, POST /__upload__/<name> stores the body (read back with
// `upload(name)`), and /__blank__.html is an empty page of the same origin.
export function startServer() {
  const files = [];
  const uploads = new Map();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://localhost');
    const p = decodeURIComponent(url.pathname);
    if (req.method === 'POST' && p.startsWith('/__upload__/')) {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        uploads.set(p.slice('/__upload__/'.length), Buffer.concat(chunks));
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end('ok');
      });
      return;
    }
    if (p === '/favicon.ico') {
      res.writeHead(204);
      res.end();
      return;
    }
    if (p === '/__blank__.html') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end('<!doctype html><meta charset="utf-8"><title>medfastsam harness</title><body></body>');
      return;
    }
    let file = null;
    if (p.startsWith('/__files__/')) {
      file = files[Number(p.slice('/__files__/'.length))] || null;
    } else {
      const rel = p === '/' ? 'index.html' : p.slice(1);
      const abs = path.resolve(webRoot, rel);
      if (abs.startsWith(webRoot + path.sep) && !abs.includes(`${path.sep}test${path.sep}`)) file = abs;
    }
    if (!file || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': MIME[path.extname(file)] || 'application/octet-stream', 'cache-control': 'no-store' });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () =>
      resolve({
        server,
        origin: `http://127.0.0.1:${server.address().port}`,
        addFile: (f) => {
          files.push(path.resolve(f));
          return `/__files__/${files.length - 1}`;
        },
        upload: (name) => uploads.get(name),
      }),
    );
  });
}

// The page's worker on a blank page: `call(op, fields, fileFields)` posts {id, op, ...fields}
// where each fileFields entry (name -> url or list of urls on this origin) is fetched in the page
// and passed as a Blob, waits for the result and returns its value (an Error with the worker's
// name and message on ok: false). ArrayBuffer fields of the value named in `uploadAs` (field ->
// upload name) are POSTed to the server instead of returned. Progress messages are kept and
// returned by `progress()`.
export async function openWorker(browser, origin, log) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') log(`  [console.${m.type()}] ${m.text()}`);
  });
  page.on('pageerror', (e) => log(`  [pageerror] ${e}`));
  page.on('worker', (w) => w.on('console', (m) => log(`  [worker console.${m.type()}] ${m.text()}`)));
  await page.goto(`${origin}/__blank__.html`);
  await page.evaluate(() => {
    const w = new Worker('/worker.js', { type: 'module' });
    let next = 1;
    const waiting = new Map();
    window.__progress = [];
    w.onmessage = (ev) => {
      const m = ev.data;
      if (m.type === 'progress') {
        const { id, type, ...rest } = m;
        window.__progress.push(rest);
        return;
      }
      const p = waiting.get(m.id);
      if (p) {
        waiting.delete(m.id);
        p(m);
      }
    };
    w.onerror = (e) => console.error(`worker error: ${e.message}`);
    window.__call = (msg, transfer) =>
      new Promise((resolve) => {
        const id = next++;
        waiting.set(id, resolve);
        w.postMessage({ id, ...msg }, transfer || []);
      });
  });
  const call = async (op, fields = {}, fileFields = {}, uploadAs = {}) => {
    const r = await page.evaluate(
      async ({ op, fields, fileFields, uploadAs }) => {
        const blob = async (u) => {
          const res = await fetch(u);
          if (!res.ok) throw new Error(`${u}: HTTP ${res.status}`);
          return res.blob();
        };
        const msg = { op, ...fields };
        for (const [k, v] of Object.entries(fileFields)) msg[k] = Array.isArray(v) ? await Promise.all(v.map(blob)) : await blob(v);
        const m = await window.__call(msg);
        if (m.ok && m.value && typeof m.value === 'object') {
          for (const [field, name] of Object.entries(uploadAs)) {
            const b = m.value[field];
            if (b instanceof ArrayBuffer) {
              const res = await fetch(`/__upload__/${name}`, { method: 'POST', body: b });
              if (!res.ok) throw new Error(`upload ${name}: HTTP ${res.status}`);
              m.value[field] = { uploaded: name, length: b.byteLength };
            }
          }
          if (m.value.mask instanceof ImageBitmap) m.value.mask = { width: m.value.mask.width, height: m.value.mask.height };
        }
        return m;
      },
      { op, fields, fileFields, uploadAs },
    );
    if (!r.ok) {
      const e = new Error(r.error.message);
      e.name = r.error.name;
      throw e;
    }
    return r.value;
  };
  const progress = () => page.evaluate(() => window.__progress.splice(0));
  return { page, context, call, progress };
}

// Reads a safetensors file: {metadata, tensors: {name: {dtype, shape, data: Float32Array | null}}}
// (f32 tensors decoded; others left as bytes).
export function readSafetensors(buf) {
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.toString('utf8', 8, 8 + n));
  const base = 8 + n;
  const tensors = {};
  for (const [k, v] of Object.entries(header)) {
    if (k === '__metadata__') continue;
    const [a, b] = v.data_offsets;
    const bytes = buf.subarray(base + a, base + b);
    let data = null;
    if (v.dtype === 'F32') {
      data = new Float32Array(bytes.length / 4);
      for (let i = 0; i < data.length; i++) data[i] = bytes.readFloatLE(i * 4);
    }
    tensors[k] = { dtype: v.dtype, shape: v.shape, data, bytes };
  }
  return { metadata: header.__metadata__ || {}, tensors };
}

// Per-tensor comparison of the f32 tensors whose names pass `keep`: max|a-b| / max|b| (relative)
// and max|a-b| (absolute); the worst of each, and the keys missing on either side. With
// `zeroBelow` > 0, a tensor whose reference is below zeroBelow x the largest reference value of
// all compared tensors is mathematically zero (e.g. the gradient of a key bias under softmax: its
// values are rounding noise) and is judged apart: `zero` holds their count and the largest
// |a-b| among them relative to that largest value. `rows`: every compared tensor {key, abs, rel,
// zero}.
export function compareTensors(got, want, keep = () => true, zeroBelow = 0) {
  const missing = [];
  let worstRel = { key: null, value: 0 };
  let worstAbs = { key: null, value: 0 };
  const zero = { count: 0, key: null, value: 0 };
  let compared = 0;
  const pairs = [];
  let global = 0;
  for (const [k, w] of Object.entries(want.tensors)) {
    if (!keep(k) || !w.data) continue;
    const g = got.tensors[k];
    if (!g || !g.data || g.data.length !== w.data.length) {
      missing.push(k);
      continue;
    }
    let num = 0, den = 0;
    for (let i = 0; i < w.data.length; i++) {
      const d = Math.abs(g.data[i] - w.data[i]);
      if (!(d <= num)) num = Number.isNaN(d) ? Infinity : d;
      den = Math.max(den, Math.abs(w.data[i]));
    }
    pairs.push({ k, num, den });
    global = Math.max(global, den);
  }
  const rows = [];
  for (const { k, num, den } of pairs) {
    compared++;
    if (num > worstAbs.value || worstAbs.key === null) worstAbs = { key: k, value: num };
    if (zeroBelow > 0 && den < zeroBelow * global) {
      rows.push({ key: k, abs: num, zero: true });
      zero.count++;
      const v = num / Math.max(global, 1e-30);
      if (v > zero.value || zero.key === null) Object.assign(zero, { key: k, value: v });
      continue;
    }
    const rel = num === 0 ? 0 : num / Math.max(den, 1e-30);
    rows.push({ key: k, abs: num, rel, zero: false });
    if (rel > worstRel.value || worstRel.key === null) worstRel = { key: k, value: rel };
  }
  for (const k of Object.keys(got.tensors)) if (keep(k) && !(k in want.tensors)) missing.push(`${k} (only in the page's file)`);
  return { compared, missing, worstRel, worstAbs, zero, global, rows };
}

// A minimal PNG decoder (8-bit grey, grey+alpha, RGB, RGBA; not interlaced; what the mask encoder
// writes) → {width, height, channels, data}, for comparisons.
export function decodePng(buf) {
  const sig = Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]);
  if (!buf.subarray(0, 8).equals(sig)) throw new Error('not a PNG');
  let off = 8;
  let width, height, depth, ctype, interlace;
  const idat = [];
  while (off < buf.length) {
    const len = buf.readUInt32BE(off);
    const type = buf.toString('latin1', off + 4, off + 8);
    const data = buf.subarray(off + 8, off + 8 + len);
    if (type === 'IHDR') {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      depth = data[8];
      ctype = data[9];
      interlace = data[12];
    } else if (type === 'IDAT') idat.push(data);
    else if (type === 'IEND') break;
    off += 12 + len;
  }
  const channels = { 0: 1, 2: 3, 4: 2, 6: 4 }[ctype];
  if (depth !== 8 || !channels || interlace !== 0) throw new Error(`unsupported PNG (depth ${depth}, colour type ${ctype}, interlace ${interlace})`);
  const raw = zlib.inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const out = Buffer.alloc(stride * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const row = out.subarray(y * stride, (y + 1) * stride);
    const prev = y > 0 ? out.subarray((y - 1) * stride, y * stride) : null;
    for (let x = 0; x < stride; x++) {
      const a = x >= channels ? row[x - channels] : 0;
      const b = prev ? prev[x] : 0;
      const c = prev && x >= channels ? prev[x - channels] : 0;
      let v = line[x];
      if (filter === 1) v += a;
      else if (filter === 2) v += b;
      else if (filter === 3) v += (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      } else if (filter !== 0) throw new Error(`bad PNG filter ${filter}`);
      row[x] = v & 255;
    }
  }
  return { width, height, channels, data: out };
}
