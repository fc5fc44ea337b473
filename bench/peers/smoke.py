"""Checks one fan-out server against the peer contract (bench/peers/README.md), by hand, with the
`websockets` client: SUBS subscribers of one room and one of another room, one publisher; each
message published reaches every subscriber of its room exactly once, in order, as one binary
frame with exactly that payload, and nothing reaches the other room.

Usage: smoke.py PORT [--nchan] [--subs N]    (exit 0 = pass)
"""
import argparse
import asyncio
import os
import sys

import websockets

SIZES = [1, 100, 125, 126, 1000, 65535, 65536, 100]  # every header length, and back


def url(port, nchan, role, room):
    return f"ws://127.0.0.1:{port}/{role}/{room}" if nchan else f"ws://127.0.0.1:{port}/{role}?room={room}"


async def expect(ws, payloads, who):
    for i, want in enumerate(payloads):
        try:
            got = await asyncio.wait_for(ws.recv(), 5)
        except asyncio.TimeoutError:
            raise AssertionError(f"{who}: message {i} ({len(want)} B) never arrived")
        if isinstance(got, str):
            raise AssertionError(f"{who}: message {i} came as a text frame")
        if got != want:
            raise AssertionError(f"{who}: message {i}: got {len(got)} B, wanted {len(want)} B (or other bytes)")
    await nothing_more(ws, who)


async def nothing_more(ws, who):
    try:
        extra = await asyncio.wait_for(ws.recv(), 0.3)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"{who}: an extra frame of {len(extra)} B")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--nchan", action="store_true")
    ap.add_argument("--subs", type=int, default=5)
    a = ap.parse_args()
    room = f"smoke{os.getpid()}"
    connect = lambda role, r: websockets.connect(url(a.port, a.nchan, role, r), max_size=None, compression=None)
    subs = [await connect("sub", room) for _ in range(a.subs)]
    other = await connect("sub", room + "x")
    pub = await connect("pub", room)
    # Subscriptions may settle asynchronously (Nchan: across worker processes).
    await asyncio.sleep(0.5)
    payloads = [os.urandom(n) for n in SIZES]
    for p in payloads:
        await pub.send(p)
    await asyncio.gather(*(expect(s, payloads, f"subscriber {i}") for i, s in enumerate(subs)))
    await nothing_more(other, "subscriber of another room")
    for ws in subs + [other, pub]:
        await ws.close()
    print(f"pass: {a.subs} subscribers got {len(payloads)} messages ({min(SIZES)}-{max(SIZES)} B) each, exactly; other room got none")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except AssertionError as e:
        print(f"FAIL: {e}")
        sys.exit(1)
    except Exception as e:  # connection refused, handshake refused, ...
        print(f"FAIL: {type(e).__name__}: {e}")
        sys.exit(1)
