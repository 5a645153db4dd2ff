// ChatConnect's web client: sign in, the room list, a room's live chat.
//
// Plain DOM, no framework. Everything a user or another user typed is put
// on the page with textContent, never as HTML. The page is three views
// (sign-in, lobby, room) chosen from the session and the URL hash
// (`#/` or `#/room/<name>`), so a reload comes back to the same room.
// The API it speaks is docs/API.md: /register, /login, /rooms,
// /rooms/{name}/messages and the /ws/{room} WebSocket.

const AUTH_MODE = document.querySelector('meta[name="chatconnect-auth"]')?.content || 'open';
const SESSION_KEY = 'chatconnect.session';
const ROOMS_REFRESH_MS = 3000;
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 15000;
const PAGE = 50;

const $ = (id) => document.getElementById(id);

// --- session -------------------------------------------------------------

/** {username, token} or null; kept in localStorage across reloads. */
function loadSession() {
  try {
    const s = JSON.parse(localStorage.getItem(SESSION_KEY));
    return s && typeof s.username === 'string' ? s : null;
  } catch {
    return null;
  }
}

let session = loadSession();

/** Whether the session's token (a JWT) has passed its `exp`. */
function tokenExpired(s) {
  if (!s?.token) return false;
  try {
    const part = s.token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part));
    return typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now();
  } catch {
    return true;
  }
}

function saveSession(s) {
  session = s;
  if (s) localStorage.setItem(SESSION_KEY, JSON.stringify(s));
  else localStorage.removeItem(SESSION_KEY);
}

// --- the API -------------------------------------------------------------

/** A JSON call; resolves to {status, body}; rejects only on network errors. */
async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (session?.token) headers.Authorization = `Bearer ${session.token}`;
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await resp.json();
  } catch {
    // No JSON body (or none at all).
  }
  return { status: resp.status, body: data };
}

function errorText(r, fallback) {
  return r.body?.error || `${fallback} (HTTP ${r.status})`;
}

// --- small view helpers --------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

let noticeTimer = null;

/** A passing message at the top of the page. */
function notice(text) {
  const n = $('notice');
  n.textContent = text;
  n.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { n.hidden = true; }, 8000);
}

function show(view) {
  for (const id of ['signin', 'lobby', 'room']) $(id).hidden = id !== view;
  $('logout').hidden = !session;
  $('who').textContent = session ? `Signed in as ${session.username}` : '';
}

// --- sign-in -------------------------------------------------------------

function credentials() {
  return { username: $('username').value.trim(), password: $('password').value };
}

function signinError(text) {
  $('signin-error').textContent = text;
}

async function login() {
  const { username, password } = credentials();
  if (!username || !password) return signinError('Enter a username and a password.');
  try {
    const r = await api('POST', '/login', { username, password });
    if (r.status !== 200) return signinError(errorText(r, 'Login failed'));
    saveSession({ username: r.body.username || username, token: r.body.token });
    $('password').value = '';
    signinError('');
    route();
  } catch {
    signinError('The server cannot be reached.');
  }
}

async function register() {
  const { username, password } = credentials();
  if (!username || !password) return signinError('Choose a username and a password.');
  try {
    const r = await api('POST', '/register', { username, password });
    if (r.status !== 200) return signinError(errorText(r, 'Registration failed'));
    await login();
  } catch {
    signinError('The server cannot be reached.');
  }
}

function enterAsGuest() {
  const { username } = credentials();
  if (!username) return signinError('Enter a name.');
  saveSession({ username, token: null });
  signinError('');
  route();
}

function setupSignin() {
  $('signin-form').addEventListener('submit', (e) => { e.preventDefault(); login(); });
  $('register').addEventListener('click', register);
  $('guest').addEventListener('click', enterAsGuest);
  $('guest').hidden = AUTH_MODE !== 'open';
  $('mode-hint').textContent = AUTH_MODE === 'token'
    ? 'This server needs an account: register once, then log in.'
    : 'Log in or register, or enter with just a name.';
}

// --- lobby ---------------------------------------------------------------

let roomsTimer = null;
/** The room whose delete button was clicked once (it asks to confirm). */
let armed = null;
let armedTimer = null;

async function refreshRooms() {
  clearTimeout(roomsTimer);
  if ($('lobby').hidden) return;
  try {
    const r = await api('GET', '/rooms');
    if (r.status === 200 && Array.isArray(r.body)) {
      renderRooms(r.body);
      $('lobby-error').textContent = '';
    } else {
      $('lobby-error').textContent = errorText(r, 'The room list is unavailable');
    }
  } catch {
    $('lobby-error').textContent = 'The server cannot be reached; retrying.';
  }
  if (!$('lobby').hidden) roomsTimer = setTimeout(refreshRooms, ROOMS_REFRESH_MS);
}

function renderRooms(rooms) {
  const list = $('rooms');
  // Keep the element that has focus (a pending delete, a link) in place.
  const focused = document.activeElement?.dataset?.room;
  list.replaceChildren();
  $('rooms-empty').hidden = rooms.length > 0;
  for (const room of rooms) {
    const li = el('li', 'room-item');
    const link = el('a', 'room-link', room.name);
    link.href = `#/room/${encodeURIComponent(room.name)}`;
    link.dataset.room = room.name;
    const n = room.members ?? 0;
    const meta = el('span', 'meta', `${n} online · by ${room.creator}`);
    li.append(link, meta);
    if (session && room.creator === session.username) {
      const del = el('button', 'danger', 'Delete');
      del.type = 'button';
      del.dataset.room = room.name;
      del.dataset.del = '1';
      if (armed === room.name) del.textContent = 'Really delete?';
      del.addEventListener('click', () => deleteRoom(del, room.name));
      li.append(del);
    }
    list.append(li);
  }
  if (focused) {
    const again = [...list.querySelectorAll('[data-room]')].find((e) => e.dataset.room === focused);
    again?.focus();
  }
}

/** The first click arms the button, a second within 4 s deletes. */
async function deleteRoom(button, name) {
  clearTimeout(armedTimer);
  if (armed !== name) {
    armed = name;
    button.textContent = 'Really delete?';
    armedTimer = setTimeout(() => {
      armed = null;
      refreshRooms();
    }, 4000);
    return;
  }
  armed = null;
  const q = `name=${encodeURIComponent(name)}&username=${encodeURIComponent(session.username)}`;
  try {
    const r = await api('DELETE', `/rooms?${q}`);
    if (r.status === 200) notice(`Room “${name}” deleted.`);
    else $('lobby-error').textContent = errorText(r, 'Delete failed');
  } catch {
    $('lobby-error').textContent = 'The server cannot be reached.';
  }
  refreshRooms();
}

async function createRoom(e) {
  e.preventDefault();
  const name = $('room-name').value.trim();
  if (!name) return;
  try {
    const r = await api('POST', '/rooms', { name, username: session.username });
    if (r.status === 201) {
      $('room-name').value = '';
      $('lobby-error').textContent = '';
      location.hash = `#/room/${encodeURIComponent(name)}`;
    } else {
      $('lobby-error').textContent = errorText(r, 'The room was not created');
    }
  } catch {
    $('lobby-error').textContent = 'The server cannot be reached.';
  }
}

function setupLobby() {
  $('create-form').addEventListener('submit', createRoom);
}

// --- a room --------------------------------------------------------------

/** The open room's connection and what it has shown. */
let chat = null;

function setState(state, text) {
  const s = $('state');
  s.dataset.state = state;
  s.textContent = text;
}

function openRoom(name) {
  closeRoom();
  chat = {
    name,
    ws: null,
    lastSeq: null, // the newest seq shown: the resume point
    firstSeq: null, // the oldest seq shown: where paging goes on
    attempt: 0,
    retryTimer: null,
    loadingOlder: false,
    noOlder: false,
  };
  $('room-title').textContent = name;
  $('messages').replaceChildren();
  $('older').hidden = true;
  show('room');
  connect();
  $('text').focus();
}

function closeRoom() {
  if (!chat) return;
  clearTimeout(chat.retryTimer);
  const ws = chat.ws;
  chat = null;
  if (ws) ws.close(1000, 'left');
}

function wsUrl(c) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const q = new URLSearchParams();
  if (session.token) q.set('token', session.token);
  else q.set('username', session.username);
  if (c.lastSeq !== null) q.set('since', String(c.lastSeq));
  return `${scheme}://${location.host}/ws/${encodeURIComponent(c.name)}?${q}`;
}

function connect() {
  const c = chat;
  setState('connecting', c.attempt ? 'Reconnecting…' : 'Connecting…');
  const ws = new WebSocket(wsUrl(c));
  c.ws = ws;
  ws.onopen = () => {
    if (chat !== c) return;
    c.attempt = 0;
    setState('live', 'Live');
  };
  ws.onmessage = (e) => {
    if (chat === c) receive(c, e.data);
  };
  ws.onclose = (e) => {
    if (chat !== c || c.ws !== ws) return;
    c.ws = null;
    if (e.code === 4404) {
      closeRoom();
      notice(`Room “${c.name}” was deleted.`);
      location.hash = '#/';
      return;
    }
    if (e.code === 1008 && e.reason) systemLine(`Disconnected: ${e.reason}`, 'error');
    retry(c);
  };
}

/** Reconnect after a backoff that doubles up to RETRY_MAX_MS, with jitter. */
function retry(c) {
  if (tokenExpired(session)) {
    closeRoom();
    route();
    return;
  }
  const base = Math.min(RETRY_MAX_MS, RETRY_MIN_MS * 2 ** c.attempt);
  const wait = Math.round(base / 2 + Math.random() * base / 2);
  c.attempt += 1;
  setState('offline', `Offline; reconnecting in ${Math.ceil(wait / 1000)} s`);
  c.retryTimer = setTimeout(() => {
    if (chat === c) connect();
  }, wait);
}

function receive(c, text) {
  let m;
  try {
    m = JSON.parse(text);
  } catch {
    return;
  }
  if (m.error) {
    systemLine(describeError(m), 'error');
    return;
  }
  if (typeof m.seq !== 'number') return;
  // A resume sends what came after lastSeq; anything at or below it has
  // been shown already.
  if (c.lastSeq !== null && m.seq <= c.lastSeq) return;
  const list = $('messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(messageItem(m));
  c.lastSeq = m.seq;
  if (c.firstSeq === null) {
    c.firstSeq = m.seq;
    $('older').hidden = m.seq <= 1;
  }
  if (atBottom || m.username === session.username) list.scrollTop = list.scrollHeight;
}

function describeError(m) {
  switch (m.code) {
    case 'rate_limited': return `Slow down: ${m.error}`;
    case 'too_long': return `Not sent, too long: ${m.error}`;
    case 'empty_content': return `Not sent: ${m.error}`;
    case 'store_unavailable': return `Not sent, the server could not store it: ${m.error}`;
    default: return `Error: ${m.error}`;
  }
}

function messageItem(m) {
  const li = el('li', m.username === session.username ? 'msg mine' : 'msg');
  li.dataset.seq = String(m.seq);
  const head = el('div', 'msg-head');
  head.append(el('span', 'author', m.username));
  const when = new Date(m.timestamp);
  const time = el('time', 'when', when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }));
  time.dateTime = m.timestamp;
  time.title = when.toLocaleString();
  head.append(time);
  li.append(head, el('p', 'content', m.content));
  return li;
}

function systemLine(text, cls) {
  const list = $('messages');
  const li = el('li', `system ${cls || ''}`, text);
  li.setAttribute('role', 'alert');
  list.append(li);
  list.scrollTop = list.scrollHeight;
}

/** Older messages, from the paged history endpoint, above what is shown. */
async function loadOlder() {
  const c = chat;
  if (!c || c.loadingOlder || c.noOlder || c.firstSeq === null || c.firstSeq <= 1) return;
  c.loadingOlder = true;
  try {
    const path = `/rooms/${encodeURIComponent(c.name)}/messages?limit=${PAGE}&before=${c.firstSeq}`;
    const r = await api('GET', path);
    if (chat !== c) return;
    if (r.status !== 200 || !Array.isArray(r.body)) {
      systemLine(errorText(r, 'Older messages are unavailable'), 'error');
      return;
    }
    const page = r.body.filter((m) => m.seq < c.firstSeq);
    if (page.length === 0) {
      c.noOlder = true;
      $('older').hidden = true;
      return;
    }
    const list = $('messages');
    const before = list.scrollHeight;
    list.prepend(...page.map(messageItem));
    list.scrollTop += list.scrollHeight - before;
    c.firstSeq = page[0].seq;
    $('older').hidden = c.firstSeq <= 1;
  } catch {
    systemLine('The server cannot be reached.', 'error');
  } finally {
    c.loadingOlder = false;
  }
}

function send(e) {
  e.preventDefault();
  const input = $('text');
  const content = input.value;
  if (!content.trim() || !chat) return;
  if (!chat.ws || chat.ws.readyState !== WebSocket.OPEN) {
    systemLine('Not connected: your message was not sent (it is still in the box).', 'error');
    return;
  }
  chat.ws.send(JSON.stringify({ content }));
  input.value = '';
}

function setupRoom() {
  $('send-form').addEventListener('submit', send);
  $('back').addEventListener('click', () => { location.hash = '#/'; });
  $('older').addEventListener('click', loadOlder);
  $('messages').addEventListener('scroll', () => {
    if ($('messages').scrollTop < 60) loadOlder();
  });
}

// --- routing -------------------------------------------------------------

function route() {
  if (tokenExpired(session)) {
    saveSession(null);
    notice('Your session has expired: log in again.');
  }
  if (!session) {
    closeRoom();
    show('signin');
    $('username').focus();
    return;
  }
  const m = location.hash.match(/^#\/room\/(.+)$/);
  let name = null;
  if (m) {
    try {
      name = decodeURIComponent(m[1]);
    } catch {
      name = null;
    }
  }
  if (name) {
    if (!chat || chat.name !== name) openRoom(name);
    return;
  }
  closeRoom();
  show('lobby');
  refreshRooms();
}

function logout() {
  closeRoom();
  saveSession(null);
  location.hash = '#/';
  route();
}

setupSignin();
setupLobby();
setupRoom();
$('logout').addEventListener('click', logout);
window.addEventListener('hashchange', route);
route();
