// The module's own logic, without a hub: values and errors, and the protocol's state
// across reconnects, played against a fake WebSocket.

import assert from 'node:assert/strict';
import { afterEach, describe, test } from 'node:test';

import {
  Client,
  ConnectionFailed,
  ConnectionLost,
  MAX_ERROR_LENGTH,
  NoResult,
  TaskAborted,
  TaskFailed,
  TaskHubError,
  backoff,
  canonicalTaskId,
  checkAction,
  cutText,
  encodeValue,
  errorText,
} from '../../taskhub/static/taskhub/taskhub.js';
import { FakeSocket, recorder, settle, until } from './helpers.mjs';

const URL_ = 'ws://hub.test/ws/taskhub/';
const TASK = '6a1d0b2c-3d4e-4f50-8a6b-7c8d9e0f1a2b';
const WELCOME = { type: 'welcome', v: 1, service: 'mailer', instance: 'i1', resume: 'i1.token', resumed: false, max_message_size: 786432, max_payload_size: 524288 };

const clients = [];

/** A client on fake sockets: reconnects at once, no pings or resyncs unless asked. */
function makeClient(options = {}) {
  const logger = recorder();
  const client = new Client(URL_, { name: 'mailer', key: 'k'.repeat(20), WebSocket: FakeSocket, backoff: () => 0, pingInterval: null, resyncInterval: null, logger, ...options });
  client.log = logger;
  clients.push(client);
  return client;
}

/** Open the newest fake socket and welcome the client on it. */
async function welcome(extra = {}) {
  await until(() => FakeSocket.last && FakeSocket.last.readyState === 0, 'a socket');
  const socket = FakeSocket.last;
  socket.open();
  socket.receive({ ...WELCOME, ...extra });
  answerAll(socket, 'sub', (f) => ({ type: 'ack', action: f.action, waiting: 0 }));
  await settle();
  return socket;
}

/** Answer every unanswered frame of `type` on `socket` with `answer(frame)`. */
function answerAll(socket, type, answer) {
  for (const frame of socket.frames(type)) socket.receive({ ref: frame.ref, ...answer(frame) });
}

afterEach(async () => {
  for (const client of clients.splice(0)) {
    client._stop(new ConnectionLost('test over'));
  }
  FakeSocket.all = [];
});

describe('values', () => {
  test('backoff is min((10n)² ms, 60 s), as the Python client waits', () => {
    assert.deepEqual([1, 2, 3, 10, 24, 25, 100].map(backoff), [100, 400, 900, 10000, 57600, 60000, 60000]);
  });

  test('errorText says the error as Python does, and a thrown non-Error as its text', () => {
    assert.equal(errorText(new TypeError('no such mailbox')), 'TypeError: no such mailbox');
    assert.equal(errorText(new Error('')), 'Error');
    assert.equal(errorText('plain words'), 'plain words');
    assert.equal(errorText({ toString() { throw new Error('broken'); } }), "<the error's message could not be read>");
  });

  test('error texts are cut to the hub limit and cleaned of what it refuses', () => {
    const long = errorText(new Error('x'.repeat(3 * MAX_ERROR_LENGTH)));
    assert.equal(long.length, MAX_ERROR_LENGTH);
    assert.ok(long.startsWith('Error: xxx') && long.endsWith('…'));
    assert.equal(cutText('a\u0000b'), 'a\\x00b');
    assert.equal(cutText('lone \ud800 here'), 'lone \\ud800 here');
    assert.equal(cutText('pair 😀'), 'pair 😀');
    // A cut never leaves half a surrogate pair.
    const emoji = cutText('a' + '😀'.repeat(MAX_ERROR_LENGTH));
    assert.ok(emoji.length <= MAX_ERROR_LENGTH);
    assert.doesNotThrow(() => encodeValue(emoji));
  });

  test('encodeValue accepts what the hub carries', () => {
    assert.equal(encodeValue({ a: [1, 'é', null, true], n: 2 ** 53, big: 1e21 }), '{"a":[1,"é",null,true],"n":9007199254740992,"big":1e+21}');
    assert.equal(encodeValue(undefined), 'null');
    assert.equal(encodeValue({ skipped: undefined, when: new Date(0) }), '{"when":"1970-01-01T00:00:00.000Z"}');
    let deep = 1;
    for (let i = 0; i < 31; i += 1) deep = [deep];
    assert.doesNotThrow(() => encodeValue(deep, 'payload'));
  });

  test('encodeValue refuses, with invalid_value, what the hub would refuse', () => {
    let deep = 1;
    for (let i = 0; i < 32; i += 1) deep = [deep];
    const cycle = {};
    cycle.self = cycle;
    const cases = [
      [NaN, /NaN is not JSON/],
      [{ x: -Infinity }, /-Infinity is not JSON/],
      [2 ** 53 + 2, /beyond ±2\*\*53/],
      ['a\u0000b', /U\+0000/],
      [{ ['\udc00']: 1 }, /a key holds a lone surrogate/],
      [deep, /nested deeper than 31 levels/],
      [10n, /BigInt/],
      [cycle, /circular|nested deeper/],
    ];
    for (const [value, message] of cases) {
      assert.throws(() => encodeValue(value, 'payload'), (error) => {
        assert.ok(error instanceof TaskHubError);
        assert.equal(error.code, 'invalid_value');
        assert.match(error.detail, /^payload could not be sent: /);
        assert.match(error.detail, message);
        return true;
      });
    }
  });

  test('encodeValue refuses, with payload_too_large, a value over the limit in UTF-8 bytes', () => {
    assert.equal(encodeValue('éé', 'result', 6), '"éé"'); // 6 bytes
    assert.throws(() => encodeValue('ééé', 'result', 6), { code: 'payload_too_large', detail: "result of 8 bytes is over the hub's limit of 6 bytes" });
  });

  test('action names and task ids are checked as the hub checks them', () => {
    assert.equal(checkAction('weather/metno:forecast'), 'weather/metno:forecast');
    for (const bad of ['mail', 'Mail:send', 'mail:send:x', `a:${'b'.repeat(200)}`, 3]) {
      assert.throws(() => checkAction(bad), { code: 'invalid_action' });
    }
    assert.equal(canonicalTaskId('{6A1D0B2C3D4E4F508A6B7C8D9E0F1A2B}'), TASK);
    assert.equal(canonicalTaskId(`urn:uuid:${TASK}`), TASK);
    assert.throws(() => canonicalTaskId('6a1d'), { code: 'invalid_field' });
  });
});

describe('connecting', () => {
  test('a service says hello with its name and key, and connect() resolves with the welcome', async () => {
    const client = makeClient({ concurrency: 2 });
    const connected = client.connect();
    const socket = await welcome();
    assert.deepEqual(socket.sent[0], { type: 'hello', name: 'mailer', key: 'k'.repeat(20), inline_end: true, concurrency: 2 });
    assert.deepEqual(await connected, WELCOME);
    assert.equal(client.connected, true);
    assert.equal(client.instance, 'i1');
  });

  test('a monitor says exactly {"type":"hello","monitor":true}', async () => {
    const client = new Client(URL_, { monitor: true, WebSocket: FakeSocket, pingInterval: null, logger: recorder() });
    clients.push(client);
    const connected = client.connect();
    const socket = await welcome({ monitor: true, service: undefined, instance: undefined, user: 'admin' });
    assert.deepEqual(socket.sent, [{ type: 'hello', monitor: true }]);
    assert.equal((await connected).monitor, true);
  });

  test('URLs: a ws(s) URL, or in a page a relative one; anything else is refused', () => {
    assert.throws(() => new Client('http://hub.test/ws/taskhub/', { name: 'a', key: 'b' }), TypeError);
    assert.throws(() => new Client(URL_, {}), /name, key/);
    assert.throws(() => new Client(URL_, { name: 'a', key: 'b', timeOut: 3 }), /unknown option\(s\) timeOut/);
    globalThis.location = { href: 'https://hub.test/taskhub/dashboard/' };
    try {
      assert.equal(new Client('/ws/taskhub/', { monitor: true }).url, 'wss://hub.test/ws/taskhub/');
    } finally {
      delete globalThis.location;
    }
  });

  test('a refusal on the first connect is final: connect() rejects with it and nothing reconnects', async () => {
    const client = makeClient();
    const connected = client.connect();
    const handle = client.pub('mail:send', 1);
    await until(() => FakeSocket.last, 'a socket');
    FakeSocket.last.open();
    FakeSocket.last.receive({ type: 'error', code: 'authentication_failed', detail: 'unknown name or wrong key' });
    FakeSocket.last.drop(4001);
    await assert.rejects(connected, { code: 'authentication_failed', detail: 'unknown name or wrong key' });
    await assert.rejects(handle.getResult(null), { code: 'authentication_failed' });
    await settle();
    assert.equal(FakeSocket.all.length, 1);
  });

  test('a monitor refused after a session (a logout) stays refused: nothing reconnects', async () => {
    const client = makeClient({ name: undefined, key: undefined, monitor: true });
    const closes = [];
    client.on('close', (event) => closes.push(event.code));
    await Promise.all([client.connect(), welcome({ monitor: true, service: undefined, instance: undefined })]);
    FakeSocket.last.receive({ type: 'error', code: 'authentication_failed', detail: 'the session ended' });
    FakeSocket.last.drop(4001);
    await settle();
    assert.deepEqual(closes, [4001]);
    assert.equal(FakeSocket.all.length, 1);
  });

  test('after a session, a refusal is retried with backoff', async () => {
    const tries = [];
    const client = makeClient({ backoff: (n) => { tries.push(n); return 0; } });
    await Promise.all([client.connect(), welcome()]);
    FakeSocket.last.drop(1006);
    await until(() => FakeSocket.all.length === 2, 'a reconnect');
    FakeSocket.last.open();
    FakeSocket.last.receive({ type: 'error', code: 'too_many_instances', detail: 'every slot is taken' });
    FakeSocket.last.drop(4003);
    await until(() => FakeSocket.all.length === 3, 'a second reconnect');
    assert.deepEqual(tries, [1, 2]);
    assert.ok(client.log.lines.some(([level, line]) => level === 'error' && line.includes('too_many_instances')));
    await welcome({ resumed: true });
    assert.equal(client.connected, true);
  });

  test('connect() rejects with ConnectionFailed after connectTimeout, and the client stops', async () => {
    const client = makeClient({ connectTimeout: 30 });
    const connected = client.connect();
    await until(() => FakeSocket.last, 'a socket');
    FakeSocket.last.onerror({ message: 'connect ECONNREFUSED 127.0.0.1:9' });
    FakeSocket.last.drop(1006);
    await assert.rejects(connected, (error) => error instanceof ConnectionFailed && /within 30 ms: connect ECONNREFUSED/.test(error.message));
    await assert.rejects(client.connect(), ConnectionLost);
  });

  test('a ping left unanswered drops the connection, and the client reconnects', async () => {
    const client = makeClient({ pingInterval: 20 });
    await Promise.all([client.connect(), welcome()]);
    const first = FakeSocket.last;
    await until(() => first.frames('ping').length === 1, 'a ping');
    await until(() => FakeSocket.all.length === 2, 'a reconnect after the unanswered ping');
    assert.equal(first.closedWith, 3008);
  });
});

describe('commands', () => {
  test('answers are matched by ref, in any order; an error rejects with its code and detail', async () => {
    const client = makeClient();
    const messages = [];
    client.on('message', (m) => messages.push(m.type));
    await Promise.all([client.connect(), welcome()]);
    const socket = FakeSocket.last;
    const first = client.request({ type: 'tasks', limit: 5, ref: 'mine' });
    const second = client.request({ type: 'ping' });
    const third = client.request({ type: 'stats' });
    const [a, b, c] = socket.sent.slice(1);
    assert.notEqual(a.ref, 'mine');
    assert.equal(new Set([a.ref, b.ref, c.ref]).size, 3);
    socket.receive({ type: 'pong', ref: b.ref });
    socket.receive({ type: 'error', ref: c.ref, code: 'permission_denied', detail: 'monitors only' });
    socket.receive({ type: 'tasks', ref: a.ref, tasks: [{ id: TASK }] });
    socket.receive({ type: 'pong', ref: 999 }); // answers nothing of ours: listeners still hear it
    assert.deepEqual(await second, { type: 'pong', ref: b.ref });
    await assert.rejects(third, (error) => error instanceof TaskHubError && error.code === 'permission_denied' && error.detail === 'monitors only');
    assert.deepEqual((await first).tasks, [{ id: TASK }]);
    assert.deepEqual(messages, ['welcome', 'pong', 'error', 'tasks', 'pong']);
  });

  test('a frame over the hub limit is refused before it is sent', async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome({ max_message_size: 100, max_payload_size: 50 })]);
    assert.throws(() => client.pub('mail:send', 'x'.repeat(60)), { code: 'payload_too_large' });
    await assert.rejects(client.request({ type: 'tasks', action: `a:${'b'.repeat(100)}` }), { code: 'message_too_large' });
    assert.deepEqual(FakeSocket.last.sent.map((f) => f.type), ['hello']);
  });

  test('pub maps its options to the protocol: ms to seconds, Infinity to no limit', async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome()]);
    client.pub('mail:send', ['a'], 1000 * 60 * 30);
    client.pub('mail:send', null, { timeout: Infinity, pickupTimeout: 500, heartbeatTimeout: 2500, retries: -1, retryBackoff: 1500, taskId: TASK.toUpperCase(), autoremove: true });
    const [seed, full] = FakeSocket.last.frames('pub');
    assert.equal(seed.timeout, 1800);
    assert.match(seed.task_id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.deepEqual(full, { type: 'pub', action: 'mail:send', payload: null, task_id: TASK, timeout: null, pickup_timeout: 0.5, heartbeat_timeout: 2.5, retries: -1, retry_backoff: 1.5, autoremove: true, ref: full.ref });
    assert.throws(() => client.pub('mail:send', null, { timeout: 0 }), { code: 'invalid_field' });
    assert.throws(() => client.pub('mail:send', null, { retries: 1.5 }), { code: 'invalid_field' });
    assert.throws(() => client.pub('mail:send', null, { autoremove: 'yes' }), { code: 'invalid_field' });
    assert.throws(() => client.pub('mail:send', null, { pickup: 3 }), /unknown pub option\(s\) pickup/);
  });

  test('getResult(valueIfError) stands in for a failure or no result, not for a refusal', async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome()]);
    const socket = FakeSocket.last;
    const failed = client.pub('mail:send');
    const ended = client.pub('mail:send');
    const refused = client.pub('mail:send');
    const [f, e, r] = socket.frames('pub');
    socket.receive({ type: 'ack', ref: f.ref, task: f.task_id, created: true });
    socket.receive({ type: 'fail', task: f.task_id, seq: 3, attempt: 1, reason: 'error', detail: 'Error: boom' });
    socket.receive({ type: 'end', task: e.task_id, seq: 3, attempt: 1, status: 'ended' });
    socket.receive({ type: 'error', ref: r.ref, code: 'permission_denied', detail: 'mailer may not publish mail:send' });
    await assert.rejects(failed.getResult(), (error) => error instanceof TaskFailed && error.reason === 'error' && error.detail === 'Error: boom');
    assert.equal(await failed.getResult('fallback'), 'fallback');
    assert.equal(await failed.getResult(undefined), undefined);
    await assert.rejects(ended.getResult(), NoResult);
    assert.equal(await ended.getResult(null), null);
    await assert.rejects(refused.getResult('fallback'), { code: 'permission_denied' });
    // A listener added after the end is called at once.
    const heard = [];
    failed.on('fail', (error) => heard.push(error.reason)).on('end', (status) => heard.push(status));
    assert.deepEqual(heard, ['error', 'failed']);
  });

  test('tasks() says when the hub cut the list; a bad filter is refused before sending', async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome()]);
    const listed = client.tasks({ status: 'failed', action: 'mail:send', service: 'mailer', limit: 2 });
    const frame = FakeSocket.last.frames('tasks')[0];
    assert.deepEqual(frame, { type: 'tasks', limit: 2, status: 'failed', action: 'mail:send', service: 'mailer', ref: frame.ref });
    FakeSocket.last.receive({ type: 'tasks', ref: frame.ref, tasks: [{ id: TASK }], more: true });
    const list = await listed;
    assert.deepEqual([...list], [{ id: TASK }]);
    assert.equal(list.more, true);
    await assert.rejects(client.tasks({ limit: 0 }), { code: 'invalid_field' });
    await assert.rejects(client.tasks({ status: 'done' }), { code: 'invalid_field' });
  });
});

describe('task events', () => {
  test('each seq is delivered once, live or replayed, in order', async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome()]);
    const socket = FakeSocket.last;
    const seen = [];
    const handle = client.watch(TASK).on('update', (data, update) => seen.push([data, update.progress, update.seq]));
    const watch = socket.frames('watch')[0];
    assert.deepEqual(watch, { type: 'watch', task: TASK, since: 0, ref: watch.ref });
    // A live update overtakes the replay: it waits for it.
    socket.receive({ type: 'update', task: TASK, seq: 5, attempt: 1, service: 'w', data: 'c', progress: 0.9 });
    assert.deepEqual(seen, []);
    socket.receive({
      type: 'state', ref: watch.ref, task: { id: TASK, status: 'started', attempt: 1 },
      events: [
        { seq: 1, kind: 'init', attempt: 1, data: {} },
        { seq: 3, kind: 'update', service: 'w', attempt: 1, data: { data: 'a', progress: 0.1 } },
        { seq: 4, kind: 'update', service: 'w', attempt: 1, data: { data: 'b' } },
        { seq: 5, kind: 'update', service: 'w', attempt: 1, data: { data: 'c', progress: 0.9 } },
      ],
    });
    socket.receive({ type: 'update', task: TASK, seq: 4, attempt: 1, service: 'w', data: 'b' }); // came again
    socket.receive({ type: 'success', task: TASK, seq: 6, attempt: 1, service: 'w', result: { ok: 1 } });
    assert.deepEqual(await handle.getResult(), { ok: 1 });
    assert.deepEqual(seen, [['a', 0.1, 3], ['b', null, 4], ['c', 0.9, 5]]);
  });

  test('a long history is read page by page, and live events wait for the last page', async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome()]);
    const socket = FakeSocket.last;
    const seen = [];
    const handle = client.watch(TASK).on('update', (data) => seen.push(data));
    const update = (seq) => ({ seq, kind: 'update', service: 'w', attempt: 1, data: { data: seq } });
    const first = socket.frames('watch')[0];
    socket.receive({ type: 'update', task: TASK, seq: 9, attempt: 1, service: 'w', data: 9 }); // live
    socket.receive({ type: 'state', ref: first.ref, task: { id: TASK, status: 'started', has_result: true, result: null }, events: [update(1), update(2)], more: true });
    const second = socket.frames('watch')[1];
    assert.deepEqual(second, { type: 'watch', task: TASK, since: 2, follow: false, ref: second.ref });
    assert.deepEqual(seen, [1, 2]);
    socket.receive({ type: 'state', ref: second.ref, task: { id: TASK, status: 'success', result: 'done' }, events: [update(3), { seq: 8, kind: 'success', attempt: 1, data: { result: 'done' } }] });
    assert.equal(await handle.getResult(), 'done');
    assert.deepEqual(seen, [1, 2, 3]); // seq 9 came after the success: the handle was done
    const state = client.getTask(TASK);
    const read = socket.frames('watch')[2];
    assert.equal(read.follow, false);
    socket.receive({ type: 'state', ref: read.ref, task: { id: TASK }, events: [update(1)], more: true });
    const next = socket.frames('watch')[3];
    socket.receive({ type: 'state', ref: next.ref, task: { id: TASK, status: 'success' }, events: [update(2)] });
    assert.deepEqual((await state).events.map((e) => e.seq), [1, 2]);
  });

  test('an end whose outcome was lost makes the handle read the task back', async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome()]);
    const socket = FakeSocket.last;
    const handle = client.pub('mail:send');
    const pub = socket.frames('pub')[0];
    socket.receive({ type: 'ack', ref: pub.ref, task: pub.task_id, created: true });
    socket.receive({ type: 'end', task: pub.task_id, seq: 7, attempt: 1, status: 'success' });
    const watch = socket.frames('watch')[0];
    assert.equal(watch.since, 7);
    socket.receive({ type: 'state', ref: watch.ref, task: { id: pub.task_id, status: 'success', result: 42 }, events: [] });
    assert.equal(await handle.getResult(), 42);
  });
});

describe('reconnecting', () => {
  test('resumes with the token, subscribes again, and re-sends what may go twice', async () => {
    const client = makeClient();
    const welcomes = [];
    const closes = [];
    client.on('welcome', (w) => welcomes.push(w.resumed)).on('close', (c) => closes.push(c.code));
    let task;
    client.sub('mail:send', async (t) => {
      task = t;
      await new Promise(() => {}); // works until the test ends
    });
    await Promise.all([client.connect(), welcome()]);
    let socket = FakeSocket.last;
    socket.receive({ type: 'task', task: TASK, action: 'mail:send', attempt: 1, publisher: 'app', payload_size: 4, payload: null });
    await until(() => task, 'the handler');
    const update = task.update({ sent: 1 }, 0.5);
    const handle = client.pub('mail:send', ['a']);
    handle.on('update', () => {});
    const cancelled = client._submit({ type: 'cancel', task: TASK }).promise;
    const pub = socket.frames('pub')[0];
    const sentUpdate = socket.frames('update')[0];
    socket.drop(1006);
    await assert.rejects(cancelled, ConnectionLost); // a cancel is never sent twice
    socket = await welcome({ resumed: true });
    assert.deepEqual(socket.sent[0], { type: 'hello', name: 'mailer', key: 'k'.repeat(20), inline_end: true, resume: 'i1.token' });
    const types = socket.sent.slice(1).map((f) => f.type);
    assert.equal(types[0], 'sub'); // subscriptions first
    assert.deepEqual(socket.frames('pub'), [pub]); // the same ref and task id: the hub creates it once
    assert.deepEqual(socket.frames('update'), [{ ...sentUpdate, again: true }]);
    // The tasks followed are watched from the last event heard: the worker's and the pub's.
    assert.deepEqual(socket.frames('watch').map((f) => [f.task, f.since]).sort(), [[TASK, 0], [pub.task_id, 0]].sort());
    assert.ok(!types.includes('cancel'));
    socket.receive({ type: 'ack', ref: sentUpdate.ref, task: TASK });
    assert.deepEqual(await update, { type: 'ack', ref: sentUpdate.ref, task: TASK });
    assert.equal(task.signal.aborted, false);
    assert.deepEqual(welcomes, [false, true]);
    assert.deepEqual(closes, [1006]);
  });

  test('a handle watches its task again from the last event it heard', async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome()]);
    let socket = FakeSocket.last;
    const updates = [];
    const handle = client.pub('mail:send').on('update', (data) => updates.push(data));
    const pub = socket.frames('pub')[0];
    socket.receive({ type: 'ack', ref: pub.ref, task: pub.task_id, created: true });
    socket.receive({ type: 'update', task: pub.task_id, seq: 4, attempt: 1, service: 'w', data: 1 });
    socket.drop();
    socket = await welcome({ resumed: true });
    const watch = socket.frames('watch')[0];
    assert.deepEqual(watch, { type: 'watch', task: pub.task_id, since: 4, ref: watch.ref });
    socket.receive({
      type: 'state', ref: watch.ref, task: { id: pub.task_id, status: 'success', result: 'r' },
      events: [{ seq: 5, kind: 'update', service: 'w', attempt: 1, data: { data: 2 } }, { seq: 6, kind: 'success', service: 'w', attempt: 1, data: { result: 'r' } }],
    });
    assert.equal(await handle.getResult(), 'r');
    assert.deepEqual(updates, [1, 2]);
  });

  test('a reconnect that did not get the instance back aborts the running handlers', async () => {
    const client = makeClient();
    let task;
    client.sub('mail:send', (t) => {
      task = t;
      return new Promise(() => {});
    });
    await Promise.all([client.connect(), welcome()]);
    FakeSocket.last.receive({ type: 'task', task: TASK, action: 'mail:send', attempt: 1, payload_size: 4, payload: null });
    await until(() => task, 'the handler');
    FakeSocket.last.drop();
    await welcome({ resumed: false, instance: 'i2' });
    assert.equal(task.signal.aborted, true);
    assert.ok(task.signal.reason instanceof TaskAborted);
    assert.match(task.signal.reason.detail, /went to other instances/);
  });
});

describe('handlers', () => {
  async function worker(handler, welcomeExtra = {}) {
    const client = makeClient();
    client.sub('mail:send', handler);
    await Promise.all([client.connect(), welcome(welcomeExtra)]);
    return { client, socket: FakeSocket.last };
  }

  function offer(socket, attempt = 1, extra = {}) {
    socket.receive({ type: 'task', task: TASK, action: 'mail:send', attempt, publisher: 'app', payload_size: 2, payload: [1], ...extra });
  }

  test('a handler that throws fails the task with the error text, cut to the limit', async () => {
    const { socket } = await worker(async () => {
      throw new RangeError('x'.repeat(20000));
    });
    offer(socket);
    await until(() => socket.frames('fail').length, 'the fail');
    const [fail] = socket.frames('fail');
    assert.equal(fail.task, TASK);
    assert.equal(fail.attempt, 1);
    assert.equal(fail.error.length, MAX_ERROR_LENGTH);
    assert.ok(fail.error.startsWith('RangeError: xxx'));
    assert.deepEqual(socket.frames('return'), []);
  });

  test('a result the hub cannot take fails the task, saying why', async () => {
    const { socket } = await worker(() => ({ ratio: NaN }));
    offer(socket);
    await until(() => socket.frames('fail').length, 'the fail');
    assert.equal(socket.frames('fail')[0].error, 'result could not be sent: NaN is not JSON');
  });

  test('the return value is the result (undefined: null); after drop() it is ignored', async () => {
    const results = [undefined, 'kept'];
    let dropNext = false;
    const { socket } = await worker(async (task) => {
      if (dropNext) {
        task.drop();
        return 'ignored';
      }
      return results.shift();
    });
    offer(socket, 1);
    await until(() => socket.frames('return').length === 1, 'the first return');
    assert.equal(socket.frames('return')[0].result, null);
    dropNext = true;
    socket.receive({ type: 'task', task: 'ffffffff-3d4e-4f50-8a6b-7c8d9e0f1a2b', action: 'mail:send', attempt: 1, payload_size: 4, payload: null });
    await until(() => socket.frames('drop').length === 1, 'the drop');
    await settle();
    assert.equal(socket.frames('return').length, 1);
  });

  test('an offer sent again runs the handler once; a newer attempt aborts the older', async () => {
    const runs = [];
    const { socket } = await worker((task) => {
      runs.push(task);
      return new Promise(() => {});
    });
    offer(socket, 1);
    offer(socket, 1);
    await until(() => runs.length === 1, 'the handler');
    offer(socket, 2);
    await until(() => runs.length === 2, 'the second attempt');
    assert.equal(runs[0].signal.aborted, true);
    assert.equal(runs[1].signal.aborted, false);
    assert.deepEqual(runs.map((t) => t.attempt), [1, 2]);
  });

  test('when the hub ends the part, the signal aborts and the task refuses more commands', async () => {
    let task;
    const { socket } = await worker(async (t) => {
      task = t;
      t.pickup();
      await new Promise((resolve) => t.signal.addEventListener('abort', resolve));
      t.update('too late'); // throws the abort reason
    });
    offer(socket);
    await until(() => task, 'the handler');
    socket.receive({ type: 'fail', task: TASK, seq: 5, attempt: 1, reason: 'cancelled', detail: 'cancelled by app' });
    assert.equal(task.signal.aborted, true);
    assert.equal(task.signal.reason.name, 'AbortError');
    assert.equal(task.signal.reason.code, 'aborted');
    assert.match(task.signal.reason.detail, /cancelled by app/);
    assert.throws(() => task.touch(), (error) => error === task.signal.reason);
    await settle();
    assert.deepEqual(socket.sent.map((f) => f.type).filter((t) => !['hello', 'sub'].includes(t)), ['pickup']);
  });

  test('a refused update that means the part is over aborts the signal', async () => {
    let task;
    const { socket } = await worker((t) => {
      task = t;
      return new Promise(() => {});
    });
    offer(socket);
    await until(() => task, 'the handler');
    const update = task.update({ n: 1 });
    const frame = socket.frames('update')[0];
    socket.receive({ type: 'error', ref: frame.ref, code: 'stale_attempt', detail: 'the attempt is over' });
    await assert.rejects(update, { code: 'stale_attempt' });
    assert.equal(task.signal.aborted, true);
  });

  test('update() checks progress and data before sending', async () => {
    let task;
    const { socket } = await worker((t) => {
      task = t;
      return new Promise(() => {});
    }, { max_payload_size: 10 });
    offer(socket);
    await until(() => task, 'the handler');
    assert.throws(() => task.update('x', 1.5), { code: 'invalid_field' });
    assert.throws(() => task.update('x'.repeat(20)), { code: 'payload_too_large' });
    assert.throws(() => task.update({ n: NaN }), { code: 'invalid_value' });
    assert.deepEqual(socket.frames('update'), []);
    assert.deepEqual(await task.getPayload(), [1]); // inline: no round trip
  });

  /** A task offered and its handler running until the test ends. */
  async function running() {
    let task;
    const { socket } = await worker(async (t) => {
      task = t;
      await new Promise(() => {});
    });
    offer(socket);
    await until(() => task, 'the handler');
    return { task, socket };
  }

  test("a worker's commands ask for no answer; a later answer acknowledges them", async () => {
    const { task, socket } = await running();
    const pickup = task.pickup();
    const update = task.update('half', 0.5);
    const [sentPickup] = socket.frames('pickup');
    const [sentUpdate] = socket.frames('update');
    assert.equal(sentPickup.ack, false);
    assert.equal(sentUpdate.ack, false);
    const payload = task._client._submit({ type: 'get_payload', task: TASK }).promise;
    const fetch = socket.frames('get_payload')[0];
    socket.receive({ type: 'payload', ref: fetch.ref, task: TASK, payload: [1] });
    assert.deepEqual(await pickup, { type: 'ack', ref: sentPickup.ref, task: TASK });
    assert.deepEqual(await update, { type: 'ack', ref: sentUpdate.ref, task: TASK });
    assert.deepEqual((await payload).payload, [1]);
  });

  test('awaiting a command sent without an answer asks for it at once', async () => {
    const { task, socket } = await running();
    const update = task.update(1);
    task.update(2); // not awaited: no ping for it
    assert.deepEqual(socket.frames('ping'), []);
    const waited = update.then((ack) => ack);
    const [ping] = socket.frames('ping');
    assert.ok(ping, 'a ping went at once');
    socket.receive({ type: 'pong', ref: ping.ref });
    assert.equal((await waited).ref, socket.frames('update')[0].ref);
    assert.equal(socket.frames('ping').length, 1);
  });

  test('a ping follows every run of commands sent without an answer; a refusal still ends the part', async () => {
    const { task, socket } = await running();
    const updates = [];
    for (let i = 0; i < 64; i += 1) updates.push(task.update(i)); // SYNC_EVERY
    const types = socket.sent.filter((f) => ['update', 'ping'].includes(f.type)).map((f) => f.type);
    assert.deepEqual(types, [...Array(64).fill('update'), 'ping']);
    const [ping] = socket.frames('ping');
    const third = socket.frames('update')[2];
    socket.receive({ type: 'error', code: 'stale_attempt', detail: 'over', ref: third.ref });
    socket.receive({ type: 'pong', ref: ping.ref });
    const settled = await Promise.allSettled(updates);
    assert.deepEqual(settled.map((r) => r.status), ['fulfilled', 'fulfilled', 'rejected', ...Array(61).fill('fulfilled')]);
    assert.equal(task.signal.aborted, true);
  });

  test("a frame's applied acknowledges the commands sent up to it; the run before a ping starts again", { timeout: 5000 }, async () => {
    const { task, socket } = await running();
    const updates = [];
    for (let i = 0; i < 62; i += 1) updates.push(task.update(i));
    task.update('after'); // not awaited: no ping asked for it
    const sent = socket.frames('update');
    socket.receive({ type: 'update', task: TASK, seq: 9, data: 1, applied: sent[61].ref });
    assert.deepEqual(socket.frames('ping'), []);
    const acks = await Promise.all(updates); // asks for a ping for any not acknowledged
    assert.deepEqual(socket.frames('ping'), [], 'acknowledged already: awaiting asked for nothing');
    assert.deepEqual(acks.map((ack) => ack.ref), sent.slice(0, 62).map((f) => f.ref));
    for (let i = 0; i < 62; i += 1) task.update(i); // 63 in a row not acknowledged: still no ping
    assert.deepEqual(socket.frames('ping'), []);
    task.update('64th');
    assert.equal(socket.frames('ping').length, 1);
  });

  test('a return asks for no answer, and a result the hub refuses fails the task', async () => {
    const { client, socket } = await worker(async () => 'result');
    offer(socket);
    await until(() => socket.frames('return').length, 'the return');
    const [ret] = socket.frames('return');
    assert.equal(ret.ack, false);
    socket.receive({ type: 'error', code: 'invalid_value', detail: 'too deep', ref: ret.ref });
    await until(() => socket.frames('fail').length, 'the fail');
    assert.match(socket.frames('fail')[0].error, /result could not be sent: too deep/);
    assert.ok(client.log.lines.some(([, text]) => /succeeded/.test(text)));
  });

  test("an end inside the event before it is heard as the two events", async () => {
    const client = makeClient();
    await Promise.all([client.connect(), welcome()]);
    const socket = FakeSocket.last;
    const handle = client.pub('mail:send', 1);
    const [pub] = socket.frames('pub');
    socket.receive({ type: 'ack', ref: pub.ref, task: pub.task_id, created: true });
    const heard = [];
    handle.on('success', (result) => heard.push(['success', result])).on('end', (status) => heard.push(['end', status]));
    socket.receive({ type: 'success', task: pub.task_id, seq: 4, attempt: 1, service: 'w', result: 7, end: { seq: 5, attempt: 1, status: 'success' } });
    assert.equal(await handle.getResult(), 7);
    await until(() => heard.length === 2, 'both events');
    assert.deepEqual(heard, [['success', 7], ['end', 'success']]);
    assert.equal(handle.status, 'success');
  });

  test('close() says bye, rejects what waits with ConnectionLost and aborts handlers', async () => {
    let task;
    const { client, socket } = await worker((t) => {
      task = t;
      return new Promise(() => {});
    });
    offer(socket);
    await until(() => task, 'the handler');
    const handle = client.pub('mail:send');
    const closes = [];
    client.on('close', (event) => closes.push(event.code));
    const closed = client.close();
    assert.equal(client.close(), closed); // once
    const bye = socket.frames('bye')[0];
    socket.receive({ type: 'ack', ref: bye.ref });
    await closed;
    assert.deepEqual(closes, [1000]);
    assert.equal(socket.frames('bye').length, 1);
    await assert.rejects(handle.getResult(null), ConnectionLost);
    assert.equal(task.signal.aborted, true);
    await assert.rejects(client.pub('mail:send').getResult(null), ConnectionLost);
    assert.equal(socket.closedWith, 1000);
  });
});
