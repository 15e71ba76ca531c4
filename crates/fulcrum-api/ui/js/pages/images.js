// Software images: upload from this computer (resumable, with progress), the list with each
// controller node's copy, and delete (the API says why an image in use cannot go).

import { del, getAll } from '../api.js';
import { alertBox, badge, bytes, confirmThen, field, fill, fillWith, h, progressBar, table, when } from '../dom.js';
import { uploadPackage } from '../upload.js';

function versionOf(image) {
  const build = image.controller_info?.build || image.se_info?.build;
  if (!build) return '';
  return [build.version, build.patch_version || build.patch, build.build_no ? `build ${build.build_no}` : ''].filter(Boolean).join(' ');
}

export async function render({ main, can, every }) {
  const status = h('div');
  const list = h('div');
  const load = async () => {
    const images = await getAll('/api/image');
    fillWith(list, images.results, () => table([
      { title: 'Name', cell: (i) => h('span', { class: 'mono' }, i.name) },
      { title: 'Type', cell: (i) => i.type || '' },
      { title: 'Version', cell: (i) => versionOf(i) },
      { title: 'State', cell: (i) => [badge(i.img_state?.state), i.progress < 100 ? ` ${i.progress}%` : ''] },
      {
        title: 'Controller nodes',
        cell: (i) => h('ul', { class: 'plain' }, (i.node_states || []).map((n) =>
          h('li', {}, `${n.node} `, badge(n.state), n.state === 'IMAGE_FSM_IN_PROGRESS' ? ` ${n.progress}%` : '', n.reason ? ` ${n.reason}` : ''))),
      },
      { title: 'Size', cell: (i) => bytes(i.size) },
      { title: 'Uploaded', cell: (i) => when(i.end_time || i.start_time) },
      ...(can('image') ? [{ title: 'Actions', class: 'actions', cell: (i) => h('button', { type: 'button', class: 'danger', onclick: () => remove(i) }, 'Delete') }] : []),
    ], images.results, 'No images yet. Upload a package built with `fulcrum pkg build`.'));
  };
  const remove = async (image) => {
    await confirmThen(`Delete image ${image.name}?`, () => del(`/api/image/${encodeURIComponent(image.uuid)}`), status,
      `Image ${image.name} deleted.`, `Image ${image.name} was not deleted`);
    load();
  };
  main.append(h('h1', {}, 'Images'));
  if (can('image')) main.append(uploadPanel(status, load));
  main.append(status, h('h2', {}, 'Images on the controller'), list);
  every(3000, load);
}

function uploadPanel(status, reload) {
  const file = h('input', { type: 'file', name: 'package', accept: '.pkg,application/octet-stream', required: true });
  const progress = h('div', { class: 'upload-progress' });
  const note = h('div', { class: 'muted', role: 'status' });
  const start = h('button', { type: 'submit', class: 'primary' }, 'Upload');
  const form = h('form', {
    class: 'inline',
    'aria-label': 'Upload an image',
    onsubmit: async (event) => {
      event.preventDefault();
      const chosen = file.files[0];
      if (!chosen) return;
      start.disabled = true;
      fill(status);
      fill(progress, progressBar(0, 'Upload progress'));
      try {
        const image = await uploadPackage(chosen, ({ sent, size, note: text }) => {
          fill(progress, progressBar(size ? (100 * sent) / size : 100, 'Upload progress'));
          if (text) note.textContent = text;
        });
        note.textContent = '';
        fill(status, alertBox('ok', `Image ${image.name} uploaded and verified.`));
        file.value = '';
        reload();
      } catch (e) {
        fill(status, alertBox('error', `The upload stopped: ${e.message}. Choose the same file and upload again to continue where it stopped.`));
      } finally {
        start.disabled = false;
      }
    },
  }, field('Package file', file), start);
  return h('section', { class: 'panel' }, h('h2', {}, 'Upload a package'), form, progress, note);
}
