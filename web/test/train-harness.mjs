// The training harness: the page's worker (web/worker.js, the wasm build in web/pkg) in headless
// Chromium, driven through its training ops on given weights, images and masks, writing what the
// CLI writes for the same inputs. Used by `node web/test/run.mjs gradients|train ...` and by
// web/test/train.mjs.
//
//   node web/test/run.mjs gradients --weights W [--config C] --images I... --masks M... --out G.safetensors
//                                   [--mode full|semi] [--size S] [--chromium PATH]
//     one forward + backward on the batch (trainGradients), the same keys as `medfastsam gradients`
//   node web/test/run.mjs train --weights W [--config C] --images I... --masks M... --steps N --seed S
//                               --batch B --mode full|semi [--lr LR] [--size S] [--out W.safetensors] [--chromium PATH]
//     N optimiser steps (trainStart, trainAddExample per image in the order given, trainStep), then
//     the weights (trainWeights); prints the loss of every step and the time per step
//   --size S trains at input size S (as the CLI's --size); default: the configuration's

import fs from 'node:fs';
import path from 'node:path';
import { launch, startServer, openWorker, parseArgs, logger } from './lib.mjs';

// A browser, the server and a worker with `weights` loaded (init + weights ops).
export async function openEngine({ chromium, weights, log }) {
  const srv = await startServer();
  const browser = await launch(chromium);
  try {
    const w = await openWorker(browser, srv.origin, log);
    const init = await w.call('init', {});
    log(`adapter: ${[init.browser.vendor, init.browser.architecture, init.browser.description].filter(Boolean).join(' ') || init.gpu.name} (${init.gpu.backend})`);
    const info = await w.call('weights', { name: path.basename(weights) }, { blob: srv.addFile(weights) });
    log(`weights ${path.basename(weights)}: ${info.tensors} tensors, ${info.parameters} parameters`);
    return {
      ...w,
      init,
      srv,
      browser,
      close: async () => {
        await browser.close();
        srv.server.close();
      },
    };
  } catch (e) {
    await browser.close();
    srv.server.close();
    throw e;
  }
}

function configOption(config) {
  return config ? JSON.parse(fs.readFileSync(config, 'utf8')) : undefined;
}

// One step's gradients in the page: the bytes of the safetensors file.
export async function pageGradients(eng, { config, images, masks, mode, size }) {
  const t0 = Date.now();
  const r = await eng.call(
    'trainGradients',
    { mode, options: { config: configOption(config), size: size || 0 } },
    { images: images.map((f) => eng.srv.addFile(f)), masks: masks.map((f) => eng.srv.addFile(f)) },
    { bytes: 'gradients' },
  );
  return { bytes: eng.srv.upload(r.bytes.uploaded), seconds: (Date.now() - t0) / 1000 };
}

// `steps` optimiser steps in the page: the losses of each step, ms per step (the worker's own
// timing), the final weights file's bytes.
export async function pageTrain(eng, { config, images, masks, steps, seed, batch, mode, lr, size }) {
  await eng.call('trainStop', {});
  await eng.call('trainClearExamples', {});
  for (let i = 0; i < images.length; i++) {
    await eng.call('trainAddExample', { name: path.basename(images[i]) }, { image: eng.srv.addFile(images[i]), mask: eng.srv.addFile(masks[i]) });
  }
  const options = { mode, batch, seed, config: configOption(config), size: size || 0 };
  if (lr !== undefined) options.lr = lr;
  const run = await eng.call('trainStart', { options });
  await eng.progress();
  const r = await eng.call('trainStep', { steps });
  const records = (await eng.progress()).filter((p) => p.phase === 'train');
  const w = await eng.call('trainWeights', {}, {}, { bytes: 'weights' });
  return { run, result: r, records, bytes: eng.srv.upload(w.bytes.uploaded) };
}

// `node web/test/run.mjs gradients|train ...`
export async function harnessMain(argv) {
  const cmd = argv[0];
  const { opt, list } = parseArgs(argv.slice(1));
  const { log } = logger(`harness ${cmd}`);
  const weights = opt('--weights');
  const images = list('--images');
  const masks = list('--masks');
  const out = opt('--out');
  if (!weights || !images.length || images.length !== masks.length) {
    throw new Error('--weights W, --images I... and as many --masks M... are required');
  }
  const eng = await openEngine({ chromium: opt('--chromium'), weights, log });
  try {
    if (cmd === 'gradients') {
      if (!out) throw new Error('--out G.safetensors is required');
      const g = await pageGradients(eng, { config: opt('--config'), images, masks, mode: opt('--mode', 'full'), size: Number(opt('--size', '0')) });
      fs.writeFileSync(out, g.bytes);
      log(`gradients (${opt('--mode', 'full')} mode) of ${images.length} image(s) in ${g.seconds.toFixed(1)} s -> ${out} (${g.bytes.length} bytes)`);
    } else {
      const lr = opt('--lr');
      const t = await pageTrain(eng, {
        config: opt('--config'),
        images,
        masks,
        steps: Number(opt('--steps', '1')),
        seed: Number(opt('--seed', '0')),
        batch: Number(opt('--batch', '2')),
        mode: opt('--mode', 'semi'),
        lr: lr === undefined ? undefined : Number(lr),
        size: Number(opt('--size', '0')),
      });
      for (const p of t.records) log(`step ${p.step} (epoch ${p.epoch + 1}): loss ${p.loss.toFixed(6)} (focal ${p.focal.toFixed(6)}, Dice loss ${p.dice.toFixed(6)}) ${p.ms.toFixed(0)} ms`);
      const ms = t.records.map((p) => p.ms);
      if (ms.length) log(`${ms.length} steps, ${(ms.reduce((a, b) => a + b, 0) / ms.length / 1000).toFixed(2)} s per step on average`);
      if (out) {
        fs.writeFileSync(out, t.bytes);
        log(`weights -> ${out} (${t.bytes.length} bytes)`);
      }
    }
  } finally {
    await eng.close();
  }
}
