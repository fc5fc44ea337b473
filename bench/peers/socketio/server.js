// Socket.IO peer for bench/cluster.sh: one of several processes that share rooms through Redis
// with @socket.io/redis-adapter (the deployment Socket.IO documents for more than one node).
//
// Subscribers: GET /socket.io/?EIO=4&transport=websocket&room=R (a plain Socket.IO v4 client
// over WebSocket; the server joins it to room R on connect). Publishers: a raw WebSocket on
// GET /pub?room=R; every binary message is `io.to(R).emit("m", text)`, where text is "#" + the
// message's 24-byte header in hex + its filler, so the adapter carries it to every process and
// each process encodes the packet once and writes it to its members of R (one text frame
// `42["m","#..."]` each). Pings are every 10 minutes (runs are shorter), compression off.
//
// Run: PORT=8080 REDIS_URL=redis://127.0.0.1:6379 node server.js   (NO_REDIS=1: one process alone)
'use strict';
const http = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || process.env.PORT || 8080);
const redisUrl = process.env.REDIS_URL || 'redis://127.0.0.1:6379';

async function main() {
  // NO_REDIS=1: one process alone, Socket.IO's in-memory adapter.
  let adapter;
  if (!process.env.NO_REDIS) {
    const pub = createClient({ url: redisUrl });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    adapter = createAdapter(pub, sub);
  }
  const server = http.createServer((req, res) => {
    res.writeHead(404).end();
  });
  const io = new Server(server, {
    transports: ['websocket'],
    pingInterval: 600000,
    pingTimeout: 600000,
    perMessageDeflate: false,
    httpCompression: false,
    maxHttpBufferSize: 1 << 20,
    ...(adapter ? { adapter } : {}),
  });
  io.on('connection', (socket) => {
    const room = socket.handshake.query.room;
    if (typeof room === 'string') socket.join(room);
  });
  // Publishers: raw WebSockets on /pub, outside Socket.IO (the publisher is the business side).
  const publishers = new WebSocketServer({ noServer: true, perMessageDeflate: false });
  server.on('upgrade', (req, socket, head) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname !== '/pub') return; // Socket.IO's engine handles /socket.io/
    const room = url.searchParams.get('room');
    publishers.handleUpgrade(req, socket, head, (ws) => {
      ws.on('message', (data, isBinary) => {
        if (!isBinary || data.length < 24) return;
        const text = '#' + data.subarray(0, 24).toString('hex') + data.subarray(24).toString('latin1');
        io.to(room).emit('m', text);
      });
    });
  });
  server.listen(port, '127.0.0.1', () => {
    console.error(`socket.io peer on 127.0.0.1:${port} (${adapter ? 'redis adapter ' + redisUrl : 'alone'}), 1 thread`);
  });
}

main().catch((e) => {
  console.error(`socket.io peer: ${e.stack || e}`);
  process.exit(1);
});
