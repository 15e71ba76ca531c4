// Service engines (paged by the API, for fleets of thousands) and their groups.

import { get, getAll, withQuery } from '../api.js';
import { badge, fillWith, h, pager, refName, refUuid, table, when } from '../dom.js';

const PAGE_SIZE = 50;

export async function render({ main, every }) {
  let page = 1;
  let filter = '';
  const groupsBody = h('div');
  const enginesBody = h('div');
  const search = h('input', { type: 'search', placeholder: 'Name contains…', 'aria-label': 'Filter service engines by name' });
  search.addEventListener('input', () => { filter = search.value.trim(); page = 1; load(); });
  const version = (se) => [se.version, se.build ? `(${se.build})` : ''].filter(Boolean).join(' ');
  const load = async () => {
    const [groups, summary, engines] = await Promise.all([
      getAll('/api/serviceenginegroup', { fields: 'name,max_se,min_scaleout_per_vs' }),
      getAll('/api/serviceengine', { fields: 'se_group_ref,version,patch_version,oper_status' }),
      get(withQuery('/api/serviceengine', { page, page_size: PAGE_SIZE, 'name.icontains': filter, include_name: true })),
    ]);
    fillWith(groupsBody, [groups, summary], () => table([
      { title: 'Group', cell: (g) => g.name },
      { title: 'SEs', cell: (g) => String(summary.results.filter((s) => refUuid(s.se_group_ref) === g.uuid).length) },
      { title: 'Up', cell: (g) => String(summary.results.filter((s) => refUuid(s.se_group_ref) === g.uuid && s.oper_status?.state === 'OPER_UP').length) },
      { title: 'Versions', cell: (g) => [...new Set(summary.results.filter((s) => refUuid(s.se_group_ref) === g.uuid).map((s) => [s.version, s.patch_version].filter(Boolean).join(' ')))].join(', ') },
      { title: 'Max SEs', cell: (g) => String(g.max_se ?? '') },
    ], groups.results, 'No SE groups.'));
    fillWith(enginesBody, [engines, page, filter], () => [
      table([
        { title: 'Name', cell: (s) => s.name },
        { title: 'Group', cell: (s) => refName(s.se_group_ref) },
        { title: 'Version', cell: (s) => version(s) },
        { title: 'Patch', cell: (s) => s.patch_version || '' },
        { title: 'State', cell: (s) => [badge(s.oper_status?.state), s.oper_status?.reason?.length ? h('div', { class: 'muted' }, s.oper_status.reason.join('; ')) : null] },
        { title: 'Last heartbeat', cell: (s) => when(s.last_heartbeat) },
        { title: 'License', cell: (s) => [badge(s.license_state), s.licensed_cores ? ` ${s.licensed_cores} core(s)` : ''] },
        { title: 'Virtual services', cell: (s) => (s.vs_refs || []).map(refName).join(', ') },
      ], engines.results, filter ? `No service engine's name contains “${filter}”.` : 'No service engines have joined. Create a join token (POST /api/sejointoken) and start `fulcrum se-agent` with it.'),
      engines.count > PAGE_SIZE ? pager(page, PAGE_SIZE, engines.count, (p) => { page = p; load(); }) : null]);
  };
  main.append(
    h('h1', {}, 'Service engines'),
    h('h2', {}, 'SE groups'), groupsBody,
    h('h2', {}, 'Service engines'), h('div', { class: 'toolbar' }, search), enginesBody);
  every(3000, load);
}
