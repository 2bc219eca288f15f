// Browser test of fine-tuning in the page (run by web/test.sh; needs the wasm build in web/pkg and
// the native CLI). With the tiny fixture weights and the four quadrants of the nuclei image
// (written by `medfastsam quickstart --rows otsu`), it checks the page's training ops against the
// CLI on the same inputs. The page runs on Chromium's SwiftShader, and the CLI runs on the same
// driver (Vulkan through the SwiftShader ICD Chromium ships beside its executable), so the two
// sides differ only in the WGSL compiler (Tint vs naga): what is checked is the code, not two
// drivers' rounding. The CLI on the default adapter (lavapipe in CI) is compared too, with the
// cross-driver bound.
//   (a) one step's gradients (trainGradients) against `medfastsam gradients`, full and semi mode:
//       on the same driver every `grad.*` tensor and the loss within 1e-4 relative (max|page -
//       cli| / max|cli| per tensor; the worst tensor is printed), the same keys; against the
//       default adapter within 1e-3;
//   (b) 20 Adam steps, seed 7, batch 2, semi mode, on the four quadrants (trainStart,
//       trainAddExample in file-name order, trainStep {steps: 20}) against `medfastsam train
//       --format generic --split all` on the same driver for 10 epochs of 2 steps: final weights
//       within 1e-5 (max abs
//       difference over every tensor; also printed relative), the same order of batches, and the
//       loss of the last step below the first; the downloaded weights load in the CLI and record
//       the fine-tuning; a checkpoint round trip (trainCheckpoint, trainStart from it) continues
//       with the step count;
//   (c) refusals with a message: a mask of the wrong size, an empty example set, a batch of 5,
//       full mode with batch 1.
// Prints seconds per step in the page and natively, and the test's run time.
//
// Usage: node web/test/train.mjs --cli PATH [--chromium PATH]   exits 1 on failure
// MEDFASTSAM_SWIFTSHADER_ICD names the SwiftShader ICD file when it is not beside Chromium.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { parseArgs, logger, readSafetensors, compareTensors, repoRoot } from './lib.mjs';
import { openEngine, pageGradients, pageTrain } from './train-harness.mjs';

const { opt } = parseArgs(process.argv.slice(2));
const cli = opt('--cli', path.join(process.env.CARGO_TARGET_DIR || path.join(repoRoot, 'target'), 'release', 'medfastsam'));
const { log, check, failures, fail, seconds } = logger('train-test');

const fixtures = path.join(repoRoot, 'tests', 'data', 'fixtures');
const weights = path.join(fixtures, 'tiny.weights.safetensors');
const config = path.join(fixtures, 'tiny.config.json');
// On the same driver: issue 13's 1e-4. Against another driver: 1e-3, the bound tests/parity_train.rs
// holds the native gradients to against PyTorch in float64: the attention query/key projections'
// gradients pass through the softmax backward, whose cancellation turns the different rounding
// of SwiftShader and llvmpipe (exp, reduction order) into a few 1e-4 of those tensors.
const GRAD_TOL = 1e-4;
const GRAD_BOUND = 1e-3;
const gradWorst = {};
const WEIGHT_TOL = 1e-5;
const STEPS = 20;
const SEED = 7;
const BATCH = 2;
const MODE = 'semi';
// The gradients are compared at the model's size (256²); the 20 steps run at 64² (the CLI's
// --size 64, the page's options.size): on SwiftShader a step at 64² takes seconds where one at 256²
// takes tens of seconds. The code path is the same at every size.
const GRAD_SIZE = 256;
const SIZE = 64;
// A gradient whose CLI values are all below this fraction of the largest gradient is
// mathematically zero (a key bias under softmax...): rounding noise on both sides, judged by its
// absolute difference relative to the largest gradient.
const ZERO_BELOW = 1e-6;

// Chromium's SwiftShader Vulkan ICD: beside the real Chromium executable (Debian's
// /usr/lib/chromium, Chrome's and Playwright's bundles alike), or MEDFASTSAM_SWIFTSHADER_ICD.
function swiftshaderIcd(chromiumPath) {
  if (process.env.MEDFASTSAM_SWIFTSHADER_ICD) return process.env.MEDFASTSAM_SWIFTSHADER_ICD;
  const exe = chromiumPath || process.env.CHROMIUM || '/usr/bin/chromium';
  const candidates = [];
  try {
    candidates.push(path.join(path.dirname(fs.realpathSync(exe)), 'vk_swiftshader_icd.json'));
  } catch {}
  candidates.push('/usr/lib/chromium/vk_swiftshader_icd.json');
  return candidates.find((f) => fs.existsSync(f));
}
// The page's adapter is SwiftShader (forced by --use-webgpu-adapter=swiftshader, so a machine with
// a GPU compares the same thing).
process.env.MEDFASTSAM_CHROMIUM_ARGS = `${process.env.MEDFASTSAM_CHROMIUM_ARGS || ''} --use-webgpu-adapter=swiftshader`;
const icd = swiftshaderIcd(opt('--chromium'));
const SAME = 'same driver';
const OTHER = 'default adapter';

// Runs the CLI on the page's driver (`on === SAME`) or on the default adapter; the adapter line
// it prints is checked.
function run(args, on = OTHER) {
  const t0 = Date.now();
  const env = { ...process.env };
  if (on === SAME) {
    env.VK_ICD_FILENAMES = icd;
    env.MEDFASTSAM_BACKEND = 'vulkan';
    delete env.MEDFASTSAM_ADAPTER;
  }
  const r = spawnSync(cli, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env, maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`medfastsam ${args[0]} (${on}) failed (${r.status ?? r.signal}): ${r.stderr.slice(-2000)}`);
  const adapter = /adapter:\s*([^\n]*)/.exec(r.stdout + r.stderr)?.[1] || '';
  if (on === SAME && adapter && !/swiftshader/i.test(adapter)) throw new Error(`medfastsam ${args[0]} ran on ${adapter}, not on SwiftShader (VK_ICD_FILENAMES=${icd})`);
  return { out: r.stdout, adapter, seconds: (Date.now() - t0) / 1000 };
}

async function expectRefusal(promise, pattern, what) {
  try {
    await promise;
    check(false, `${what} is refused`, 'it was accepted');
  } catch (e) {
    check(pattern.test(e.message), `${what} is refused with a message: ${e.name}: ${e.message}`, `message does not match ${pattern}`);
  }
}

let weightDiff = null;
let logitsDiff = null;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'medfastsam-train-'));
let eng;
try {
  // The four quadrants of the nuclei image and their masks, as a generic dataset folder.
  run(['quickstart', '--rows', 'otsu', '--out', path.join(tmp, 'qs')]);
  const data = path.join(tmp, 'data');
  fs.mkdirSync(path.join(data, 'images'), { recursive: true });
  fs.mkdirSync(path.join(data, 'masks'), { recursive: true });
  const names = fs.readdirSync(path.join(tmp, 'qs', 'nuclei', 'images')).sort();
  for (const n of names) {
    for (const d of ['images', 'masks']) fs.copyFileSync(path.join(tmp, 'qs', 'nuclei', d, n), path.join(data, d, n));
  }
  const images = names.map((n) => path.join(data, 'images', n));
  const masks = names.map((n) => path.join(data, 'masks', n));
  log(`inputs: ${names.join(', ')} (256x256 quadrants of data/dsb2018-nuclei/image.tif)`);

  eng = await openEngine({ chromium: opt('--chromium'), weights, log });
  const pageAdapter = `${eng.init.browser?.vendor || ''} ${eng.init.browser?.architecture || ''}`;
  if (!icd || !/swiftshader/i.test(pageAdapter)) {
    throw new Error(
      `the same-driver comparison needs the page on SwiftShader (it is on '${pageAdapter.trim()}') and Chromium's SwiftShader Vulkan ICD for the CLI (${icd ? `found ${icd}` : 'vk_swiftshader_icd.json not found beside Chromium; set MEDFASTSAM_SWIFTSHADER_ICD'})`,
    );
  }
  log(`the CLI's same-driver runs use ${icd}`);

  // (a) gradients, full and semi: against the CLI on the same driver (issue 13's bound) and on the
  // default adapter (the cross-driver bound).
  for (const mode of ['full', 'semi']) {
    const p = await pageGradients(eng, { config, images: images.slice(0, 2), masks: masks.slice(0, 2), mode, size: GRAD_SIZE });
    const got = readSafetensors(p.bytes);
    for (const [on, bound] of [[SAME, GRAD_TOL], [OTHER, GRAD_BOUND]]) {
      const cliOut = path.join(tmp, `cli-grad-${mode}-${on === SAME ? 'same' : 'other'}.safetensors`);
      const c = run(['gradients', '--weights', weights, '--config', config, '--images', ...images.slice(0, 2), '--masks', ...masks.slice(0, 2), '--out', cliOut, '--mode', mode, '--size', String(GRAD_SIZE)], on);
      const want = readSafetensors(fs.readFileSync(cliOut));
      const keysG = Object.keys(got.tensors).sort().join(',');
      const keysW = Object.keys(want.tensors).sort().join(',');
      const nGrad = Object.keys(want.tensors).filter((k) => k.startsWith('grad.')).length;
      check(keysG === keysW && nGrad > 0, `${mode} mode: the page's gradients file has the CLI's ${Object.keys(want.tensors).length} keys (${nGrad} gradients)`);
      const cmp = compareTensors(got, want, (k) => k.startsWith('grad.'), ZERO_BELOW);
      const loss = compareTensors(got, want, (k) => k.startsWith('loss'));
      log(`  ${mode}, CLI on ${c.adapter}: page ${p.seconds.toFixed(1)} s, CLI ${c.seconds.toFixed(1)} s; loss page ${got.tensors.loss.data[0].toFixed(6)} CLI ${want.tensors.loss.data[0].toFixed(6)}`);
      const over = cmp.rows.filter((r) => !r.zero && r.rel > GRAD_TOL).map((r) => `${r.key} ${r.rel.toExponential(2)}`);
      if (on === SAME) gradWorst[mode] = cmp.worstRel;
      else gradWorst[`${mode} (default adapter)`] = cmp.worstRel;
      check(
        cmp.missing.length === 0 && cmp.compared > 0 && cmp.worstRel.value <= bound && loss.worstRel.value <= GRAD_TOL,
        `${mode} mode, ${GRAD_SIZE}², ${on}: every gradient within ${bound} relative of medfastsam gradients (worst tensor ${cmp.worstRel.key}: ${cmp.worstRel.value.toExponential(2)}; ${cmp.compared} tensors; loss terms within ${loss.worstRel.value.toExponential(2)})`,
        cmp.missing.length ? `missing: ${cmp.missing.slice(0, 5).join(', ')}` : undefined,
      );
      if (on === OTHER) log(`  ${mode}, ${on}: tensors over 1e-4: ${over.length ? over.join(', ') : 'none'}`);
      check(
        cmp.zero.value <= 1e-6,
        `${mode} mode, ${on}: the ${cmp.zero.count} mathematically zero gradient(s) (CLI values below ${ZERO_BELOW} of the largest, ${cmp.global.toExponential(2)}) agree within 1e-6 of it (worst ${cmp.zero.key}: ${cmp.zero.value.toExponential(2)})`,
      );
    }
  }

  // (c) refusals (before the run: no examples yet).
  await eng.call('trainStop', {});
  await eng.call('trainClearExamples', {});
  await eng.call('trainStart', { options: { mode: MODE, batch: BATCH, seed: SEED, size: SIZE, config: JSON.parse(fs.readFileSync(config, 'utf8')) } });
  await expectRefusal(eng.call('trainStep', { steps: 1 }), /no training examples/, 'a step with no examples');
  const wrong = new Uint8Array(128 * 128).fill(255);
  await expectRefusal(
    eng.page
      .evaluate(async ({ img, wrong }) => {
        const image = await (await fetch(img)).blob();
        return window.__call({ op: 'trainAddExample', name: 'q1.png', image, mask: new Uint8Array(wrong), maskWidth: 128, maskHeight: 128 });
      }, { img: eng.srv.addFile(images[0]), wrong: Array.from(wrong) })
      .then((m) => {
        if (!m.ok) throw Object.assign(new Error(m.error.message), { name: m.error.name });
        return m.value;
      }),
    /128x128.*256x256/,
    'a 128x128 mask for a 256x256 image',
  );
  await expectRefusal(eng.call('trainStart', { options: { mode: 'semi', batch: 5 } }), /batch 5 is out of range/, 'batch 5');
  await expectRefusal(eng.call('trainStart', { options: { mode: 'full', batch: 1 } }), /batches of at least 2/, 'full mode with batch 1');
  await expectRefusal(
    eng.call('trainStart', { options: { mode: 'semi', batch: 1, budget_bytes: 1024 * 1024 } }),
    /not enough memory/,
    'a run whose memory estimate exceeds a 1 MiB budget',
  );
  const mem = await eng.call('trainMemory', { mode: 'semi', batch: 2, options: { size: SIZE, config: JSON.parse(fs.readFileSync(config, 'utf8')) } });
  check(mem.bytes > 0 && typeof mem.detail === 'string', `trainMemory: ${mem.detail}`);

  // (b) 20 steps against medfastsam train on the same driver.
  const cliDir = path.join(tmp, 'cli-train');
  const epochs = STEPS / ((names.length / BATCH) | 0);
  const c = run(['train', '--data', data, '--format', 'generic', '--split', 'all', '--weights', weights, '--config', config, '--epochs', String(epochs), '--batch', String(BATCH), '--seed', String(SEED), '--mode', MODE, '--size', String(SIZE), '--out', cliDir], SAME);
  const cliPerStep = c.seconds / STEPS;
  const t = await pageTrain(eng, { config, images, masks, steps: STEPS, seed: SEED, batch: BATCH, mode: MODE, size: SIZE });
  check(t.records.length === STEPS && t.result.steps === STEPS, `${STEPS} steps ran in the page, one progress message each (${t.records.length})`);
  const losses = t.records.map((p) => p.loss);
  log(`  page losses: ${losses.map((l) => l.toFixed(4)).join(' ')}`);
  const pageMs = t.records.slice(1).map((p) => p.ms);
  const pagePerStep = pageMs.reduce((a, b) => a + b, 0) / Math.max(1, pageMs.length) / 1000;
  check(losses.length === STEPS && losses[STEPS - 1] < losses[0], `the loss falls in ${STEPS} steps: first ${losses[0]?.toFixed(5)}, last ${losses[STEPS - 1]?.toFixed(5)}`);
  const got = readSafetensors(t.bytes);
  const want = readSafetensors(fs.readFileSync(path.join(cliDir, 'final.safetensors')));
  const cmpAll = compareTensors(got, want);
  let over = 0, total = 0;
  const overTensors = new Set();
  for (const [k, w] of Object.entries(want.tensors)) {
    if (!w.data || !got.tensors[k]?.data) continue;
    for (let i = 0; i < w.data.length; i++) {
      total++;
      if (!(Math.abs(got.tensors[k].data[i] - w.data[i]) <= WEIGHT_TOL)) {
        over++;
        overTensors.add(k);
      }
    }
  }
  weightDiff = { all: cmpAll.worstAbs, over, total };
  log(
    `  weights after ${STEPS} steps: max abs diff ${cmpAll.worstAbs.value.toExponential(2)} (${cmpAll.worstAbs.key}) over all ${cmpAll.compared} tensors; ${over} of ${total} values differ by more than ${WEIGHT_TOL} (in ${overTensors.size} tensors)`,
  );
  check(
    cmpAll.missing.length === 0 && cmpAll.compared > 0 && cmpAll.worstAbs.value <= WEIGHT_TOL,
    `${STEPS} Adam steps: every weight within ${WEIGHT_TOL} of medfastsam train's on the same driver (max abs diff ${cmpAll.worstAbs.value.toExponential(2)}, ${cmpAll.compared} tensors, ${total} values)`,
  );
  // What the two models compute: their loss and logits on the four quadrants (the CLI's gradients
  // command on each weights file).
  const pageW = path.join(tmp, 'page-final.safetensors');
  fs.writeFileSync(pageW, t.bytes);
  const outs = {};
  for (const [name, w] of [['page', pageW], ['cli', path.join(cliDir, 'final.safetensors')]]) {
    const f = path.join(tmp, `final-${name}.safetensors`);
    run(['gradients', '--weights', w, '--images', ...images, '--masks', ...masks, '--out', f, '--mode', MODE, '--size', String(SIZE)]);
    outs[name] = readSafetensors(fs.readFileSync(f));
  }
  const fn = compareTensors(outs.page, outs.cli, (k) => k === 'logits' || k.startsWith('loss'));
  logitsDiff = fn.worstRel;
  check(fn.compared === 4 && fn.worstRel.value <= 1e-5, `the page's and the CLI's trained models compute the same logits and loss on the four quadrants within 1e-5 relative (worst ${fn.worstRel.key}: ${fn.worstRel.value.toExponential(2)})`);
  // The per-epoch mean losses the CLI logs (log.jsonl) against the page's steps of each epoch:
  // the same batches in the same order give the same losses.
  const cliEpochs = fs.readFileSync(path.join(cliDir, 'log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  let worstLoss = 0;
  for (const e of cliEpochs) {
    const mine = t.records.filter((p) => p.epoch === e.epoch - 1).map((p) => p.loss);
    const mean = mine.reduce((a, b) => a + b, 0) / Math.max(1, mine.length);
    worstLoss = Math.max(worstLoss, mine.length ? Math.abs(mean - e.train_loss) / Math.abs(e.train_loss) : Infinity);
  }
  check(cliEpochs.length === epochs && worstLoss <= 1e-4, `the page's mean loss of each of the ${cliEpochs.length} epochs equals medfastsam train's log.jsonl within 1e-4 relative (worst ${worstLoss.toExponential(2)}): the same batches in the same order`);
  const ft = got.metadata['medfastsam.fine_tuning'] ? JSON.parse(got.metadata['medfastsam.fine_tuning']) : null;
  check(ft && ft.steps === STEPS && ft.seed === SEED && ft.mode === MODE && /browser/.test(ft.trained_in) && ft.examples === 4, `the weights record the fine-tuning: ${JSON.stringify(ft)}`);
  const dl = path.join(tmp, 'page.safetensors');
  fs.writeFileSync(dl, t.bytes);
  const info = run(['info', dl]).out;
  check(/annotated in the browser/.test(info), 'medfastsam info reads the downloaded weights and shows the fine-tuning', info.slice(0, 400));

  // Checkpoint round trip: the step count continues and the weights are the same.
  const ck = await eng.call('trainCheckpoint', {}, {}, { bytes: 'checkpoint' });
  const ckBytes = eng.srv.upload(ck.bytes.uploaded);
  await eng.call('trainStop', {});
  const ckFile = path.join(tmp, 'checkpoint.safetensors');
  fs.writeFileSync(ckFile, ckBytes);
  const r = await eng.call('trainStart', { options: {} }, { checkpoint: eng.srv.addFile(ckFile) });
  check(r.step === STEPS && r.mode === MODE && r.seed === SEED, `a checkpoint (${ckBytes.length} bytes) resumes at step ${r.step} with the run's options`);
  const again = readSafetensors(eng.srv.upload((await eng.call('trainWeights', {}, {}, { bytes: 'weights2' })).bytes.uploaded));
  check(compareTensors(again, got).worstAbs.value === 0, 'the resumed run holds exactly the weights it was saved with');

  log(`seconds per step (tiny preset, ${SIZE}², batch ${BATCH}, ${MODE}): page ${pagePerStep.toFixed(2)} s (SwiftShader, steps 2-${STEPS}), native ${cliPerStep.toFixed(2)} s (medfastsam train on SwiftShader incl. start-up and pipeline compilation, ${c.seconds.toFixed(1)} s for ${STEPS})`);
} catch (e) {
  fail();
  log(`FAIL ${e.stack || e}`);
} finally {
  if (eng) await eng.close();
  fs.rmSync(tmp, { recursive: true, force: true });
}
log(
  `summary: gradients worst relative on the same driver: full ${gradWorst.full?.value.toExponential(2)} (${gradWorst.full?.key}), semi ${gradWorst.semi?.value.toExponential(2)} (${gradWorst.semi?.key}); ` +
    `against the default adapter: full ${gradWorst['full (default adapter)']?.value.toExponential(2)}, semi ${gradWorst['semi (default adapter)']?.value.toExponential(2)}; ` +
    `weights after ${STEPS} steps max abs diff ${weightDiff?.all.value.toExponential(2)}, ${weightDiff?.over} of ${weightDiff?.total} values over ${WEIGHT_TOL}; trained models' logits ${logitsDiff?.value.toExponential(2)} relative`,
);
log(`run time ${seconds().toFixed(0)} s`);
if (failures()) {
  log(`${failures()} check(s) FAILED`);
  process.exit(1);
}
log('all checks passed');
