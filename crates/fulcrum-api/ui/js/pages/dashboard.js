// The state of the whole system at a glance, refreshed every few seconds.

import { get, getAll } from '../api.js';
import { badge, fillWith, h, progressBar, refUuid } from '../dom.js';

const IN_PROGRESS = /IN_PROGRESS|WAITING|STARTED|SUSPENDED|PAUSED/;

function card(title, ...body) {
  return h('section', { class: 'card', 'aria-label': title }, h('h2', {}, title), body);
}

function upDown(items, stateOf) {
  const up = items.filter((i) => stateOf(i) === 'OPER_UP').length;
  return [h('div', { class: 'big' }, `${up} up · ${items.length - up} not up`), h('div', { class: 'muted' }, `${items.length} in all`)];
}

export async function render({ main, every }) {
  const grid = h('div', { class: 'cards' });
  main.append(h('h1', {}, 'Dashboard'), grid);
  every(5000, async () => {
    const [vs, ses, groups, cluster, images, upgrades] = await Promise.all([
      getAll('/api/virtualservice-inventory', { fields: 'name' }),
      getAll('/api/serviceengine', { fields: 'name,oper_status,se_group_ref,version,build,patch_version' }),
      getAll('/api/serviceenginegroup', { fields: 'name' }),
      get('/api/cluster/runtime'),
      getAll('/api/image', { fields: 'name,type,img_state' }),
      get('/api/upgradestatusinfo'),
    ]);
    fillWith(grid, [vs, ses, groups, cluster, images, upgrades], () => {
    const groupRows = groups.results.map((g) => {
      const members = ses.results.filter((s) => refUuid(s.se_group_ref) === g.uuid);
      const versions = [...new Set(members.map((s) => [s.version, s.patch_version].filter(Boolean).join(' ')))];
      return h('li', {}, `${g.name}: ${members.length} SE(s)`, versions.length ? ` — ${versions.join(', ')}` : '');
    });
    const running = upgrades.results.filter((u) => IN_PROGRESS.test(u.state?.state || ''));
    return [
      card('Virtual services', upDown(vs.results, (v) => v.runtime?.oper_status?.state), h('a', { href: '#/virtualservices' }, 'Virtual services')),
      card('Service engines', upDown(ses.results, (s) => s.oper_status?.state), h('a', { href: '#/serviceengines' }, 'Service engines')),
      card('SE groups and versions', groupRows.length ? h('ul', { class: 'plain' }, groupRows) : h('p', { class: 'empty' }, 'No SE groups.')),
      card('Controller cluster',
        h('div', {}, badge(cluster.cluster_state?.state)),
        h('ul', { class: 'plain' }, (cluster.node_states || []).map((n) =>
          h('li', {}, `${n.name} (${n.mgmt_ip}) `, badge(n.role), ' ', badge(n.state))))),
      card('Images',
        h('div', { class: 'big' }, `${images.count}`),
        h('ul', { class: 'plain' }, images.results.slice(0, 5).map((i) => h('li', {}, i.name, ' ', badge(i.img_state?.state)))),
        h('a', { href: '#/images' }, 'Images')),
      card('Upgrade',
        running.length
          ? running.map((u) => h('div', {}, h('div', {}, `${u.name}: `, badge(u.state.state)), progressBar(u.progress, `${u.name} progress`)))
          : h('p', { class: 'muted' }, 'No upgrade in progress.'),
        h('a', { href: '#/upgrades' }, 'Upgrades'))];
    });
  });
}
