// Shared by the Node tests: the hub's address and credentials from the environment (set by
// tests/e2e/test_js_client.py), waits bounded by one scaled timeout, a fake WebSocket for
// the unit tests and a TCP proxy that can cut a live client's connection.

import net from 'node:net';

/** Seconds every wait may take (tests.conftest.TIMEOUT, scaled by TASKHUB_TEST_SCALE). */
export const TIMEOUT = Number(process.env.TASKHUB_TEST_TIMEOUT || 5) * 1000;

/** An environment variable the pytest wrapper sets; a clear failure when run without it. */
export function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through tests/e2e/test_js_client.py`);
  return value;
}

/** Whether the hub's variables are set (the hub-less unit tests run without them). */
export const LIVE = Boolean(process.env.TASKHUB_URL);

/** `promise`, or a rejection naming `what` after TIMEOUT. */
export function within(promise, what = 'the wait', ms = TIMEOUT) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not happen within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A promise and its resolve, to wait on an event. */
export function signal() {
  let resolve;
  const promise = new Promise((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** A logger that keeps what it is told (and prints nothing). */
export function recorder() {
  const lines = [];
  const keep = (level) => (...args) => lines.push([level, args.map((a) => (a instanceof Error ? `${a.name}: ${a.message}` : String(a))).join(' ')]);
  return { lines, debug: keep('debug'), info: keep('info'), warn: keep('warn'), error: keep('error') };
}

/**
 * A WebSocket that talks to the test instead of a hub: `FakeSocket.last` is the newest,
 * `.sent` holds the frames the client sent (parsed), `.open()`, `.receive(obj)` and
 * `.drop(code)` play the hub's part.
 */
export class FakeSocket {
  static all = [];

  static get last() {
    return FakeSocket.all.at(-1);
  }

  constructor(url) {
    this.url = url;
    this.sent = [];
    this.readyState = 0;
    this.closedWith = null;
    FakeSocket.all.push(this);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error('not open');
    this.sent.push(JSON.parse(text));
  }

  close(code = 1000, reason = '') {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.closedWith = code;
    queueMicrotask(() => this.onclose?.({ code, reason, wasClean: true }));
  }

  // The hub's part.
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  receive(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }

  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: false });
  }

  /** The frames sent of `type`. */
  frames(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

/** Let queued promise callbacks and timers of 0 ms run. */
export function settle() {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/**
 * A TCP proxy in front of the hub: clients connect to `proxy.url`; `hold()` stops passing
 * the hub's bytes to the clients connected now (they pile up), `cut()` closes every
 * connection without a close frame, as a network failure does.
 */
export async function startProxy(hubUrl) {
  const target = new URL(hubUrl);
  const pairs = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    const pair = { client, upstream, held: false };
    pairs.add(pair);
    client.on('data', (data) => upstream.write(data));
    upstream.on('data', (data) => {
      if (!pair.held) client.write(data);
    });
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    url: `ws://127.0.0.1:${port}${target.pathname}`,
    get connections() {
      return pairs.size;
    },
    hold() {
      for (const pair of pairs) pair.held = true;
    },
    cut() {
      for (const pair of [...pairs]) {
        pair.client.resetAndDestroy();
        pair.upstream.destroy();
      }
    },
    close() {
      this.cut();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Wait until `condition()` holds, letting the client's callbacks and timers run; fail after TIMEOUT. */
export async function until(condition, what = 'the condition') {
  const deadline = Date.now() + TIMEOUT;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`${what} did not happen within ${TIMEOUT} ms`);
    await settle();
  }
}
