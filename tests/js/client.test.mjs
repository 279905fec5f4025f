// taskhub.js workers and callers against a live hub: failures, cancel and task.signal,
// lost connections (through a proxy that cuts them), reads, retries and refusals.
//
// The pytest wrapper gives a namespace the worker credentials may subscribe to and the
// caller may publish; each test uses an action of its own in it.
//
// Reads TASKHUB_URL, TASKHUB_NAMESPACE, and TASKHUB_WORKER_, TASKHUB_WORKER2_ (may subscribe
// to the namespace) and TASKHUB_CALLER_ (may publish to it) _NAME and _KEY; the worker's
// and the caller's credentials need max_instances 2 at least.

import assert from 'node:assert/strict';
import { afterEach, test } from 'node:test';

import WebSocket from 'ws';

import { Client, NoResult, TaskAborted, TaskFailed, TaskHubError } from '../../taskhub/static/taskhub/taskhub.js';
import { TIMEOUT, env, recorder, signal, startProxy, until, within } from './helpers.mjs';

const URL_ = env('TASKHUB_URL');
const NS = env('TASKHUB_NAMESPACE');
const OPTIONS = { timeout: 60 * TIMEOUT };
const open = [];

function client(role, url = URL_, options = {}) {
  const c = new Client(url, { name: env(`TASKHUB_${role}_NAME`), key: env(`TASKHUB_${role}_KEY`), WebSocket, logger: recorder(), ...options });
  open.push(c);
  return c;
}

const worker = (url, options) => client('WORKER', url, options);
const caller = (url, options) => client('CALLER', url, options);

afterEach(async () => {
  await Promise.all(open.splice(0).map((c) => c.close()));
});

/** Resolves once `task.signal` aborts. */
const aborted = (task) => new Promise((resolve) => task.signal.addEventListener('abort', () => resolve(task.signal.reason)));

test('a handler that throws fails the task: TaskFailed with reason error, or the fallback', OPTIONS, async () => {
  const action = `${NS}:fail`;
  const w = worker();
  w.sub(action, async () => {
    throw new RangeError('no such mailbox');
  });
  await within(w.connect(), 'the worker connects');
  const c = caller();
  await assert.rejects(within(c.pub(action, 1).getResult(), 'the failure'), (error) => {
    assert.ok(error instanceof TaskFailed);
    assert.equal(error.reason, 'error');
    assert.equal(error.detail, 'RangeError: no such mailbox');
    return true;
  });
  assert.equal(await within(c.pub(action, 2).getResult('fallback'), 'the fallback'), 'fallback');
});

test('progress reaches the caller in order, and a result that is not JSON fails the task', OPTIONS, async () => {
  const action = `${NS}:progress`;
  const w = worker();
  w.sub(action, async (task) => {
    task.pickup();
    const steps = await task.getPayload();
    if (steps === 0) return { ratio: NaN };
    for (let i = 1; i <= steps; i += 1) task.update({ step: i }, i / steps);
    return { steps, publisher: task.publisher, attempt: task.attempt };
  });
  const c = caller();
  const updates = [];
  const result = await within(c.pub(action, 3).on('update', (data, u) => updates.push([data.step, u.progress, u.service, u.attempt])).getResult(), 'the result');
  assert.deepEqual(result, { steps: 3, publisher: env('TASKHUB_CALLER_NAME'), attempt: 1 });
  const name = env('TASKHUB_WORKER_NAME');
  assert.deepEqual(updates, [[1, 1 / 3, name, 1], [2, 2 / 3, name, 1], [3, 1, name, 1]]);
  await assert.rejects(within(c.pub(action, 0).getResult(), 'the failure'), { reason: 'error', detail: 'result could not be sent: NaN is not JSON' });
});

test('cancel from the caller aborts the worker task.signal, and nothing more is sent for it', OPTIONS, async () => {
  const action = `${NS}:cancel`;
  const w = worker();
  const started = signal();
  const reasons = signal();
  w.sub(action, async (task) => {
    await task.pickup(); // acknowledged: the hub has it before the caller cancels
    started.resolve(task);
    const reason = await aborted(task);
    try {
      task.update('after the abort');
    } catch (error) {
      reasons.resolve([reason, error]);
      throw error;
    }
  });
  const c = caller();
  const handle = c.pub(action, null, { timeout: 60 * TIMEOUT * 1000 });
  await within(started.promise, 'the worker starts');
  await within(handle.cancel(), 'the cancel');
  await assert.rejects(within(handle.getResult(), 'the result'), (error) => error instanceof TaskFailed && error.reason === 'cancelled' && error.detail === `cancelled by ${env('TASKHUB_CALLER_NAME')}`);
  const [reason, thrown] = await within(reasons.promise, 'the abort');
  assert.ok(reason instanceof TaskAborted);
  assert.equal(reason.name, 'AbortError');
  assert.match(reason.detail, /cancelled/);
  assert.equal(thrown, reason);
  await assert.rejects(within(handle.cancel(), 'the second cancel'), { code: 'invalid_transition' });
  const { events } = await within(c.getTask(handle.id), 'the task');
  assert.deepEqual(events.map((e) => e.kind).filter((k) => !['init', 'start'].includes(k)), ['pickup', 'fail', 'end']);
});

test('a worker rides through a lost connection: it resumes, and its updates and result arrive once', OPTIONS, async () => {
  const action = `${NS}:resume`;
  const proxy = await startProxy(URL_);
  try {
    const w = worker(proxy.url);
    const welcomes = [];
    const closes = [];
    w.on('welcome', (m) => welcomes.push(m.resumed)).on('close', (e) => closes.push(e.code));
    const started = signal();
    const go = signal();
    w.sub(action, async (task) => {
      task.pickup();
      task.update({ step: 1 }, 0.5);
      started.resolve(task);
      await go.promise;
      task.update({ step: 2 }, 1);
      return 'done';
    });
    await within(w.connect(), 'the worker connects');
    const c = caller();
    const updates = [];
    const handle = c.pub(action).on('update', (data) => updates.push(data.step));
    const task = await within(started.promise, 'the worker starts');
    await until(() => updates.length === 1, 'the first update');
    proxy.cut();
    await until(() => welcomes.length === 2, 'the worker reconnects');
    assert.deepEqual(welcomes, [false, true]);
    assert.deepEqual(closes, [1006]);
    go.resolve();
    assert.equal(await within(handle.getResult(), 'the result'), 'done');
    assert.deepEqual(updates, [1, 2]);
    assert.equal(task.signal.aborted, false);
  } finally {
    await proxy.close();
  }
});

test('a pub whose answer a lost connection took is sent again, and the hub creates the task once', OPTIONS, async () => {
  const action = `${NS}:once`;
  const proxy = await startProxy(URL_);
  try {
    const c = caller(proxy.url);
    await within(c.connect(), 'the caller connects');
    const w = worker();
    const offered = signal();
    const go = signal();
    let runs = 0;
    w.sub(action, async (task) => {
      runs += 1;
      offered.resolve();
      await go.promise;
      return { payload: await task.getPayload() };
    });
    await within(w.connect(), 'the worker connects');
    const created = [];
    const welcomes = [];
    c.on('message', (m) => m.type === 'ack' && 'created' in m && created.push(m.created));
    c.on('welcome', (m) => welcomes.push(m.resumed));
    proxy.hold(); // the hub's answers to the caller pile up in the proxy...
    const handle = c.pub(action, 'x');
    await within(offered.promise, 'the offer'); // ...so the hub has the task, and the caller no ack
    proxy.cut();
    go.resolve();
    assert.deepEqual(await within(handle.getResult(), 'the result'), { payload: 'x' });
    assert.equal(runs, 1);
    // The result may come first (the task is watched again at once); the pub's ack follows.
    await until(() => created.length, "the re-sent pub's ack");
    assert.deepEqual(created, [false]); // the ack heard is the re-sent pub's: the task existed
    assert.deepEqual(welcomes, [true]);
    const listed = await within(c.tasks({ action }), 'the list');
    assert.deepEqual(listed.map((t) => [t.id, t.status]), [[handle.id, 'success']]);
  } finally {
    await proxy.close();
  }
});

test('watch, getTask and tasks read a finished task back; a large payload is fetched', OPTIONS, async () => {
  const action = `${NS}:read`;
  const w = worker();
  w.sub(action, async (task) => {
    const payload = await task.getPayload();
    task.update({ got: payload.length }, 0.5);
    return { inline: task.payloadSize <= 16384, got: payload.length };
  });
  const c = caller();
  const big = 'x'.repeat(40000); // over the hub's inline size: not in the offer
  const handle = c.pub(action, big);
  assert.deepEqual(await within(handle.getResult(), 'the result'), { inline: false, got: 40000 });
  // Another client follows it by id: the history first, then the result.
  const other = caller();
  const replayed = [];
  const ends = [];
  const watched = other.watch(handle.id.toUpperCase()).on('update', (data, u) => replayed.push([data, u.progress])).on('end', (s) => ends.push(s));
  assert.deepEqual(await within(watched.getResult(), 'the watch'), { inline: false, got: 40000 });
  assert.deepEqual(replayed, [[{ got: 40000 }, 0.5]]);
  assert.deepEqual(ends, ['success']);
  const { task, events } = await within(other.getTask(handle.id), 'the task');
  assert.equal(task.status, 'success');
  assert.deepEqual(events.map((e) => e.kind).filter((k) => k !== 'start'), ['init', 'pickup', 'update', 'success', 'end']); // an update picks up
  const listed = await within(other.tasks({ action, status: 'success', limit: 10 }), 'the list');
  assert.deepEqual(listed.map((t) => t.id), [handle.id]);
  assert.equal(listed.more, false);
  await assert.rejects(within(other.watch('00000000-0000-4000-8000-000000000000').getResult(null), 'the refusal'), { code: 'unknown_task' });
});

test('retries: a failed attempt is retried after its backoff (ms), and a failed task on request', OPTIONS, async () => {
  const action = `${NS}:retry`;
  const w = worker();
  w.sub(action, async (task) => {
    const { succeedAt } = await task.getPayload();
    if (task.attempt < succeedAt) throw new Error(`attempt ${task.attempt} failed`);
    return task.attempt;
  });
  const c = caller();
  const retries = [];
  const handle = c.pub(action, { succeedAt: 2 }, { retries: 1, retryBackoff: 100 }).on('retry', (r) => retries.push(r));
  assert.equal(await within(handle.getResult(), 'the retried result'), 2);
  assert.equal(retries.length, 1);
  assert.deepEqual([retries[0].attempt, retries[0].reason, retries[0].detail, retries[0].nextAttempt], [1, 'error', 'Error: attempt 1 failed', 2]);
  assert.ok(retries[0].delay >= 50 && retries[0].delay <= 100, `a delay in ms in the backoff's upper half: ${retries[0].delay}`);
  // Without retries, the task fails; a retry on request runs its next attempt.
  const failed = c.pub(action, { succeedAt: 2 });
  await assert.rejects(within(failed.getResult(), 'the failure'), { reason: 'error' });
  const again = await within(c.retry(failed.id), 'the retry');
  assert.equal(await within(again.getResult(), 'the second attempt'), 2);
  await assert.rejects(within(c.retry(failed.id), 'the refusal'), { code: 'invalid_transition' });
});

test('options reach the hub: a pickup timeout in ms; a dropped task has no result', OPTIONS, async () => {
  const c = caller();
  const started = Date.now();
  await assert.rejects(within(c.pub(`${NS}:nobody`, null, { pickupTimeout: 300 }).getResult(), 'the pickup timeout'), { reason: 'pickup_timeout' });
  assert.ok(Date.now() - started >= 300);
  const action = `${NS}:drop`;
  const w = worker();
  w.sub(action, (task) => {
    task.drop();
    return 'ignored';
  });
  await assert.rejects(within(c.pub(action).getResult(), 'no result'), NoResult);
  assert.equal(await within(c.pub(action).getResult(null), 'the fallback'), null);
});

test('two services on one task: one hears the other update and succeed, then its part is over', OPTIONS, async () => {
  const action = `${NS}:fanout`;
  const first = worker();
  const second = client('WORKER2');
  const heard = [];
  const over = signal();
  const gotUpdate = signal();
  first.sub(action, async (task) => {
    task.pickup();
    await gotUpdate.promise;
    return 'first';
  });
  second.sub(action, async (task) => {
    task.pickup();
    task.on('update', (data, u) => heard.push(['update', data, u.service]));
    task.on('success', (result) => heard.push(['success', result]));
    task.update('second is on it');
    over.resolve(await aborted(task));
  });
  await within(Promise.all([first.connect(), second.connect()]), 'the workers connect');
  const c = caller();
  const updates = [];
  const handle = c.pub(action).on('update', (data) => {
    updates.push(data);
    gotUpdate.resolve();
  });
  assert.equal(await within(handle.getResult(), 'the result'), 'first');
  const reason = await within(over.promise, 'the second part ends');
  assert.match(reason.detail, /ended \(success\)/);
  assert.deepEqual(heard, [['success', 'first']]);
  assert.deepEqual(updates, ['second is on it']);
});

test('refusals: a wrong key or path is final on connect; a forbidden pub rejects whatever the fallback', OPTIONS, async () => {
  const wrong = new Client(URL_, { name: env('TASKHUB_CALLER_NAME'), key: 'not-the-key-at-all', WebSocket, logger: recorder() });
  await assert.rejects(within(wrong.connect(), 'the refusal'), (error) => error instanceof TaskHubError && error.code === 'authentication_failed');
  const lost = new Client(URL_.replace('/ws/taskhub/', '/ws/nothing/'), { name: 'a', key: 'b', WebSocket, logger: recorder() });
  await assert.rejects(within(lost.connect(), 'the refusal'), { code: 'not_found' });
  const c = caller();
  await assert.rejects(within(c.pub('forbidden:thing').getResult('fallback'), 'the refusal'), { code: 'permission_denied' });
  const w = client('CALLER'); // the caller's credential may not subscribe
  const subscribed = w.sub(`${NS}:work`, () => null); // not awaited, as the seed does: no unhandled rejection
  await assert.rejects(within(w.connect(), 'the refusal'), { code: 'permission_denied' });
  await assert.rejects(subscribed, { code: 'permission_denied' });
});
