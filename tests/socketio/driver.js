// A socket.io-client driven by commands, for tests in other languages that
// need a Socket.IO peer. It reads one JSON command per line on stdin and
// writes one JSON line per event on stdout, so the caller does the waiting
// and the assertions.
//
// Commands:
//   {"cmd": "connect", "id": ID, "url": URL, "options": {...}}
//       opens a socket with socket.io-client options (transports, auth,
//       extraHeaders, ...) and `forceNew: true`
//   {"cmd": "emit", "id": ID, "event": NAME, "data": VALUE, "ack": SEQ}
//       emits NAME with VALUE (no argument when "data" is absent) and, when
//       "ack" is given, an acknowledgement callback
//   {"cmd": "status", "id": ID}
//       reports whether the socket is connected and whether it will
//       reconnect by itself
//   {"cmd": "close", "id": ID}
//       disconnects the socket as a client does
// Output lines, each with the socket's "id":
//   {"event": NAME, "data": VALUE}             a server event
//   {"event": "$connect", "transport": T}      connected (again)
//   {"event": "$disconnect", "reason": R}      socket.io-client's reason text
//   {"event": "$connect_error", "message": M}
//   {"event": "$ack", "seq": SEQ, "data": V}   the acknowledgement's first value
//   {"event": "$status", "connected": B, "active": B, "transport": T}
//   {"event": "$error", "message": M}          a command that failed
// The driver exits when stdin closes, or after NEXUS_DRIVER_MAX_MS
// (default 600000) so that it never outlives its caller for long.

'use strict';

const readline = require('node:readline');
const { io } = require('socket.io-client');

const sockets = new Map();

function output(id, line) {
  process.stdout.write(`${JSON.stringify({ id, ...line })}\n`);
}

function transportOf(socket) {
  const engine = socket.io.engine;
  return engine && engine.transport ? engine.transport.name : null;
}

function connect(id, url, options) {
  if (sockets.has(id)) sockets.get(id).disconnect();
  const socket = io(url, { forceNew: true, reconnectionDelay: 200, reconnectionDelayMax: 1000, ...options });
  sockets.set(id, socket);
  socket.onAny((event, data) => output(id, { event, data: data === undefined ? null : data }));
  socket.on('connect', () => output(id, { event: '$connect', transport: transportOf(socket) }));
  socket.on('disconnect', (reason) => output(id, { event: '$disconnect', reason }));
  socket.on('connect_error', (error) => output(id, { event: '$connect_error', message: error.message }));
}

function handle(command) {
  const { cmd, id } = command;
  if (cmd === 'connect') {
    connect(id, command.url, command.options || {});
    return;
  }
  const socket = sockets.get(id);
  if (!socket) {
    output(id, { event: '$error', message: `no socket with id ${id}; send connect first` });
    return;
  }
  if (cmd === 'emit') {
    const args = 'data' in command ? [command.data] : [];
    if (command.ack !== undefined) {
      args.push((data) => output(id, { event: '$ack', seq: command.ack, data: data === undefined ? null : data }));
    }
    socket.emit(command.event, ...args);
  } else if (cmd === 'status') {
    output(id, { event: '$status', connected: socket.connected, active: socket.active, transport: transportOf(socket) });
  } else if (cmd === 'close') {
    socket.disconnect();
  } else {
    output(id, { event: '$error', message: `unknown command ${JSON.stringify(cmd)}` });
  }
}

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  if (!line.trim()) return;
  let command;
  try {
    command = JSON.parse(line);
  } catch (error) {
    output(null, { event: '$error', message: `command is not JSON: ${error.message}` });
    return;
  }
  handle(command);
});
lines.on('close', () => {
  for (const socket of sockets.values()) socket.disconnect();
  // Let the disconnect packets go out before exiting.
  setTimeout(() => process.exit(0), 200);
});

const maxLifetimeMs = Number(process.env.NEXUS_DRIVER_MAX_MS || 600000);
setTimeout(() => {
  process.stderr.write(`driver.js stopped after NEXUS_DRIVER_MAX_MS=${maxLifetimeMs} ms\n`);
  process.exit(3);
}, maxLifetimeMs).unref();
