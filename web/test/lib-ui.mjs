// Helpers for browser tests of the page's own sections (web/test/train-ui.mjs), on top of the
// shared ones in lib.mjs (Chromium, the static server, arguments, the logger): a main-thread block
// monitor, an axe-core audit, element screenshots, and small ZIP/TIFF readers and a PNG writer for
// checking what the page downloads (the PNG reader is lib.mjs's decodePng).

import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { here, repoRoot } from './lib.mjs';

export { launch, startServer, parseArgs, logger, readSafetensors, repoRoot } from './lib.mjs';
export const fixturesDir = path.join(repoRoot, 'tests', 'data', 'fixtures');
const axeFile = path.join(here, 'node_modules', 'axe-core', 'axe.min.js');

/** Installed before the page's scripts: the longest gap between 20 ms timer ticks, and the longest
 * long task the browser reports, on the page's main thread (window.__block). reset() restarts. */
export const BLOCK_MONITOR = () => {
  const b = { timerGap: 0, longTask: 0, reset() { b.timerGap = 0; b.longTask = 0; } };
  window.__block = b;
  let last = performance.now();
  setInterval(() => {
    const now = performance.now();
    b.timerGap = Math.max(b.timerGap, now - last - 20);
    last = now;
  }, 20);
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) b.longTask = Math.max(b.longTask, e.duration);
    }).observe({ type: 'longtask', buffered: true });
  } catch {
    b.longTask = -1; // not supported: the timer probe alone
  }
};

/** axe-core on the page (served through lib.mjs's server: `srv` is what startServer resolved
 * to); serious and critical violations fail (all are printed). An absent axe-core is a failure
 * here, not a skip. `include`: selectors to audit (default: the document). */
export async function axeAudit(rep, page, srv, what, include) {
  if (!fs.existsSync(axeFile)) return rep.check(false, `axe-core audit (${what})`, 'web/test/node_modules/axe-core is missing (npm ci in web/test)');
  if (!(await page.evaluate(() => typeof window.axe === 'object'))) await page.addScriptTag({ url: `${srv.origin}${srv.addFile(axeFile)}` });
  const violations = await page.evaluate(async (inc) => {
    const ctx = inc ? { include: inc.map((s) => [s]) } : document;
    const r = await window.axe.run(ctx, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length, where: v.nodes.slice(0, 3).map((n) => `${n.target.join(' ')}: ${(n.failureSummary || '').replace(/\s+/g, ' ').slice(0, 200)}`) }));
  }, include || null);
  for (const v of violations) rep.log(`  axe (${what}): ${v.impact} ${v.id} on ${v.nodes} node(s): ${v.help} — ${v.where.join(' | ')}`);
  const bad = violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  return rep.check(bad.length === 0, `axe-core audit (${what}): no serious or critical violations (${violations.length} kind(s) in all${bad.length ? ': ' + bad.map((v) => v.id).join(', ') : ''})`);
}

/** A screenshot of one element into DIR/name.png (JPEG when the PNG is over 300 KB). */
export async function shotElement(rep, dir, locator, name) {
  if (!dir) return;
  fs.mkdirSync(dir, { recursive: true });
  for (const ext of ['png', 'jpg']) fs.rmSync(path.join(dir, `${name}.${ext}`), { force: true });
  await locator.scrollIntoViewIfNeeded();
  const png = await locator.screenshot({ type: 'png' });
  let file = path.join(dir, `${name}.png`);
  if (png.length <= 300 * 1024) fs.writeFileSync(file, png);
  else {
    file = path.join(dir, `${name}.jpg`);
    fs.writeFileSync(file, await locator.screenshot({ type: 'jpeg', quality: 80 }));
  }
  rep.log(`  screenshot ${path.relative(repoRoot, file)} (${(fs.statSync(file).size / 1024).toFixed(0)} KB)`);
}

// ---------------------------------------------------------------------------------------------
// Files

/** An 8-bit greyscale PNG. */
export function writeGreyPng(w, h, grey) {
  const crcTable = new Int32Array(256).map((_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c;
  });
  const crc = (b) => {
    let c = -1;
    for (const x of b) c = crcTable[(c ^ x) & 255] ^ (c >>> 8);
    return (c ^ -1) >>> 0;
  };
  const chunk = (type, data) => {
    const head = Buffer.alloc(8);
    head.writeUInt32BE(data.length, 0);
    head.write(type, 4, 'latin1');
    const tail = Buffer.alloc(4);
    tail.writeUInt32BE(crc(Buffer.concat([head.subarray(4), data])), 0);
    return Buffer.concat([head, data, tail]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8;
  const raw = Buffer.alloc((w + 1) * h);
  for (let y = 0; y < h; y++) Buffer.from(grey.subarray(y * w, (y + 1) * w)).copy(raw, y * (w + 1) + 1);
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr), chunk('IDAT', zlib.deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}

/** An uncompressed single-channel TIFF (8 or 16 bit, strips) → {width, height, data: numbers}. */
export function readTiffGrey(buf) {
  const le = buf.toString('latin1', 0, 2) === 'II';
  const u16 = (o) => (le ? buf.readUInt16LE(o) : buf.readUInt16BE(o));
  const u32 = (o) => (le ? buf.readUInt32LE(o) : buf.readUInt32BE(o));
  const ifd = u32(4);
  const n = u16(ifd);
  const tags = {};
  for (let i = 0; i < n; i++) {
    const e = ifd + 2 + i * 12;
    const tag = u16(e), type = u16(e + 2), count = u32(e + 4);
    const size = type === 3 ? 2 : 4;
    const at = count * size <= 4 ? e + 8 : u32(e + 8);
    tags[tag] = Array.from({ length: count }, (_, k) => (size === 2 ? u16(at + k * 2) : u32(at + k * 4)));
  }
  const [w] = tags[256], [h] = tags[257];
  const bits = tags[258]?.[0] ?? 1;
  if ((tags[259]?.[0] ?? 1) !== 1) throw new Error('compressed TIFF');
  const offsets = tags[273], counts = tags[279];
  const bytes = Buffer.concat(offsets.map((o, i) => buf.subarray(o, o + counts[i])));
  const data = new Array(w * h);
  for (let i = 0; i < w * h; i++) data[i] = bits === 16 ? (le ? bytes.readUInt16LE(i * 2) : bytes.readUInt16BE(i * 2)) : bytes[i];
  return { width: w, height: h, data };
}

/** The entries of a stored (method 0) ZIP: name → bytes. */
export function readZip(buf) {
  let eocd = buf.length - 22;
  while (eocd >= 0 && buf.readUInt32LE(eocd) !== 0x06054b50) eocd--;
  if (eocd < 0) throw new Error('no ZIP end record');
  const n = buf.readUInt16LE(eocd + 10);
  let off = buf.readUInt32LE(eocd + 16);
  const out = new Map();
  for (let i = 0; i < n; i++) {
    if (buf.readUInt32LE(off) !== 0x02014b50) throw new Error('bad central directory');
    const method = buf.readUInt16LE(off + 10);
    const size = buf.readUInt32LE(off + 20);
    const nameLen = buf.readUInt16LE(off + 28), extra = buf.readUInt16LE(off + 30), comment = buf.readUInt16LE(off + 32);
    const local = buf.readUInt32LE(off + 42);
    const name = buf.toString('utf8', off + 46, off + 46 + nameLen);
    const start = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
    const data = buf.subarray(start, start + size);
    out.set(name, method === 0 ? data : zlib.inflateRawSync(data));
    off += 46 + nameLen + extra + comment;
  }
  return out;
}
