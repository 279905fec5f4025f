// A taskhub.js caller against a Python worker (taskhub.client.Client, run by
// tests/e2e/test_js_client.py in its own process): the result, the progress updates, a
// handler that raises, and a cancel that reaches the Python handler.
//
// The Python handler takes {steps} and updates {step: i} with progress i/steps, then returns
// {done, by: 'python', publisher}; {fail: text} raises ValueError(text); {hang: true}
// updates {hanging: true} and waits until the hub ends its part.
//
// Reads TASKHUB_URL, TASKHUB_ACTION, TASKHUB_WORKER_NAME, and TASKHUB_CALLER_NAME/_KEY.

import assert from 'node:assert/strict';
import { afterEach, test } from 'node:test';

import WebSocket from 'ws';

import { Client, TaskFailed } from '../../taskhub/static/taskhub/taskhub.js';
import { TIMEOUT, env, recorder, signal, within } from './helpers.mjs';

const ACTION = env('TASKHUB_ACTION');
const WORKER = env('TASKHUB_WORKER_NAME');
const CALLER = env('TASKHUB_CALLER_NAME');
const OPTIONS = { timeout: 60 * TIMEOUT };
let client;

function caller() {
  client = new Client(env('TASKHUB_URL'), { name: CALLER, key: env('TASKHUB_CALLER_KEY'), WebSocket, logger: recorder() });
  return client;
}

afterEach(() => client?.close());

test("a JS caller gets a Python worker's result and each progress update", OPTIONS, async () => {
  const updates = [];
  const result = await within(
    caller()
      .pub(ACTION, { steps: 3 }, { timeout: 30000, heartbeatTimeout: 30000 })
      .on('update', (data, u) => updates.push([data, u.progress, u.service, u.attempt]))
      .getResult(),
    'the result',
  );
  assert.deepEqual(result, { done: 3, by: 'python', publisher: CALLER });
  assert.deepEqual(updates, [
    [{ step: 1 }, 1 / 3, WORKER, 1],
    [{ step: 2 }, 2 / 3, WORKER, 1],
    [{ step: 3 }, 1, WORKER, 1],
  ]);
});

test('a Python handler that raises: getResult rejects with TaskFailed (error), or gives the fallback', OPTIONS, async () => {
  const c = caller();
  await assert.rejects(within(c.pub(ACTION, { fail: 'no such mailbox' }).getResult(), 'the failure'), (error) => {
    assert.ok(error instanceof TaskFailed);
    assert.equal(error.reason, 'error');
    assert.equal(error.detail, 'ValueError: no such mailbox');
    return true;
  });
  assert.equal(await within(c.pub(ACTION, { fail: 'again' }).getResult('fallback'), 'the fallback'), 'fallback');
});

test('a cancel from JS reaches the Python handler', OPTIONS, async () => {
  const started = signal();
  const handle = caller().pub(ACTION, { hang: true }).on('update', started.resolve);
  await within(started.promise, 'the Python handler starts');
  await within(handle.cancel(), 'the cancel');
  await assert.rejects(within(handle.getResult(), 'the result'), { reason: 'cancelled', detail: `cancelled by ${CALLER}` });
  // The pytest side asserts that the Python handler saw asyncio.CancelledError.
});
