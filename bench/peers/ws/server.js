// Node `ws` broadcast peer for bench/fanout.sh (the peer contract in bench/peers/README.md).
//
// GET /sub?room=R subscribes, GET /pub?room=R publishes: every binary message a publisher sends
// goes to every subscriber of R as one binary frame with that payload.
//
// Broadcast path: the one ws documents — iterate the room's clients and `send` to each (ws
// frames the message per client). Queue/drop policy, the library's own: none; `send` never
// drops, a client that falls behind buffers without bound in its socket (`bufferedAmount`).
// Single-threaded (one Node event loop).
//
// Run: PORT=8080 node server.js   (or: node server.js 8080)
'use strict';
const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || process.env.PORT || 8080);
const rooms = new Map(); // room name -> Set of subscriber sockets

function members(name) {
  let set = rooms.get(name);
  if (!set) {
    set = new Set();
    rooms.set(name, set);
  }
  return set;
}

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, clientTracking: false });
const server = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://x');
  const room = url.searchParams.get('room');
  const role = url.pathname;
  if (room === null || (role !== '/sub' && role !== '/pub')) {
    socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    socket.setNoDelay(true);
    if (role === '/sub') {
      const set = members(room);
      set.add(ws);
      ws.on('close', () => set.delete(ws));
    } else {
      ws.on('message', (data, isBinary) => {
        if (!isBinary) return;
        for (const client of members(room)) {
          if (client.readyState === WebSocket.OPEN) client.send(data, { binary: true });
        }
      });
    }
    ws.on('error', () => {});
  });
});

server.listen({ host: '127.0.0.1', port, backlog: 65535 }, () => {
  console.error(`ws peer on 127.0.0.1:${port}, 1 thread (Node event loop)`);
});
