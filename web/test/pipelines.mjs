// Compiles, one by one in headless Chromium's WebGPU, every pipeline a native run created, and
// prints the compile time, any validation error and the GPU process's memory after each one.
// For finding the kernel a browser's shader compiler chokes on.
//
//   MEDFASTSAM_DUMP_PIPELINES=/tmp/pl medfastsam segment ... --webgpu-limits
//   node web/test/pipelines.mjs /tmp/pl [--chromium PATH]

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const args = process.argv.slice(2);
const dir = args.find((a) => !a.startsWith('--'));
if (!dir) {
  console.error('usage: node pipelines.mjs DIR [--chromium PATH]');
  process.exit(2);
}
const ci = args.indexOf('--chromium');
const chromiumPath = ci >= 0 ? args[ci + 1] : process.env.CHROMIUM || '/usr/bin/chromium';

const pipelines = fs
  .readFileSync(path.join(dir, 'pipelines.jsonl'), 'utf8')
  .split('\n')
  .filter(Boolean)
  .map((l) => JSON.parse(l));
const sources = {};
for (const p of pipelines) sources[p.family] ??= fs.readFileSync(path.join(dir, `${p.family}.wgsl`), 'utf8');

function gpuProcessRssMiB() {
  for (const pid of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (!cmd.includes('--type=gpu-process')) continue;
      const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+) kB/);
      if (m) return Math.round(Number(m[1]) / 1024);
    } catch {
      // process went away
    }
  }
  return -1;
}

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/html' });
  res.end('<!doctype html><title>pipelines</title>');
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: ['--enable-unsafe-webgpu', '--no-first-run', '--disable-dev-shm-usage'],
});
let failed = 0;
try {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.evaluate(async (sources) => {
    const adapter = await navigator.gpu.requestAdapter();
    window.__dev = await adapter.requestDevice();
    window.__mods = {};
    for (const [f, code] of Object.entries(sources)) window.__mods[f] = window.__dev.createShaderModule({ code, label: f });
  }, sources);
  for (const p of pipelines) {
    const t = Date.now();
    const err = await page.evaluate(async (p) => {
      const dev = window.__dev;
      dev.pushErrorScope('validation');
      try {
        await dev.createComputePipelineAsync({
          layout: 'auto',
          compute: { module: window.__mods[p.family], entryPoint: p.entry, constants: p.constants },
        });
      } catch (e) {
        return String(e);
      }
      const e = await dev.popErrorScope();
      return e ? e.message : null;
    }, p);
    const ms = Date.now() - t;
    if (err) failed++;
    console.log(
      `${String(ms).padStart(7)} ms  gpu-process ${String(gpuProcessRssMiB()).padStart(6)} MiB  ${p.family}::${p.entry} ${JSON.stringify(p.constants)}${err ? `  ERROR ${err}` : ''}`,
    );
  }
} finally {
  await browser.close();
  server.close();
}
console.log(`${pipelines.length} pipelines, ${failed} failed`);
process.exit(failed ? 1 : 0);
