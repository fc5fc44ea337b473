#!/usr/bin/env python3
"""Opens N real WebSocket connections (handshakes done) from 127.0.K.x and prints the kernel slab
growth per loopback pair. Usage: hold_sockets.py PORT N K (K picks fresh source addresses)."""
import socket, sys, time, os
port, n = int(sys.argv[1]), int(sys.argv[2])
def slab():
    for l in open('/proc/meminfo'):
        if l.startswith('Slab:'): return int(l.split()[1]) * 1024
req = b"GET /ws?room=r%d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
time.sleep(0.5); s0 = slab(); socks = []
for i in range(n):
    s = socket.socket(); s.bind(("127.0.%d.%d" % (int(sys.argv[3]), 1 + i // 20000), 0)); s.connect(("127.0.0.1", port)); s.sendall(req % (i % 10)); socks.append(s)
for s in socks:
    data = b""
    while b"\r\n\r\n" not in data: data += s.recv(4096)
time.sleep(2); s1 = slab()
print("%d conns: slab +%.0f B per pair" % (n, (s1 - s0) / n))
