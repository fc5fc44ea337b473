"""Drives a running barrage gateway with the third-party Python `websockets` client.

Usage: client.py WS_ADDR API_ADDR TOKEN_ALICE TOKEN_BOB
Exits non-zero (with an assertion message) on any deviation.
"""
import asyncio
import base64
import json
import sys
import urllib.error
import urllib.request

import websockets

WS, API, ALICE, BOB = sys.argv[1:5]
JSON = ["barrage.v1.json"]
PROTO = ["barrage.v1.proto"]


def api(method, path, body=None, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(f"http://{API}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


async def wait_online(room, n):
    for _ in range(500):
        status, info = api("GET", f"/v1/rooms/{room}")
        assert status == 200, info
        if info["online"] == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"room {room} never reached {n} online")


# --- a minimal protobuf reader, enough to check ServerFrame blocks ---
def varint(b, i):
    shift = value = 0
    while True:
        byte = b[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def fields(b):
    """Yields (field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(b, i)
        elif wt == 2:
            n, i = varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise AssertionError(f"unexpected wire type {wt}")
        yield num, wt, v


def proto_block(frame):
    """ServerFrame bytes -> (first_seq, last_seq, [(seq, data)]) of its block (field 2)."""
    (num, _, block), = list(fields(frame))
    assert num == 2, f"expected a block, got field {num}"
    first = last = 0
    messages = []
    for n, _, v in fields(block):
        if n == 2:
            first = v
        elif n == 3:
            last = v
        elif n == 4:
            m = {k: val for k, _, val in fields(v)}
            messages.append((m.get(3, 0), m.get(9, b"")))
    return first, last, messages


def join_frame(room):
    inner = b"\x0a" + bytes([len(room)]) + room.encode()
    return b"\x0a" + bytes([len(inner)]) + inner


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def main():
    async with websockets.connect(f"ws://{WS}/ws?room=py", subprotocols=JSON) as a, \
            websockets.connect(f"ws://{WS}/ws?room=py&token={ALICE}", subprotocols=JSON) as b, \
            websockets.connect(f"ws://{WS}/ws?room=py", subprotocols=PROTO) as c:
        assert a.subprotocol == "barrage.v1.json" and c.subprotocol == "barrage.v1.proto"
        wa, wb = await recv_json(a), await recv_json(b)
        assert wa["welcome"]["room"] == "py", wa
        assert wb["welcome"]["user"] == "alice", wb
        welcome_c = await asyncio.wait_for(c.recv(), 5)
        assert isinstance(welcome_c, bytes) and welcome_c[0] == 0x0A  # field 1: welcome
        await wait_online("py", 3)

        # One merged block, priority order, consecutive seqs, same for JSON and protobuf.
        for body in [{"text": "low"}, {"priority": "whitelist", "type": "notice", "text": "sys"},
                     {"priority": "high", "type": "gift", "weight": 5, "text": "gift"}]:
            status, resp = api("POST", "/v1/rooms/py/messages", body)
            assert status == 202, resp
        for ws in (a, b):
            block = (await recv_json(ws))["block"]
            texts = [base64.b64decode(m["data"]).decode() for m in block["messages"]]
            assert texts == ["sys", "gift", "low"], texts
            seqs = [int(m["seq"]) for m in block["messages"]]
            assert seqs == list(range(int(block["firstSeq"]), int(block["lastSeq"]) + 1)), seqs
        first, last, msgs = proto_block(await asyncio.wait_for(c.recv(), 5))
        assert [d for _, d in msgs] == [b"sys", b"gift", b"low"], msgs
        assert [s for s, _ in msgs] == list(range(first, last + 1))

        # Alice chats; everyone in the room sees it in the next block.
        await b.send(json.dumps({"send": {"data": base64.b64encode(b"hi from py").decode()}}))
        block = (await recv_json(a))["block"]
        assert block["messages"][0]["sender"] == "alice", block

        # c (protobuf) sees alice's chat too, before it moves.
        _, _, chat = proto_block(await asyncio.wait_for(c.recv(), 5))
        assert chat[0][1] == b"hi from py", chat

        # Switching rooms: c joins py2 and so leaves py.
        await c.send(join_frame("py2"))
        await wait_online("py2", 1)
        await wait_online("py", 2)
        api("POST", "/v1/rooms/py/messages", {"text": "only py"})
        api("POST", "/v1/rooms/py2/messages", {"text": "only py2"})
        _, _, msgs = proto_block(await asyncio.wait_for(c.recv(), 5))
        assert [d for _, d in msgs] == [b"only py2"], msgs
        block = (await recv_json(a))["block"]
        assert block["room"] == "py" and len(block["messages"]) == 1
        # Alice (b) is still in py: her own chat line, then "only py".
        assert (await recv_json(b))["block"]["messages"][0]["sender"] == "alice"
        assert len((await recv_json(b))["block"]["messages"]) == 1

        # Direct to alice, then broadcast to all.
        status, resp = api("POST", "/v1/users/alice/messages", {"type": "notice", "text": "psst"})
        assert status == 202 and resp["connections"] == 1, resp
        direct = (await recv_json(b))["direct"]["message"]
        assert base64.b64decode(direct["data"]) == b"psst"
        status, resp = api("POST", "/v1/broadcast", {"type": "notice", "text": "everyone"})
        assert status == 202 and resp["connections"] == 3, resp
        assert "broadcast" in await recv_json(a)
        assert "broadcast" in await recv_json(b)
        assert (await asyncio.wait_for(c.recv(), 5))[0] == 0x22  # field 4: broadcast

        # Application ping.
        await a.send(json.dumps({"ping": {}}))
        assert "pong" in await recv_json(a)

    # The close handshake completed cleanly for every client (websockets raises otherwise).
    ws = await websockets.connect(f"ws://{WS}/ws", subprotocols=JSON)
    await recv_json(ws)
    await ws.close(code=1000, reason="bye")
    assert ws.close_code == 1000, ws.close_code

    # A bad token is refused in the handshake with 401.
    try:
        async with websockets.connect(f"ws://{WS}/ws?token=garbage"):
            raise AssertionError("bad token accepted")
    except websockets.exceptions.InvalidStatus as e:
        assert e.response.status_code == 401, e.response.status_code
    print("python websockets client: all checks passed")


asyncio.run(main())
