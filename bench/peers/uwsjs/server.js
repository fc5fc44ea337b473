// uWebSockets.js broadcast peer for bench/fanout.sh (the peer contract in bench/peers/README.md).
// From npm `uwebsockets` (uWebSockets.js's prebuilt binaries, repackaged; the package's
// `source_commit` names the uWebSockets.js commit).
//
// GET /sub?room=R subscribes, GET /pub?room=R publishes: every binary message a publisher sends
// goes to every subscriber of R as one binary frame with that payload.
//
// Broadcast path: uWS topics — a subscriber subscribes to topic R, a publisher's message is
// `app.publish(R, msg, true)`. uWS frames it once per topic and queues it to each subscriber,
// packing queued messages into one write. Queue/drop policy, the library's own: a socket whose
// buffered amount exceeds maxBackpressure is skipped by publish (the message is dropped for it,
// silently) unless closeOnBackpressureLimit; the default limit is 64 KiB, raised here to
// MAX_BACKPRESSURE so a subscriber that is briefly behind queues instead of losing messages.
// Idle timeout and automatic pings are off (subscribers never send). Single-threaded.
//
// TLS: with CERT and KEY (PEM files) in the environment the app is an `SSLApp` on that pair
// (bench/tls_fanout.sh runs it beside barrage's wss on the same certificate).
// COMPRESSION=shared: permessage-deflate with uWS's `SHARED_COMPRESSOR` (one compressor for all
// sockets, no context takeover), and publishes compressed (bench/deflate.sh). uWS's publish
// sends to each subscriber with `ws->send(message, opCode, compress)`, so a published message
// is compressed once per subscriber, not once per topic (src/App.h, uWebSockets v20).
//
// Run: PORT=8080 node server.js   (or: node server.js 8080)
'use strict';
const uWS = require('uwebsockets');

const port = Number(process.argv[2] || process.env.PORT || 8080);
const MAX_BACKPRESSURE = 16 * 1024 * 1024;

const tls = process.env.CERT && process.env.KEY;
const shared = process.env.COMPRESSION === 'shared';
const app = tls ? uWS.SSLApp({ cert_file_name: process.env.CERT, key_file_name: process.env.KEY }) : uWS.App();
app.ws('/*', {
  compression: shared ? uWS.SHARED_COMPRESSOR : uWS.DISABLED,
  maxPayloadLength: 1 << 20,
  maxBackpressure: MAX_BACKPRESSURE,
  idleTimeout: 0,
  sendPingsAutomatically: false,
  upgrade: (res, req, context) => {
    const role = req.getUrl();
    const room = new URLSearchParams(req.getQuery() || '').get('room');
    if (room === null || (role !== '/sub' && role !== '/pub')) {
      res.writeStatus('404 Not Found').end();
      return;
    }
    res.upgrade(
      { role, room },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  },
  open: (ws) => {
    const { role, room } = ws.getUserData();
    if (role === '/sub') ws.subscribe(room);
  },
  message: (ws, message, isBinary) => {
    const { role, room } = ws.getUserData();
    if (role === '/pub' && isBinary) app.publish(room, message, true, shared);
  },
});
app.any('/*', (res) => res.writeStatus('404 Not Found').end());
app.listen('127.0.0.1', port, (token) => {
  if (!token) {
    console.error(`uWebSockets.js peer: cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
  console.error(`uWebSockets.js peer on ${tls ? 'wss' : 'ws'}://127.0.0.1:${port}, 1 thread`);
});
