// Checks a Nexus Chat server's Socket.IO endpoint with the real
// socket.io-client, used the way the old gateway's front end uses it:
// `authenticate` and the chat events by name, `socket.on` for every server
// event, plus the `auth` option and acknowledgement callbacks. It prints one
// line per check and a closing `N passed, N failed` line, and exits 1 when
// any check fails.
//
// Checks in the group `legacy` assert only what clients of the old gateway
// rely on, so they also run against that gateway. Checks in the group
// `nexus` assert the rest of Nexus Chat's contract.
//
// Environment:
//   NEXUS_URLS            comma-separated base URLs, e.g. http://127.0.0.1:3000.
//                         With two, checks that involve two connections put
//                         them on different instances.
//   JWT_SECRET            the servers' HS256 secret; the checks mint a token
//                         for each fresh user they use.
//   NEXUS_ORIGIN          an origin in the servers' FRONTEND_URLS (required
//                         by the origin checks).
//   NEXUS_FOREIGN_ORIGIN  an origin outside it (default http://foreign-origin.invalid).
//   NEXUS_TRANSPORTS      modes to run the per-connection checks in, from
//                         upgrade (polling, then WebSocket), websocket and
//                         polling (default: all three).
//   NEXUS_CHECKS          comma-separated groups or check names to run
//                         (default: all).
//   NEXUS_EXCLUDE_CHECKS  comma-separated check names not to run.
//   NEXUS_USER_PREFIX     prefix of the user ids (default: random per run).
// The checks must know these server settings. The defaults, in
// parentheses, are the protocol's unless noted:
//   NEXUS_MESSAGE_RATE_LIMIT (100), NEXUS_MESSAGE_BLOCK_S (60),
//   NEXUS_TYPING_RATE_LIMIT (60), NEXUS_ONLINE_USERS_RATE_LIMIT (20),
//   NEXUS_TYPING_TIMEOUT_MS (5000), NEXUS_AUTH_TIMEOUT_MS (10000),
//   NEXUS_INACTIVITY_TIMEOUT_MS (0, not the protocol's, so the heartbeat
//   check does not stay idle past it),
//   NEXUS_MAX_EVENTS_PER_SECOND (20), NEXUS_MAX_CONTENT_BYTES (4096),
//   NEXUS_PRESENCE_REACH (partners or broadcast, default partners).
// Bounds: NEXUS_EVENT_TIMEOUT_MS (5000) per expected event, NEXUS_CHECK_TIMEOUT_MS
// (60000) per check, NEXUS_DEADLINE_MS (900000) for the whole run.

'use strict';

const crypto = require('node:crypto');
const assert = require('node:assert/strict');
const {
  Peer, TRANSPORT_MODES, httpRequest, nowSeconds, show, signToken, sleep, unsignedToken, withTimeout,
} = require('./lib');

// ---- configuration ----

function integerSetting(name, fallback) {
  const text = process.env[name];
  if (text === undefined || text === '') return fallback;
  const value = Number(text);
  if (!Number.isInteger(value) || value < 0) {
    console.error(`${name}=${text} is invalid: expected a non-negative integer`);
    process.exit(2);
  }
  return value;
}

function readConfig() {
  const urls = (process.env.NEXUS_URLS || '').split(',').map((url) => url.trim()).filter(Boolean);
  if (urls.length === 0) {
    console.error('NEXUS_URLS is missing: set it to the server base URL(s), e.g. http://127.0.0.1:3000');
    process.exit(2);
  }
  const secret = process.env.JWT_SECRET || '';
  if (!secret) {
    console.error('JWT_SECRET is missing: the checks mint tokens for fresh users with it');
    process.exit(2);
  }
  const modes = (process.env.NEXUS_TRANSPORTS || 'upgrade,websocket,polling').split(',').map((mode) => mode.trim());
  for (const mode of modes) {
    if (!TRANSPORT_MODES[mode]) {
      console.error(`NEXUS_TRANSPORTS contains unknown mode ${mode}: expected upgrade, websocket or polling`);
      process.exit(2);
    }
  }
  const reach = process.env.NEXUS_PRESENCE_REACH || 'partners';
  if (reach !== 'partners' && reach !== 'broadcast') {
    console.error(`NEXUS_PRESENCE_REACH=${reach} is invalid: expected partners or broadcast`);
    process.exit(2);
  }
  return {
    urls,
    secret,
    origin: process.env.NEXUS_ORIGIN || '',
    foreignOrigin: process.env.NEXUS_FOREIGN_ORIGIN || 'http://foreign-origin.invalid',
    modes,
    only: (process.env.NEXUS_CHECKS || '').split(',').map((item) => item.trim()).filter(Boolean),
    excluded: (process.env.NEXUS_EXCLUDE_CHECKS || '').split(',').map((item) => item.trim()).filter(Boolean),
    userPrefix: process.env.NEXUS_USER_PREFIX ?? `sio${crypto.randomBytes(3).toString('hex')}`,
    messageRateLimit: integerSetting('NEXUS_MESSAGE_RATE_LIMIT', 100),
    messageBlockS: integerSetting('NEXUS_MESSAGE_BLOCK_S', 60),
    typingRateLimit: integerSetting('NEXUS_TYPING_RATE_LIMIT', 60),
    onlineUsersRateLimit: integerSetting('NEXUS_ONLINE_USERS_RATE_LIMIT', 20),
    typingTimeoutMs: integerSetting('NEXUS_TYPING_TIMEOUT_MS', 5000),
    authTimeoutMs: integerSetting('NEXUS_AUTH_TIMEOUT_MS', 10000),
    inactivityTimeoutMs: integerSetting('NEXUS_INACTIVITY_TIMEOUT_MS', 0),
    maxEventsPerSecond: integerSetting('NEXUS_MAX_EVENTS_PER_SECOND', 20),
    maxContentBytes: integerSetting('NEXUS_MAX_CONTENT_BYTES', 4096),
    presenceReach: reach,
    eventTimeoutMs: integerSetting('NEXUS_EVENT_TIMEOUT_MS', 5000),
    checkTimeoutMs: integerSetting('NEXUS_CHECK_TIMEOUT_MS', 60000),
    deadlineMs: integerSetting('NEXUS_DEADLINE_MS', 900000),
    quietMs: 700,
  };
}

const config = readConfig();
const WAIT = config.eventTimeoutMs;
const QUIET = config.quietMs;

// ---- check context ----

// What one check runs with: its transport mode, fresh user ids, tokens and
// the sockets it opened, which are closed when the check ends.
class Context {
  constructor(mode, checkIndex) {
    this.mode = mode;
    this.options = mode ? TRANSPORT_MODES[mode] : {};
    this.prefix = `${config.userPrefix}-${mode || 'http'}-${checkIndex}`;
    this.peers = [];
  }

  // Returns the base URL of instance `index` (the only one when one URL
  // was given).
  url(index = 0) {
    return config.urls[index % config.urls.length];
  }

  // Returns a user id unique to this check and run.
  user(name) {
    return `${this.prefix}-${name}`;
  }

  token(userId, lifetimeS = 3600) {
    return signToken({ sub: userId, exp: nowSeconds() + lifetimeS, iat: nowSeconds() }, config.secret);
  }

  // Opens a socket to instance `index` without authenticating.
  open(label, index = 0, options = {}) {
    const peer = new Peer(`${label}@${index % config.urls.length}`, this.url(index), { ...this.options, ...options });
    this.peers.push(peer);
    return peer;
  }

  async connect(label, index = 0, options = {}) {
    const peer = this.open(label, index, options);
    await peer.waitConnected(WAIT * 2);
    return peer;
  }

  // Connects to instance `index` and authenticates as `userId` with the
  // `authenticate` event, as the old front end does.
  async login(userId, index = 0, options = {}) {
    const peer = await this.connect(userId.slice(this.prefix.length + 1), index, options);
    await peer.authenticate(userId, this.token(userId), WAIT);
    return peer;
  }

  closeAll() {
    for (const peer of this.peers) peer.close();
  }
}

// ---- assertions ----

function field(data, name, type) {
  assert.notEqual(data, null, `expected an object with field ${name}, got null`);
  assert.equal(typeof data, 'object', `expected an object with field ${name}, got ${show(data)}`);
  assert.equal(typeof data[name], type, `field ${name} of ${show(data)} is not a ${type}`);
  return data[name];
}

function assertMessageId(data, name) {
  const id = field(data, name, 'string');
  assert.match(id, /^[0-9]{20}$/, `${name} ${id} is not a 20-digit message id`);
  return id;
}

function assertCreatedAt(data) {
  const text = field(data, 'createdAt', 'string');
  assert.match(text, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, `createdAt ${text} is not RFC 3339 UTC with milliseconds`);
  const skew = Math.abs(Date.parse(text) - Date.now());
  assert.ok(skew < 600000, `createdAt ${text} is ${skew} ms away from this machine's clock`);
  return text;
}

function assertError(data, code, event) {
  assert.equal(field(data, 'code', 'string'), code, `expected ERROR code ${code}, got ${show(data)}`);
  assert.equal(data.event, event, `ERROR names event ${show(data.event)}, expected ${event}: ${show(data)}`);
  assert.equal(typeof data.message, 'string', `ERROR without a message text: ${show(data)}`);
  assert.ok(data.message.length > 0, `ERROR with an empty message text: ${show(data)}`);
}

function assertRateLimited(data, maxRetryAfter) {
  assert.ok(field(data, 'error', 'string').length > 0, `empty error text in ${show(data)}`);
  const retryAfter = field(data, 'retryAfter', 'number');
  assert.ok(Number.isInteger(retryAfter), `retryAfter ${retryAfter} is not whole seconds`);
  assert.ok(retryAfter >= 1, `retryAfter ${retryAfter} is below 1 s`);
  assert.ok(retryAfter <= maxRetryAfter, `retryAfter ${retryAfter} is above ${maxRetryAfter} s`);
}

const isFrom = (userId) => (data) => data && data.userId === userId;
const presenceOf = (userId, status) => (data) => data && data.userId === userId && data.status === status;
const typingOf = (userId, isTyping) => (data) => data && data.userId === userId && data.isTyping === isTyping;
const withContent = (content) => (data) => data && data.content === content;

// Sends a message and waits for the sender's MESSAGE_SENT and the
// receiver's NEW_MESSAGE. Returns both data.
async function exchange(sender, receiver, content) {
  sender.emit('NEW_MESSAGE', { receiverId: receiver.userId, content });
  const sent = await sender.next('MESSAGE_SENT', WAIT);
  const delivered = await receiver.next('NEW_MESSAGE', WAIT, withContent(content));
  assert.equal(delivered.messageId, sent.messageId, `MESSAGE_SENT ${show(sent)} and NEW_MESSAGE ${show(delivered)} differ`);
  return { sent, delivered };
}

// Sends one message and returns the reply: `MESSAGE_SENT` or
// `RATE_LIMIT_EXCEEDED`, as `{name, data}`.
async function sendAndClassify(sender, receiverId, content) {
  sender.emit('NEW_MESSAGE', { receiverId, content });
  const reply = await sender.nextOf(['MESSAGE_SENT', 'RATE_LIMIT_EXCEEDED', 'ERROR'], WAIT);
  if (reply.name === 'ERROR') sender.fail(`NEW_MESSAGE ${content} got ERROR ${show(reply.data)}`);
  return reply;
}

// Fetches an Engine.IO v4 polling handshake and returns its open packet.
async function engineHandshake(url, headers = {}) {
  const response = await httpRequest(`${url}/socket.io/?EIO=4&transport=polling`, { headers });
  assert.equal(response.status, 200, `handshake status ${response.status}: ${response.body}`);
  assert.ok(response.body.startsWith('0{'), `handshake body is not an Engine.IO open packet: ${response.body}`);
  return { response, open: JSON.parse(response.body.slice(1)) };
}

// ---- checks ----

const checks = [];

// Registers a check. `perTransport` checks run once in every transport
// mode; the others run once.
function check(name, groups, run, { perTransport = true } = {}) {
  checks.push({ name, groups, run, perTransport });
}

check('transport mode is used', ['legacy'], async (ctx) => {
  const peer = await ctx.connect('alice');
  if (ctx.mode === 'upgrade') {
    assert.equal(peer.openTransports[0], 'polling', 'the default mode did not start with long-polling');
    const deadline = Date.now() + WAIT;
    while (peer.transportName() !== 'websocket' && Date.now() < deadline) await sleep(50);
    assert.equal(peer.transportName(), 'websocket', 'the polling connection was not upgraded to WebSocket');
  } else {
    await sleep(QUIET);
    assert.equal(peer.transportName(), ctx.mode);
  }
  peer.emit('HEALTH_CHECK');
  const health = await peer.next('HEALTH_STATUS', WAIT);
  assert.equal(health.status, 'ok', show(health));
});

check('HEALTH_CHECK answers before authentication', ['legacy'], async (ctx) => {
  const peer = await ctx.connect('anon');
  peer.emit('HEALTH_CHECK');
  const status = await peer.next('HEALTH_STATUS', WAIT);
  assert.equal(status.status, 'ok');
  const timestamp = field(status, 'timestamp', 'number');
  assert.ok(Math.abs(timestamp - Date.now()) < 60000, `timestamp ${timestamp} is not milliseconds near now`);
});

check('HEALTH_STATUS names the instance', ['nexus'], async (ctx) => {
  const peer = await ctx.connect('anon');
  peer.emit('HEALTH_CHECK');
  const status = await peer.next('HEALTH_STATUS', WAIT);
  assert.ok(field(status, 'instanceId', 'string').length > 0, `empty instanceId in ${show(status)}`);
});

check('authenticate event succeeds', ['legacy'], async (ctx) => {
  const alice = ctx.user('alice');
  const peer = await ctx.connect('alice');
  const success = await peer.authenticate(alice, ctx.token(alice), WAIT);
  assert.equal(success.userId, alice);
  peer.emit('HEALTH_CHECK');
  await peer.next('HEALTH_STATUS', WAIT);
});

check('CONNECTION_SUCCESS fields', ['nexus'], async (ctx) => {
  const alice = ctx.user('alice');
  const exp = nowSeconds() + 1800;
  const peer = await ctx.connect('alice');
  const success = await peer.authenticate(alice, signToken({ sub: alice, exp }, config.secret), WAIT);
  assert.ok(field(success, 'connectionId', 'string').length > 0, 'empty connectionId');
  assert.ok(field(success, 'instanceId', 'string').length > 0, 'empty instanceId');
  const expiresAt = Date.parse(field(success, 'expiresAt', 'string'));
  assert.ok(Math.abs(expiresAt / 1000 - exp) <= 1, `expiresAt ${success.expiresAt} is not the token's exp ${exp}`);
});

check('auth option token authenticates', ['nexus'], async (ctx) => {
  const alice = ctx.user('alice');
  const peer = ctx.open('alice', 0, { auth: { token: ctx.token(alice) } });
  const success = await peer.next('CONNECTION_SUCCESS', WAIT * 2);
  assert.equal(success.userId, alice);
  peer.userId = alice;
  const bob = await ctx.login(ctx.user('bob'), 1);
  await exchange(bob, peer, 'to the auth option socket');
});

check('token query parameter authenticates', ['nexus'], async (ctx) => {
  const alice = ctx.user('alice');
  const peer = ctx.open('alice', 0, { query: { token: ctx.token(alice) } });
  const success = await peer.next('CONNECTION_SUCCESS', WAIT * 2);
  assert.equal(success.userId, alice);
});

check('Authorization header authenticates', ['nexus'], async (ctx) => {
  const alice = ctx.user('alice');
  const peer = ctx.open('alice', 0, { extraHeaders: { Authorization: `Bearer ${ctx.token(alice)}` } });
  const success = await peer.next('CONNECTION_SUCCESS', WAIT * 2);
  assert.equal(success.userId, alice);
});

check('invalid tokens rejected and disconnected', ['legacy'], async (ctx) => {
  const alice = ctx.user('alice');
  const exp = nowSeconds() + 3600;
  const cases = {
    forged: signToken({ sub: alice, exp }, `${config.secret}-but-not-the-real-one`),
    expired: signToken({ sub: alice, exp: nowSeconds() - 3600 }, config.secret),
    'alg none': unsignedToken({ sub: alice, exp }),
    HS512: signToken({ sub: alice, exp }, config.secret, 'HS512'),
    'subject is another user': ctx.token(ctx.user('mallory')),
    'not a JWT': 'not-a-token',
  };
  for (const [kind, token] of Object.entries(cases)) {
    const peer = await ctx.connect(`alice-${kind}`);
    peer.emit('authenticate', { userId: alice, token });
    const error = await peer.next('ERROR', WAIT);
    assert.equal(error.code, 'UNAUTHORIZED', `${kind} token: ${show(error)}`);
    assert.equal(error.event, 'authenticate', `${kind} token: ${show(error)}`);
    const reason = await peer.disconnected(WAIT);
    assert.equal(reason, 'io server disconnect', `${kind} token: disconnect reason`);
    assert.equal(peer.drain('CONNECTION_SUCCESS').length, 0, `${kind} token got CONNECTION_SUCCESS`);
  }
});

check('auth option with an invalid token rejected', ['nexus'], async (ctx) => {
  const alice = ctx.user('alice');
  const forged = signToken({ sub: alice, exp: nowSeconds() + 3600 }, `${config.secret}-forged`);
  const peer = ctx.open('alice', 0, { auth: { token: forged } });
  const error = await peer.next('ERROR', WAIT * 2);
  assertError(error, 'UNAUTHORIZED', 'authenticate');
  assert.equal(await peer.disconnected(WAIT), 'io server disconnect');
  assert.equal(peer.drain('CONNECTION_SUCCESS').length, 0, 'a forged token got CONNECTION_SUCCESS');
});

check('NEW_MESSAGE before authenticate rejected', ['legacy'], async (ctx) => {
  const bob = await ctx.login(ctx.user('bob'), 1);
  const peer = await ctx.connect('anon');
  peer.emit('NEW_MESSAGE', { receiverId: bob.userId, content: 'anonymous' });
  const error = await peer.next('ERROR', WAIT);
  assert.equal(error.code, 'UNAUTHENTICATED', show(error));
  assert.equal(error.event, 'NEW_MESSAGE', show(error));
  await bob.expectNone('NEW_MESSAGE', QUIET);
});

check('other events before authenticate rejected', ['nexus'], async (ctx) => {
  const bob = ctx.user('bob');
  const peer = await ctx.connect('anon');
  const events = [
    ['NEW_MESSAGE', { receiverId: bob, content: 'x' }],
    ['TYPING_START', { receiverId: bob }],
    ['TYPING_STOP', { receiverId: bob }],
    ['GET_ONLINE_USERS'],
  ];
  for (const [name, ...args] of events) {
    peer.emit(name, ...args);
    assertError(await peer.next('ERROR', WAIT), 'UNAUTHENTICATED', name);
  }
  assert.equal(peer.drain('ONLINE_USERS').length, 0, 'GET_ONLINE_USERS was answered before authentication');
  peer.emit('HEALTH_CHECK');
  await peer.next('HEALTH_STATUS', WAIT);
});

check('authentication timeout disconnects', ['nexus'], async (ctx) => {
  const peer = await ctx.connect('idle');
  const started = Date.now();
  const reason = await peer.disconnected(config.authTimeoutMs + WAIT);
  const elapsed = Date.now() - started;
  assert.equal(reason, 'io server disconnect');
  assert.ok(elapsed >= config.authTimeoutMs - 1000, `disconnected after ${elapsed} ms, before the ${config.authTimeoutMs} ms timeout`);
  assert.equal(peer.socket.active, false, 'the client reconnects after a server disconnect');
});

check('token expiry disconnects and renewal keeps the socket', ['nexus'], async (ctx) => {
  const alice = ctx.user('alice');
  const bob = ctx.user('bob');
  const expiring = await ctx.connect('alice');
  await expiring.authenticate(alice, ctx.token(alice, 2), WAIT);
  const renewed = await ctx.connect('bob', 1);
  await renewed.authenticate(bob, ctx.token(bob, 2), WAIT);
  await renewed.authenticate(bob, ctx.token(bob, 3600), WAIT);

  assert.equal(await expiring.disconnected(4000 + WAIT), 'io server disconnect');
  await sleep(QUIET);
  assert.equal(renewed.disconnects.length, 0, `the renewed socket was disconnected: ${renewed.disconnects}`);
  renewed.emit('HEALTH_CHECK');
  await renewed.next('HEALTH_STATUS', WAIT);
});

check('renewal as another user rejected', ['nexus'], async (ctx) => {
  const alice = ctx.user('alice');
  const mallory = ctx.user('mallory');
  const peer = await ctx.login(alice);
  peer.emit('authenticate', { userId: mallory, token: ctx.token(mallory) });
  assertError(await peer.next('ERROR', WAIT), 'UNAUTHORIZED', 'authenticate');
  await sleep(QUIET);
  assert.equal(peer.disconnects.length, 0, 'a rejected renewal disconnected the socket');
  const bob = await ctx.login(ctx.user('bob'), 1);
  const { delivered } = await exchange(peer, bob, 'still alice');
  assert.equal(delivered.senderId, alice, `the sender changed: ${show(delivered)}`);
});

check('chat in both directions', ['legacy'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);

  const first = await exchange(alice, bob, 'hello bob');
  assert.ok(field(first.sent, 'messageId', 'string').length > 0, 'empty messageId');
  assert.equal(first.delivered.senderId, alice.userId);
  assert.equal(first.delivered.receiverId, bob.userId);
  assert.equal(first.delivered.content, 'hello bob');
  const createdAt = field(first.delivered, 'createdAt', 'string');
  assert.ok(!Number.isNaN(Date.parse(createdAt)), `createdAt ${createdAt} is not a date`);
  await alice.expectNone('NEW_MESSAGE', QUIET);

  const reply = await exchange(bob, alice, 'hi alice, ünïcødé ✓ 🚀');
  assert.equal(reply.delivered.senderId, bob.userId);
  assert.equal(reply.delivered.receiverId, alice.userId);
  assert.equal(reply.delivered.content, 'hi alice, ünïcødé ✓ 🚀');
  await bob.expectNone('NEW_MESSAGE', QUIET);
});

check('message ids and timestamps', ['nexus'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  alice.emit('NEW_MESSAGE', { receiverId: bob.userId, content: 'first', clientMessageId: 'c-1' });
  const sent = await alice.next('MESSAGE_SENT', WAIT);
  const firstId = assertMessageId(sent, 'messageId');
  assert.equal(sent.clientMessageId, 'c-1');
  const sentAt = assertCreatedAt(sent);
  const delivered = await bob.next('NEW_MESSAGE', WAIT);
  assert.equal(assertMessageId(delivered, 'messageId'), firstId);
  assert.equal(assertCreatedAt(delivered), sentAt);

  const second = await exchange(alice, bob, 'second');
  const secondId = assertMessageId(second.sent, 'messageId');
  assert.ok(secondId > firstId, `ids ${firstId} then ${secondId} do not sort in creation order`);
  assert.ok(second.sent.clientMessageId === undefined || second.sent.clientMessageId === null,
    `MESSAGE_SENT has a clientMessageId that was never sent: ${show(second.sent)}`);
});

check('messages arrive in order', ['nexus'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  // Stay within the message rate limit, which counts every message.
  const count = Math.min(20, config.messageRateLimit);
  for (let index = 0; index < count; index += 1) {
    alice.emit('NEW_MESSAGE', { receiverId: bob.userId, content: `ordered ${index}` });
  }
  for (let index = 0; index < count; index += 1) {
    const delivered = await bob.next('NEW_MESSAGE', WAIT);
    assert.equal(delivered.content, `ordered ${index}`, `message ${index} out of order`);
  }
  for (let index = 0; index < count; index += 1) await alice.next('MESSAGE_SENT', WAIT);
});

check('clientMessageId repeat delivered once', ['legacy'], async (ctx) => {
  const bob = await ctx.login(ctx.user('bob'), 1);
  const alice = await ctx.login(ctx.user('alice'), 0);
  alice.emit('NEW_MESSAGE', { receiverId: bob.userId, content: 'original', clientMessageId: 'retry-1' });
  const first = await alice.next('MESSAGE_SENT', WAIT);
  await bob.next('NEW_MESSAGE', WAIT, withContent('original'));

  // The retry comes from a new connection on the other instance, with
  // other content, as a client that lost its connection would send it.
  alice.close();
  const again = await ctx.login(alice.userId, 1);
  again.emit('NEW_MESSAGE', { receiverId: bob.userId, content: 'changed', clientMessageId: 'retry-1' });
  const repeat = await again.next('MESSAGE_SENT', WAIT);
  assert.equal(repeat.messageId, first.messageId, `the repeat got another messageId: ${show(repeat)}`);
  assert.equal(repeat.clientMessageId, 'retry-1');
  await bob.expectNone('NEW_MESSAGE', QUIET);
});

check('offline messages delivered on connect', ['nexus'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = ctx.user('bob');
  const ids = [];
  for (let index = 0; index < 3; index += 1) {
    alice.emit('NEW_MESSAGE', { receiverId: bob, content: `while away ${index}` });
    ids.push((await alice.next('MESSAGE_SENT', WAIT)).messageId);
  }
  const peer = await ctx.login(bob, 1);
  for (let index = 0; index < ids.length; index += 1) {
    const delivered = await peer.next('NEW_MESSAGE', WAIT);
    assert.equal(delivered.messageId, ids[index], `message ${index} out of order`);
    assert.equal(delivered.content, `while away ${index}`);
  }
  peer.close();

  const later = await ctx.connect('bob-again', 1);
  await later.authenticate(bob, ctx.token(bob), WAIT, { lastMessageId: ids[1] });
  const delivered = await later.next('NEW_MESSAGE', WAIT);
  assert.equal(delivered.messageId, ids[2], 'lastMessageId did not skip the earlier messages');
  await later.expectNone('NEW_MESSAGE', QUIET);
});

check('acknowledgements carry the first reply', ['nexus'], async (ctx) => {
  const alice = await ctx.connect('alice');
  const aliceId = ctx.user('alice');
  const bob = await ctx.login(ctx.user('bob'), 1);

  const health = await alice.ack(WAIT, 'HEALTH_CHECK');
  assert.equal(health && health.status, 'ok', `HEALTH_CHECK ack ${show(health)}`);
  await alice.next('HEALTH_STATUS', WAIT);

  const unauthenticated = await alice.ack(WAIT, 'NEW_MESSAGE', { receiverId: bob.userId, content: 'x' });
  assertError(unauthenticated, 'UNAUTHENTICATED', 'NEW_MESSAGE');
  await alice.next('ERROR', WAIT);

  const success = await alice.ack(WAIT, 'authenticate', { userId: aliceId, token: ctx.token(aliceId) });
  assert.equal(success && success.userId, aliceId, `authenticate ack ${show(success)}`);
  await alice.next('CONNECTION_SUCCESS', WAIT);
  alice.userId = aliceId;

  const sent = await alice.ack(WAIT, 'NEW_MESSAGE', { receiverId: bob.userId, content: 'acked', clientMessageId: 'a-1' });
  assertMessageId(sent, 'messageId');
  assert.equal(sent.clientMessageId, 'a-1');
  const event = await alice.next('MESSAGE_SENT', WAIT);
  assert.deepEqual(event, sent, 'the MESSAGE_SENT event and the acknowledgement differ');
  await bob.next('NEW_MESSAGE', WAIT, withContent('acked'));

  const typing = await alice.ack(WAIT, 'TYPING_START', { receiverId: bob.userId });
  assert.equal(typing, null, `TYPING_START has no reply to the sender, but the ack carried ${show(typing)}`);
  await bob.next('USER_TYPING', WAIT, typingOf(aliceId, true));

  const online = await alice.ack(WAIT, 'GET_ONLINE_USERS');
  assert.ok(Array.isArray(online), `GET_ONLINE_USERS ack is not an array: ${show(online)}`);
  assert.ok(online.includes(aliceId), `GET_ONLINE_USERS ack lacks ${aliceId}: ${show(online)}`);
  await alice.next('ONLINE_USERS', WAIT);

  const invalid = await alice.ack(WAIT, 'NEW_MESSAGE', { receiverId: bob.userId });
  assertError(invalid, 'VALIDATION_ERROR', 'NEW_MESSAGE');
  await alice.next('ERROR', WAIT);

  const unknown = await alice.ack(WAIT, 'NO_SUCH_EVENT', {});
  assertError(unknown, 'UNKNOWN_EVENT', 'NO_SUCH_EVENT');
  await alice.next('ERROR', WAIT);
});

check('typing start and stop', ['legacy'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  alice.emit('TYPING_START', { receiverId: bob.userId });
  const started = await bob.next('USER_TYPING', WAIT, isFrom(alice.userId));
  assert.equal(started.isTyping, true, show(started));
  alice.emit('TYPING_STOP', { receiverId: bob.userId });
  const stopped = await bob.next('USER_TYPING', WAIT, isFrom(alice.userId));
  assert.equal(stopped.isTyping, false, show(stopped));
  await alice.expectNone('USER_TYPING', QUIET);
});

check('typing clears after the timeout', ['legacy'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  alice.emit('TYPING_START', { receiverId: bob.userId });
  await bob.next('USER_TYPING', WAIT, typingOf(alice.userId, true));
  const started = Date.now();
  await bob.next('USER_TYPING', config.typingTimeoutMs + WAIT, typingOf(alice.userId, false));
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= config.typingTimeoutMs - 500, `cleared after ${elapsed} ms, before the ${config.typingTimeoutMs} ms timeout`);
});

check('typing cleared by a message and by disconnect', ['nexus'], async (ctx) => {
  // Wait for the clear for half the typing timeout at most, so that the
  // timeout itself cannot pass for the clear being checked.
  const clearWait = Math.min(WAIT, Math.floor(config.typingTimeoutMs / 2));
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  alice.emit('TYPING_START', { receiverId: bob.userId });
  await bob.next('USER_TYPING', WAIT, typingOf(alice.userId, true));
  alice.emit('NEW_MESSAGE', { receiverId: bob.userId, content: 'done typing' });
  await bob.next('NEW_MESSAGE', WAIT, withContent('done typing'));
  await bob.next('USER_TYPING', clearWait, typingOf(alice.userId, false));

  alice.emit('TYPING_START', { receiverId: bob.userId });
  await bob.next('USER_TYPING', WAIT, typingOf(alice.userId, true));
  alice.close();
  await bob.next('USER_TYPING', clearWait, typingOf(alice.userId, false));
});

check('presence updates reach a partner', ['legacy'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  await exchange(alice, bob, 'now we are partners');
  bob.close();
  await alice.next('USER_PRESENCE_UPDATE', WAIT, presenceOf(bob.userId, 'offline'));
  await ctx.login(bob.userId, 1);
  await alice.next('USER_PRESENCE_UPDATE', WAIT, presenceOf(bob.userId, 'online'));
});

check('presence reach', ['nexus'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const carol = await ctx.login(ctx.user('carol'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  await exchange(alice, bob, 'partners');
  bob.close();
  await alice.next('USER_PRESENCE_UPDATE', WAIT, presenceOf(bob.userId, 'offline'));
  if (config.presenceReach === 'partners') {
    await carol.expectNone('USER_PRESENCE_UPDATE', QUIET, isFrom(bob.userId));
  } else {
    await carol.next('USER_PRESENCE_UPDATE', WAIT, presenceOf(bob.userId, 'offline'));
  }
});

check('GET_ONLINE_USERS lists online users', ['legacy'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  alice.emit('GET_ONLINE_USERS');
  const online = await alice.next('ONLINE_USERS', WAIT);
  assert.ok(Array.isArray(online), `ONLINE_USERS data is not an array: ${show(online)}`);
  assert.ok(online.every((id) => typeof id === 'string'), `ONLINE_USERS has non-string ids: ${show(online)}`);
  assert.ok(online.includes(alice.userId), `${alice.userId} missing from ${show(online)}`);
  assert.ok(online.includes(bob.userId), `${bob.userId} missing from ${show(online)}`);

  await exchange(alice, bob, 'partners');
  bob.close();
  await alice.next('USER_PRESENCE_UPDATE', WAIT, presenceOf(bob.userId, 'offline'));
  alice.emit('GET_ONLINE_USERS');
  const after = await alice.next('ONLINE_USERS', WAIT);
  assert.ok(!after.includes(bob.userId), `${bob.userId} is offline but listed: ${show(after)}`);
  assert.ok(after.includes(alice.userId), `${alice.userId} missing from ${show(after)}`);
});

check('newer connection replaces the older one', ['legacy'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const oldBob = await ctx.login(ctx.user('bob'), 0);
  await exchange(alice, oldBob, 'partners first');

  const newBob = await ctx.login(oldBob.userId, 1);
  assert.equal(await oldBob.disconnected(WAIT), 'io server disconnect');
  await alice.expectNone('USER_PRESENCE_UPDATE', QUIET, presenceOf(oldBob.userId, 'offline'));
  assert.equal(oldBob.socket.active, false, 'the replaced socket reconnects');

  await exchange(alice, newBob, 'to the new connection');
  await exchange(newBob, alice, 'from the new connection');
  assert.equal(oldBob.drain('NEW_MESSAGE').length, 0, 'the replaced socket received a message');

  newBob.close();
  await alice.next('USER_PRESENCE_UPDATE', WAIT, presenceOf(oldBob.userId, 'offline'));
});

check('message rate limit and block', ['legacy'], async (ctx) => {
  const limit = config.messageRateLimit;
  const bob = await ctx.login(ctx.user('bob'), 1);
  let alice = await ctx.login(ctx.user('alice'), 0);
  const half = Math.floor(limit / 2);
  for (let index = 0; index < limit; index += 1) {
    // The count is per user, so it carries over to a new connection on the
    // other instance.
    if (index === half) {
      alice.close();
      alice = await ctx.login(alice.userId, 1);
    }
    const reply = await sendAndClassify(alice, bob.userId, `m${index}`);
    assert.equal(reply.name, 'MESSAGE_SENT', `message ${index} of ${limit}: ${show(reply.data)}`);
  }
  const over = await sendAndClassify(alice, bob.userId, 'over the limit');
  assert.equal(over.name, 'RATE_LIMIT_EXCEEDED', `message ${limit + 1} was accepted: ${show(over.data)}`);
  assertRateLimited(over.data, config.messageBlockS);
  const blocked = await sendAndClassify(alice, bob.userId, 'while blocked');
  assert.equal(blocked.name, 'RATE_LIMIT_EXCEEDED', `a blocked user's message was accepted: ${show(blocked.data)}`);

  for (let index = 0; index < limit; index += 1) {
    await bob.next('NEW_MESSAGE', WAIT, withContent(`m${index}`));
  }
  await bob.expectNone('NEW_MESSAGE', QUIET);
});

check('RATE_LIMIT_EXCEEDED names the event', ['nexus'], async (ctx) => {
  const kinds = [
    ['NEW_MESSAGE', config.messageRateLimit, (peer, receiver, index) => ({ receiverId: receiver, content: `r${index}` })],
    ['TYPING_START', config.typingRateLimit, (peer, receiver) => ({ receiverId: receiver })],
    ['GET_ONLINE_USERS', config.onlineUsersRateLimit, () => undefined],
  ];
  const bob = await ctx.login(ctx.user('bob'), 1);
  for (const [name, limit, data] of kinds) {
    const peer = await ctx.login(ctx.user(`alice-${name}`), 0);
    for (let index = 0; index < limit; index += 1) {
      const payload = data(peer, bob.userId, index);
      if (payload === undefined) peer.emit(name);
      else peer.emit(name, payload);
    }
    await sleep(QUIET);
    assert.equal(peer.drain('RATE_LIMIT_EXCEEDED').length, 0, `${name} was limited before ${limit} events`);
    const payload = data(peer, bob.userId, limit);
    if (payload === undefined) peer.emit(name);
    else peer.emit(name, payload);
    const limited = await peer.next('RATE_LIMIT_EXCEEDED', WAIT);
    assertRateLimited(limited, 3600);
    assert.equal(limited.event, name, `RATE_LIMIT_EXCEEDED names ${show(limited.event)}: ${show(limited)}`);
  }
});

// Emits `count` HEALTH_CHECK events at once, each with an acknowledgement
// callback, and returns how the acknowledgements ended.
async function healthCheckBurst(peer, count) {
  const outcome = { ok: 0, rateLimited: 0, otherErrors: [], unanswered: 0 };
  const acks = [];
  for (let index = 0; index < count; index += 1) {
    const ack = peer.socket.timeout(WAIT * 2).emitWithAck('HEALTH_CHECK').then((data) => {
      if (data && data.status === 'ok') outcome.ok += 1;
      else if (data && data.code === 'RATE_LIMITED') outcome.rateLimited += 1;
      else outcome.otherErrors.push(data);
    }, () => {
      outcome.unanswered += 1;
    });
    acks.push(ack);
  }
  await Promise.all(acks);
  return outcome;
}

check('frame rate limit', ['nexus'], async (ctx) => {
  const peer = await ctx.login(ctx.user('alice'), 0);
  // Bursts may reach twice the per-second rate, so four times it cannot all
  // pass within the moment it takes to send them.
  const burst = config.maxEventsPerSecond * 4;
  const outcome = await healthCheckBurst(peer, burst);
  assert.ok(outcome.rateLimited >= 1, `no RATE_LIMITED among ${burst} events: ${show(outcome)}`);
  assert.ok(outcome.ok >= 1, `none of ${burst} events was handled: ${show(outcome)}`);
  assert.deepEqual(outcome.otherErrors, [], 'unexpected replies');
  // The budget refills once the client slows down.
  await sleep(1500);
  peer.drain('HEALTH_STATUS');
  const health = await peer.ack(WAIT, 'HEALTH_CHECK');
  assert.equal(health && health.status, 'ok', `HEALTH_CHECK after the burst: ${show(health)}`);
});

check('every event of a burst is answered', ['nexus'], async (ctx) => {
  const peer = await ctx.login(ctx.user('alice'), 0);
  // Large enough to overflow the host's queue of events waiting for a
  // session, not only the per-second budget.
  const burst = Math.max(config.maxEventsPerSecond * 4, 1000);
  const outcome = await healthCheckBurst(peer, burst);
  await sleep(QUIET);
  const statuses = peer.drain('HEALTH_STATUS').length;
  const errors = peer.drain('ERROR');
  assert.equal(outcome.unanswered, 0,
    `${outcome.unanswered} of ${burst} acknowledgements were never answered: ${show(outcome)}`);
  assert.equal(statuses + errors.length, burst,
    `${burst} events got ${statuses} HEALTH_STATUS and ${errors.length} ERROR events`);
  const unnamed = errors.filter((error) => error.event !== 'HEALTH_CHECK');
  assert.deepEqual(unnamed.slice(0, 1), [], `${unnamed.length} ERROR events do not name the rejected event HEALTH_CHECK`);
});

check('unknown and reserved events rejected', ['nexus'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  for (const name of ['NO_SUCH_EVENT', 'new_message', '$connected', '$disconnected']) {
    alice.emit(name, { userId: ctx.user('victim') });
    assertError(await alice.next('ERROR', WAIT), 'UNKNOWN_EVENT', name);
  }
  alice.emit('HEALTH_CHECK');
  await alice.next('HEALTH_STATUS', WAIT);
});

check('invalid NEW_MESSAGE gets an ERROR', ['legacy'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  const payloads = [{ receiverId: bob.userId }, { receiverId: bob.userId, content: '' }, { content: 'no receiver' }];
  for (const payload of payloads) {
    alice.emit('NEW_MESSAGE', payload);
    const error = await alice.next('ERROR', WAIT);
    assert.equal(error.event, 'NEW_MESSAGE', `${show(payload)}: ${show(error)}`);
    assert.equal(typeof error.code, 'string', `${show(payload)}: ${show(error)}`);
  }
  await bob.expectNone('NEW_MESSAGE', QUIET);
  await exchange(alice, bob, 'still works');
});

check('invalid fields named in VALIDATION_ERROR', ['nexus'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  const long = 'x'.repeat(129);
  const cases = [
    ['NEW_MESSAGE', {}, 'VALIDATION_ERROR', 'receiverId'],
    ['NEW_MESSAGE', { receiverId: bob.userId }, 'VALIDATION_ERROR', 'content'],
    ['NEW_MESSAGE', { receiverId: bob.userId, content: '' }, 'VALIDATION_ERROR', 'content'],
    ['NEW_MESSAGE', { receiverId: bob.userId, content: 42 }, 'VALIDATION_ERROR', 'content'],
    ['NEW_MESSAGE', { receiverId: 7, content: 'x' }, 'VALIDATION_ERROR', 'receiverId'],
    ['NEW_MESSAGE', { receiverId: '', content: 'x' }, 'VALIDATION_ERROR', 'receiverId'],
    ['NEW_MESSAGE', { receiverId: long, content: 'x' }, 'VALIDATION_ERROR', 'receiverId'],
    ['NEW_MESSAGE', { receiverId: alice.userId, content: 'to myself' }, 'VALIDATION_ERROR', 'receiverId'],
    ['NEW_MESSAGE', { receiverId: bob.userId, content: 'x', clientMessageId: long }, 'VALIDATION_ERROR', 'clientMessageId'],
    ['NEW_MESSAGE', { receiverId: bob.userId, content: 'é'.repeat(config.maxContentBytes / 2 + 1) }, 'CONTENT_TOO_LARGE', null],
    ['NEW_MESSAGE', 'not an object', 'VALIDATION_ERROR', null],
    ['NEW_MESSAGE', [bob.userId, 'x'], 'VALIDATION_ERROR', null],
    ['TYPING_START', {}, 'VALIDATION_ERROR', 'receiverId'],
    ['TYPING_STOP', { receiverId: 3 }, 'VALIDATION_ERROR', 'receiverId'],
  ];
  for (const [name, payload, code, fieldName] of cases) {
    alice.emit(name, payload);
    const error = await alice.next('ERROR', WAIT);
    const what = `${name} ${show(payload).slice(0, 80)}`;
    assert.equal(error.code, code, `${what}: ${show(error)}`);
    assert.equal(error.event, name, `${what}: ${show(error)}`);
    if (fieldName) assert.ok(String(error.message).includes(fieldName), `${what}: message does not name ${fieldName}: ${show(error)}`);
  }
  await bob.expectNone('NEW_MESSAGE', QUIET);
  await bob.expectNone('USER_TYPING', 0);
  await exchange(alice, bob, 'valid after the invalid ones');
});

check('binary attachment rejected with a clear error', ['nexus'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bob = await ctx.login(ctx.user('bob'), 1);
  alice.emit('NEW_MESSAGE', { receiverId: bob.userId, content: Buffer.from('binary content') });
  const error = await alice.next('ERROR', WAIT);
  assert.equal(error.event, 'NEW_MESSAGE', show(error));
  // The protocol rejects binary frames with INVALID_FRAME; a field check
  // would have to name the binary field, which is `content`.
  const clear = error.code === 'INVALID_FRAME'
    || (error.code === 'VALIDATION_ERROR' && String(error.message).includes('content'));
  assert.ok(clear, `expected INVALID_FRAME, or VALIDATION_ERROR naming content, got ${show(error)}`);
  await bob.expectNone('NEW_MESSAGE', QUIET);
});

check('Engine.IO heartbeat keeps the socket', ['nexus'], async (ctx) => {
  const { open } = await engineHandshake(ctx.url(0));
  const interval = open.pingInterval;
  const pings = 3;
  const stayMs = Math.max(interval * pings + 500, config.inactivityTimeoutMs + 1500);
  assert.ok(stayMs <= 30000,
    `staying through ${pings} pings every ${interval} ms and the inactivity timeout takes ${stayMs} ms; start the server with a shorter PING_INTERVAL_MS`);
  const alice = await ctx.login(ctx.user('alice'), 0);
  await sleep(stayMs);
  assert.equal(alice.disconnects.length, 0, `disconnected while idle: ${alice.disconnects}`);
  assert.ok(alice.pings >= pings, `${alice.pings} pings in ${stayMs} ms with pingInterval ${interval} ms`);
  alice.emit('HEALTH_CHECK');
  await alice.next('HEALTH_STATUS', WAIT);
});

check('reconnect after a lost transport', ['legacy'], async (ctx) => {
  const aliceId = ctx.user('alice');
  const alice = await ctx.login(aliceId, 0);
  const bob = ctx.open('bob', 1);
  const bobId = ctx.user('bob');
  bob.userId = bobId;
  // The old front end authenticates on every connect, reconnects included.
  bob.socket.on('connect', () => bob.emit('authenticate', { userId: bobId, token: ctx.token(bobId) }));
  await bob.next('CONNECTION_SUCCESS', WAIT * 2);
  await exchange(alice, bob, 'before the loss');

  bob.socket.io.engine.close();
  const reason = await bob.disconnected(WAIT);
  assert.notEqual(reason, 'io server disconnect', 'the server disconnected the socket');
  await bob.connectedTimes(2, WAIT * 2);
  await bob.next('CONNECTION_SUCCESS', WAIT);
  await exchange(alice, bob, 'after the reconnect');
  await exchange(bob, alice, 'reply after the reconnect');
});

check('reconnect with the auth option catches up', ['nexus'], async (ctx) => {
  const alice = await ctx.login(ctx.user('alice'), 0);
  const bobId = ctx.user('bob');
  const bob = ctx.open('bob', 1, { auth: { token: ctx.token(bobId) } });
  bob.userId = bobId;
  await bob.next('CONNECTION_SUCCESS', WAIT * 2);
  await exchange(alice, bob, 'partners');

  // Keep the socket from reconnecting until a message is waiting for it.
  bob.socket.io.reconnectionDelay(1500);
  bob.socket.io.reconnectionDelayMax(1500);
  bob.socket.io.engine.close();
  await bob.disconnected(WAIT);
  await alice.next('USER_PRESENCE_UPDATE', WAIT, presenceOf(bobId, 'offline'));
  alice.emit('NEW_MESSAGE', { receiverId: bobId, content: 'sent while away' });
  await alice.next('MESSAGE_SENT', WAIT);

  await bob.connectedTimes(2, WAIT * 2);
  const again = await bob.next('CONNECTION_SUCCESS', WAIT);
  assert.equal(again.userId, bobId);
  await bob.next('NEW_MESSAGE', WAIT, withContent('sent while away'));
  await alice.next('USER_PRESENCE_UPDATE', WAIT, presenceOf(bobId, 'online'));
});

check('allowed Origin header connects', ['nexus'], async (ctx) => {
  assert.ok(config.origin, 'NEXUS_ORIGIN is missing: set it to an origin in the server\'s FRONTEND_URLS');
  const aliceId = ctx.user('alice');
  const peer = await ctx.connect('alice', 0, { extraHeaders: { Origin: config.origin } });
  await peer.authenticate(aliceId, ctx.token(aliceId), WAIT);
});

check('foreign Origin header rejected', ['nexus'], async (ctx) => {
  const aliceId = ctx.user('alice');
  const peer = ctx.open('alice', 0, {
    extraHeaders: { Origin: config.foreignOrigin },
    auth: { token: ctx.token(aliceId) },
    reconnection: false,
  });
  const error = await peer.connectError(WAIT * 2);
  assert.ok(error, 'no connect_error');
  assert.equal(peer.connects, 0, 'a socket with a foreign origin connected');
  assert.equal(peer.drain('CONNECTION_SUCCESS').length, 0);
});

check('polling CORS headers for an allowed origin', ['nexus'], async (ctx) => {
  assert.ok(config.origin, 'NEXUS_ORIGIN is missing: set it to an origin in the server\'s FRONTEND_URLS');
  const { response } = await engineHandshake(ctx.url(0), { Origin: config.origin });
  assert.equal(response.headers['access-control-allow-origin'], config.origin);
  assert.equal(response.headers['access-control-allow-credentials'], 'true');

  const preflight = await httpRequest(`${ctx.url(0)}/socket.io/?EIO=4&transport=polling`, {
    method: 'OPTIONS',
    headers: {
      Origin: config.origin,
      'Access-Control-Request-Method': 'POST',
      'Access-Control-Request-Headers': 'content-type',
    },
  });
  assert.ok(preflight.status >= 200, `preflight status ${preflight.status}`);
  assert.ok(preflight.status < 300, `preflight status ${preflight.status}`);
  assert.equal(preflight.headers['access-control-allow-origin'], config.origin);
  const methods = String(preflight.headers['access-control-allow-methods'] || '');
  assert.ok(/POST/i.test(methods), `preflight allows methods ${show(methods)}`);
  const headers = String(preflight.headers['access-control-allow-headers'] || '');
  assert.ok(/content-type/i.test(headers), `preflight allows headers ${show(headers)}`);
}, { perTransport: false });

check('polling request from a foreign origin rejected', ['nexus'], async (ctx) => {
  const response = await httpRequest(`${ctx.url(0)}/socket.io/?EIO=4&transport=polling`, {
    headers: { Origin: config.foreignOrigin },
  });
  assert.equal(response.status, 403, `status ${response.status}: ${response.body}`);
  assert.equal(response.headers['access-control-allow-origin'], undefined,
    `a foreign origin got access-control-allow-origin ${response.headers['access-control-allow-origin']}`);
}, { perTransport: false });

check('polling request without Origin allowed', ['legacy'], async (ctx) => {
  const { open } = await engineHandshake(ctx.url(0));
  assert.equal(typeof open.sid, 'string');
  assert.ok(Array.isArray(open.upgrades), `upgrades is not an array: ${show(open.upgrades)}`);
  assert.ok(open.upgrades.includes('websocket'), `upgrades lacks websocket: ${show(open.upgrades)}`);
  assert.equal(typeof open.pingInterval, 'number');
  assert.equal(typeof open.pingTimeout, 'number');
}, { perTransport: false });

// ---- runner ----

function selected(entry) {
  if (config.excluded.includes(entry.name)) return false;
  if (config.only.length === 0) return true;
  return config.only.some((item) => entry.groups.includes(item) || entry.name === item);
}

async function runAll() {
  const runs = [];
  for (const entry of checks.filter(selected)) {
    if (entry.perTransport) {
      for (const mode of config.modes) runs.push({ entry, mode });
    } else {
      runs.push({ entry, mode: null });
    }
  }

  console.log(`checking ${config.urls.join(', ')}: ${runs.length} checks, users prefixed ${config.userPrefix}`);
  let passed = 0;
  let failed = 0;
  for (const [index, { entry, mode }] of runs.entries()) {
    const ctx = new Context(mode, index);
    const label = `[${mode || 'http'}] ${entry.name}`;
    const started = Date.now();
    try {
      await withTimeout(entry.run(ctx), config.checkTimeoutMs, 'check did not finish');
      passed += 1;
      console.log(`ok   ${label} (${Date.now() - started} ms)`);
    } catch (error) {
      failed += 1;
      // node:assert appends a blank line and a diff; keep the lines with text.
      const text = String(error && error.message ? error.message : error);
      const message = text.split('\n').filter((line) => line.trim()).join('\n       ');
      console.log(`FAIL ${label} (${Date.now() - started} ms): ${message}`);
    } finally {
      ctx.closeAll();
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  return failed === 0;
}

const deadline = setTimeout(() => {
  console.log(`FAIL the run passed NEXUS_DEADLINE_MS=${config.deadlineMs} ms; stopping`);
  process.exit(1);
}, config.deadlineMs);
deadline.unref();

runAll().then((ok) => {
  process.exit(ok ? 0 : 1);
}, (error) => {
  console.log(`FAIL the check runner crashed: ${error && error.stack ? error.stack : error}`);
  process.exit(1);
});
