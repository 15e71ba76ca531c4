// The page's frame: who is logged in, the navigation, and which view shows. Views live in
// pages/*.js; each renders into <main> and returns a function that stops what it started
// (its refresh timer) when another view takes over.

import { get, onSessionEnd, post, setOpen, settle } from './api.js';
import { alertBox, fill, h } from './dom.js';
import { showLogin } from './pages/login.js';
import * as dashboard from './pages/dashboard.js';
import * as pools from './pages/pools.js';
import * as virtualservices from './pages/virtualservices.js';
import * as engines from './pages/engines.js';
import * as images from './pages/images.js';
import * as upgrades from './pages/upgrades.js';
import * as asyncpatch from './pages/asyncpatch.js';

const ROUTES = {
  dashboard, pools, virtualservices, serviceengines: engines, images, upgrades, async: asyncpatch,
};

const main = document.getElementById('main');
const header = document.querySelector('header.top');
const notice = document.getElementById('notice');
let user = null;
let stopView = null;

/** What the logged-in user may do, from the privileges /api/useraccount lists. */
function can(kind) {
  if (!user) return false;
  if (kind === 'upgrade') return Boolean(user.is_superuser);
  const resource = `PERMISSION_${kind.toUpperCase()}`;
  return (user.privileges || []).some((p) => (p.resource === '*' || p.resource === resource) && p.type === 'WRITE_ACCESS');
}

/** Runs `task` now and every `ms` while the view is shown (skipped while the tab is hidden). */
function every(ms, task) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await task();
        notice.hidden = true;
      } catch (e) {
        if (e.status !== 401 && user) {
          notice.textContent = `Could not refresh this page: ${e.message} Retrying every ${ms / 1000} s.`;
          notice.hidden = false;
        }
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

async function route() {
  if (!user) return;
  if (stopView) { stopView(); stopView = null; }
  const [name, ...rest] = (location.hash.replace(/^#\/?/, '') || 'dashboard').split('/');
  const view = ROUTES[name];
  for (const link of header.querySelectorAll('nav a')) {
    if (link.getAttribute('href') === `#/${name}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  if (!view) {
    fill(main, h('h1', {}, 'Not found'), alertBox('error', `There is no page “${name}”.`), h('a', { href: '#/dashboard' }, 'Go to the dashboard'));
    return;
  }
  fill(main);
  const cleanups = [];
  const context = {
    main, user, can, params: rest.map(decodeURIComponent),
    every: (ms, task) => { cleanups.push(every(ms, task)); },
    onLeave: (f) => cleanups.push(f),
  };
  stopView = () => cleanups.forEach((f) => f());
  try {
    await view.render(context);
  } catch (e) {
    if (e.status !== 401) main.append(alertBox('error', e.message));
  }
  const title = main.querySelector('h1');
  if (title) {
    title.setAttribute('tabindex', '-1');
    document.title = `${title.textContent} · Fulcrum`;
  }
}

// Whether this browser has logged in (and not out) since: without it the page shows the login
// form straight away instead of asking the API, and being refused, first.
const LOGGED_IN = 'fulcrum-logged-in';

function enter(account, idle) {
  setOpen(true);
  lastActivity = Date.now();
  learnIdleTimeout(idle);
  localStorage.setItem(LOGGED_IN, '1');
  user = account;
  document.getElementById('username').textContent = account.username;
  header.hidden = false;
  route();
}

function leave(message) {
  localStorage.removeItem(LOGGED_IN);
  notice.hidden = true;
  if (stopView) { stopView(); stopView = null; }
  user = null;
  header.hidden = true;
  showLogin(main, message, enter);
}

onSessionEnd((message) => {
  if (user) leave(`Your session has ended (${message}). Log in again.`);
});

async function logOut(message) {
  // Nothing may ask the API with the session while it ends.
  setOpen(false);
  if (stopView) { stopView(); stopView = null; }
  user = null;
  await settle();
  try { await post('/logout', undefined, { quiet: true }); } catch { /* the session is gone either way */ }
  leave(message);
}

document.getElementById('logout').addEventListener('click', () => logOut('You are logged out.'));

// The page's own refreshes count as uses of the session, so the controller's idle expiry
// (controllerproperties.api_idle_timeout minutes) is kept here: without a key or a click for
// that long, the UI logs out.
let idleMinutes = 15;
let lastActivity = Date.now();
for (const kind of ['pointerdown', 'keydown']) {
  document.addEventListener(kind, () => { lastActivity = Date.now(); }, { passive: true });
}
setInterval(() => {
  if (user && idleMinutes > 0 && Date.now() - lastActivity > idleMinutes * 60_000) {
    logOut(`Your session expired after ${idleMinutes} minutes without activity. Log in again.`);
  }
}, 5000);

async function learnIdleTimeout(known) {
  if (typeof known === 'number') { idleMinutes = known; return; }
  try {
    const properties = await get('/api/controllerproperties?fields=api_idle_timeout', { quiet: true });
    if (typeof properties.api_idle_timeout === 'number') idleMinutes = properties.api_idle_timeout;
  } catch { /* a user who may not read it keeps the default */ }
}

window.addEventListener('hashchange', () => {
  route().then(() => main.querySelector('h1')?.focus());
});

(async () => {
  if (!localStorage.getItem(LOGGED_IN)) {
    leave('');
    return;
  }
  try {
    enter(await get('/api/useraccount', { quiet: true }));
  } catch (e) {
    leave(e.status === 401 ? '' : e.message);
  }
})();
