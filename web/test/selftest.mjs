// Browser test of the page's "Check this GPU" (run by web/test.sh; needs the wasm build in web/pkg and
// the native CLI). Runs `medfastsam selftest --quick --json F` natively, then opens the page from a
// fresh profile in headless Chromium (WebGPU on SwiftShader), presses "Check this GPU" from the
// keyboard, waits for the run, presses "Download report" and checks:
//   - the download is exactly the page's report (JSON), named medfastsam-selftest-<adapter>.json,
//     and it validates against docs/selftest.schema.json (a validator of the keywords that schema
//     uses: type, required, properties, items, const, enum);
//   - its checks are the CLI's, in the CLI's order, minus only those the page cannot run
//     (PAGE_CANNOT_RUN, said by name), and for every check in both the verdicts are equal; every
//     page check passes on this adapter (else: which, and its message);
//   - every check names its entry point(s), at least one pipeline has a compile time, the table
//     has a row per check with the report's verdict, the compile list is every created pipeline,
//     slowest first; the progress said "Check k of n — name"; the main thread never froze;
//   - with a model loaded (the tiny fixture), the check runs again with the same verdicts and the
//     model is undisturbed (an image's mask after the check equals its mask before).
// Prints the page's table and the time of its run.
//
// Usage: node web/test/selftest.mjs --cli PATH [--chromium PATH] [--screenshots DIR]   exits 1 on failure

import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const webRoot = path.resolve(here, '..');
const repoRoot = path.resolve(webRoot, '..');
const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};
const chromiumPath = opt('--chromium', process.env.CHROMIUM || '/usr/bin/chromium');
const cliPath = opt('--cli', path.join(process.env.CARGO_TARGET_DIR || path.join(repoRoot, 'target'), 'release', 'medfastsam'));
const shotsDir = opt('--screenshots');

// Checks the CLI runs that the page cannot: none (the model checks read the compact fixture
// web/build.sh writes to pkg/selftest-tiny.safetensors).
const PAGE_CANNOT_RUN = new Set();

const t0 = Date.now();
const log = (...m) => console.log(`[selftest-test ${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s]`, ...m);
let failures = 0;
function check(ok, what, detail) {
  if (ok) log(`ok   ${what}`);
  else {
    failures++;
    log(`FAIL ${what}${detail !== undefined ? ` -- ${typeof detail === 'string' ? detail : JSON.stringify(detail)}` : ''}`);
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// JSON Schema, the subset docs/selftest.schema.json uses. Returns a list of "path: problem".

function typeOf(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v; // string, boolean, object
}

function validate(schema, v, at = '$', errs = []) {
  if (schema.type !== undefined) {
    const want = [].concat(schema.type);
    const got = typeOf(v);
    if (!want.includes(got) && !(got === 'integer' && want.includes('number'))) {
      errs.push(`${at}: type ${got}, want ${want.join('|')}`);
      return errs;
    }
  }
  if ('const' in schema && JSON.stringify(v) !== JSON.stringify(schema.const)) errs.push(`${at}: ${JSON.stringify(v)} is not the constant ${JSON.stringify(schema.const)}`);
  if (schema.enum && !schema.enum.some((e) => JSON.stringify(e) === JSON.stringify(v))) errs.push(`${at}: ${JSON.stringify(v)} is not one of ${schema.enum.join(', ')}`);
  if (typeOf(v) === 'object') {
    for (const k of schema.required || []) if (!(k in v)) errs.push(`${at}: missing required '${k}'`);
    for (const [k, s] of Object.entries(schema.properties || {})) if (k in v) validate(s, v[k], `${at}.${k}`, errs);
  }
  if (Array.isArray(v) && schema.items) v.forEach((x, i) => validate(schema.items, x, `${at}[${i}]`, errs));
  return errs;
}

// The validator itself must reject what the schema forbids (else a pass below means nothing).
function selfCheckValidator(schema, good) {
  const bad = (mutate) => {
    const r = structuredClone(good);
    mutate(r);
    return validate(schema, r).length > 0;
  };
  return (
    validate(schema, good).length === 0 &&
    bad((r) => (r.schema = 'medfastsam-selftest/0')) &&
    bad((r) => delete r.adapter.name) &&
    bad((r) => (r.mode = 'fast')) &&
    bad((r) => (r.passed = 1.5)) &&
    (good.checks.length === 0 || (bad((r) => (r.checks[0].verdict = 'ok')) && bad((r) => (r.checks[0].max_rel_err = 'small')) && bad((r) => delete r.checks[0].pipelines)))
  );
}

// ---------------------------------------------------------------------------------------------
// Static server for web/ (as the page is served: same origin for the page, worker, wasm).

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.wasm': 'application/wasm',
  '.svg': 'image/svg+xml',
  '.json': 'application/json',
};
function startServer() {
  const server = http.createServer((req, res) => {
    const p = decodeURIComponent(new URL(req.url, 'http://localhost').pathname);
    const abs = path.resolve(webRoot, p === '/' ? 'index.html' : p.slice(1));
    if (!abs.startsWith(webRoot + path.sep) || abs.includes(`${path.sep}test${path.sep}`) || !fs.existsSync(abs) || !fs.statSync(abs).isFile()) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': MIME[path.extname(abs)] || 'application/octet-stream', 'cache-control': 'no-store' });
    fs.createReadStream(abs).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, origin: `http://127.0.0.1:${server.address().port}` })));
}

function table(checks) {
  const rows = checks.map((c) => [
    c.name,
    c.verdict,
    c.max_rel_err == null ? '-' : c.max_rel_err.toExponential(2),
    c.tolerance.toExponential(0),
    c.ms == null ? '-' : c.ms.toFixed(2),
    c.gflops != null ? `${c.gflops.toFixed(2)} GFLOP/s` : c.gbps != null ? `${c.gbps.toFixed(2)} GB/s` : '-',
    c.compile_ms == null ? '-' : c.compile_ms.toFixed(1),
    c.entry,
  ]);
  const head = ['check', 'verdict', 'max rel err', 'tol', 'ms', 'rate', 'compile ms', 'entry'];
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r) => r.map((x, i) => (i === r.length - 1 ? x : x.padEnd(w[i]))).join('  ');
  return [line(head), ...rows.map(line)].join('\n');
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const schema = JSON.parse(fs.readFileSync(path.join(repoRoot, 'docs', 'selftest.schema.json'), 'utf8'));
  if (!fs.existsSync(path.join(webRoot, 'pkg', 'medfastsam_bg.wasm'))) throw new Error('web/pkg is missing: run web/build.sh');
  if (!fs.existsSync(cliPath)) throw new Error(`the native CLI is missing at ${cliPath} (cargo build --release, or --cli PATH)`);

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medfastsam-selftest-'));
  const cliJson = path.join(tmp, 'cli.json');
  log(`native: ${cliPath} selftest --quick --json ${cliJson}`);
  const tc = Date.now();
  try {
    execFileSync(cliPath, ['selftest', '--quick', '--json', cliJson], { stdio: ['ignore', 'ignore', 'inherit'] });
  } catch (e) {
    // A failing check makes the CLI exit non-zero; its report is still written and compared below.
    log(`  the CLI exited with status ${e.status}`);
  }
  const cli = JSON.parse(fs.readFileSync(cliJson, 'utf8'));
  log(`  CLI: ${cli.passed} of ${cli.checks.length} pass in ${((Date.now() - tc) / 1000).toFixed(1)} s on ${cli.adapter.name} (${cli.adapter.backend}, ${cli.adapter.device_type})`);
  check(validate(schema, cli).length === 0, "the CLI's report validates against docs/selftest.schema.json", validate(schema, cli).slice(0, 5));

  const { server, origin } = await startServer();
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: ['--enable-unsafe-webgpu', '--no-first-run', '--no-default-browser-check', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  try {
    const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
    await context.addInitScript(() => {
      let last = performance.now();
      window.__stall = { max: 0 };
      setInterval(() => {
        const now = performance.now();
        window.__stall.max = Math.max(window.__stall.max, now - last - 20);
        last = now;
      }, 20);
    });
    const page = await context.newPage();
    page.on('pageerror', (e) => log(`  [pageerror] ${e}`));
    page.on('console', (m) => (m.type() === 'error' ? log(`  [console.error] ${m.text()}`) : null));
    await page.goto(`${origin}/?no-bundled`);
    const run = page.getByRole('button', { name: 'Check this GPU', exact: true });
    await run.waitFor();
    await page.waitForFunction(() => !document.querySelector('#check-run').disabled, null, { timeout: 120000 });
    check(await page.evaluate(() => document.querySelector('#check-label').getAttribute('aria-live') === 'polite'), 'the check\'s progress text is a polite live region');

    // From the keyboard: focus the real button and press Enter.
    await run.focus();
    await page.evaluate(() => (window.__stall.max = 0));
    const tp = Date.now();
    await page.keyboard.press('Enter');
    const labels = new Set();
    let maxValue = 0;
    for (;;) {
      const s = await page.evaluate(() => ({
        label: document.querySelector('#check-label').textContent,
        value: document.querySelector('#check-bar').value,
        done: !document.querySelector('#check-download').disabled,
        alert: document.querySelector('#check-alert').hidden ? null : document.querySelector('#check-alert').textContent,
        rows: document.querySelectorAll('#check-rows tr').length,
      }));
      labels.add(s.label);
      maxValue = Math.max(maxValue, s.value);
      if (s.done || s.alert) {
        if (s.alert) check(false, 'the GPU check ran to the end', s.alert);
        break;
      }
      if (Date.now() - tp > 20 * 60 * 1000) throw new Error(`the check did not finish in 20 min (last: ${s.label}, ${s.rows} rows)`);
      await page.waitForTimeout(100);
    }
    const pageMs = Date.now() - tp;
    const progressed = [...labels].filter((l) => /^Check \d+ of \d+ — \S+/.test(l));
    check(progressed.length >= 2, `the progress said "Check k of n — name" (${progressed.length} distinct, e.g. "${progressed[1] || progressed[0]}")`);
    const stall = await page.evaluate(() => window.__stall.max);
    check(stall < 500, `the main thread stayed responsive during the check (longest stall ${stall.toFixed(0)} ms < 500 ms)`);

    const [dl] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Download report' }).click()]);
    const text = fs.readFileSync(await dl.path(), 'utf8');
    const inPage = await page.evaluate(() => window.medfastsam.checkReport());
    check(inPage && text === inPage.text, 'the download is exactly the report the engine wrote');
    const rep = JSON.parse(text);
    const want = `medfastsam-selftest-${rep.adapter.name.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-+|-+$/g, '').slice(0, 60)}.json`;
    check(dl.suggestedFilename() === want && /^medfastsam-selftest-[a-z0-9-]+\.json$/.test(want), `the download is named ${dl.suggestedFilename()}`);
    check(selfCheckValidator(schema, rep), 'the schema validator accepts the report and rejects mutated copies of it');
    const errs = validate(schema, rep);
    check(errs.length === 0, "the page's report validates against docs/selftest.schema.json", errs.slice(0, 5));
    check(rep.mode === 'quick' && rep.checks.length > 0, `quick mode, ${rep.checks.length} checks`);
    log(`page: ${rep.passed} of ${rep.checks.length} pass, ${rep.failed} failed, on ${rep.adapter.name} (${rep.adapter.backend}, ${rep.adapter.device_type}${rep.adapter.driver ? ', ' + rep.adapter.driver : ''}) in ${(pageMs / 1000).toFixed(1)} s (worker ${(inPage.ms / 1000).toFixed(1)} s)`);
    console.log(table(rep.checks));

    // Against the CLI.
    const pageNames = rep.checks.map((c) => c.name);
    const cliNames = cli.checks.map((c) => c.name);
    const missing = cliNames.filter((n) => !pageNames.includes(n));
    const extra = pageNames.filter((n) => !cliNames.includes(n));
    check(extra.length === 0, 'every page check is one of the CLI\'s', extra);
    check(missing.every((n) => PAGE_CANNOT_RUN.has(n)), `the page runs every CLI check but those it cannot run${missing.length ? ` (${missing.join(', ')}: the tiny model's fixture files)` : ' (none missing)'}`, missing.filter((n) => !PAGE_CANNOT_RUN.has(n)));
    check(JSON.stringify(cliNames.filter((n) => pageNames.includes(n))) === JSON.stringify(pageNames), 'the page runs them in the CLI\'s order');
    const cliBy = new Map(cli.checks.map((c) => [c.name, c]));
    log(`  adapter types: page ${rep.adapter.device_type} (${rep.adapter.backend}), CLI ${cli.adapter.device_type} (${cli.adapter.backend})`);
    // A check the page skips because the browser's adapter lacks an optional feature (shader-f16:
    // SwiftShader in Chromium does not offer it, lavapipe does) is the adapters' difference, not
    // the page's: named, and set aside from the comparisons below.
    const lacksFeature = (c) => c.verdict === 'skipped' && /does not offer/.test(c.message || '');
    const featureSkips = rep.checks.filter(lacksFeature);
    log(`  skipped for a feature this browser's adapter lacks: ${featureSkips.map((c) => `${c.name} (${c.message})`).join('; ') || 'none'}`);
    check(featureSkips.every((c) => c.name.startsWith('f16.')), 'only the f16 check may be skipped for a missing feature', featureSkips.map((c) => c.name));
    const differ = rep.checks.filter((c) => !lacksFeature(c) && cliBy.has(c.name) && cliBy.get(c.name).verdict !== c.verdict);
    check(differ.length === 0, `verdicts equal the CLI's for all ${rep.checks.filter((c) => cliBy.has(c.name)).length} common checks`, differ.map((c) => `${c.name}: page ${c.verdict} (${c.message}), CLI ${cliBy.get(c.name).verdict} (${cliBy.get(c.name).message})`));
    const notPass = rep.checks.filter((c) => c.verdict !== 'pass' && !lacksFeature(c));
    check(notPass.length === 0 && rep.passed + featureSkips.length === rep.checks.length && rep.failed === 0, 'every page check passes on this adapter', notPass.map((c) => `${c.name}: ${c.verdict}: ${c.message}`));
    const noEntry = rep.checks.filter((c) => !lacksFeature(c) && (!c.entry || !c.entry.trim()));
    check(noEntry.length === 0, 'every check names its entry point(s)', noEntry.map((c) => c.name));
    const compiled = rep.checks.flatMap((c) => c.pipelines.filter((p) => p.compile_ms != null).map((p) => ({ ...p, check: c.name })));
    check(compiled.length > 0, `${compiled.length} pipelines report a compile time`);
    compiled.sort((a, b) => b.compile_ms - a.compile_ms);
    if (compiled.length) log(`  slowest compiles: ${compiled.slice(0, 3).map((p) => `${p.family}/${p.entry} ${p.compile_ms.toFixed(1)} ms`).join(', ')}; total ${compiled.reduce((t, p) => t + p.compile_ms, 0).toFixed(0)} ms`);

    // The page's table and compile list show the report.
    const shown = await page.evaluate(() => ({
      rows: [...document.querySelectorAll('#check-rows tr')].map((tr) => ({ name: tr.dataset.name, verdict: tr.dataset.verdict, text: tr.querySelector('.verdict').textContent, cells: tr.cells.length, wall: tr.cells[tr.cells.length - 1].textContent })),
      heads: document.querySelectorAll('#check-table thead th').length,
      pipelines: [...document.querySelectorAll('#check-pipelines li')].map((li) => li.textContent),
      summary: document.querySelector('#check-summary').textContent,
      adapter: document.querySelector('#check-adapter').textContent,
      all: document.querySelector('#check').textContent,
    }));
    check(
      shown.rows.length === rep.checks.length && shown.rows.every((r, i) => r.name === rep.checks[i].name && r.verdict === rep.checks[i].verdict && r.cells === shown.heads && /pass|tolerance|compile|error|skipped/.test(r.text)),
      `the table has a row per check with its verdict in words (${shown.rows.length} rows, ${shown.heads} columns)`,
    );
    const walls = shown.rows.map((r) => Number(r.wall));
    check(walls.every((w) => Number.isFinite(w) && w >= 0), 'every row has its wall time');
    const byWall = shown.rows.map((r, i) => [r.name, walls[i]]).sort((a, b) => b[1] - a[1]);
    log(`  wall time: ${walls.reduce((a, b) => a + b, 0)} ms in all; longest ${byWall.slice(0, 3).map(([n, w]) => `${n} ${w} ms`).join(', ')}`);
    const listed = shown.pipelines.map((t) => Number(/— ([\d.]+) ms/.exec(t)?.[1]));
    check(listed.length === compiled.length && listed.every((x, i) => i === 0 || x <= listed[i - 1]), `the compile list has every created pipeline, slowest first (${listed.length})`);
    check(shown.summary.includes(`${rep.passed} of ${rep.checks.length} pass`), `summary: "${shown.summary}"`);
    check(rep.adapter.name.trim() !== '' && shown.adapter.includes(rep.adapter.name), `adapter named in the report and on the page: "${shown.adapter}"`);
    check(!/NaN|undefined|null/.test(shown.all), 'no NaN, undefined or null in the section');

    // With a model loaded: the tiny fixture weights at 256, one image segmented (stretched, one
    // pass), the check run again, then the same image segmented again: the check leaves the model
    // as it was (the same mask, byte for byte) and its verdicts are the first run's.
    const waitFor = (fn, arg, what, timeout = 180000) => page.waitForFunction(fn, arg, { timeout, polling: 100 }).catch(() => { throw new Error(`timed out waiting for ${what}`); });
    await page.selectOption('#size', '256');
    await page.setInputFiles('#weights-input', path.join(repoRoot, 'tests', 'data', 'fixtures', 'tiny.weights.safetensors'));
    await waitFor(() => document.body.dataset.prepared === '256:paper' && document.body.dataset.state === 'ready', null, 'the tiny model');
    await page.check('#stretch');
    const image = path.join(repoRoot, 'data', 'he', 'skimage-ihc.png');
    const maskOf = async (k) => {
      await waitFor((n) => { const c = document.querySelectorAll('.card')[n]; return c && (c.dataset.state === 'done' || c.dataset.state === 'error'); }, k, `image ${k + 1}`);
      const card = page.locator('.card').nth(k);
      if ((await card.getAttribute('data-state')) !== 'done') throw new Error(`image ${k + 1} failed: ${await card.locator('.status').textContent()}`);
      const [d] = await Promise.all([page.waitForEvent('download'), card.locator('a.download-mask').click()]);
      return fs.readFileSync(await d.path());
    };
    await page.setInputFiles('#images-input', image);
    const before = await maskOf(0);
    const tm = Date.now();
    await run.click();
    await waitFor(() => !document.querySelector('#check-download').disabled || !document.querySelector('#check-alert').hidden, null, 'the second check', 20 * 60 * 1000);
    const rep2 = JSON.parse((await page.evaluate(() => window.medfastsam.checkReport()))?.text || '{"checks":[]}');
    const same = rep2.checks.length === rep.checks.length && rep2.checks.every((c, i) => c.name === rep.checks[i].name && c.verdict === rep.checks[i].verdict);
    const walls2 = await page.evaluate(() => [...document.querySelectorAll('#check-rows tr')].map((tr) => Number(tr.cells[tr.cells.length - 1].textContent)));
    log(`  second run (pipelines cached): wall ${walls2.reduce((a, b) => a + b, 0)} ms in all, ${rep2.checks.filter((c) => c.compile_ms != null).length} checks created pipelines`);
    check(same && validate(schema, rep2).length === 0, `with a model loaded the check runs again with the same verdicts (${rep2.passed} of ${rep2.checks.length} pass, ${((Date.now() - tm) / 1000).toFixed(1)} s)`);
    await page.setInputFiles('#images-input', image);
    const after = await maskOf(1);
    check(before.length > 0 && before.equals(after), `the loaded model is undisturbed: the same image's mask after the check equals the one before (${before.length} bytes)`);

    if (shotsDir) {
      fs.mkdirSync(shotsDir, { recursive: true });
      const file = path.join(shotsDir, 'selftest.png');
      await page.locator('#check').screenshot({ path: file });
      log(`  screenshot ${path.relative(repoRoot, file)} (${(fs.statSync(file).size / 1024).toFixed(0)} KB)`);
    }
    await context.close();
  } finally {
    await browser.close();
    server.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().then(
  () => {
    log(failures ? `${failures} check(s) FAILED` : 'all checks passed');
    process.exit(failures ? 1 : 0);
  },
  (e) => {
    log(`FAIL ${e.stack || e}`);
    process.exit(1);
  },
);
