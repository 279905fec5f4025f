/**
 * taskhub.js: the TaskHub client for browsers and Node, as one ES module.
 *
 * No build step and no dependency in browsers; in Node 20, pass the `ws` package's
 * WebSocket (`new Client(url, {name, key, WebSocket})`), or set `globalThis.WebSocket`,
 * or install `ws` where Node resolves it from this file (Node 22 and newer have a global
 * WebSocket). docs/javascript.md is the reference; docs/protocol.md the wire protocol.
 *
 *     import { Client } from '/static/taskhub/taskhub.js';
 *
 *     const client = new Client('ws://localhost:8000/ws/taskhub/', { name: 'mailer', key: '...' });
 *     client.sub('mail:send-bulk', async (task) => {
 *       task.pickup();
 *       const emails = await task.getPayload();
 *       task.update({ sent: emails.length }, 1);
 *       return { sent: emails.length };           // or throw to fail, or task.drop()
 *     });
 *     const result = await client.pub('mail:send-bulk', emails, 30 * 60 * 1000).getResult(null);
 *
 * Times are milliseconds everywhere in this API (the seed's `1000 * 60 * 30`); the
 * protocol's seconds are only on the wire.
 *
 * Errors:
 *
 *     TaskHubError              .code and .detail: the hub's error codes, and those below
 *     ├── TaskFailed            the task failed: .reason (error, worker_lost, pickup_timeout,
 *     │                         complete_timeout, heartbeat_timeout, cancelled), .detail
 *     ├── NoResult              the task ended without a result (every service dropped or saw it)
 *     ├── ConnectionLost        the client was closed while a command or a handle waited, or the
 *     │                         connection closed before a cancel/retry was answered
 *     ├── ConnectionFailed      connect() could not reach the hub within connectTimeout
 *     └── TaskAborted           a handler's task.signal.reason (name "AbortError"): the hub ended
 *                               this service's part of the task
 *
 * The module's layout: values and errors; Client (the connection, the protocol's state
 * across reconnects, the API, the worker); TaskHandle (a caller's task); Task (a
 * handler's task).
 */

/** The wire protocol's version this client speaks (`welcome.v`). */
export const PROTOCOL_VERSION = 1;
/** Longest `error` a `fail` may carry, in characters (docs/protocol.md, "Limits"). */
export const MAX_ERROR_LENGTH = 10000;
/** Deepest nesting of arrays and objects in a frame; a payload, data or result sits one level down. */
const MAX_FRAME_DEPTH = 32;
const MAX_VALUE_DEPTH = MAX_FRAME_DEPTH - 1;
const MAX_ACTION_LENGTH = 200;
const MAX_SECONDS = 1e9;
const MAX_RETRIES = 1000000;
const MAX_LIMIT = 1000;
/** Offered attempts whose handler finished that the worker remembers, so that an offer sent again runs once. */
const REMEMBERED = 1000;

/**
 * Commands sent again after a reconnect when their answer was lost: reads, a `pub` (it
 * carries its task id, so the hub creates the task once) and a worker's commands (sent
 * with `again`: the hub applies each once). Never `cancel` and `retry`: the hub cannot
 * tell one sent again from a new one.
 */
const RESENT = new Set([
  'pub', 'get_payload', 'watch', 'tasks', 'ping', 'stats', 'unsub',
  'pickup', 'update', 'touch', 'return', 'drop', 'fail',
]);
/** A worker's commands among them: they go again with `again: true` and their first ref. */
const WORK = new Set(['pickup', 'update', 'touch', 'return', 'drop', 'fail']);
/** Refusals of a worker's command that mean the hub no longer waits for this part. */
const PART_OVER = new Set(['invalid_transition', 'stale_attempt', 'unknown_task']);
/** Refusals of a session that are final on the first connect (the credential, or a wrong path). */
const FINAL = new Set([
  'authentication_failed', 'authentication_timeout', 'too_many_attempts', 'credential_disabled',
  'too_many_instances', 'superseded', 'disconnected', 'not_found',
]);
/** The error codes of the hub's close codes, for a close that came without its error. */
const CLOSE_CODES = new Map([
  [4000, 'authentication_timeout'], [4001, 'authentication_failed'], [4002, 'credential_disabled'],
  [4003, 'too_many_instances'], [4004, 'superseded'], [4005, 'disconnected'], [4029, 'too_many_attempts'],
  [4404, 'not_found'],
]);
const TASK_EVENTS = new Set(['update', 'success', 'retry', 'fail', 'end']);
/**
 * Commands that asked for no answer (`ack: false`, a worker's) sent in a row, after which
 * a `ping` asks for the answer that acknowledges them all (the hub answers them only to
 * refuse them, and answers a connection's commands in order), so that a reconnect sends
 * no more than these again. An offer's or a task event's `applied` acknowledges them too.
 */
const SYNC_EVERY = 64;
/** Ms after such a command before a `ping` asks for that answer, if nothing else did. */
const SYNC_AFTER = 1000;
const TERMINAL = new Set(['success', 'failed', 'ended']);
const STATUSES = new Set(['pending', 'started', 'success', 'failed', 'ended']);
const ACTION_RE = /^[a-z0-9._-]+(?:\/[a-z0-9._-]+)*:[a-z0-9._-]+$/;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;
const CLIENT_EVENTS = new Set(['message', 'welcome', 'close']);

// -- errors ---------------------------------------------------------------------------------

/** Every error this module raises: `.code` is stable and machine-readable, `.detail` a sentence. */
export class TaskHubError extends Error {
  constructor(code, detail) {
    super(detail);
    this.name = 'TaskHubError';
    this.code = code;
    this.detail = detail;
  }
}

/** The task failed (with retries: its last attempt). `.reason` says why, `.detail` more. */
export class TaskFailed extends TaskHubError {
  constructor(taskId, reason, detail = '') {
    super('task_failed', `task ${taskId} failed (${reason})${detail ? `: ${detail}` : ''}`);
    this.name = 'TaskFailed';
    this.taskId = taskId;
    this.reason = reason;
    this.detail = detail;
  }
}

/** The task ended without a result: every service saw or dropped it. */
export class NoResult extends TaskHubError {
  constructor(taskId) {
    super('no_result', `task ${taskId} ended without a result`);
    this.name = 'NoResult';
    this.taskId = taskId;
  }
}

/** The client was closed while something waited, or a `cancel`/`retry` lost its answer. */
export class ConnectionLost extends TaskHubError {
  constructor(detail) {
    super('connection_lost', detail);
    this.name = 'ConnectionLost';
  }
}

/** `connect()` could not reach the hub within its timeout; `.url` and `.error` (the last failure). */
export class ConnectionFailed extends TaskHubError {
  constructor(url, error, ms) {
    super('connection_failed', `could not connect to ${url} within ${ms} ms: ${error}`);
    this.name = 'ConnectionFailed';
    this.url = url;
    this.error = error;
  }
}

/**
 * Why a handler's `task.signal` was aborted: the hub ended this service's part (the task
 * was cancelled, timed out, failed, or completed by another service; the attempt will be
 * retried; the task went to another instance), or the client closed. Its `name` is
 * "AbortError", as for any aborted signal, so `err.name === 'AbortError'` checks work.
 */
export class TaskAborted extends TaskHubError {
  constructor(detail) {
    super('aborted', detail);
    this.name = 'AbortError';
  }
}

function hubError(message) {
  return new TaskHubError(String(message.code ?? 'unknown'), String(message.detail ?? ''));
}

// -- values -----------------------------------------------------------------------------------

/**
 * Milliseconds to wait before reconnect number `tries` (1, 2, ...): `min((10n)² ms, 60 s)`,
 * the Python client's (and wsq's) schedule.
 */
export function backoff(tries) {
  return Math.min((10 * tries) ** 2, 60000);
}

/**
 * `text` as a `fail` may carry it: U+0000 and lone surrogates escaped (the hub refuses
 * both), cut to {@link MAX_ERROR_LENGTH} characters with a trailing "…".
 */
export function cutText(text, length = MAX_ERROR_LENGTH) {
  let clean = String(text)
    .replaceAll('\u0000', '\\x00')
    .replace(LONE_SURROGATE, (c) => `\\u${c.charCodeAt(0).toString(16)}`);
  if (clean.length <= length) return clean;
  clean = clean.slice(0, length - 1);
  if (/[\ud800-\udbff]$/.test(clean)) clean = clean.slice(0, -1); // never half a pair
  return `${clean}…`;
}

/**
 * The text a `fail` carries for what a handler threw: `Name: message` for an Error (as
 * Python's `Type: message`), the value's text otherwise, cut by {@link cutText}.
 */
export function errorText(error) {
  let text;
  try {
    if (error instanceof Error) {
      const name = error.name || 'Error';
      text = error.message ? `${name}: ${error.message}` : name;
    } else {
      text = typeof error === 'string' ? error : String(error);
    }
  } catch {
    text = "<the error's message could not be read>"; // a broken toString must not keep the task from ending
  }
  return cutText(text);
}

/** Bytes of `text` in UTF-8. */
export function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

/**
 * Encode `value` as compact JSON, refusing what the hub cannot carry (docs/protocol.md,
 * "Limits"), and return the text. Call before sending a payload, update data or result.
 *
 * `undefined` becomes `null`, and object members that JSON leaves out (undefined,
 * functions) are left out, as `JSON.stringify` does.
 *
 * @param {*} value
 * @param {string} what - how the error names it: "payload", "update data", "result"
 * @param {number|null} limit - the most bytes it may take (the hub's `max_payload_size`)
 * @param {number} maxDepth - the deepest nesting of arrays and objects
 * @throws {TaskHubError} `invalid_value` for NaN, Infinity, an integer beyond ±2⁵³, a
 *   string with U+0000 or a lone surrogate, a BigInt, a cycle or nesting deeper than
 *   `maxDepth`; `payload_too_large` over `limit` bytes.
 */
export function encodeValue(value, what = 'value', limit = null, maxDepth = MAX_VALUE_DEPTH) {
  const depths = new WeakMap();
  let text;
  try {
    text = JSON.stringify(value === undefined ? null : value, function check(key, v) {
      // `this` is the object or array holding `v`; JSON.stringify's own wrapper is at depth 0.
      const depth = depths.get(this) ?? 0;
      if (depth > 0 && !Array.isArray(this)) checkString(key, 'a key');
      switch (typeof v) {
        case 'number':
          if (!Number.isFinite(v)) throw new TaskHubError('invalid_value', `${v} is not JSON`);
          // Such integers are written without an exponent, and read as integers beyond ±2⁵³.
          if (Number.isInteger(v) && Math.abs(v) > 2 ** 53 && Math.abs(v) < 1e21) {
            throw new TaskHubError('invalid_value', `the integer ${v} is beyond ±2**53`);
          }
          break;
        case 'string':
          checkString(v, 'a string');
          break;
        case 'bigint':
          throw new TaskHubError('invalid_value', `a BigInt (${v}n) is not JSON`);
        case 'object':
          if (v !== null) {
            if (depth + 1 > maxDepth) throw new TaskHubError('invalid_value', `nested deeper than ${maxDepth} levels`);
            depths.set(v, depth + 1);
          }
          break;
        default:
      }
      return v;
    });
  } catch (error) {
    const reason = error instanceof TaskHubError ? error.detail : `not JSON (${error.message})`;
    throw new TaskHubError('invalid_value', `${what} could not be sent: ${reason}`);
  }
  text ??= 'null'; // a function or a symbol alone
  if (limit != null && text.length * 3 > limit) {
    const size = utf8Length(text);
    if (size > limit) {
      throw new TaskHubError('payload_too_large', `${what} of ${size} bytes is over the hub's limit of ${limit} bytes`);
    }
  }
  return text;
}

function checkString(text, what) {
  if (text.includes('\u0000')) throw new TaskHubError('invalid_value', `${what} holds U+0000`);
  LONE_SURROGATE.lastIndex = 0;
  if (LONE_SURROGATE.test(text)) throw new TaskHubError('invalid_value', `${what} holds a lone surrogate`);
}

/**
 * Return `action` if it is a valid action name (`noun/path:verb`).
 * @throws {TaskHubError} `invalid_action`
 */
export function checkAction(action) {
  if (typeof action !== 'string') throw new TaskHubError('invalid_action', 'action must be a string');
  if (action.length > MAX_ACTION_LENGTH) {
    throw new TaskHubError('invalid_action', `action is longer than ${MAX_ACTION_LENGTH} characters`);
  }
  if (!ACTION_RE.test(action)) {
    throw new TaskHubError(
      'invalid_action',
      `invalid action ${JSON.stringify(action)}: expected noun/path:verb in lowercase letters, digits, '-', '_' and '.'`,
    );
  }
  return action;
}

/**
 * A task id as the hub spells it (a UUID, lowercase and hyphenated); braces, `urn:uuid:`,
 * capitals and missing hyphens are accepted.
 * @throws {TaskHubError} `invalid_field` for anything that is not a UUID
 */
export function canonicalTaskId(id) {
  const hex = typeof id === 'string' ? id.trim().toLowerCase().replace(/^urn:uuid:/, '').replace(/^\{(.*)\}$/, '$1').replaceAll('-', '') : '';
  if (!/^[0-9a-f]{32}$/.test(hex)) {
    throw new TaskHubError('invalid_field', `invalid task id ${JSON.stringify(id)}: expected a UUID`);
  }
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** A random (version 4) UUID; `crypto.randomUUID` exists in secure contexts only. */
function uuid4() {
  const crypto = globalThis.crypto;
  if (typeof crypto?.randomUUID === 'function') return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  return canonicalTaskId([...b].map((x) => x.toString(16).padStart(2, '0')).join(''));
}

/** Milliseconds to the protocol's seconds: Infinity is `null` (no limit). */
function seconds(ms, name, { infinite = true } = {}) {
  if (ms === Infinity && infinite) return null;
  if (typeof ms !== 'number' || !(ms > 0) || ms / 1000 > MAX_SECONDS) {
    const none = infinite ? ' (Infinity: no limit)' : '';
    throw new TaskHubError('invalid_field', `${name} must be a number of milliseconds above 0 and at most 10**12${none}`);
  }
  return ms / 1000;
}

/** The WebSocket URL of `url`: a relative one (in a page) is resolved against the page's, http(s) becoming ws(s). */
function webSocketUrl(url) {
  const text = String(url);
  const relative = !/^[a-z][a-z0-9+.-]*:/i.test(text);
  let parsed;
  try {
    parsed = new URL(text, relative ? globalThis.location?.href : undefined);
  } catch {
    throw new TypeError(`${JSON.stringify(text)} is not a WebSocket URL (ws://HOST[:PORT]/PATH or wss://...)`);
  }
  if (relative && (parsed.protocol === 'http:' || parsed.protocol === 'https:')) {
    parsed.protocol = parsed.protocol === 'https:' ? 'wss:' : 'ws:';
  }
  if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
    throw new TypeError(`${JSON.stringify(text)} is not a WebSocket URL (ws://HOST[:PORT]/PATH or wss://...)`);
  }
  return parsed.href;
}

/** The live message a logged event of a `watch` answer was (`null` for a kind that is not relayed). */
/**
 * A frame from the hub as the messages it holds: a task event with its task's `end`
 * inside (`inline_end`) is two, the event and then the end; anything else is itself.
 */
export function unfoldEnd(message) {
  const inner = message.end;
  if (!TASK_EVENTS.has(message.type) || message.type === 'end' || !inner || typeof inner !== 'object' || Array.isArray(inner)) {
    return [message];
  }
  const { end: _, ...event } = message;
  return [event, { ...inner, type: 'end', task: message.task }];
}

function eventMessage(task, event) {
  if (!event || !Number.isInteger(event.seq) || typeof event.kind !== 'string' || !TASK_EVENTS.has(event.kind)) return null;
  const data = event.data && typeof event.data === 'object' ? event.data : {};
  const base = { type: event.kind, task, seq: event.seq, attempt: event.attempt ?? 1 };
  switch (event.kind) {
    case 'update':
      return { ...base, service: event.service ?? '', data: data.data ?? null, progress: data.progress ?? null };
    case 'success':
      return { ...base, service: event.service ?? '', result: data.result ?? null };
    case 'retry':
      return { ...data, ...base, reason: data.reason ?? '', detail: data.detail ?? '' };
    case 'fail':
      return { ...base, reason: data.reason ?? '', detail: data.detail ?? '' };
    default:
      return { ...base, status: data.status ?? 'ended' };
  }
}

/** What an `update` listener gets as its second argument (its first is `update.data`). */
function updateOf(message) {
  return {
    data: message.data ?? null,
    progress: message.progress ?? null,
    service: message.service ?? '',
    attempt: message.attempt ?? 1,
    seq: message.seq,
  };
}

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {}); // settled with nobody waiting is not an error
  return { promise, resolve, reject };
}

const quietLogger = {};
const defaultLogger = {
  warn: (...args) => console.warn(...args),
  error: (...args) => console.error(...args),
};

// -- the client ---------------------------------------------------------------------------------

/**
 * A service's (or a monitor's) connection to the hub, across reconnects.
 *
 * It connects on first use (`sub`, `pub`, `watch`, `request`, ...) or on `connect()`,
 * authenticates with a `hello` frame, and reconnects with {@link backoff} after a lost
 * connection: it resumes its instance with the token from `welcome`, subscribes again,
 * sends again the commands whose answer was lost and that are safe to repeat (a `pub`
 * with its task id, so the hub creates the task once; a worker's commands with
 * `again`), and watches the tasks it waits for from the last event it heard.
 */
export class Client {
  /**
   * @param {string|URL} url - the hub's endpoint, e.g. `ws://localhost:8000/ws/taskhub/`; in a
   *   page, a relative URL (`/ws/taskhub/`) is resolved against the page's.
   * @param {object} options
   * @param {string} [options.name] - the service's credential name (not for a monitor)
   * @param {string} [options.key] - its key
   * @param {boolean} [options.monitor] - authenticate as a monitor (the dashboard): `{"type":
   *   "hello", "monitor": true}`, with the page's staff session
   * @param {Function} [options.WebSocket] - the WebSocket class (default: `globalThis.WebSocket`,
   *   else the `ws` package, imported)
   * @param {number|null} [options.concurrency] - most unfinished tasks the hub offers at once
   * @param {number|null} [options.connectTimeout=30000] - ms `connect()` waits (null: for ever)
   * @param {number} [options.openTimeout=10000] - ms a socket may take to open and be welcomed
   * @param {Function} [options.backoff] - ms to wait before reconnect number n
   * @param {number|null} [options.resyncInterval=30000] - ms between re-reads of an unfinished
   *   handle's task from the hub (its notices may be lost); null: never
   * @param {number|null} [options.pingInterval=20000] - ms between pings; a ping unanswered by
   *   the next one drops the connection (then it reconnects); null: no pings
   * @param {object} [options.logger] - an object with `debug`, `info`, `warn`, `error` (any
   *   of them; default: warnings and errors to the console)
   * @throws {TypeError} `url` is not a WebSocket URL, or name and key are missing
   */
  constructor(url, options = {}) {
    const {
      name, key, monitor = false, WebSocket: socketClass = null, concurrency = null,
      connectTimeout = 30000, openTimeout = 10000, backoff: backoffOf = backoff,
      resyncInterval = 30000, pingInterval = 20000, logger = defaultLogger,
      ...unknown
    } = options;
    const extra = Object.keys(unknown);
    if (extra.length) throw new TypeError(`unknown option(s) ${extra.join(', ')}`);
    this.url = webSocketUrl(url);
    if (!monitor && (typeof name !== 'string' || typeof key !== 'string')) {
      throw new TypeError('a service needs { name, key } (or { monitor: true })');
    }
    this.name = monitor ? null : name;
    this.monitor = Boolean(monitor);
    this._key = key;
    this._socketClass = socketClass;
    this.concurrency = concurrency;
    this.connectTimeout = connectTimeout;
    this.openTimeout = openTimeout;
    this.backoff = backoffOf;
    this.resyncInterval = resyncInterval;
    this.pingInterval = pingInterval;
    this.logger = logger ?? quietLogger;
    /** The last `welcome` (null before the first). */
    this.welcome = null;

    this._listeners = new Map();
    this._refs = 0;
    this._silentRun = 0; // commands sent without an answer since the last that asks for one
    this._state = 'idle'; // idle → connecting ⇄ open → closed
    this._ws = null;
    this._resume = null;
    this._tries = 0;
    this._timers = { reconnect: null, open: null, ping: null, sync: null };
    this._pingOut = null;
    this._lastError = 'no answer yet';
    this._socketError = null; // what this socket's error event, or the hub's refusal, said
    this._closing = false;
    this._closingDone = null;
    this._finalWs = null; // the socket open when the client stopped: its close is the last
    this._ready = false; // open, and its subscriptions answered
    this._hadSession = false; // once true, refusals are retried rather than final
    this._readyWaiters = [];
    this._closed = deferred();
    // The commands: sent on this socket and unanswered; waiting for the session to open.
    this._unanswered = new Map();
    this._held = new Map();
    // The worker's side: handlers by action, subscriptions asked before a session, tasks run.
    this._subs = new Map();
    this._subWaiters = new Map();
    this._tasks = new Map();
    this._running = new Set();
    this._finished = new Map();
    // A caller's side: handles by task id, and every task whose events this client wants.
    this._handles = new Map();
    this._followed = new Map();
  }

  /** Whether the session is open and its subscriptions answered. */
  get connected() {
    return this._state === 'open' && this._ready;
  }

  /** This client's instance id (from `welcome`; a monitor has none). */
  get instance() {
    return this.welcome?.instance ?? null;
  }

  // -- events ------------------------------------------------------------------------

  /**
   * Listen to the connection: `'message'` (every message from the hub, parsed), `'welcome'`
   * (each (re)connect's welcome: catch up here), `'close'` (each disconnect: `{code,
   * reason, wasClean}`). Returns the client, for chaining.
   * @throws {TypeError} another event name
   */
  on(event, fn) {
    if (!CLIENT_EVENTS.has(event)) throw new TypeError(`unknown event ${JSON.stringify(event)}: use 'message', 'welcome' or 'close'`);
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return this;
  }

  /** Stop calling `fn` on `event`. */
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
    return this;
  }

  _emit(event, ...args) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) this._call(fn, args);
  }

  /** Run a user callback: its exception, or its promise's rejection, is logged. */
  _call(fn, args) {
    try {
      const outcome = fn(...args);
      if (outcome && typeof outcome.then === 'function') {
        outcome.then(undefined, (error) => this._log('error', 'taskhub: a callback failed:', error));
      }
    } catch (error) {
      this._log('error', 'taskhub: a callback failed:', error);
    }
  }

  _log(level, ...args) {
    const fn = this.logger[level];
    if (typeof fn === 'function') {
      try {
        fn.apply(this.logger, args);
      } catch {
        // a broken logger must not break the client
      }
    }
  }

  // -- connecting -------------------------------------------------------------------------

  /**
   * Connect (if not already), and resolve with the `welcome` once the session is open and
   * its subscriptions are acknowledged.
   *
   * Before the first session, refusals are final: the client stops and this rejects with
   * the hub's error (`authentication_failed`, `credential_disabled`, `too_many_instances`,
   * `too_many_attempts`, `not_found` for a path that serves no hub, `permission_denied`
   * for a subscription). After it, they are logged and retried with backoff.
   *
   * @param {object} [options]
   * @param {number|null} [options.timeout] - ms to wait (the client's `connectTimeout` unless
   *   given; null: for ever)
   * @returns {Promise<object>} the welcome
   * @throws {ConnectionFailed} the hub could not be reached in time; if the client never had
   *   a session, it stops trying
   * @throws {ConnectionLost} the client was closed
   */
  connect({ timeout = this.connectTimeout } = {}) {
    if (this._state === 'closed') return Promise.reject(new ConnectionLost('the client was closed'));
    if (this.connected) return Promise.resolve(this.welcome);
    const waiter = deferred();
    this._readyWaiters.push(waiter);
    this._start();
    if (timeout != null) {
      const timer = setTimeout(() => {
        const error = new ConnectionFailed(this.url, this._lastError, timeout);
        if (!this._hadSession) {
          this._stop(error);
        } else {
          this._readyWaiters = this._readyWaiters.filter((w) => w !== waiter);
          waiter.reject(error);
        }
      }, timeout);
      const clear = () => clearTimeout(timer);
      waiter.promise.then(clear, clear);
    }
    return waiter.promise.then((welcome) => welcome);
  }

  /**
   * Leave: send `bye` (the hub releases the instance: its slot is free once this
   * resolves), close the connection and stop reconnecting. Running handlers are aborted
   * (`task.signal`), and whatever waits (commands, `getResult()`) rejects with
   * {@link ConnectionLost}.
   */
  close() {
    this._closingDone ??= this._close();
    return this._closingDone;
  }

  async _close() {
    if (this._state === 'closed') return;
    this._closing = true;
    if (this._state === 'open') {
      const bye = this._submit({ type: 'bye' }, { resend: false });
      const timer = setTimeout(() => bye.reject(new ConnectionLost('no answer to bye')), 5000);
      await bye.promise.then(() => {}, () => {});
      clearTimeout(timer);
    }
    const ws = this._ws;
    this._stop(new ConnectionLost('the client was closed'));
    if (ws) {
      const timer = setTimeout(() => this._closed.resolve(), 2000);
      await this._closed.promise;
      clearTimeout(timer);
    }
  }

  _start() {
    if (this._state !== 'idle') return;
    this._state = 'connecting';
    this._open();
  }

  async _resolveSocketClass() {
    if (this._socketClass) return this._socketClass;
    if (typeof globalThis.WebSocket === 'function') return globalThis.WebSocket;
    const name = 'ws'; // a variable, so that no bundler tries to resolve it for browsers
    try {
      const module = await import(name);
      return module.WebSocket ?? module.default;
    } catch (error) {
      throw new TypeError(`no WebSocket here: pass { WebSocket } from the ws package (npm install ws): ${error.message}`);
    }
  }

  async _open() {
    this._timers.reconnect = null;
    this._socketError = null;
    let Socket;
    try {
      Socket = await this._resolveSocketClass();
    } catch (error) {
      this._log('error', `taskhub: ${error.message}`);
      this._stop(error);
      return;
    }
    if (this._state === 'closed') return;
    let ws;
    try {
      ws = new Socket(this.url);
    } catch (error) {
      this._lastError = error.message;
      this._reconnect();
      return;
    }
    this._ws = ws;
    this._timers.open = setTimeout(() => this._drop(ws, 'no welcome within the open timeout'), this.openTimeout);
    ws.onopen = () => {
      if (this._ws === ws) this._sendText(ws, JSON.stringify(this._hello()));
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._receive(event.data);
    };
    ws.onerror = (event) => {
      if (this._ws === ws) this._socketError = event?.message || event?.error?.message || null;
    };
    ws.onclose = (event) => {
      if (this._ws === ws) {
        this._lost(ws, event);
      } else if (this._finalWs === ws) {
        // The socket the client closed for good: the last disconnect.
        this._emit('close', { code: event?.code ?? 1006, reason: event?.reason ?? '', wasClean: Boolean(event?.wasClean) });
        this._closed.resolve();
      }
    };
  }

  /** The first frame: a monitor's, or the credential with the instance to resume. */
  _hello() {
    if (this.monitor) return { type: 'hello', monitor: true };
    // inline_end: this client reads an end carried inside the task event before it.
    const hello = { type: 'hello', name: this.name, key: this._key, inline_end: true };
    if (this._resume) hello.resume = this._resume;
    if (this.concurrency != null) hello.concurrency = this.concurrency;
    return hello;
  }

  _sendText(ws, text) {
    try {
      ws.send(text);
    } catch (error) {
      // The socket is closing: its close event holds what was unanswered, to send again.
      this._lastError = error.message;
    }
  }

  /** Give up on a socket that is silent: close it and go on as if it had closed. */
  _drop(ws, reason) {
    if (this._ws !== ws) return;
    this._socketError = reason;
    try {
      ws.close(3008, 'timeout');
    } catch {
      // closing a socket that never opened may throw; it is forgotten either way
    }
    this._lost(ws, { code: 1006, reason, wasClean: false });
  }

  /** A socket closed (or was given up): hold what may be sent again, fail the rest, reconnect. */
  _lost(ws, event) {
    if (this._ws !== ws) return;
    this._ws = null;
    clearTimeout(this._timers.open);
    clearInterval(this._timers.ping);
    clearTimeout(this._timers.sync);
    this._timers.sync = null;
    this._silentRun = 0;
    this._pingOut = null;
    this._ready = false;
    const code = event?.code ?? 1006;
    const reason = event?.reason ?? '';
    this._lastError = this._socketError ?? `connection closed (${code}${reason ? ` ${reason}` : ''})`;
    const again = new Map();
    for (const [ref, record] of this._unanswered) {
      if (record.resend) {
        if (WORK.has(record.message.type)) record.again = true;
        again.set(ref, record);
      } else {
        record.reject(new ConnectionLost('the connection closed before the hub answered'));
      }
    }
    this._unanswered.clear();
    this._held = new Map([...again, ...this._held]); // sent before them, so sent again before them
    this._state = 'connecting';
    this._emit('close', { code, reason, wasClean: Boolean(event?.wasClean) });
    if (this._closing) {
      this._stop(new ConnectionLost('the client was closed'));
      this._closed.resolve();
      return;
    }
    const refusal = CLOSE_CODES.get(code);
    // A monitor refused after a session (a logout) stays refused: retrying cannot help,
    // and each try would count against this address's failed authentications.
    if (refusal && FINAL.has(refusal) && (!this._hadSession || this.monitor)) {
      this._stop(new TaskHubError(refusal, `the hub closed the connection with ${code}${reason ? ` (${reason})` : ''}`));
      return;
    }
    this._reconnect();
  }

  _reconnect() {
    this._tries += 1;
    const delay = this.backoff(this._tries);
    this._timers.reconnect = setTimeout(() => this._open(), delay);
  }

  /**
   * Stop for good: nothing reconnects, whatever waits rejects with `error`, handlers are
   * aborted and handles abandoned.
   */
  _stop(error) {
    if (this._state === 'closed') return;
    const first = !this._hadSession && !(error instanceof ConnectionLost);
    this._state = 'closed';
    clearTimeout(this._timers.reconnect);
    clearTimeout(this._timers.open);
    clearInterval(this._timers.ping);
    clearTimeout(this._timers.sync);
    const ws = this._ws;
    this._ws = null;
    this._finalWs = ws;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // a socket still opening may refuse to close; it is forgotten either way
      }
    } else {
      this._closed.resolve();
    }
    const pending = [...this._unanswered.values(), ...this._held.values()];
    this._unanswered.clear();
    this._held.clear();
    for (const record of pending) record.reject(error);
    for (const waiters of this._subWaiters.values()) for (const waiter of waiters) waiter.reject(error);
    this._subWaiters.clear();
    for (const task of [...this._tasks.values()]) task._end(`the client was closed: ${error.message}`);
    for (const handles of [...this._handles.values()]) {
      for (const handle of handles) handle._abandon(error instanceof ConnectionLost ? new ConnectionLost('the client was closed before the task ended') : error);
    }
    this._handles.clear();
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const waiter of waiters) waiter.reject(error);
    if (first && !waiters.length) this._log('error', `taskhub: could not connect to ${this.url}: ${error.message}`);
  }

  // -- frames from the hub ----------------------------------------------------------------

  _receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      this._log('warn', 'taskhub: skipped a frame from the hub that is not JSON');
      return;
    }
    if (!message || typeof message !== 'object' || Array.isArray(message) || typeof message.type !== 'string') {
      this._log('warn', 'taskhub: skipped a frame from the hub that is not a message');
      return;
    }
    for (const one of unfoldEnd(message)) {
      try {
        if (this._state === 'connecting') this._opening(one);
        else if (this._state === 'open') {
          if (Number.isInteger(one.applied)) this._appliedThrough(one.applied);
          this._dispatch(one);
        }
      } catch (error) {
        this._log('error', 'taskhub: could not handle a message from the hub:', error);
      }
      this._emit('message', one);
    }
  }

  _opening(message) {
    if (message.type === 'welcome') {
      this._welcomed(message);
      return;
    }
    if (message.type !== 'error') {
      this._log('warn', `taskhub: the hub's first message was ${message.type}, not welcome`);
      return;
    }
    const error = hubError(message);
    this._socketError = `${error.code}: ${error.detail}`;
    if (FINAL.has(error.code) && (!this._hadSession || this.monitor)) {
      this._stop(error); // the caller of connect() learns why, and nothing reconnects
    } else {
      this._log('error', `taskhub: the hub refused the session: ${error.code}: ${error.detail}; reconnecting`);
      // the hub closes the connection after it: its close reconnects
    }
  }

  _welcomed(welcome) {
    const ws = this._ws;
    clearTimeout(this._timers.open);
    const lost = this.welcome !== null && !this.monitor && welcome.resumed !== true;
    this.welcome = welcome;
    this._state = 'open';
    this._tries = 0;
    if (typeof welcome.resume === 'string') this._resume = welcome.resume;
    if (lost) {
      // The resume grace had passed: the tasks the old instance worked on went to others.
      for (const task of [...this._tasks.values()]) task._end('the hub gave this instance up: its tasks went to other instances');
    }
    // Subscriptions first, then what a reconnect recovers: the events missed by the tasks
    // followed (unless a watch of the task waits to be sent anyway)...
    const subs = [...this._subs.keys()].map((action) => this._subscribe(action));
    const watched = new Set([...this._held.values()].filter((r) => r.message.type === 'watch').map((r) => r.message.task));
    for (const [taskId, followed] of this._followed) {
      if (followed.resume && !watched.has(taskId)) this._rewatch(taskId, followed.seq);
    }
    // ...then what waited for the session, in the order it was made.
    const held = this._held;
    this._held = new Map();
    for (const record of held.values()) this._transmit(record);
    this._startPing();
    this._emit('welcome', welcome);
    Promise.allSettled(subs.map((record) => record.promise)).then((results) => this._subscribed(ws, results));
  }

  /** The session's subscriptions are answered: it is ready (or refused, on the first connect). */
  _subscribed(ws, results) {
    if (this._ws !== ws || this._state !== 'open') return; // lost meanwhile: the next session subscribes again
    const refused = results.find((r) => r.status === 'rejected' && !(r.reason instanceof ConnectionLost));
    if (results.some((r) => r.status === 'rejected' && r.reason instanceof ConnectionLost)) return;
    if (refused && !this._hadSession) {
      this._stop(refused.reason);
      return;
    }
    this._ready = true;
    this._hadSession = true;
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const waiter of waiters) waiter.resolve(this.welcome);
  }

  _subscribe(action) {
    const record = this._submit({ type: 'sub', action }, { resend: false });
    const waiters = this._subWaiters.get(action) ?? [];
    this._subWaiters.delete(action);
    record.promise.then(
      (ack) => waiters.forEach((w) => w.resolve(ack)),
      (error) => {
        if (error instanceof ConnectionLost) {
          if (waiters.length) this._subWaiters.set(action, [...(this._subWaiters.get(action) ?? []), ...waiters]);
          return;
        }
        this._log('error', `taskhub: subscription to ${action} refused: ${error.code}: ${error.detail}`);
        waiters.forEach((w) => w.reject(error));
      },
    );
    return record;
  }

  _dispatch(message) {
    const record = message.ref === undefined ? undefined : this._unanswered.get(message.ref);
    if (record) {
      this._appliedBefore(record);
      this._unanswered.delete(message.ref);
      this._answer(record, message);
      return;
    }
    if (message.type === 'task') {
      this._offer(message);
    } else if (TASK_EVENTS.has(message.type) && typeof message.task === 'string' && Number.isInteger(message.seq)) {
      this._taskEvents([message], true);
    } else if (message.type === 'error') {
      this._log('error', `taskhub: ${message.code}: ${message.detail}`);
    }
  }

  /**
   * The commands that asked for no answer and were sent before `record`, whose answer
   * came: the hub applied them (it answers in order, and would have refused them by now).
   */
  _appliedBefore(record, inclusive = false) {
    for (const [ref, earlier] of this._unanswered) {
      if (earlier === record && !inclusive) break;
      if (earlier.silent) {
        this._unanswered.delete(ref);
        earlier.resolve({ type: 'ack', ref, task: earlier.message.task });
      }
      if (earlier === record) break;
    }
    // Those still unknown were sent after: no more of them in a row than are left. None
    // in a row (a caller's every answer): nothing to count.
    if (!this._silentRun) return;
    let left = 0;
    for (const r of this._unanswered.values()) if (r.silent) left += 1;
    this._silentRun = Math.min(this._silentRun, left);
  }

  /**
   * A frame's `applied`: the hub applied the command of that ref, sent without an
   * answer, and those before it.
   */
  _appliedThrough(ref) {
    const record = this._unanswered.get(ref);
    if (record?.silent) this._appliedBefore(record, true);
  }

  /**
   * The promise of a command sent without an answer, as a thenable: whoever awaits it
   * (or calls `then`) asks for the answer that acknowledges it at once (a `ping`, unless
   * a command sent since asks for an answer anyway); one that is not awaited costs no frame.
   */
  _acknowledgement(record) {
    const ask = () => {
      if (this._unanswered.has(record.ref)) this._askForAck();
      return record.promise;
    };
    return {
      then: (onFulfilled, onRejected) => ask().then(onFulfilled, onRejected),
      catch: (onRejected) => ask().catch(onRejected),
      finally: (onFinally) => ask().finally(onFinally),
      [Symbol.toStringTag]: 'Promise',
    };
  }

  /**
   * Send a `ping` if commands were sent without an answer since the last command that
   * asks for one: its answer acknowledges them. Whether one went.
   */
  _askForAck() {
    if (this._state !== 'open' || !this._silentRun) return false;
    this._submit({ type: 'ping' });
    return true;
  }

  /** A while after a command sent without an answer: ask for it, if none will come. */
  _sync() {
    this._timers.sync = null;
    if (this._state !== 'open' || this._askForAck()) return;
    if ([...this._unanswered.values()].some((r) => r.silent)) {
      this._timers.sync = setTimeout(() => this._sync(), SYNC_AFTER);
    }
  }

  _answer(record, message) {
    if (record.message.type === 'watch') {
      const taskId = record.message.task;
      const isState = message.type === 'state';
      const events = isState && Array.isArray(message.events) ? message.events : [];
      const replayed = events.map((event) => eventMessage(taskId, event)).filter(Boolean);
      if (record.pages && isState && message.more === true && events.length) {
        // A long history comes in pages: ask for the next before this page is delivered,
        // so that the live events held meanwhile wait for the last page.
        const since = Math.max(...events.map((e) => e.seq).filter(Number.isInteger));
        const next = this._submit({ type: 'watch', task: taskId, since, follow: false }, { chain: record });
        next.pages.push(...events);
        this._watchAnswered(taskId, replayed);
        return;
      }
      this._watchAnswered(taskId, replayed);
      if (record.pages?.length && isState) message = { ...message, events: [...record.pages, ...events] };
    }
    if (message.type === 'error') record.reject(hubError(message));
    else record.resolve(message);
  }

  // -- commands -------------------------------------------------------------------------

  /**
   * Queue `message` (sent now if the session is open, else once it is) and return its
   * record: `{ref, promise}`; the promise resolves with the hub's answer or rejects with
   * its error, or with ConnectionLost.
   */
  _submit(message, { resend = RESENT.has(message.type), raw = false, pages = false, chain = null } = {}) {
    const silent = message.ack === false;
    const done = chain ?? deferred();
    const record = {
      ref: ++this._refs,
      message,
      resend,
      raw,
      silent,
      again: false,
      pages: chain ? chain.pages : pages ? [] : null,
      promise: done.promise,
      resolve: done.resolve,
      reject: done.reject,
    };
    if (this._state === 'closed') {
      record.error = new ConnectionLost('the client was closed');
      record.reject(record.error);
      return record;
    }
    this._start();
    if (message.type === 'watch') {
      const followed = this._followed.get(message.task);
      if (followed) followed.watches += 1;
    }
    if (this._state === 'open') this._transmit(record);
    else this._held.set(record.ref, record);
    return record;
  }

  _transmit(record) {
    let text;
    try {
      const frame = { ...record.message, ref: record.ref };
      if (record.again) frame.again = true;
      text = record.raw ? encodeValue(frame, 'message', null, MAX_FRAME_DEPTH) : JSON.stringify(frame);
      const limit = this.welcome?.max_message_size;
      if (Number.isInteger(limit) && text.length * 3 > limit) {
        const size = utf8Length(text);
        if (size > limit) throw new TaskHubError('message_too_large', `message of ${size} bytes is over the hub's limit of ${limit} bytes`);
      }
    } catch (error) {
      if (record.message.type === 'watch') this._watchAnswered(record.message.task, []);
      record.error = error instanceof TaskHubError ? error : new TaskHubError('invalid_value', error.message);
      record.reject(record.error);
      return;
    }
    this._unanswered.set(record.ref, record);
    this._sendText(this._ws, text);
    if (!record.silent) {
      this._silentRun = 0;
      return;
    }
    this._silentRun += 1;
    if (this._silentRun >= SYNC_EVERY) this._askForAck();
    else this._timers.sync ??= setTimeout(() => this._sync(), SYNC_AFTER);
  }

  /**
   * Send a command with a fresh `ref` and resolve with the hub's answer to it (`ack`,
   * `state`, `tasks`, `payload`, `pong`, ...). While disconnected, it waits for the next
   * session. A read (`watch`, `tasks`, `get_payload`, `ping`, `stats`), a `pub` or a
   * worker's command whose answer a lost connection took is sent again; any other rejects
   * with ConnectionLost. A `ref` in `message` is replaced.
   *
   * @param {object} message - a command: `{type: 'tasks', status: 'failed'}`, ...
   * @returns {Promise<object>} the hub's answer
   * @throws {TaskHubError} the hub's `error` (`.code`, `.detail`), `invalid_value` or
   *   `message_too_large` before sending, ConnectionLost
   * @throws {TypeError} (synchronously) `message` has no string `type`
   */
  request(message) {
    if (!message || typeof message !== 'object' || typeof message.type !== 'string') {
      throw new TypeError('a command is an object with a string type');
    }
    const { ref: _, ...command } = message;
    return this._submit(command, { raw: true, pages: false }).promise.then((answer) => answer);
  }

  /** Milliseconds a `ping` takes to the hub and back (once the session is open). */
  async ping() {
    const start = Date.now();
    await this._submit({ type: 'ping' }).promise;
    return Date.now() - start;
  }

  _startPing() {
    clearInterval(this._timers.ping);
    if (!this.pingInterval) return;
    const ws = this._ws;
    this._timers.ping = setInterval(() => {
      if (this._ws !== ws) return;
      if (this._pingOut) {
        this._drop(ws, `no answer to a ping within ${this.pingInterval} ms`);
        return;
      }
      const record = this._submit({ type: 'ping' }, { resend: false });
      this._pingOut = record;
      const done = () => {
        if (this._pingOut === record) this._pingOut = null;
      };
      record.promise.then(done, done);
    }, this.pingInterval);
  }

  // -- following tasks ------------------------------------------------------------------

  /** Deliver the task's events after `since`; with `resume`, watch it again after a reconnect. */
  _follow(taskId, { resume = false, since = 0 } = {}) {
    let followed = this._followed.get(taskId);
    if (!followed) {
      followed = { seq: since, resume: false, watches: 0, early: [] };
      this._followed.set(taskId, followed);
    }
    followed.resume ||= resume;
    followed.seq = Math.max(followed.seq, since);
  }

  /** Stop following a task once neither a handle nor a handler needs its events. */
  _unfollow(taskId) {
    if (!this._handles.has(taskId) && !this._tasks.has(taskId)) this._followed.delete(taskId);
  }

  _lastSeq(taskId) {
    return this._followed.get(taskId)?.seq ?? 0;
  }

  _watchAnswered(taskId, replayed) {
    const followed = this._followed.get(taskId);
    if (!followed) return;
    followed.watches = Math.max(0, followed.watches - 1);
    let waiting = replayed;
    if (followed.watches === 0) {
      waiting = waiting.concat(followed.early);
      followed.early = [];
    }
    waiting.sort((a, b) => a.seq - b.seq);
    this._taskEvents(waiting, false);
  }

  /**
   * Deliver task events, each `seq` once. While a watch of the task is unanswered, live
   * events wait: the hub joins the task's group before it reads the events it replays,
   * so a live one can overtake the replay of older ones.
   */
  _taskEvents(messages, live) {
    for (const message of messages) {
      const followed = this._followed.get(message.task);
      if (!followed || message.seq <= followed.seq) continue; // not ours, or heard already
      if (live && followed.watches) {
        followed.early.push(message);
        continue;
      }
      followed.seq = message.seq;
      for (const handle of [...(this._handles.get(message.task) ?? [])]) handle._event(message);
      this._tasks.get(message.task)?._event(message);
    }
  }

  /** After a reconnect: the events of a followed task since the last one heard, and its state. */
  _rewatch(taskId, since) {
    const record = this._submit({ type: 'watch', task: taskId, since }, { pages: true });
    record.promise.then(
      (state) => this._applyState(taskId, state),
      (error) => this._log('debug', `taskhub: watching ${taskId} again failed: ${error.message}`),
    );
  }

  /** Re-read a handle's task (after a quiet spell, or an `end` whose outcome was lost). */
  _resync(handle) {
    if (this._state !== 'open') return; // the next session watches it again anyway
    this._rewatch(handle.id, this._lastSeq(handle.id));
  }

  _applyState(taskId, state) {
    if (state?.type !== 'state' || !state.task) return;
    for (const handle of [...(this._handles.get(taskId) ?? [])]) handle._snapshot(state.task);
  }

  // -- a caller's API -----------------------------------------------------------------------

  /**
   * Publish a task and return its handle at once.
   *
   * @param {string} action - e.g. `mail:send-bulk`
   * @param {*} payload - any JSON value
   * @param {number|object} [options] - the complete timeout in ms (the seed's third
   *   argument), or `{timeout, pickupTimeout, heartbeatTimeout, retries, retryBackoff,
   *   taskId, autoremove}`: timeouts in ms (Infinity: no limit; absent or null: the hub's
   *   default), `retries` (-1: for ever), `retryBackoff` in ms, `taskId` a UUID of your
   *   choice, `autoremove` true to have the hub delete the task once it succeeded and
   *   its result reached this client
   * @returns {TaskHandle}
   * @throws {TaskHubError} (synchronously, nothing sent) `invalid_action`, `invalid_field`
   *   for an option out of range, `invalid_value` or `payload_too_large` for the payload
   * @throws {TypeError} an unknown option
   */
  pub(action, payload = null, options = undefined) {
    checkAction(action);
    const opts = options == null || typeof options === 'number' ? { timeout: options } : options;
    if (typeof opts !== 'object') throw new TypeError('pub options are a number of ms or an object');
    const { timeout, pickupTimeout, heartbeatTimeout, retries, retryBackoff, taskId, autoremove, ...unknown } = opts;
    const extra = Object.keys(unknown);
    if (extra.length) throw new TypeError(`unknown pub option(s) ${extra.join(', ')}`);
    const message = { type: 'pub', action, payload: payload === undefined ? null : payload };
    message.task_id = taskId == null ? uuid4() : canonicalTaskId(taskId);
    if (timeout != null) message.timeout = seconds(timeout, 'timeout');
    if (pickupTimeout != null) message.pickup_timeout = seconds(pickupTimeout, 'pickupTimeout');
    if (heartbeatTimeout != null) message.heartbeat_timeout = seconds(heartbeatTimeout, 'heartbeatTimeout');
    if (retries != null && retries !== 0) {
      if (!Number.isInteger(retries) || retries < -1 || retries > MAX_RETRIES) {
        throw new TaskHubError('invalid_field', `retries must be an integer from -1 (for ever) to ${MAX_RETRIES}`);
      }
      message.retries = retries;
    }
    if (retryBackoff != null) message.retry_backoff = seconds(retryBackoff, 'retryBackoff', { infinite: false });
    if (autoremove != null && autoremove !== false) {
      if (autoremove !== true) throw new TaskHubError('invalid_field', 'autoremove must be true or false');
      message.autoremove = true;
    }
    encodeValue(message.payload, 'payload', this.welcome?.max_payload_size ?? null);
    return this._handle(message.task_id, message);
  }

  /**
   * Follow a task by id, as `pub`'s handle does: the events it had (to the `on()`
   * listeners added at once), then the live ones, and its result. For the task's
   * publisher and the services it was offered to (and monitors).
   * @throws {TaskHubError} (synchronously) `invalid_field` for an id that is not a UUID;
   *   `getResult()` rejects with `unknown_task` for a task that is not this credential's
   */
  watch(taskId) {
    const id = canonicalTaskId(taskId);
    return this._handle(id, { type: 'watch', task: id, since: 0 });
  }

  /**
   * Retry a failed task this credential published: its next attempt is offered at once.
   * Resolves, once the hub accepted, with the handle that follows the task from the retry on.
   * @throws {TaskHubError} `invalid_transition` (the task did not fail), `unknown_task`,
   *   ConnectionLost (the connection closed before the answer: not sent again, since a
   *   second retry could start another attempt; read the task to learn what happened)
   */
  async retry(taskId) {
    const id = canonicalTaskId(taskId);
    const { events } = await this.getTask(id);
    const since = Math.max(0, ...events.map((e) => e.seq).filter(Number.isInteger));
    const handle = this._handle(id, { type: 'retry', task: id }, since);
    await handle._published.promise;
    return handle;
  }

  /**
   * The task's state and its events with a `seq` above `since`, from the hub's database,
   * every page read: `{task, events}` (docs/protocol.md, `watch`).
   * @throws {TaskHubError} `unknown_task`, `invalid_field`
   */
  async getTask(taskId, since = 0) {
    const id = canonicalTaskId(taskId);
    const state = await this._submit({ type: 'watch', task: id, since, follow: false }, { pages: true }).promise;
    return { task: state.task, events: state.events ?? [] };
  }

  /**
   * The tasks this credential published or was offered (a monitor: all), newest first:
   * those with `status` (pending, started, success, failed, ended), `action` and
   * `service` (offered to it), at most `limit` (1 to 1,000; 100 by default).
   *
   * The protocol's `tasks` has no cursor: a list over the hub's frame limit comes cut,
   * and the array returned then has `more === true` (ask with a narrower filter).
   * @throws {TaskHubError} `invalid_field` or `invalid_action` for a filter out of range
   */
  async tasks({ status, action, service, limit = 100 } = {}) {
    const message = { type: 'tasks', limit };
    if (!Number.isInteger(limit) || limit < 1 || limit > MAX_LIMIT) {
      throw new TaskHubError('invalid_field', `limit must be an integer from 1 to ${MAX_LIMIT}`);
    }
    if (status != null) {
      if (!STATUSES.has(status)) throw new TaskHubError('invalid_field', `status must be one of ${[...STATUSES].join(', ')}`);
      message.status = status;
    }
    if (action != null) message.action = checkAction(action);
    if (service != null) message.service = service;
    const answer = await this._submit(message).promise;
    const list = Array.isArray(answer.tasks) ? [...answer.tasks] : [];
    list.more = answer.more === true;
    return list;
  }

  /** Cancel `handle`'s task once the hub has it (see {@link TaskHandle#cancel}). */
  async _cancel(handle) {
    await handle._published.promise;
    await this._submit({ type: 'cancel', task: handle.id }).promise;
  }

  /** A handle on `taskId`, made by `message` (a pub, watch or retry), sent now or once connected. */
  _handle(taskId, message, since = 0) {
    const handle = new TaskHandle(this, taskId);
    if (!this._handles.has(taskId)) this._handles.set(taskId, new Set());
    this._handles.get(taskId).add(handle);
    this._follow(taskId, { resume: true, since });
    const record = this._submit(message, { pages: message.type === 'watch' });
    record.promise.then(
      (answer) => {
        handle._published.resolve(answer);
        if (answer.type === 'state') handle._snapshot(answer.task);
        else if (answer.type === 'ack' && answer.created === false) this._resync(handle); // it existed: maybe over already
      },
      (error) => {
        handle._published.reject(error);
        handle._abandon(error);
      },
    );
    return handle;
  }

  _forget(handle) {
    const handles = this._handles.get(handle.id);
    if (handles) {
      handles.delete(handle);
      if (!handles.size) this._handles.delete(handle.id);
    }
    this._unfollow(handle.id);
  }

  // -- a worker's API ---------------------------------------------------------------------

  /**
   * Subscribe `handler` to `action`, now and after every reconnect (the client connects
   * if it has not). For each task offered, `handler(task)` runs: its return value is the
   * result (`undefined`: null), what it throws fails the task (`fail` with the error's
   * text), and after `task.drop()` its return value is ignored.
   *
   * @returns {Promise<object>} the hub's `ack`: you need not wait for it (a refusal is
   *   logged, and rejects `connect()` on the first session; never an unhandled rejection)
   * @throws {TaskHubError} (synchronously) `invalid_action`
   */
  sub(action, handler) {
    checkAction(action);
    if (typeof handler !== 'function') throw new TypeError('sub(action, handler): handler must be a function');
    this._subs.set(action, handler);
    // The promises returned are marked handled: the seed calls sub() without waiting, and
    // a refusal must not end a Node process as an unhandled rejection (it is logged).
    if (this._state === 'open') return this._subscribe(action).promise;
    const waiter = deferred();
    if (this._state === 'closed') {
      waiter.reject(new ConnectionLost('the client was closed'));
      return waiter.promise;
    }
    this._subWaiters.set(action, [...(this._subWaiters.get(action) ?? []), waiter]);
    this._start();
    return waiter.promise;
  }

  /**
   * Stop new offers of `action` (tasks running go on).
   * @returns {Promise<object>} the hub's `ack`
   */
  unsub(action) {
    checkAction(action);
    this._subs.delete(action);
    return this._submit({ type: 'unsub', action }).promise.then((ack) => ack);
  }

  /** The tasks whose handlers run now. */
  get running() {
    return [...this._tasks.values()];
  }

  _offer(offer) {
    if (typeof offer.task !== 'string' || !Number.isInteger(offer.attempt)) return;
    this._follow(offer.task);
    const key = `${offer.task}#${offer.attempt}`;
    if (this._running.has(key)) return; // an offer sent again
    const current = this._tasks.get(offer.task);
    if (this._finished.has(key) || (current && current.attempt > offer.attempt)) {
      if (!current) this._unfollow(offer.task);
      return;
    }
    const handler = this._subs.get(offer.action);
    if (!handler) {
      this._log('warn', `taskhub: offered ${offer.action}, which has no handler`);
      this._unfollow(offer.task);
      return;
    }
    current?._end('the hub moved on to a newer attempt of the task');
    const task = new Task(this, offer);
    this._tasks.set(task.id, task);
    this._follow(task.id, { resume: true });
    this._running.add(key);
    this._work(task, handler, key);
  }

  async _work(task, handler, key) {
    const started = Date.now();
    const name = `${task.action}[${task.id}]`;
    const took = () => `${((Date.now() - started) / 1000).toFixed(3)}s`;
    this._log('info', `Task ${name} received (attempt ${task.attempt})`);
    let result;
    let threw = false;
    let error;
    try {
      result = await handler(task);
    } catch (e) {
      threw = true;
      error = e;
    }
    task._settled = true;
    try {
      if (task.signal.aborted) {
        this._log('info', `Task ${name} ended by the hub after ${took()}: ${task.signal.reason.detail}`);
        return;
      }
      if (task._done) return; // dropped: the return value is ignored
      task._done = true;
      if (task._elsewhere && !threw) {
        this._log('info', `Task ${name} finished in ${took()}, after another service completed it`);
        return;
      }
      if (threw) {
        this._log('error', `Task ${name} failed in ${took()}:`, error);
        await this._finishTask(task, 'fail', { error: errorText(error) });
        return;
      }
      const value = result === undefined ? null : result;
      try {
        encodeValue(value, 'result', this.welcome?.max_payload_size ?? null);
      } catch (refused) {
        this._log('error', `Task ${name} failed in ${took()}: ${refused.detail}`);
        await this._finishTask(task, 'fail', { error: cutText(refused.detail) });
        return;
      }
      const sent = await this._finishTask(task, 'return', { result: value });
      this._log('info', `Task ${name} ${sent ? 'succeeded' : 'finished, its result not accepted'} in ${took()}`);
    } finally {
      this._running.delete(key);
      this._finished.set(key, true);
      if (this._finished.size > REMEMBERED) this._finished.delete(this._finished.keys().next().value);
      if (this._tasks.get(task.id) === task) {
        this._tasks.delete(task.id);
        this._unfollow(task.id);
      }
    }
  }

  /**
   * Send the handler's `return` or `fail`, asking for no answer (the hub answers only a
   * refusal, logged when it comes); whether it was sent. A result that cannot go (over
   * the frame limit, or refused by the hub) fails the task instead.
   */
  async _finishTask(task, type, fields) {
    const record = this._submit({ type, task: task.id, attempt: task.attempt, ...fields, ack: false });
    const refused = (error) => {
      if (type === 'return' && ['message_too_large', 'invalid_value', 'payload_too_large'].includes(error.code)) {
        return this._finishTask(task, 'fail', { error: cutText(`result could not be sent: ${error.detail}`) });
      }
      if (!(error instanceof ConnectionLost)) this._log('warn', `taskhub: ${type} of ${task.id} not accepted: ${error.message}`);
      return false;
    };
    if (record.error) { // refused before it was sent (over the frame limit): said now
      record.promise.catch(() => {});
      return refused(record.error);
    }
    record.promise.then(undefined, refused);
    return true;
  }
}

// -- a caller's task ---------------------------------------------------------------------------

const HANDLE_EVENTS = ['update', 'success', 'fail', 'end', 'retry'];

/**
 * A task as its caller sees it: returned at once by `client.pub()`, `client.watch()` and
 * (resolved) `client.retry()`. `.id` is the task's id, `.status` its status once over
 * (`success`, `failed`, `ended`), `.attempt` the attempt it is at.
 */
export class TaskHandle {
  constructor(client, id) {
    this._client = client;
    this.id = id;
    this.status = 'pending';
    this.attempt = 1;
    this._listeners = Object.fromEntries(HANDLE_EVENTS.map((e) => [e, []]));
    this._published = deferred();
    this._outcome = deferred();
    this._settled = null;
    this._timer = client.resyncInterval ? setInterval(() => client._resync(this), client.resyncInterval) : null;
  }

  /**
   * Call `fn` on the task's events; returns the handle, for chaining:
   * - `'update'`: `fn(data, update)`, `update` being `{data, progress, service, attempt, seq}`
   *   (each update once, also those sent while this client was disconnected);
   * - `'success'`: `fn(result)`; `'fail'`: `fn(taskFailed)`; `'end'`: `fn(status)` (`success`,
   *   `failed` or `ended`), once, when the task is over;
   * - `'retry'`: `fn({attempt, reason, detail, nextAttempt, delay})` (`delay` in ms) each time
   *   a failed attempt is retried.
   * A `success`, `fail` or `end` listener added after the task ended is called at once.
   * @throws {TypeError} another event name
   */
  on(event, fn) {
    if (!this._listeners[event]) {
      throw new TypeError(`unknown event ${JSON.stringify(event)}: use ${HANDLE_EVENTS.map((e) => `'${e}'`).join(', ')}`);
    }
    this._listeners[event].push(fn);
    const settled = this._settled;
    if (settled && ((event === 'end' && settled.ended) || event === settled.event)) {
      this._client._call(fn, [event === 'end' ? this.status : settled.value]);
    }
    return this;
  }

  /**
   * Wait for the task to finish and resolve with its result; it survives reconnects and
   * hub restarts.
   *
   * @param {*} [valueIfError] - resolve with it instead of rejecting when the task failed
   *   or ended without a result
   * @returns {Promise<*>}
   * @throws {TaskFailed} the task failed (`.reason`: `error`, `pickup_timeout`, ...)
   * @throws {NoResult} every service saw or dropped it without a result
   * @throws {TaskHubError} the hub refused the command that made the handle
   *   (`permission_denied`, `unknown_task`, ...), whatever `valueIfError`
   * @throws {ConnectionLost} the client was closed first
   */
  getResult(...args) {
    const fallback = args.length > 0;
    return this._outcome.promise.then(
      (result) => result,
      (error) => {
        if (fallback && (error instanceof TaskFailed || error instanceof NoResult)) return args[0];
        throw error;
      },
    );
  }

  /**
   * Cancel the task: it fails with reason `cancelled` (`getResult()` rejects with
   * TaskFailed), and the handlers on it are aborted (`task.signal`). Not sent again after
   * a reconnect.
   * @throws {TaskHubError} `invalid_transition` (already finished), `unknown_task` (not
   *   published by this credential), ConnectionLost (the connection closed before the
   *   answer: whether it was cancelled, `getResult()` tells)
   */
  cancel() {
    return this._client._cancel(this);
  }

  _event(message) {
    switch (message.type) {
      case 'update': {
        const update = updateOf(message);
        for (const fn of [...this._listeners.update]) this._client._call(fn, [update.data, update]);
        break;
      }
      case 'retry': {
        if (Number.isInteger(message.next_attempt)) this.attempt = message.next_attempt;
        const retry = {
          attempt: message.attempt,
          reason: message.reason ?? '',
          detail: message.detail ?? '',
          nextAttempt: message.next_attempt ?? null,
          delay: typeof message.delay === 'number' ? message.delay * 1000 : null,
          by: message.by ?? null,
        };
        for (const fn of [...this._listeners.retry]) this._client._call(fn, [retry]);
        break;
      }
      case 'success':
        this._finish('success', { result: message.result ?? null });
        break;
      case 'fail':
        this._finish('failed', { reason: message.reason ?? '', detail: message.detail ?? '' });
        break;
      case 'end':
        if (message.status === 'ended') this._finish('ended');
        // The outcome travels in success/fail, which may have been lost: read it back.
        else if (!this._settled) this._client._resync(this);
        break;
      default:
    }
  }

  _snapshot(task) {
    if (!task || typeof task !== 'object') return;
    if (Number.isInteger(task.attempt)) this.attempt = Math.max(this.attempt, task.attempt);
    if (TERMINAL.has(task.status)) {
      this._finish(task.status, { result: task.result ?? null, reason: task.failure_reason ?? '', detail: task.failure_detail ?? '' });
    }
  }

  _finish(status, { result = null, reason = '', detail = '' } = {}) {
    if (this._settled) return;
    this.status = status;
    if (status === 'success') {
      this._settled = { event: 'success', value: result, ended: true };
      this._outcome.resolve(result);
    } else {
      const error = status === 'failed' ? new TaskFailed(this.id, reason, detail) : new NoResult(this.id);
      this._settled = { event: status === 'failed' ? 'fail' : null, value: error, ended: true };
      this._outcome.reject(error);
    }
    clearInterval(this._timer);
    this._client._forget(this);
    if (this._settled.event) for (const fn of [...this._listeners[this._settled.event]]) this._client._call(fn, [this._settled.value]);
    for (const fn of [...this._listeners.end]) this._client._call(fn, [status]);
  }

  /** The hub refused the command that made the handle, or the client closed. */
  _abandon(error) {
    clearInterval(this._timer);
    this._published.reject(error);
    if (!this._settled) {
      this._settled = { event: null, value: error, ended: false };
      this._outcome.reject(error);
    }
    this._client._forget(this);
  }
}

// -- a handler's task ---------------------------------------------------------------------

const TASK_EVENTS_OF_HANDLER = ['update', 'success', 'fail'];

/**
 * A task offered to this worker: what a handler receives.
 *
 * `id`, `action`, `attempt`, `publisher`, `payloadSize`; `signal`, an AbortSignal aborted
 * when the hub ends this service's part (the task was cancelled, timed out, failed or
 * completed by another service; the attempt failed and will be retried; it went to
 * another instance) or the client closes: pass it to `fetch()` and the like, or listen to
 * its `abort` event. After it, `pickup()`, `update()`, `touch()` and `drop()` throw its
 * reason (a TaskAborted), and nothing more is sent for the task.
 */
export class Task {
  constructor(client, offer) {
    this._client = client;
    this.id = offer.task;
    this.action = offer.action;
    this.attempt = offer.attempt;
    this.publisher = offer.publisher ?? '';
    this.payloadSize = offer.payload_size ?? 0;
    this._hasPayload = Object.hasOwn(offer, 'payload');
    this._payload = offer.payload;
    this._controller = new AbortController();
    this.signal = this._controller.signal;
    this._listeners = Object.fromEntries(TASK_EVENTS_OF_HANDLER.map((e) => [e, []]));
    this._outcome = null; // [event, value] once another service completed it, or it failed
    this._done = false; // this service returned, dropped or failed, or the task ended
    this._elsewhere = false; // another service completed the task: this one's result is not wanted
    this._settled = false; // the handler finished: the hub ending the part no longer aborts it
  }

  /**
   * Tell the hub this service works on the task, so that it waits (up to the task's
   * complete timeout). Sent at once; no need to wait for it.
   * @returns {Promise<object>} the hub's `ack` (a refusal that ends this part aborts `signal`)
   * @throws {TaskAborted|TaskHubError} (synchronously) the part is over
   */
  pickup() {
    this._usable();
    return this._command('pickup', {});
  }

  /**
   * The task's payload (fetched from the hub when it was too large to come with the offer).
   * @returns {Promise<*>}
   */
  async getPayload() {
    if (!this._hasPayload) {
      const answer = await this._client._submit({ type: 'get_payload', task: this.id }).promise;
      this._payload = answer.payload ?? null;
      this._hasPayload = true;
    }
    return this._payload;
  }

  /**
   * Send progress to the caller and the other services on the task (it restarts the
   * task's heartbeat timeout). Sent at once, in order with this client's other commands:
   * no need to wait for it; awaiting it waits for the hub's acknowledgement.
   *
   * @param {*} [data] - any JSON value
   * @param {number} [progress] - a fraction from 0 to 1, for progress bars
   * @returns {Promise<object>} the hub's `ack`
   * @throws {TaskHubError} (synchronously, nothing sent) `invalid_field` for a progress
   *   outside 0..1, `invalid_value` or `payload_too_large` for the data; the part is over
   */
  update(data = null, progress = undefined) {
    this._usable();
    const fields = { data: data === undefined ? null : data };
    if (progress != null) {
      if (typeof progress !== 'number' || !(progress >= 0 && progress <= 1)) {
        throw new TaskHubError('invalid_field', 'progress must be a number from 0 to 1');
      }
      fields.progress = progress;
    }
    encodeValue(fields.data, 'update data', this._client.welcome?.max_payload_size ?? null);
    return this._command('update', fields);
  }

  /**
   * Tell the hub this service is alive and still on the task: its heartbeat timeout
   * starts again. A touch on a task not picked up picks it up.
   * @returns {Promise<object>} the hub's `ack`
   */
  touch() {
    this._usable();
    return this._command('touch', {});
  }

  /**
   * Finish without a result; the handler's return value is then ignored.
   * @returns {Promise<object>} the hub's `ack`
   */
  drop() {
    this._usable();
    this._done = true;
    return this._command('drop', {});
  }

  /**
   * Call `fn(data, update)` on another service's `'update'`, `fn(result)` on `'success'`
   * (another service completed the task), `fn(taskFailed)` on `'fail'`. A `success` or
   * `fail` listener added after it happened is called at once. Returns the task.
   * @throws {TypeError} another event name
   */
  on(event, fn) {
    if (!this._listeners[event]) throw new TypeError(`unknown task event ${JSON.stringify(event)}: use 'update', 'success' or 'fail'`);
    this._listeners[event].push(fn);
    if (this._outcome?.[0] === event) this._client._call(fn, [this._outcome[1]]);
    return this;
  }

  _usable() {
    if (this.signal.aborted) throw this.signal.reason;
    if (this._done) throw new TaskHubError('invalid_transition', "this service's part in the task is over: it returned, dropped or failed");
  }

  _command(type, fields) {
    // pickup, update and touch ask for no answer: the hub answers them only to refuse them.
    const silent = type !== 'drop';
    const record = this._client._submit({ type, task: this.id, attempt: this.attempt, ...fields, ...(silent ? { ack: false } : {}) });
    record.promise.then(undefined, (error) => {
      if (PART_OVER.has(error.code)) this._end(`the hub refused ${type}: ${error.detail}`);
      else if (!(error instanceof ConnectionLost)) this._client._log('warn', `taskhub: ${type} of ${this.id} not accepted: ${error.message}`);
    });
    return silent ? this._client._acknowledgement(record) : record.promise;
  }

  /** The hub gave up on this part (or the client closed): abort the handler's signal. */
  _end(detail) {
    if (this.signal.aborted || this._settled) return;
    this._done = true;
    this._controller.abort(new TaskAborted(detail));
  }

  _event(message) {
    if (message.attempt !== this.attempt && message.type !== 'update') return; // another attempt's news
    switch (message.type) {
      case 'update': {
        const update = updateOf(message);
        for (const fn of [...this._listeners.update]) this._client._call(fn, [update.data, update]);
        break;
      }
      case 'success':
        this._elsewhere = true; // its end follows, which aborts this part
        this._outcome = ['success', message.result ?? null];
        for (const fn of [...this._listeners.success]) this._client._call(fn, [this._outcome[1]]);
        break;
      case 'fail': {
        const failed = new TaskFailed(this.id, message.reason ?? '', message.detail ?? '');
        this._outcome = ['fail', failed];
        for (const fn of [...this._listeners.fail]) this._client._call(fn, [failed]);
        this._end(`the task failed (${failed.reason})${failed.detail ? `: ${failed.detail}` : ''}`);
        break;
      }
      case 'retry':
        this._end(`the attempt failed (${message.reason}) and the task will be retried`);
        break;
      case 'end':
        this._end(`the task ended (${message.status})`);
        break;
      default:
    }
  }
}
