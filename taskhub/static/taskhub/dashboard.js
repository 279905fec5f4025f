/**
 * The TaskHub dashboard (/taskhub/): every task of the hub, live, for staff users.
 *
 * It connects to the hub as a *monitor* (`hello` with `monitor: true`; the hub takes the
 * rights from this page's Django session) through taskhub.js, and changes nothing. What it
 * shows comes from three sources:
 *
 * - `transition` messages: every transition of every task, on every hub process, as it
 *   is written (the task after it and the events it wrote);
 * - `tasks` and `watch` answers, read from the database: on every (re)connect, every
 *   RECONCILE_EVERY ms, and for the task whose timeline is open. The channel layer may
 *   drop a `transition`; the database is the truth, and each task's `version` says which
 *   of two views of it is newer, so the page converges on it;
 * - `stats` answers (services, instances, per-action counts, waiting tasks), every
 *   STATS_EVERY ms.
 *
 * Each task is one row carrying `data-task-id`, `data-status` and, once it has progress,
 * `data-progress` (0..1), for tests and scripts.
 */

import {Client} from './taskhub.js';

const config = JSON.parse(document.getElementById('taskhub-config').textContent);

/** Most tasks kept on the page; the oldest finished ones go first. */
const MAX_TASKS = 500;
/** Tasks read per listing. */
const LIST_LIMIT = 200;
/** Milliseconds between two reads of the tasks from the database. */
const RECONCILE_EVERY = 5000;
/** Milliseconds between two reads of the services and counts. */
const STATS_EVERY = 5000;
/** Unfinished tasks beyond the listing re-read one by one per reconciliation, at most. */
const RECHECK = 20;
/** Characters of JSON shown before it is cut. */
const JSON_SHOWN = 20000;
/** A `since` past any event: `watch` then answers the task's state alone. */
const NO_EVENTS = Number.MAX_SAFE_INTEGER;

const FINISHED = new Set(['success', 'failed', 'ended']);
/** Where a service is with the task after each kind of event about it. */
const SERVICE_STATE = {
  start: 'offered',
  pickup: 'picked_up',
  update: 'picked_up',
  drop: 'dropped',
  success: 'returned',
  late_return: 'returned',
  error: 'failed',
  lost: 'lost',
  seen: 'seen',
};
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

const $ = (id) => document.getElementById(id);

/** Tasks on the page by id: the latest snapshot known, its services, its row. */
const tasks = new Map();
const known = {actions: new Set(), services: new Set()};
const filters = {action: '', status: '', service: '', search: ''};
/** The task whose timeline is open, and what is known of its events (by seq). */
const timeline = {id: null, events: new Map(), confirmed: 0, result: undefined, payload: undefined, reload: null};

let client = null;
let live = false;

// -- time and numbers ---------------------------------------------------------------------

/** Microseconds since the epoch of an ISO 8601 time (the hub's have microseconds). */
function micros(iso) {
  if (!iso) return NaN;
  const match = /^(.*?:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$/.exec(iso);
  if (!match) return Date.parse(iso) * 1000;
  const fraction = (match[2] || '').padEnd(6, '0').slice(0, 6);
  return Date.parse(match[1] + (match[3] || 'Z')) * 1000 + Number(fraction);
}

/** A duration in milliseconds, as an operator reads it: 12 ms, 1.25 s, 3 min 4 s, 2 h 5 min. */
function duration(ms) {
  if (!Number.isFinite(ms)) return '';
  ms = Math.max(0, ms);
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const s = Math.floor(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function rate(n) {
  return n >= 10 || n === 0 ? String(Math.round(n)) : n.toFixed(1);
}

function json(value) {
  const text = JSON.stringify(value, null, 2);
  if (text === undefined) return '';
  return text.length > JSON_SHOWN ? `${text.slice(0, JSON_SHOWN)}\n… (${text.length} characters)` : text;
}

function compact(value) {
  if (value === null || value === undefined) return '';
  const text = JSON.stringify(value);
  return text.length > 300 ? `${text.slice(0, 300)}…` : text;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'class') node.className = value;
    else if (name === 'text') node.textContent = value;
    else node.setAttribute(name, value === true ? '' : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function adminLink(kind, id, text) {
  const url = config.admin[kind];
  if (!url) return null;
  const href = id === undefined ? url : url.replace(config.placeholder, encodeURIComponent(id));
  const link = el('a', {href, class: 'admin', title: 'Open in the admin', text});
  link.addEventListener('click', (event) => event.stopPropagation());
  return link;
}

function showNotice(text) {
  const notice = $('notice');
  notice.textContent = text || '';
  notice.hidden = !text;
}

function setConnection(state, text) {
  const node = $('connection');
  node.dataset.state = state;
  node.textContent = text;
}

// -- tasks ---------------------------------------------------------------------------------

/**
 * Take a view of a task (a `transition`'s task, or a snapshot from the database): kept
 * unless a newer version of it is known. Returns the task, or null for an older view.
 */
function take(view) {
  let task = tasks.get(view.id);
  if (task && Number.isInteger(view.version) && view.version < task.version) return null;
  if (!task) {
    task = {id: view.id, version: -1, services: new Map(), row: null};
    tasks.set(view.id, task);
  }
  for (const name of [
    'action', 'status', 'attempt', 'publisher', 'progress', 'has_result', 'failure_reason',
    'failure_detail', 'retries', 'retry_at', 'created_at', 'started_at', 'finished_at',
  ]) {
    if (name in view) task[name] = view[name];
  }
  if (Number.isInteger(view.version)) task.version = view.version;
  if (Array.isArray(view.services)) {
    task.services = new Map(view.services.map((s) => [s.service, {state: s.state, attempt: task.attempt}]));
  }
  remember(task);
  return task;
}

function remember(task) {
  if (task.action && !known.actions.has(task.action)) {
    known.actions.add(task.action);
    fillSelect($('filter-action'), known.actions, filters.action);
  }
  let added = false;
  for (const name of task.services.keys()) {
    if (!known.services.has(name)) {
      known.services.add(name);
      added = true;
    }
  }
  if (added) fillSelect($('filter-service'), known.services, filters.service);
}

function fillSelect(select, values, current) {
  const sorted = [...values].sort();
  select.replaceChildren(el('option', {value: '', text: 'all'}), ...sorted.map((v) => el('option', {value: v, text: v})));
  select.value = current;
}

/** A `transition`: the task after it, and where each service is after its events. */
function onTransition(message) {
  const task = take(message.task);
  if (!task) return; // an older transition, overtaken on the way
  for (const event of message.events) {
    const state = SERVICE_STATE[event.kind];
    if (state && event.service) task.services.set(event.service, {state, attempt: event.attempt});
  }
  remember(task);
  render(task);
  trim();
  if (timeline.id === task.id) {
    for (const event of message.events) {
      if (!timeline.events.has(event.seq)) timeline.events.set(event.seq, {...event, live: true});
    }
    renderTimeline();
    scheduleTimelineReload();
  }
}

function matches(task) {
  if (filters.action && task.action !== filters.action) return false;
  if (filters.status && task.status !== filters.status) return false;
  if (filters.service && !task.services.has(filters.service)) return false;
  if (filters.search && !task.id.includes(filters.search)) return false;
  return true;
}

/** The task's row, made or brought up to date; one element per task. */
function render(task) {
  let row = task.row;
  if (!row) {
    row = task.row = el('tr', {class: 'task', tabindex: '0'});
    row.dataset.taskId = task.id;
    row.append(
      el('td', {class: 'col-id'}, el('code', {text: task.id.slice(0, 8), title: task.id})),
      el('td', {class: 'action'}),
      el('td', {class: 'publisher'}),
      el('td', {class: 'services'}),
      el('td', {class: 'status'}),
      el('td', {class: 'col-progress'}, el('div', {class: 'bar'}, el('span')), el('small')),
      el('td', {class: 'num age'}),
      el('td', {class: 'num duration'}),
    );
    row.addEventListener('click', () => openTimeline(task.id));
    row.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') openTimeline(task.id);
    });
    place(row, task);
  }
  row.dataset.status = task.status;
  if (typeof task.progress === 'number') row.dataset.progress = String(task.progress);
  else delete row.dataset.progress;
  row.classList.toggle('selected', timeline.id === task.id);
  const [, action, publisher, services, status, progress] = row.children;
  action.textContent = task.action || '';
  publisher.textContent = task.publisher || '';
  services.replaceChildren(
    ...[...task.services]
      .filter(([, part]) => part.attempt === task.attempt)
      .map(([name, part]) => el('span', {class: `chip ${part.state}`, title: `${name}: ${part.state.replace('_', ' ')}`, text: name})),
  );
  const badge = el('span', {class: `badge status-${task.status}`, text: task.status});
  const detail = task.status === 'failed'
    ? el('small', {
      class: 'reason',
      title: task.failure_detail || '',
      text: [task.failure_reason, task.failure_detail].filter(Boolean).join(': '),
    })
    : task.status === 'pending' && task.attempt > 1
      ? el('small', {class: 'reason', text: `retry, attempt ${task.attempt}`})
      : null;
  status.replaceChildren(...[badge, detail].filter(Boolean));
  // A task that succeeded is done, whatever its last progress said.
  const reported = typeof task.progress === 'number' && task.status !== 'success';
  const fraction = task.status === 'success' ? 1 : reported ? task.progress : 0;
  progress.firstChild.firstChild.style.width = `${(fraction * 100).toFixed(1)}%`;
  progress.lastChild.textContent = reported ? `${Math.round(task.progress * 100)}%` : '';
  row.hidden = !matches(task);
  tick(task);
  counts();
}

/** Rows stay in order, newest first. */
function place(row, task) {
  const body = $('tasks');
  const at = micros(task.created_at);
  for (const other of body.children) {
    const theirs = tasks.get(other.dataset.taskId);
    if (theirs && micros(theirs.created_at) < at) {
      body.insertBefore(row, other);
      return;
    }
  }
  body.append(row);
}

/** Age and duration: from its creation, and from its first offer to its end (or now). */
function tick(task, now = Date.now() * 1000) {
  const row = task.row;
  if (!row) return;
  const created = micros(task.created_at);
  const began = micros(task.started_at) || created;
  const ended = task.finished_at ? micros(task.finished_at) : FINISHED.has(task.status) ? NaN : now;
  row.children[6].textContent = duration((now - created) / 1000);
  row.children[7].textContent = task.status === 'pending' && !task.started_at ? '' : duration((ended - began) / 1000);
}

/** Keep at most MAX_TASKS rows: the oldest finished ones go (never the open one). */
function trim() {
  if (tasks.size <= MAX_TASKS) return;
  const rows = [...$('tasks').children].reverse();
  for (const row of rows) {
    if (tasks.size <= MAX_TASKS) break;
    const task = tasks.get(row.dataset.taskId);
    if (task && FINISHED.has(task.status) && task.id !== timeline.id) forget(task);
  }
}

function forget(task) {
  task.row?.remove();
  tasks.delete(task.id);
}

let countsDue = false;

/** Count the rows once per frame, however many changed in it. */
function counts() {
  if (countsDue) return;
  countsDue = true;
  requestAnimationFrame(() => {
    countsDue = false;
    countNow();
  });
}

function countNow() {
  let shown = 0;
  let failed = 0;
  for (const task of tasks.values()) {
    if (task.row && !task.row.hidden) shown += 1;
    if (task.status === 'failed') failed += 1;
  }
  $('task-counts').textContent = `${shown} of ${tasks.size} shown${failed ? ` · ${failed} failed` : ''}`;
  $('empty').hidden = tasks.size > 0;
}

function applyFilters() {
  for (const task of tasks.values()) {
    if (task.row) task.row.hidden = !matches(task);
  }
  counts();
}

// -- reading from the database -------------------------------------------------------------

/** Read the newest tasks (matching the filters), and re-read unfinished ones beyond them. */
async function reconcile() {
  if (!live) return;
  const command = {type: 'tasks', limit: LIST_LIMIT};
  for (const name of ['action', 'status', 'service']) {
    if (filters[name]) command[name] = filters[name];
  }
  const answer = await client.request(command);
  const listed = new Set();
  for (const view of answer.tasks) {
    listed.add(view.id);
    const task = take(view);
    if (task) render(task);
  }
  // The least recently re-read first, so that every unfinished task gets its turn.
  const stale = [...tasks.values()]
    .filter((t) => !listed.has(t.id) && !FINISHED.has(t.status))
    .sort((a, b) => (a.checkedAt || 0) - (b.checkedAt || 0))
    .slice(0, RECHECK);
  const now = Date.now();
  for (const task of stale) task.checkedAt = now;
  await Promise.all(stale.map((task) => refresh(task.id)));
  trim();
}

/** Re-read one task's state; one that is gone (purged) leaves the page. */
async function refresh(id) {
  try {
    const answer = await client.request({type: 'watch', task: id, since: NO_EVENTS, follow: false});
    const task = take(answer.task);
    if (task) render(task);
    return task || tasks.get(id);
  } catch (error) {
    if (error.code === 'unknown_task') {
      const task = tasks.get(id);
      if (task) forget(task);
      counts();
      return null;
    }
    throw error;
  }
}

async function loadStats() {
  if (!live) return;
  renderStats(await client.request({type: 'stats'}));
}

function every(ms, fn) {
  const run = async () => {
    try {
      await fn();
    } catch (error) {
      if (live) console.warn('dashboard:', error);
    } finally {
      setTimeout(run, ms);
    }
  };
  setTimeout(run, ms);
}

// -- the timeline --------------------------------------------------------------------------

async function openTimeline(id) {
  if (timeline.id !== id) {
    const previous = tasks.get(timeline.id);
    Object.assign(timeline, {id, events: new Map(), confirmed: 0, result: undefined, payload: undefined});
    if (previous) render(previous);
  }
  const task = tasks.get(id);
  if (task) render(task);
  $('timeline').hidden = false;
  renderTimeline();
  await loadTimeline(id);
  try {
    const answer = await client.request({type: 'get_payload', task: id});
    if (timeline.id === id) {
      timeline.payload = answer.payload;
      renderTimeline();
    }
  } catch (error) {
    if (timeline.id === id) $('timeline-payload').textContent = `(${error.detail || error.message})`;
  }
}

function closeTimeline() {
  const task = tasks.get(timeline.id);
  timeline.id = null;
  $('timeline').hidden = true;
  if (task) render(task);
}

/** The open task's events from the database, from the last one confirmed, page by page. */
async function loadTimeline(id) {
  let since = timeline.confirmed;
  for (;;) {
    let answer;
    try {
      answer = await client.request({type: 'watch', task: id, since, follow: false});
    } catch (error) {
      if (timeline.id === id) showNotice(`Task ${id}: ${error.detail || error.message}`);
      return;
    }
    if (timeline.id !== id) return;
    for (const event of answer.events) {
      timeline.events.set(event.seq, event);
      since = Math.max(since, event.seq);
    }
    // A page may leave a large result out; the last page has it.
    if (!answer.more) timeline.result = answer.task.has_result ? answer.task.result : undefined;
    const task = take(answer.task);
    if (task) render(task);
    if (!answer.more) break;
  }
  // Events the feed brought that the database does not have yet stay, until it does.
  timeline.confirmed = since;
  renderTimeline();
}

function scheduleTimelineReload() {
  clearTimeout(timeline.reload);
  const id = timeline.id;
  timeline.reload = setTimeout(() => {
    if (timeline.id === id && live) loadTimeline(id);
  }, 250);
}

function renderTimeline() {
  const id = timeline.id;
  if (!id) return;
  const task = tasks.get(id) || {id};
  $('timeline-title').textContent = `${task.action || 'Task'} ${id}`;
  const facts = [
    ['Status', el('span', {class: `badge status-${task.status}`, text: task.status || '…'})],
    ['Publisher', task.publisher],
    ['Attempt', task.attempt && `${task.attempt}${task.retries ? ` of ${task.retries < 0 ? '∞' : task.retries + 1}` : ''}`],
    ['Progress', typeof task.progress === 'number' ? `${Math.round(task.progress * 100)}%` : null],
    ['Created', task.created_at],
    ['Finished', task.finished_at],
    ['Failure', task.failure_reason ? `${task.failure_reason}: ${task.failure_detail}` : null],
    ['Admin', adminLink('task', id, 'open the task in the admin')],
  ];
  $('timeline-facts').replaceChildren(
    ...facts.filter(([, v]) => v !== null && v !== undefined && v !== '').flatMap(([k, v]) => [el('dt', {text: k}), el('dd', {}, v)]),
  );
  const events = [...timeline.events.values()].sort((a, b) => a.seq - b.seq);
  const init = events.find((e) => e.kind === 'init');
  const origin = init ? micros(init.at) : NaN;
  $('timeline-events').replaceChildren(
    ...events.map((event) => {
      const offset = (micros(event.at) - origin) / 1000;
      const data = event.omitted
        ? `${compact(event.data)} (${event.omitted.join(', ')}: loading…)`
        : compact(event.data);
      const row = el(
        'tr',
        {class: `event kind-${event.kind}${event.live ? ' live' : ''}`},
        el('td', {class: 'num', title: event.at, text: Number.isFinite(offset) ? `+${offset.toFixed(1)}` : ''}),
        el('td', {text: event.kind}),
        el('td', {}, event.service ? adminServiceLink(event.service) : ''),
        el('td', {class: 'num', text: String(event.attempt ?? '')}),
        el('td', {class: 'data'}, el('code', {text: data})),
      );
      row.dataset.kind = event.kind;
      return row;
    }),
  );
  $('timeline-payload').textContent = timeline.payload === undefined ? '…' : json(timeline.payload);
  $('timeline-result').textContent = task.has_result
    ? timeline.result === undefined ? '…' : json(timeline.result)
    : FINISHED.has(task.status) ? '(no result)' : '(not yet)';
}

const credentialIds = new Map();

function adminServiceLink(name) {
  const id = credentialIds.get(name);
  return id === undefined ? name : adminLink('credential', id, name) || name;
}

// -- services, actions, waiting tasks ------------------------------------------------------

function renderStats(stats) {
  credentialIds.clear();
  for (const service of stats.services) {
    credentialIds.set(service.name, service.id);
    if (!known.services.has(service.name)) {
      known.services.add(service.name);
      fillSelect($('filter-service'), known.services, filters.service);
    }
  }
  for (const action of stats.actions) {
    if (!known.actions.has(action.action)) {
      known.actions.add(action.action);
      fillSelect($('filter-action'), known.actions, filters.action);
    }
  }
  $('actions').replaceChildren(
    ...stats.actions.map((a) => {
      const {minute, hour} = a;
      const row = el(
        'tr',
        {class: hour.failed ? 'has-failures' : ''},
        el('td', {class: 'name'}, el('a', {href: '#', class: 'filter-link', title: 'Show only this action', text: a.action})),
        el('td', {class: 'num', text: String(a.subscribers)}),
        el('td', {class: 'num', text: String(a.pending)}),
        el('td', {class: 'num', text: String(a.started)}),
        el('td', {class: 'num', title: 'published in the last minute', text: `${minute.published}/min`}),
        el('td', {class: 'num', title: `${hour.published} published in the last hour`},
          `${hour.published} `, el('small', {class: 'muted', text: `${rate(hour.published / 60)}/min`})),
        el('td', {class: 'num', title: 'finished in the last hour: succeeded, failed, ended without a result'},
          el('span', {class: 'ok', text: String(hour.success)}), ' ',
          el('span', {class: hour.failed ? 'bad' : 'muted', text: String(hour.failed)}), ' ',
          el('span', {class: 'muted', text: String(hour.ended)})),
      );
      row.dataset.action = a.action;
      row.querySelector('a').addEventListener('click', (event) => {
        event.preventDefault();
        setFilter('action', a.action);
      });
      return row;
    }),
  );
  $('waiting-count').textContent = String(stats.waiting.count);
  $('waiting').replaceChildren(
    ...stats.waiting.tasks.map((t) => {
      const item = el(
        'li',
        {},
        el('a', {href: '#', class: 'waiting-task', text: t.id.slice(0, 8), title: t.id}),
        ` ${t.action} · waiting ${duration((Date.now() * 1000 - micros(t.created_at)) / 1000)} `,
        adminLink('task', t.id, 'admin'),
      );
      item.querySelector('.waiting-task').addEventListener('click', (event) => {
        event.preventDefault();
        openTimeline(t.id);
      });
      return item;
    }),
  );
  if (!stats.waiting.tasks.length) $('waiting').append(el('li', {class: 'muted', text: 'none'}));
  $('services').replaceChildren(
    ...stats.services.map((s) => {
      const connected = s.instances.filter((i) => !i.detached_at).length;
      return el(
        'li',
        {class: `service${s.active ? '' : ' inactive'}${connected ? ' live' : ''}`},
        el('div', {class: 'service-head'},
          adminLink('credential', s.id, s.name) || el('span', {text: s.name}),
          el('span', {class: 'muted', text: ` ${connected}/${s.max_instances} live${s.active ? '' : ' · disabled'}`})),
        el('ul', {class: 'instances'}, ...s.instances.map((i) => el(
          'li',
          {class: i.detached_at ? 'detached' : ''},
          el('code', {title: i.id, text: i.id.slice(0, 8)}),
          ` ${i.remote_addr || '?'} · up ${duration((Date.now() * 1000 - micros(i.connected_at)) / 1000)}`,
          ` · holds ${i.holding}${i.concurrency ? `/${i.concurrency}` : ''}`,
          i.detached_at ? ' · detached' : '',
          i.subscriptions.length ? el('small', {class: 'subs', text: ` ${i.subscriptions.join(', ')}`}) : null,
        ))),
      );
    }),
  );
  $('stats-at').textContent = `counts as of ${new Date(micros(stats.at) / 1000).toLocaleTimeString()}` +
    ` · ${stats.monitors} monitor${stats.monitors === 1 ? '' : 's'}`;
}

// -- filters ---------------------------------------------------------------------------------

function setFilter(name, value) {
  filters[name] = value;
  const input = $(`filter-${name}`);
  if (input.value !== value) input.value = value;
  applyFilters();
  if (name !== 'search') reconcile().catch((error) => console.warn('dashboard:', error));
}

async function search(text) {
  setFilter('search', text);
  if (UUID.test(text) && !tasks.has(text) && live) {
    const task = await refresh(text);
    if (task) {
      render(task);
      openTimeline(text);
    } else {
      showNotice(`No task ${text}.`);
    }
  }
}

// -- the connection --------------------------------------------------------------------------

function wsUrl() {
  const url = new URL(config.wsPath, location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
}

async function onWelcome() {
  live = true;
  setConnection('live', 'live');
  showNotice('');
  // What happened while the page was away: the database has it.
  await Promise.all([reconcile(), loadStats()]);
  if (timeline.id) await loadTimeline(timeline.id);
}

function onClose(...args) {
  live = false;
  const first = args[0];
  const code = typeof first === 'number' ? first : first?.code;
  if (code === 4001 || code === 4029) {
    setConnection('refused', 'refused');
    showNotice('The hub refused this session: log in to the admin as a staff user, then reload.');
  } else {
    setConnection('reconnecting', 'reconnecting…');
  }
}

function start() {
  const links = $('admin-links');
  for (const [kind, text] of [['index', 'Admin'], ['tasks', 'Tasks'], ['credentials', 'Credentials'], ['instances', 'Instances']]) {
    const link = adminLink(kind, undefined, text);
    if (link) links.append(link);
  }
  for (const name of ['action', 'status', 'service']) {
    $(`filter-${name}`).addEventListener('change', (event) => setFilter(name, event.target.value));
  }
  $('filters').addEventListener('submit', (event) => event.preventDefault());
  $('filter-search').addEventListener('input', (event) => {
    search(event.target.value.trim().toLowerCase()).catch((error) => console.warn('dashboard:', error));
  });
  $('timeline-close').addEventListener('click', closeTimeline);
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') closeTimeline();
  });

  client = new Client(wsUrl(), {monitor: true});
  client.on('message', (message) => {
    if (message.type === 'transition') onTransition(message);
  });
  client.on('welcome', () => {
    onWelcome().catch((error) => console.warn('dashboard:', error));
  });
  client.on('close', onClose);
  client.connect().then(
    // The first welcome may not be told as an event: then it is taken here.
    () => (live ? undefined : onWelcome()),
    (error) => {
      live = false;
      setConnection('refused', 'refused');
      showNotice(`The hub refused this session (${error.code || 'error'}: ${error.detail || error.message}).`);
    },
  ).catch((error) => console.warn('dashboard:', error));
  every(RECONCILE_EVERY, reconcile);
  every(STATS_EVERY, loadStats);
  setInterval(() => {
    const now = Date.now() * 1000;
    for (const task of tasks.values()) tick(task, now);
  }, 1000);
  counts();
}

start();
