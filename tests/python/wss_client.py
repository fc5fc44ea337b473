"""Python `websockets` over wss:// against barrage (tests/tls.rs).

Usage: wss_client.py WS_ADDR API_ADDR CA_PEM
Trusting CA_PEM, wss://WS_ADDR/ws?room=r: welcome, then a block published through the API. With
the default trust store (which does not hold the test's certificate) the handshake must fail.
"""
import asyncio
import base64
import json
import ssl
import sys
import urllib.request

import websockets

WS, API, CA = sys.argv[1:4]
HOST, PORT = WS.rsplit(":", 1)


def publish(room, text):
    req = urllib.request.Request(f"http://{API}/v1/rooms/{room}/messages", data=json.dumps({"text": text}).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202, r.status


async def main():
    trusted = ssl.create_default_context(cafile=CA)
    url = f"wss://{HOST}:{PORT}/ws?room=r"
    async with websockets.connect(url, ssl=trusted, subprotocols=["barrage.v1.json"]) as ws:
        welcome = json.loads(await ws.recv())
        assert "welcome" in welcome, welcome
        for _ in range(200):
            with urllib.request.urlopen(f"http://{API}/v1/rooms/r", timeout=10) as r:
                if json.loads(r.read())["online"] == 1:
                    break
            await asyncio.sleep(0.01)
        publish("r", "over tls")
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if "block" in frame and not frame["block"].get("backfill"):
                texts = [base64.b64decode(m["data"]).decode() for m in frame["block"]["messages"]]
                assert texts == ["over tls"], texts
                break
    try:
        async with websockets.connect(url, ssl=ssl.create_default_context()):
            raise AssertionError("an untrusted certificate was accepted")
    except ssl.SSLCertVerificationError:
        pass
    print("all checks passed")


asyncio.run(main())
