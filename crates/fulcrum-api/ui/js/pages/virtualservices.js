// Virtual services and where each runs (from the inventory: configuration and runtime).

import { get, withQuery } from '../api.js';
import { badge, fillWith, h, pager, refName, table } from '../dom.js';

const PAGE_SIZE = 25;

export async function render({ main, every }) {
  let page = 1;
  let filter = '';
  const body = h('div');
  const search = h('input', { type: 'search', placeholder: 'Name contains…', 'aria-label': 'Filter virtual services by name' });
  search.addEventListener('input', () => { filter = search.value.trim(); page = 1; load(); });
  const load = async () => {
    const data = await get(withQuery('/api/virtualservice-inventory', {
      page, page_size: PAGE_SIZE, 'name.icontains': filter, include_name: true,
    }));
    fillWith(body, [data, page, filter], () => [
      table([
        { title: 'Name', cell: (v) => v.config.name },
        { title: 'State', cell: (v) => [badge(v.runtime.oper_status?.state), v.runtime.oper_status?.reason?.length ? h('div', { class: 'muted' }, v.runtime.oper_status.reason.join('; ')) : null] },
        { title: 'Ports', cell: (v) => (v.config.services || []).map((s) => s.port).join(', ') },
        { title: 'VIP', cell: (v) => refName(v.config.vsvip_ref) },
        { title: 'Pool', cell: (v) => v.config.pool_ref ? h('a', { href: `#/pools/${encodeURIComponent(v.config.pool_ref.split('#')[0].split('/').pop())}` }, refName(v.config.pool_ref)) : '' },
        { title: 'SE group', cell: (v) => refName(v.config.se_group_ref) },
        {
          title: 'Runs on',
          cell: (v) => {
            const engines = (v.runtime.vip_summary || []).flatMap((s) => s.service_engine || []);
            if (!engines.length) return h('span', { class: 'muted' }, 'no service engine');
            return h('ul', { class: 'plain' }, engines.map((e) => h('li', {}, e.name, e.primary ? ' (primary) ' : ' ', badge(e.active_on_se ? 'ACTIVE' : 'PENDING'))));
          },
        },
      ], data.results, filter ? `No virtual service's name contains “${filter}”.` : 'No virtual services yet.'),
      data.count > PAGE_SIZE ? pager(page, PAGE_SIZE, data.count, (p) => { page = p; load(); }) : null]);
  };
  main.append(h('h1', {}, 'Virtual services'), h('div', { class: 'toolbar' }, search), body);
  every(3000, load);
}
