// The login form: POST /login, the API's own session (its cookie and CSRF token).

import { post } from '../api.js';
import { alertBox, field, fill, h } from '../dom.js';

export function showLogin(main, message, onLoggedIn) {
  document.title = 'Log in · Fulcrum';
  const username = h('input', { type: 'text', name: 'username', autocomplete: 'username', required: true });
  const password = h('input', { type: 'password', name: 'password', autocomplete: 'current-password', required: true });
  const problem = h('div');
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Log in');
  const form = h('form', {
    onsubmit: async (event) => {
      event.preventDefault();
      submit.disabled = true;
      fill(problem);
      try {
        const answer = await post('/login', { username: username.value, password: password.value }, { quiet: true });
        onLoggedIn(answer.user, answer.controller?.api_idle_timeout);
      } catch (e) {
        fill(problem, alertBox('error', e.message));
        password.select();
      } finally {
        submit.disabled = false;
      }
    },
  },
  field('User name', username),
  field('Password', password),
  problem,
  submit);
  fill(main, h('div', { class: 'login' },
    h('h1', {}, 'Log in to Fulcrum'),
    message ? alertBox('info', message) : null,
    form));
  username.focus();
}
