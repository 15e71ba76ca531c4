// Building the page. Every value from the API goes in as text (a text node or an attribute),
// never as markup: a pool named <img src=x onerror=alert(1)> shows as exactly that.

/** An element: `attrs` are attributes, except `on<event>` (a listener) and `text`. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === 'text') {
      el.textContent = String(value);
    } else if (key === 'value') {
      el.value = value;
    } else if (value === true) {
      el.setAttribute(key, '');
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replaces an element's content. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A table, or `empty` when there are no rows. */
export function table(columns, rows, empty = 'Nothing here yet.') {
  if (!rows.length) return h('p', { class: 'empty', role: 'status' }, empty);
  return h('div', { class: 'table-wrap' },
    h('table', {},
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c.title)))),
      h('tbody', {}, rows.map((row) => h('tr', {}, columns.map((c) => h('td', { class: c.class }, c.cell(row))))))));
}

/** Previous / next over `count` items, `size` per page (pages count from 1). */
export function pager(page, size, count, onPage) {
  const pages = Math.max(1, Math.ceil(count / size));
  const from = count ? (page - 1) * size + 1 : 0;
  const to = Math.min(count, page * size);
  return h('div', { class: 'pager' },
    h('button', { type: 'button', disabled: page <= 1, onclick: () => onPage(page - 1) }, '← Previous'),
    h('span', { role: 'status' }, `${from}–${to} of ${count} (page ${page} of ${pages})`),
    h('button', { type: 'button', disabled: page >= pages, onclick: () => onPage(page + 1) }, 'Next →'));
}

/** A message box; errors are announced to screen readers. */
export function alertBox(kind, message) {
  return h('div', { class: `alert ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
}

const STATE_CLASSES = [
  [/(_UP|COMPLETED|SUCCESS|ACTIVE|LICENSED|ENABLED|LEADER)$/, 'ok'],
  [/(WARNING|IN_PROGRESS|WAITING|SUSPENDED|STARTED|PAUSED|PENDING|QUEUED|RESOURCES|FOLLOWER)/, 'warn'],
  [/(DOWN|ERROR|FAILED|DISABLED|UNLICENSED|INACTIVE|REJECTED)/, 'bad'],
];

/** A state such as OPER_UP or UPGRADE_PRE_CHECK_WARNING, coloured by what it means. */
export function badge(state) {
  const text = state || 'unknown';
  const match = STATE_CLASSES.find(([pattern]) => pattern.test(text));
  return h('span', { class: `badge ${match ? match[1] : 'info'}` }, text);
}

/** The name part of a reference rendered with `include_name` (`.../pool/pool-1#web`). */
export function refName(ref) {
  if (!ref) return '';
  const hash = ref.indexOf('#');
  return hash >= 0 ? decodeURIComponent(ref.slice(hash + 1)) : ref.split('/').pop();
}

/** The uuid a reference points at. */
export function refUuid(ref) {
  return (ref || '').split('#')[0].split('?')[0].split('/').pop();
}

export function when(value) {
  if (!value) return '';
  const date = typeof value === 'object' && value.secs ? new Date(value.secs * 1000) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

export function bytes(n) {
  if (typeof n !== 'number') return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/**
 * Asks `question`; once confirmed, runs `action` and shows `done` in `status`, or the refusal
 * after `refused` (the API's own words).
 */
export async function confirmThen(question, action, status, done, refused) {
  if (!window.confirm(question)) return;
  try {
    await action();
    fill(status, alertBox('ok', done));
  } catch (e) {
    fill(status, alertBox('error', `${refused}: ${e.message}`));
  }
}

/** A labelled form control. */
export function field(label, control) {
  return h('label', {}, label, control);
}

/** A progress bar with its percentage as text. */
export function progressBar(percent, label) {
  const value = Math.max(0, Math.min(100, Math.round(percent || 0)));
  return h('div', { class: 'progress-line' },
    h('progress', { max: 100, value, 'aria-label': label }),
    h('span', { class: 'percent' }, `${value}%`));
}

const shown = new WeakMap();

/**
 * Fills `el` with `build(data)` unless it already shows the same data: a refresh that finds
 * nothing new leaves the page alone (and the keyboard focus where it was).
 */
export function fillWith(el, data, build) {
  const key = JSON.stringify(data);
  if (shown.get(el) === key) return;
  shown.set(el, key);
  fill(el, build(data));
}
