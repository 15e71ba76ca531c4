// Upgrades: choose an operation, its image and SE groups; preview its 22 checks exactly as the
// API answers them; start it (with or without skip_warnings); follow the controller and every
// SE group live; resume, roll back, roll back a patch.

import { ApiError, get, getAll, post } from '../api.js';
import { alertBox, badge, field, fill, fillWith, h, progressBar, table, when } from '../dom.js';

const OPERATIONS = [
  ['upgrade', 'Upgrade'],
  ['patch', 'Patch'],
  ['rollback', 'Roll back'],
  ['rollbackpatch', 'Roll back patch'],
  ['segroup/resume', 'Resume SE groups'],
];
const SCOPES = [['system', 'The whole system'], ['controller', 'The controller only'], ['groups', 'SE groups']];
const ACTIONS_ON_ERROR = [
  ['SUSPEND_UPGRADE_OPS_ON_ERROR', 'Suspend'],
  ['CONTINUE_UPGRADE_OPS_ON_ERROR', 'Continue'],
  ['ROLLBACK_UPGRADE_OPS_ON_ERROR', 'Roll back'],
];

function select(name, options, label) {
  return h('select', { name, 'aria-label': label }, options.map(([value, text]) => h('option', { value }, text)));
}

function checksTable(checks) {
  return table([
    { title: 'Check', cell: (c) => [h('div', {}, c.description), h('div', { class: 'mono muted' }, c.check_code)] },
    { title: 'Level', cell: (c) => badge(c.state) },
    { title: 'Details', cell: (c) => h('ul', { class: 'plain' }, (c.details || []).map((d) => h('li', {}, d))) },
  ], checks, 'No checks.');
}

function checksSummary(checks) {
  const count = (level) => checks.filter((c) => c.state === `UPGRADE_PRE_CHECK_${level}`).length;
  return `${checks.length} checks: ${count('ERROR')} error(s), ${count('WARNING')} warning(s), ${count('SUCCESS')} passed.`;
}

export async function render({ main, can, every }) {
  const writable = can('upgrade');
  const statusBody = h('div');
  const outcome = h('div', { class: 'outcome' });
  main.append(h('h1', {}, 'Upgrades'));

  // The form.
  const operation = select('operation', OPERATIONS, 'Operation');
  const scope = select('scope', SCOPES, 'Scope');
  const image = h('select', { name: 'image', 'aria-label': 'Image' });
  const controllerPatch = h('select', { name: 'controller_patch', 'aria-label': 'Controller patch' });
  const sePatch = h('select', { name: 'se_patch', 'aria-label': 'SE patch' });
  const groupsBox = h('fieldset', { class: 'groups' }, h('legend', {}, 'SE groups'));
  const skipWarnings = h('input', { type: 'checkbox', name: 'skip_warnings' });
  const actionOnError = select('action_on_error', ACTIONS_ON_ERROR, 'On an SE error');
  const disruptive = h('input', { type: 'checkbox', name: 'disruptive' });
  const imageField = field('Image', image);
  const controllerPatchField = field('Controller patch', controllerPatch);
  const sePatchField = field('SE patch', sePatch);

  const [images, groups] = await Promise.all([getAll('/api/image', { fields: 'name,type' }), getAll('/api/serviceenginegroup', { fields: 'name' })]);
  const imageOptions = (el, none) => fill(el, none ? h('option', { value: '' }, none) : null,
    images.results.map((i) => h('option', { value: i.name }, `${i.name} (${(i.type || '').replace('IMAGE_TYPE_', '').toLowerCase()})`)));
  imageOptions(image, images.results.length ? null : 'no images: upload one first');
  imageOptions(controllerPatch, '(none)');
  imageOptions(sePatch, '(none)');
  const groupChecks = groups.results.map((g) => h('input', { type: 'checkbox', name: 'se_group', value: g.name }));
  groupsBox.append(...groups.results.map((g, i) => h('label', { class: 'check' }, groupChecks[i], ` ${g.name}`)));
  if (!groups.results.length) groupsBox.append(h('p', { class: 'empty' }, 'No SE groups.'));

  const sync = () => {
    const op = operation.value;
    imageField.hidden = op !== 'upgrade';
    controllerPatchField.hidden = op !== 'patch';
    sePatchField.hidden = op !== 'patch';
    if (op === 'segroup/resume') scope.value = 'groups';
    scope.disabled = op === 'segroup/resume';
    groupsBox.hidden = scope.value !== 'groups';
  };
  operation.addEventListener('change', sync);
  scope.addEventListener('change', sync);
  sync();

  const requestBody = () => {
    const body = {};
    const op = operation.value;
    if (op === 'upgrade') body.image_ref = image.value;
    if (op === 'patch') {
      if (controllerPatch.value) body.controller_patch_ref = controllerPatch.value;
      if (sePatch.value) body.se_patch_ref = sePatch.value;
    }
    if (scope.value === 'system') body.system = true;
    if (scope.value === 'groups') body.se_group_refs = groupChecks.filter((c) => c.checked).map((c) => c.value);
    if (skipWarnings.checked) body.skip_warnings = true;
    if (scope.value !== 'controller') body.se_group_options = { action_on_error: actionOnError.value, disruptive: disruptive.checked };
    return body;
  };

  const preview = async () => {
    fill(outcome, h('p', { role: 'status' }, 'Running the checks…'));
    try {
      const answer = await post(`/api/${operation.value}/preview`, requestBody());
      fill(outcome, h('section', { class: 'panel', 'aria-label': 'Preview' },
        h('h2', {}, 'Checks before this operation'),
        h('p', { role: 'status' }, answer.status || '', ' ', checksSummary(answer.checks || [])),
        checksTable(answer.checks || [])));
    } catch (e) {
      fill(outcome, alertBox('error', e.message));
    }
  };

  const start = async () => {
    fill(outcome, h('p', { role: 'status' }, 'Starting…'));
    try {
      const answer = await post(`/api/${operation.value}`, requestBody());
      fill(outcome, alertBox('ok', answer.status || 'Started.'));
      refresh();
    } catch (e) {
      const failing = e instanceof ApiError && e.body && Array.isArray(e.body.checks) ? e.body.checks : null;
      fill(outcome, alertBox('error', e.message),
        failing ? h('section', { class: 'panel' }, h('h2', {}, 'The checks that stopped it'), checksTable(failing)) : null);
    }
  };

  if (writable) {
    main.append(h('section', { class: 'panel', 'aria-label': 'Start an operation' },
      h('h2', {}, 'Start an operation'),
      h('form', { class: 'inline', onsubmit: (event) => { event.preventDefault(); preview(); } },
        field('Operation', operation), field('Scope', scope), imageField, controllerPatchField, sePatchField,
        field('On an SE error', actionOnError),
        h('label', { class: 'check' }, disruptive, ' Disruptive (do not move virtual services first)'),
        h('label', { class: 'check' }, skipWarnings, ' Skip warnings')),
      groupsBox,
      h('div', { class: 'toolbar' },
        h('button', { type: 'button', onclick: preview }, 'Preview checks'),
        h('button', { type: 'button', class: 'primary', onclick: start }, 'Start'))));
  } else {
    main.append(alertBox('info', 'Upgrade operations need an administrator; you can follow them here.'));
  }
  main.append(outcome, h('h2', {}, 'Status'), statusBody);

  // Quick actions on a group or the controller fill the form and preview the checks first.
  const prepare = (op, target) => {
    operation.value = op;
    scope.value = target ? 'groups' : 'controller';
    for (const c of groupChecks) c.checked = c.value === target;
    sync();
    preview();
    operation.focus();
  };

  const openEvents = new Set();
  const nodeView = (node) => {
    const seg = node.seg_status;
    const isGroup = node.node_type === 'NODE_SE_GROUP';
    const events = isGroup ? node.se_upgrade_events || [] : node.upgrade_events || [];
    const list = (title, items) => (items && items.length ? [h('dt', {}, title), h('dd', {}, items.join(', '))] : []);
    return h('section', { class: 'panel', 'aria-label': `${node.name} status` },
      h('h2', {}, isGroup ? `SE group ${node.name}` : `Controller ${node.name}`),
      h('div', { class: 'toolbar' }, badge(node.state?.state), node.upgrade_ops ? ` ${node.upgrade_ops}` : '',
        node.state?.reason ? h('span', { class: 'muted' }, ` ${node.state.reason}`) : ''),
      progressBar(node.progress, `${node.name} progress`),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Version'), h('dd', {}, [node.version, node.patch_version].filter(Boolean).join(' ') || '—'),
        node.previous_version ? [h('dt', {}, 'Previous version'), h('dd', {}, node.previous_version)] : [],
        node.start_time ? [h('dt', {}, 'Started'), h('dd', {}, when(node.start_time))] : [],
        node.end_time ? [h('dt', {}, 'Ended'), h('dd', {}, when(node.end_time))] : [],
        node.total_tasks ? [h('dt', {}, 'Tasks'), h('dd', {}, `${node.tasks_completed} of ${node.total_tasks}`)] : [],
        seg ? [
          ...list('SEs completed', seg.se_upgrade_completed),
          ...list('SEs in progress', seg.se_upgrade_in_progress),
          ...list('SEs failed', seg.se_upgrade_failed),
          ...list('SEs not started', seg.se_upgrade_not_started),
          ...list('SEs already upgraded', seg.se_already_upgraded_at_start),
          h('dt', {}, 'Traffic'), h('dd', {}, `${seg.traffic_status} (${seg.num_vs_disrupted} of ${seg.num_vs} virtual services disrupted)`),
        ] : []),
      (node.controller_nodes || []).length ? table([
        { title: 'Node', cell: (n) => n.name },
        { title: 'State', cell: (n) => badge(n.state) },
        { title: 'Progress', cell: (n) => `${n.progress}% (${n.tasks_completed}/${n.total_tasks})` },
      ], node.controller_nodes) : null,
      events.length ? h('details', {
        open: openEvents.has(node.uuid),
        ontoggle: (event) => { if (event.target.open) openEvents.add(node.uuid); else openEvents.delete(node.uuid); },
      }, h('summary', {}, `Events (${events.length})`),
        h('div', { class: 'events' }, table([
          { title: 'Task', cell: (e) => e.task || e.name || '' },
          { title: 'Status', cell: (e) => badge(e.status === true ? 'COMPLETED' : e.status === false ? 'FAILED' : String(e.status ?? '')) },
          { title: 'Started', cell: (e) => when(e.start_time) },
          { title: 'Ended', cell: (e) => when(e.end_time) },
          { title: 'Message', cell: (e) => (e.reason || e.message || []).toString() },
        ], events.slice(-50)))) : null,
      writable ? h('div', { class: 'toolbar' },
        isGroup && node.state?.state === 'UPGRADE_FSM_SUSPENDED'
          ? h('button', { type: 'button', onclick: () => prepare('segroup/resume', node.name) }, `Resume ${node.name}`) : null,
        node.enable_rollback || node.previous_version
          ? h('button', { type: 'button', onclick: () => prepare('rollback', isGroup ? node.name : null) }, 'Roll back…') : null,
        node.patch_version || (seg && node.version && /\d+p\d+/.test(node.version))
          ? h('button', { type: 'button', onclick: () => prepare('rollbackpatch', isGroup ? node.name : null) }, 'Roll back patch…') : null) : null);
  };

  const refresh = async () => {
    const status = await get('/api/upgradestatusinfo');
    fillWith(statusBody, status.results, (nodes) => nodes.map(nodeView));
  };
  every(2000, refresh);
}
