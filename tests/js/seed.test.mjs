// The TaskHub seed README's client example (../shared/seeds/000_*.txt, "Client"), run with
// taskhub.js against a live hub: a worker program and a caller program, each with the
// seed's own lines. Adapted only for the URL, name and key (and the comma the seed forgot
// after `name: 'mailer'`); the lines marked `// test:` are the test's.
//
// Reads TASKHUB_URL, and TASKHUB_WORKER_NAME/_KEY (may subscribe to mail:send-bulk) and
// TASKHUB_CALLER_NAME/_KEY (may publish it).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import WebSocket from 'ws';

import { Client } from '../../taskhub/static/taskhub/taskhub.js';
import { TIMEOUT, env, within } from './helpers.mjs';

globalThis.WebSocket ??= WebSocket; // test: what Node 22 and browsers have built in

const url = env('TASKHUB_URL');

/** The seed's worker, as its own program. */
function worker() {
  const client = new Client(url, {
    name: env('TASKHUB_WORKER_NAME'), // unique name
    key: env('TASKHUB_WORKER_KEY'),
  });
  client.sub('mail:send-bulk', async (task) => {
    // Tell the hub this service will begin work on this task, so that it knows to wait.
    // Otherwise, the hub will assume a task is complete when all listening services has seen it, or timedout. (The timeout is short.)
    task.pickup();

    // Get payload (async because it could be large)
    const data = await task.getPayload();

    // Update the caller on current progress
    task.update(data);

    // Triggers when another service updates the task
    task.on('update', () => {});

    // When another service returns and thereby completes the task globally.
    task.on('success', () => {});

    // Done and the data is sent to the caller/publisher.
    return data;

    // This service has completed but doesn't want to return a result to pub.
    task.drop();
  });
  return client; // test: to close it
}

/** The seed's "Calling" lines, as another program with the caller's credential. */
async function caller(emails, valueIfError, seen) {
  const client = new Client(url, {
    name: env('TASKHUB_CALLER_NAME'), // unique name
    key: env('TASKHUB_CALLER_KEY'),
  });

  // Calling
  try {
    let result = await client.pub('mail:send-bulk', emails).getResult();
    seen.first = result; // test
  } catch(err) { seen.error = err; /* test */ }

  // Call it with value if error, to avoid the exceptions, and wait 30 min
  let result = await client.pub('mail:send-bulk', emails, 1000 * 60 * 30 /* 30 min */)
    .getResult(valueIfError);
  seen.second = result; // test

  // Call it with progress updates
  let finalResult = await client.pub('mail:send-bulk', emails)
    .on('update', (tmpResult) => { /* something */ seen.updates.push(tmpResult); /* test */ })
    .getResult(valueIfError);
  seen.final = finalResult; // test

  await client.close(); // test
}

test('the seed README client example runs as written', { timeout: 60 * TIMEOUT }, async () => {
  const emails = ['a@example.org', 'b@example.org'];
  const seen = { updates: [] };
  const client = worker();
  try {
    await within(caller(emails, 'valueIfError', seen), 'the seed caller', 20 * TIMEOUT);
  } finally {
    await client.close();
  }
  assert.equal(seen.error, undefined);
  assert.deepEqual(seen.first, emails);
  assert.deepEqual(seen.second, emails);
  assert.deepEqual(seen.final, emails);
  assert.deepEqual(seen.updates, [emails]); // the worker's task.update(data), heard by the caller
});
