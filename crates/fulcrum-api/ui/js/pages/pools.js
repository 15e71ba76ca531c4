// Pools: a filtered, paged list; a pool's servers (paged, for pools of thousands), added,
// removed, enabled and disabled through PATCH add / delete / replace.

import { del, get, patch, post, withQuery } from '../api.js';
import { alertBox, badge, confirmThen, field, fill, fillWith, h, pager, table, when } from '../dom.js';

const PAGE_SIZE = 25;
const SERVERS_PER_PAGE = 50;

export async function render(context) {
  if (context.params[0]) return renderPool(context, context.params[0]);
  return renderList(context);
}

async function renderList({ main, can, every }) {
  let page = 1;
  let filter = '';
  const status = h('div');
  const body = h('div');
  const search = h('input', { type: 'search', placeholder: 'Name contains…', 'aria-label': 'Filter pools by name' });
  let debounce = null;
  search.addEventListener('input', () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { filter = search.value.trim(); page = 1; load(); }, 250);
  });
  const load = async () => {
    const data = await get(withQuery('/api/pool', {
      page, page_size: PAGE_SIZE, 'name.icontains': filter, fields: 'name,lb_algorithm,default_server_port,_last_modified',
    }));
    fillWith(body, [data, page, filter], () => [
      table([
        { title: 'Name', cell: (p) => h('a', { href: `#/pools/${encodeURIComponent(p.uuid)}` }, p.name) },
        { title: 'Algorithm', cell: (p) => p.lb_algorithm || '' },
        { title: 'Default port', cell: (p) => p.default_server_port ?? '' },
        { title: 'Changed', cell: (p) => when(Number(p._last_modified) / 1000) },
        ...(can('pool') ? [{ title: 'Actions', class: 'actions', cell: (p) => h('button', { type: 'button', class: 'danger', onclick: () => remove(p) }, 'Delete') }] : []),
      ], data.results, filter ? `No pool's name contains “${filter}”.` : 'No pools yet.'),
      data.count > PAGE_SIZE ? pager(page, PAGE_SIZE, data.count, (p) => { page = p; load(); }) : null]);
  };
  const remove = async (pool) => {
    await confirmThen(`Delete pool ${pool.name}?`, () => del(`/api/pool/${encodeURIComponent(pool.uuid)}`), status,
      `Pool ${pool.name} deleted.`, `Pool ${pool.name} was not deleted`);
    load();
  };
  main.append(h('h1', {}, 'Pools'));
  if (can('pool')) main.append(createForm(status, load));
  main.append(h('div', { class: 'toolbar' }, search), status, body);
  every(5000, load);
}

function createForm(status, reload) {
  const name = h('input', { type: 'text', name: 'name', required: true });
  return h('form', {
    class: 'inline',
    'aria-label': 'Create a pool',
    onsubmit: async (event) => {
      event.preventDefault();
      try {
        const pool = await post('/api/pool', { name: name.value.trim() });
        fill(status, alertBox('ok', `Pool ${pool.name} created.`), h('a', { href: `#/pools/${encodeURIComponent(pool.uuid)}` }, `Open ${pool.name}`));
        name.value = '';
        reload();
      } catch (e) {
        fill(status, alertBox('error', `The pool was not created: ${e.message}`));
      }
    },
  }, field('New pool name', name), h('button', { type: 'submit', class: 'primary' }, 'Create pool'));
}

function serverKey(server) {
  return { ip: server.ip, ...(server.port !== undefined ? { port: server.port } : {}) };
}

function serverLabel(server) {
  return `${server.ip?.addr ?? '?'}${server.port !== undefined ? `:${server.port}` : ''}`;
}

async function renderPool({ main, can, every }, uuid) {
  const path = `/api/pool/${encodeURIComponent(uuid)}`;
  let pool = await get(path);
  let page = 1;
  let filter = '';
  const title = h('h1', {}, `Pool ${pool.name}`);
  const facts = h('dl', { class: 'facts' });
  const status = h('div', { tabindex: -1 });
  const servers = h('div');
  const search = h('input', { type: 'search', placeholder: 'Address contains…', 'aria-label': 'Filter servers by address' });
  search.addEventListener('input', () => { filter = search.value.trim(); page = 1; show(); });
  const writable = can('pool');

  const change = async (body, done) => {
    let changed = false;
    try {
      pool = await patch(path, body);
      fill(status, alertBox('ok', done));
      changed = true;
    } catch (e) {
      fill(status, alertBox('error', `Refused: ${e.message}`));
    }
    show();
    // The button pressed is gone with the redraw: the keyboard continues from the outcome.
    status.focus();
    return changed;
  };

  const show = () => {
    title.textContent = `Pool ${pool.name}`;
    fill(facts,
      h('dt', {}, 'Algorithm'), h('dd', {}, pool.lb_algorithm || ''),
      h('dt', {}, 'Default server port'), h('dd', {}, String(pool.default_server_port ?? '')),
      h('dt', {}, 'Servers'), h('dd', {}, String((pool.servers || []).length)),
      h('dt', {}, 'Health monitors'), h('dd', {}, String((pool.health_monitor_refs || []).length)));
    const all = pool.servers || [];
    const shown = filter ? all.filter((s) => serverLabel(s).includes(filter)) : all;
    const pages = Math.max(1, Math.ceil(shown.length / SERVERS_PER_PAGE));
    page = Math.min(page, pages);
    const slice = shown.slice((page - 1) * SERVERS_PER_PAGE, page * SERVERS_PER_PAGE);
    fill(servers,
      table([
        { title: 'Server', cell: (s) => h('span', { class: 'mono' }, serverLabel(s)) },
        { title: 'Enabled', cell: (s) => badge(s.enabled === false ? 'DISABLED' : 'ENABLED') },
        { title: 'Ratio', cell: (s) => String(s.ratio ?? 1) },
        { title: 'Hostname', cell: (s) => s.hostname || '' },
        ...(writable ? [{
          title: 'Actions',
          class: 'actions',
          cell: (s) => [
            h('button', {
              type: 'button',
              onclick: () => change({ replace: { servers: [{ ...s, enabled: s.enabled === false }] } },
                `Server ${serverLabel(s)} ${s.enabled === false ? 'enabled' : 'disabled'}.`),
            }, s.enabled === false ? 'Enable' : 'Disable'),
            ' ',
            h('button', { type: 'button', class: 'danger', onclick: () => change({ delete: { servers: [serverKey(s)] } }, `Server ${serverLabel(s)} removed.`) }, 'Remove'),
          ],
        }] : []),
      ], slice, filter ? `No server's address contains “${filter}”.` : 'This pool has no servers.'),
      shown.length > SERVERS_PER_PAGE ? pager(page, SERVERS_PER_PAGE, shown.length, (p) => { page = p; show(); }) : null);
  };

  main.append(h('p', {}, h('a', { href: '#/pools' }, '← All pools')), title, h('section', { class: 'panel' }, facts));
  if (writable) main.append(addServerForm(change));
  main.append(status, h('h2', {}, 'Servers'), h('div', { class: 'toolbar' }, search), servers);
  show();
  every(5000, async () => {
    const fresh = await get(path);
    if (fresh._last_modified !== pool._last_modified) { pool = fresh; show(); }
  });
}

function addServerForm(change) {
  const address = h('input', { type: 'text', name: 'address', required: true, placeholder: '10.0.0.1', inputmode: 'decimal' });
  const port = h('input', { type: 'number', name: 'port', min: 1, max: 65535, placeholder: 'pool default' });
  return h('form', {
    class: 'inline',
    'aria-label': 'Add a server',
    onsubmit: async (event) => {
      event.preventDefault();
      const addr = address.value.trim();
      const server = { ip: { addr, type: addr.includes(':') ? 'V6' : 'V4' } };
      if (port.value) server.port = Number(port.value);
      if (await change({ add: { servers: [server] } }, `Server ${serverLabel(server)} added.`)) {
        address.value = '';
        port.value = '';
      }
    },
  }, field('Server address', address), field('Port', port), h('button', { type: 'submit', class: 'primary' }, 'Add server'));
}
