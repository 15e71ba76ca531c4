// The one way the UI talks to the controller: its public API, with the session cookie, and the
// session's CSRF token on every request that changes something.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function cookie(name) {
  for (const part of document.cookie.split(';')) {
    const [key, ...rest] = part.trim().split('=');
    if (key === name) return decodeURIComponent(rest.join('='));
  }
  return '';
}

const UNSAFE = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);

export function headersFor(method, extra = {}) {
  const headers = { Accept: 'application/json', ...extra };
  if (UNSAFE.has(method)) headers['X-CSRFToken'] = cookie('csrftoken');
  return headers;
}

let sessionEnded = () => {};

/** Called with the API's message when a request finds the session gone (idle expiry, logout). */
export function onSessionEnd(handler) {
  sessionEnded = handler;
}

/** The API's message for a refused request. */
export function messageOf(status, data, fallback) {
  if (data && typeof data === 'object') return data.error || data.detail || data.status || fallback;
  if (typeof data === 'string' && data.trim()) return data.trim();
  return fallback || `HTTP ${status}`;
}

let inFlight = 0;
let settled = [];

/** Resolves once no request is on its way (so that logging out races none of them). */
export function settle() {
  return inFlight ? new Promise((resolve) => { settled.push(resolve); }) : Promise.resolve();
}

let open = true;

/** While closed (logging out), requests other than /login and /logout fail without being sent. */
export function setOpen(value) {
  open = value;
}

export async function request(method, path, options = {}) {
  if (!open && path !== '/login' && path !== '/logout') throw new ApiError(0, 'logged out');
  inFlight += 1;
  try {
    return await send(method, path, options);
  } finally {
    inFlight -= 1;
    if (!inFlight) { settled.forEach((resolve) => resolve()); settled = []; }
  }
}

async function send(method, path, { body, quiet = false }) {
  const headers = headersFor(method);
  let payload;
  if (body !== undefined) {
    payload = JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, credentials: 'same-origin' });
  } catch (e) {
    throw new ApiError(0, `Cannot reach the controller (${e.message}).`);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, messageOf(response.status, data, response.statusText), data);
    if (response.status === 401 && !quiet) sessionEnded(error.message);
    throw error;
  }
  return data;
}

export const get = (path, options) => request('GET', path, options);
export const post = (path, body, options) => request('POST', path, { ...options, body });
export const patch = (path, body) => request('PATCH', path, { body });
export const del = (path) => request('DELETE', path);

/** `path?k=v&...`, leaving out empty values. */
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') query.set(key, value === true ? 'true' : value);
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

/** Every object of a collection (following pages, at most `limit`). */
export async function getAll(path, params = {}, limit = 5000) {
  const results = [];
  let page = 1;
  for (;;) {
    const data = await get(withQuery(path, { ...params, page_size: 200, page }));
    results.push(...data.results);
    if (!data.next || results.length >= limit) return { results, count: data.count };
    page += 1;
  }
}
