"""permessage-deflate against barrage with the third-party Python `websockets` client (it offers
the extension by default, as browsers do). tests/deflate.rs runs it.

Usage: deflate_client.py WS_ADDR API_ADDR TOKEN [CA_FILE]
With CA_FILE the gateway speaks TLS: wss://localhost:PORT, trusting that certificate.
A compressing member and a plain one in the same room: the 101s say what was negotiated, a
compressed send and published chat lines reach both, identical once inflated; an offer asking for
a smaller server window is declined and the client goes on uncompressed.
"""
import asyncio
import base64
import json
import ssl
import sys
import urllib.request

import websockets

WS, API, TOKEN = sys.argv[1:4]
CA = sys.argv[4] if len(sys.argv) > 4 else None
JSON = ["barrage.v1.json"]
if CA:
    URL = f"wss://localhost:{WS.rsplit(':', 1)[1]}/ws?room=z&token={TOKEN}"
    TLS = {"ssl": ssl.create_default_context(cafile=CA)}
else:
    URL = f"ws://{WS}/ws?room=z&token={TOKEN}"
    TLS = {}


def api(method, path, body=None):
    data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
    req = urllib.request.Request(f"http://{API}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read() or b"null")


async def wait_online(n):
    for _ in range(500):
        if api("GET", "/v1/rooms/z")[1]["online"] == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {n} online")


async def texts(ws, want):
    """Message texts of live blocks until `want` of them arrived."""
    got = []
    while len(got) < want:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if "block" in frame and not frame["block"].get("backfill"):
            got += [base64.b64decode(m["data"]).decode() for m in frame["block"]["messages"]]
    return got


async def main():
    async with websockets.connect(URL, subprotocols=JSON, **TLS) as zipped, \
            websockets.connect(URL, subprotocols=JSON, compression=None, **TLS) as plain:
        ext = zipped.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ext == "permessage-deflate; server_no_context_takeover; client_no_context_takeover", ext
        assert "Sec-WebSocket-Extensions" not in plain.response.headers
        for ws in (zipped, plain):
            assert "welcome" in json.loads(await ws.recv())
        await wait_online(2)
        # A long chat line from the compressing client: websockets compresses it.
        line = "主播好！这波操作太秀了 666666 " * 10
        await zipped.send(json.dumps({"send": {"type": "chat", "data": base64.b64encode(line.encode()).decode()}}))
        chat = [{"room": "z", "type": "chat", "text": f"弹幕 {i}: first time here, followed 关注了"} for i in range(12)]
        status, _ = api("POST", "/v1/publish", chat)
        assert status == 200, status
        a, b = await texts(zipped, 13), await texts(plain, 13)
        assert a == b, (a, b)
        assert line in a and f"弹幕 11: first time here, followed 关注了" in a, a
    # Asking the server for a 10-bit window: declined (one block serves every member).
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=10"}
    async with websockets.connect(URL, subprotocols=JSON, compression=None, additional_headers=offer, **TLS) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert "welcome" in json.loads(await ws.recv())
    print("all checks passed")


asyncio.run(main())
