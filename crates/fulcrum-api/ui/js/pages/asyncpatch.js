// The status of an async PATCH (`?async_mode`), looked up by the patch id its 202 answer gave.

import { get } from '../api.js';
import { alertBox, badge, field, fill, h, when } from '../dom.js';

export async function render({ main, params }) {
  const id = h('input', { type: 'text', name: 'patch_id', required: true, value: params[0] || '', class: 'mono' });
  const result = h('div');
  const lookup = async () => {
    const patchId = id.value.trim();
    if (!patchId) return;
    if (location.hash !== `#/async/${encodeURIComponent(patchId)}`) history.replaceState(null, '', `#/async/${encodeURIComponent(patchId)}`);
    try {
      const status = await get(`/api/pool-async/status/${encodeURIComponent(patchId)}`);
      fill(result, h('section', { class: 'panel' },
        h('dl', { class: 'facts' }, Object.entries(status).flatMap(([key, value]) => [
          h('dt', {}, key),
          h('dd', {}, /state|status/.test(key) && typeof value === 'string' ? badge(value)
            : /time/.test(key) ? `${when(value)} (${typeof value === 'object' ? JSON.stringify(value) : value})`
              : typeof value === 'object' ? h('span', { class: 'mono' }, JSON.stringify(value)) : String(value)),
        ]))));
    } catch (e) {
      fill(result, alertBox('error', e.message));
    }
  };
  main.append(
    h('h1', {}, 'Async PATCH status'),
    h('p', { class: 'muted' }, 'A PATCH sent with ?async_mode is answered 202 with a patch id; its state is here until it is merged.'),
    h('form', { class: 'inline', onsubmit: (event) => { event.preventDefault(); lookup(); } },
      field('Patch id', id), h('button', { type: 'submit', class: 'primary' }, 'Look up')),
    result);
  if (params[0]) lookup();
}
