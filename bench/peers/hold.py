#!/usr/bin/env python3
"""Holds N subscribers on one fan-out server (peer contract) and checks one round of delivery: P
processes each open N/P plain-socket subscribers from their own source address (127.0.2.K, so
neither the 20,000-fd cap nor one address's ports get in the way), then one publisher sends
MESSAGES messages of 100 B and every subscriber must receive each one. Standard library only; a
stand-in for the load generator's fanout scenario for hand checks (e.g. the floor at 100k).

Usage: hold.py PORT N [--procs P] [--messages K]
"""
import argparse
import multiprocessing as mp
import os
import selectors
import socket
import struct
import time

REQ = (b"GET /sub?room=hold HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
FRAME = 2 + 100  # a 100-byte binary frame: 2-byte header


def child(port, n, k, messages, ready, results):
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.2.{k + 1}", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(REQ)
        socks.append(s)
    upgraded = []
    for s in socks:
        head = b""
        try:
            while b"\r\n\r\n" not in head and (chunk := s.recv(4096)):
                head += chunk
        except OSError:
            pass
        if head.startswith(b"HTTP/1.1 101"):
            s.setblocking(False)
            upgraded.append(s)
    socks = upgraded
    ready.wait()
    want = messages * FRAME
    got = {s.fileno(): 0 for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    done, deadline = 0, time.time() + 60
    while done < n and time.time() < deadline:
        for key, _ in sel.select(1):
            data = key.fileobj.recv(65536)
            fd = key.fileobj.fileno()
            got[fd] += len(data)
            if got[fd] >= want or not data:
                sel.unregister(key.fileobj)
                done += 1
    results.put((n, sum(1 for v in got.values() if v == want), sum(got.values())))
    for s in socks:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--messages", type=int, default=10)
    a = ap.parse_args()
    ready = mp.Barrier(a.procs + 1)
    results = mp.Queue()
    per = [a.n // a.procs + (1 if i < a.n % a.procs else 0) for i in range(a.procs)]
    t0 = time.time()
    procs = [mp.Process(target=child, args=(a.port, per[k], k, a.messages, ready, results)) for k in range(a.procs)]
    for p in procs:
        p.start()
    ready.wait(timeout=600)
    print(f"{a.n:,} subscribers connected and upgraded in {time.time() - t0:.1f} s")
    pub = socket.create_connection(("127.0.0.1", a.port))
    pub.sendall(REQ.replace(b"/sub", b"/pub"))
    assert pub.recv(4096).startswith(b"HTTP/1.1 101")
    time.sleep(0.2)
    for i in range(a.messages):
        payload = (b"%08d" % i) * 12 + b"abcd"
        pub.sendall(struct.pack("!BB", 0x82, 0x80 | len(payload)) + b"\0\0\0\0" + payload)
    t1 = time.time()
    held = complete = total = 0
    for _ in procs:
        n, ok, b = results.get(timeout=120)
        held, complete, total = held + n, complete + ok, total + b
    print(f"{complete:,} of {held:,} subscribers got all {a.messages} messages "
          f"({total / FRAME:,.0f} frames) within {time.time() - t1:.1f} s")
    for p in procs:
        p.join()
    raise SystemExit(0 if complete == held == a.n else 1)


if __name__ == "__main__":
    main()
