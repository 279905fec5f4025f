// A taskhub.js worker program, for a Python caller (tests/e2e/test_js_client.py): it prints
// "ready" once subscribed, one JSON line per aborted task, and "closed" after a bye once
// its standard input ends.
//
// Its handler takes {steps} and updates {step: i} with progress i/steps, then returns
// {done, by: 'javascript', publisher}; {fail: text} throws Error(text); {hang: true}
// updates {hanging: true} and waits for task.signal; {big: text} returns its length.
//
// Reads TASKHUB_URL, TASKHUB_ACTION and TASKHUB_WORKER_NAME/_KEY.

import WebSocket from 'ws';

import { Client } from '../../taskhub/static/taskhub/taskhub.js';
import { env } from './helpers.mjs';

const client = new Client(env('TASKHUB_URL'), { name: env('TASKHUB_WORKER_NAME'), key: env('TASKHUB_WORKER_KEY'), WebSocket, logger: {} });

client.sub(env('TASKHUB_ACTION'), async (task) => {
  task.pickup();
  const job = await task.getPayload();
  if (job.fail) throw new Error(job.fail);
  if (job.hang) {
    task.update({ hanging: true });
    await new Promise((resolve) => task.signal.addEventListener('abort', resolve));
    console.log(JSON.stringify({ aborted: task.id, name: task.signal.reason.name, detail: task.signal.reason.detail }));
    return 'never sent';
  }
  if (job.big) return { length: job.big.length, inline: task.payloadSize <= 16384 };
  for (let i = 1; i <= job.steps; i += 1) task.update({ step: i }, i / job.steps);
  return { done: job.steps, by: 'javascript', publisher: task.publisher };
});

await client.connect();
console.log('ready');
process.stdin.resume();
process.stdin.on('end', async () => {
  await client.close();
  console.log('closed');
});
