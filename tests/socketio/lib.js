// Helpers shared by the Socket.IO check scripts: HS256 tokens, a recording
// client around socket.io-client with bounded waits, and plain HTTP
// requests.

'use strict';

const crypto = require('node:crypto');
const http = require('node:http');
const { io } = require('socket.io-client');

// Encodes a string or buffer as unpadded base64url, as JWTs need.
function base64url(value) {
  return Buffer.from(value).toString('base64url');
}

// Signs `claims` as a JWT with HMAC (`HS256` or `HS512`) and `secret`.
function signToken(claims, secret, algorithm = 'HS256') {
  const digest = { HS256: 'sha256', HS512: 'sha512' }[algorithm];
  if (!digest) throw new Error(`unsupported JWT algorithm ${algorithm}`);
  const header = base64url(JSON.stringify({ alg: algorithm, typ: 'JWT' }));
  const payload = base64url(JSON.stringify(claims));
  const signature = crypto.createHmac(digest, secret).update(`${header}.${payload}`).digest('base64url');
  return `${header}.${payload}.${signature}`;
}

// Returns an unsigned token with header `{"alg": "none"}`.
function unsignedToken(claims) {
  const header = base64url(JSON.stringify({ alg: 'none', typ: 'JWT' }));
  return `${header}.${base64url(JSON.stringify(claims))}.`;
}

function nowSeconds() {
  return Math.floor(Date.now() / 1000);
}

// Resolves after `ms` milliseconds.
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Rejects with `message` when `promise` has not settled within `ms`.
function withTimeout(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${message} (timed out after ${ms} ms)`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Formats a value for a failure message, cut to a readable length.
function show(value) {
  let text;
  try {
    text = JSON.stringify(value);
  } catch {
    text = String(value);
  }
  if (text === undefined) text = String(value);
  return text.length > 300 ? `${text.slice(0, 300)}...` : text;
}

// Options of one transport mode, as a browser application would pass them.
const TRANSPORT_MODES = {
  // socket.io-client's default: long-polling first, then the upgrade to
  // WebSocket.
  upgrade: {},
  websocket: { transports: ['websocket'] },
  // Long-polling for the whole session, as behind a proxy without WebSocket.
  polling: { transports: ['polling'], upgrade: false },
};

// A socket.io-client socket that records every server event, so a check can
// wait for one event while others arrive, and report what it saw when a
// wait fails.
class Peer {
  constructor(label, url, options) {
    this.label = label;
    this.url = url;
    this.events = [];        // events not yet consumed by next()
    this.history = [];       // short descriptions of recent events
    this.waiters = [];
    this.disconnects = [];   // disconnect reasons, in order
    this.connects = 0;
    this.openTransports = []; // the transport of each Engine.IO open, in order
    this.pings = 0;

    this.socket = io(url, {
      forceNew: true,
      reconnectionDelay: 200,
      reconnectionDelayMax: 1000,
      ...options,
    });
    this.socket.onAny((name, data) => this.record(name, data));

    this.socket.on('connect', () => {
      this.connects += 1;
      this.note(`(connect ${this.socket.id} over ${this.transportName()})`);
      this.wake();
    });
    this.socket.on('disconnect', (reason) => {
      this.disconnects.push(reason);
      this.note(`(disconnect: ${reason})`);
      this.wake();
    });
    this.socket.on('connect_error', (error) => {
      this.lastConnectError = error;
      this.note(`(connect_error: ${error.message})`);
      this.wake();
    });

    // The Socket.IO connect may come after the upgrade, so the first
    // transport is taken when the Engine.IO session opens.
    this.socket.io.on('open', () => {
      this.openTransports.push(this.transportName());
    });
    // The manager emits 'ping' for every Engine.IO ping the server sends.
    this.socket.io.on('ping', () => {
      this.pings += 1;
    });
  }

  // Opens a socket and waits until it is connected. Rejects with the
  // connect error when the connection fails.
  static async connect(label, url, options, timeoutMs) {
    const peer = new Peer(label, url, options);
    try {
      await peer.waitConnected(timeoutMs);
    } catch (error) {
      peer.close();
      throw error;
    }
    return peer;
  }

  record(name, data) {
    this.events.push({ name, data });
    this.note(`${name} ${show(data)}`);
    this.wake();
  }

  note(text) {
    this.history.push(text);
    if (this.history.length > 30) this.history.shift();
  }

  wake() {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  // Resolves at the next recorded event, connect or disconnect, or after
  // `ms`.
  changed(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.waiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  transportName() {
    const engine = this.socket.io.engine;
    return engine && engine.transport ? engine.transport.name : '(none)';
  }

  historyText() {
    return this.history.length ? this.history.map((line) => `    ${line}`).join('\n') : '    (nothing received)';
  }

  fail(message) {
    throw new Error(`${this.label}: ${message}; last received:\n${this.historyText()}`);
  }

  async waitConnected(timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (!this.socket.connected) {
      if (this.lastConnectError && !this.socket.active) {
        this.fail(`connection rejected: ${this.lastConnectError.message}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) this.fail(`not connected to ${this.url} within ${timeoutMs} ms`);
      await this.changed(left);
    }
  }

  // Waits for a `connect_error` and returns it; fails if the socket
  // connects instead.
  async connectError(timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (!this.lastConnectError) {
      if (this.socket.connected) this.fail('connected, but the connection was expected to be rejected');
      const left = deadline - Date.now();
      if (left <= 0) this.fail(`no connect_error within ${timeoutMs} ms`);
      await this.changed(left);
    }
    return this.lastConnectError;
  }

  // Waits for the next event `name` whose data satisfies `match`, removes
  // it from the buffer and returns its data.
  async next(name, timeoutMs, match = () => true) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = this.events.findIndex((event) => event.name === name && match(event.data));
      if (index >= 0) return this.events.splice(index, 1)[0].data;
      const left = deadline - Date.now();
      if (left <= 0) this.fail(`no ${name} within ${timeoutMs} ms`);
      await this.changed(left);
    }
  }

  // Waits for the next event whose name is in `names` and returns it as
  // `{name, data}`.
  async nextOf(names, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const index = this.events.findIndex((event) => names.includes(event.name));
      if (index >= 0) return this.events.splice(index, 1)[0];
      const left = deadline - Date.now();
      if (left <= 0) this.fail(`none of ${names.join(', ')} within ${timeoutMs} ms`);
      await this.changed(left);
    }
  }

  // Listens for `ms` and fails if an event `name` matching `match` arrives
  // or is already buffered.
  async expectNone(name, ms, match = () => true) {
    const deadline = Date.now() + ms;
    for (;;) {
      const found = this.events.find((event) => event.name === name && match(event.data));
      if (found) this.fail(`unexpected ${name} ${show(found.data)}`);
      const left = deadline - Date.now();
      if (left <= 0) return;
      await this.changed(left);
    }
  }

  // Returns and removes every buffered event named `name`.
  drain(name) {
    const removed = this.events.filter((event) => event.name === name).map((event) => event.data);
    this.events = this.events.filter((event) => event.name !== name);
    return removed;
  }

  // Waits until the socket has disconnected `count` times in all and
  // returns the last reason.
  async disconnected(timeoutMs, count = 1) {
    const deadline = Date.now() + timeoutMs;
    while (this.disconnects.length < count) {
      const left = deadline - Date.now();
      if (left <= 0) this.fail(`still connected after ${timeoutMs} ms`);
      await this.changed(left);
    }
    return this.disconnects[count - 1];
  }

  // Waits until the socket has connected `count` times in all.
  async connectedTimes(count, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (this.connects < count || !this.socket.connected) {
      const left = deadline - Date.now();
      if (left <= 0) this.fail(`connected ${this.connects} times, expected ${count}, within ${timeoutMs} ms`);
      await this.changed(left);
    }
  }

  emit(name, ...args) {
    this.socket.emit(name, ...args);
  }

  // Emits with an acknowledgement callback and returns the server's
  // acknowledgement arguments' first value.
  async ack(timeoutMs, name, ...args) {
    try {
      return await this.socket.timeout(timeoutMs).emitWithAck(name, ...args);
    } catch (error) {
      this.fail(`no acknowledgement of ${name} within ${timeoutMs} ms (${error.message})`);
    }
    return undefined;
  }

  // Sends `authenticate {userId, token}` and returns the
  // `CONNECTION_SUCCESS` data, failing on an `ERROR` reply.
  async authenticate(userId, token, timeoutMs, extra = {}) {
    this.emit('authenticate', { userId, token, ...extra });
    const reply = await this.nextOf(['CONNECTION_SUCCESS', 'ERROR'], timeoutMs);
    if (reply.name === 'ERROR') this.fail(`authenticate as ${userId} failed: ${show(reply.data)}`);
    if (reply.data.userId !== userId) this.fail(`CONNECTION_SUCCESS names another user: ${show(reply.data)}`);
    this.userId = userId;
    return reply.data;
  }

  close() {
    this.socket.disconnect();
  }
}

// Sends one HTTP request without a proxy and returns `{status, headers,
// body}`.
function httpRequest(url, { method = 'GET', headers = {}, body, timeoutMs = 5000 } = {}) {
  return new Promise((resolve, reject) => {
    const request = http.request(url, { method, headers, timeout: timeoutMs }, (response) => {
      const chunks = [];
      response.on('data', (chunk) => chunks.push(chunk));
      response.on('end', () => resolve({
        status: response.statusCode,
        headers: response.headers,
        body: Buffer.concat(chunks).toString('utf8'),
      }));
      response.on('error', reject);
    });
    request.on('timeout', () => request.destroy(new Error(`${method} ${url} timed out after ${timeoutMs} ms`)));
    request.on('error', reject);
    if (body !== undefined) request.write(body);
    request.end();
  });
}

module.exports = {
  Peer,
  TRANSPORT_MODES,
  httpRequest,
  nowSeconds,
  show,
  signToken,
  sleep,
  unsignedToken,
  withTimeout,
};
