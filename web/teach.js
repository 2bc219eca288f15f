// Teaching mode: runs the prepared Med-FastSAM on one segmented image in the worker with its stage
// outputs kept (worker op teachMaps, src/web_teach.rs) and shows them with a caption each.

const $ = (sel) => document.querySelector(sel);

const CAPTIONS = {
  input: ['What the model sees', (m, r) => `The image stretched to ${r.size} × ${r.size}${r.channel && r.channel !== 'rgb' ? `, channel ${r.channel}` : ''} — the model's fixed input size.`],
  coarse: ['1 · Otsu coarse prompt', (m, r) => `White: grey level ≥ t = ${(r.threshold * 255).toFixed(0)}/255 (${(100 * r.coarse_foreground).toFixed(1)}% of pixels). This is the hint the CP-Encoder turns into the dense prompt; it is only a brightness threshold.`],
  embedding: ['2 · Image embedding (LKA-Encoder), 3 principal components', (m) => `One pixel per 16 × 16 patch (${m.width} × ${m.width}, ${m.channels} numbers each). Red, green, blue = the three directions of largest variation (${pct(m.explained)} of the variance). Same colour = the model finds the patches alike.`],
  msf_r2: ['2 · Multi-scale features msf.r2 (1/4)', (m) => `The medical branch's fine features, ${m.width} × ${m.width} × ${m.channels}, as 3 principal components (${pct(m.explained)}): edges and small structures the 1/16 grid cannot hold.`],
  msf_r1: ['2 · Multi-scale features msf.r1 (1/8)', (m) => `${m.width} × ${m.width} × ${m.channels}, 3 principal components (${pct(m.explained)}): fused into the decoder when it upsamples.`],
  lowres_logits: ['3 · Decoder output: low-resolution logits', (m) => `${m.width} × ${m.width}. Red = object, blue = background, white = undecided (colour saturates at |logit| = ${m.scale.toFixed(2)}).`],
  mask: ['Final mask', (m, r) => `Logits resized to ${r.size} × ${r.size} and cut at 0: ${(100 * r.foreground).toFixed(1)}% foreground. Compare with the coarse prompt.`],
};

function pct(e) {
  return e ? e.map((v) => `${(100 * v).toFixed(0)}%`).join(' + ') : '';
}

export function initTeaching(env) {
  const ui = {
    image: $('#teach-image'),
    run: $('#teach-run'),
    alert: $('#teach-alert'),
    status: $('#teach-status'),
    maps: $('#teach-maps'),
  };
  let busy = false;

  function candidates() {
    return env.cards().filter((c) => c.result && !c.prompts);
  }

  function refresh() {
    const cards = candidates();
    const cur = ui.image.value;
    ui.image.replaceChildren(
      ...(cards.length
        ? cards.map((c) => {
            const o = document.createElement('option');
            o.value = c.file.name;
            o.textContent = c.file.name;
            return o;
          })
        : [Object.assign(document.createElement('option'), { value: '', textContent: 'No segmented image yet' })]),
    );
    if (cards.some((c) => c.file.name === cur)) ui.image.value = cur;
    const p = env.prepared();
    ui.image.disabled = !cards.length;
    ui.run.disabled = busy || !cards.length || !p || p.prompted;
    ui.run.title = p?.prompted ? 'Teaching mode explains Med-FastSAM; MobileSAM is loaded' : '';
  }

  async function run() {
    const card = candidates().find((c) => c.file.name === ui.image.value);
    if (!card) return;
    busy = true;
    refresh();
    ui.alert.hidden = true;
    ui.status.textContent = `Running the model on ${card.file.name} with every stage kept…`;
    try {
      const r = await env.call('teachMaps', { blob: card.file, name: card.file.name, channel: env.channel(), macenko: env.macenko() });
      const figs = r.maps.map((m) => {
        const [title, text] = CAPTIONS[m.id] || [m.id, () => ''];
        const fig = document.createElement('figure');
        fig.dataset.map = m.id;
        const c = document.createElement('canvas');
        c.width = m.width;
        c.height = m.height;
        c.getContext('2d').drawImage(m.bitmap, 0, 0);
        m.bitmap.close();
        c.setAttribute('role', 'img');
        c.setAttribute('aria-label', `${title} of ${card.file.name}`);
        const cap = document.createElement('figcaption');
        const b = document.createElement('strong');
        b.textContent = title;
        cap.append(b, document.createElement('br'), text(m, r));
        fig.append(c, cap);
        return fig;
      });
      ui.maps.replaceChildren(...figs);
      ui.status.textContent = `${card.file.name} at ${r.size} × ${r.size} (${r.variant} variant), in ${Math.round(r.ms)} ms.`;
      env.announce('Teaching maps shown.');
    } catch (e) {
      ui.alert.textContent = `The maps could not be made: ${e.message}`;
      ui.alert.hidden = false;
      ui.status.textContent = '';
    } finally {
      busy = false;
      refresh();
    }
  }

  ui.run.addEventListener('click', run);
  refresh();
  return { refresh, run };
}
