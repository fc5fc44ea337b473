#!/usr/bin/env python3
"""Writes the envelope target's seed inputs into envelope/ (format: fuzz/harness/envelope.rs).
Starting points for the fuzzer, and replayed by tests/fuzz_regressions.rs."""
import os

JSON, SIGNED, SEND, ADMIN, ATTRS, ROOM, TWO_SHARDS, JAMMED = (1 << i for i in range(8))
EVERYTHING = SIGNED | SEND | ADMIN | ATTRS | ROOM


def msg(payload):  # one data message in the connection's type
    return bytes([0x00, len(payload)]) + payload


def frame(opcode, fin, payload):  # any frame
    return bytes([0x01 | opcode << 2 | (0x40 if fin else 0), len(payload)]) + payload


def driver(action, arg=0):  # 0 advance arg*10 ms, 1 stall, 2 write arg bytes, 3 fail the send,
    return bytes([0x03 | action << 2, arg])  # 4 eof, 5 jam, 6 reads of arg bytes, 7 load


def field(n, body):  # a protobuf length-delimited field
    return bytes([n << 3 | 2, len(body)]) + body


PROTO = {
    "join": field(1, field(1, b"r")),
    "leave": field(2, b""),
    "send": field(3, field(1, b"chat") + field(2, b"hi")),
    "ping": field(4, b""),
    "attr_sync": field(5, b""),
    "attr_set": field(6, field(1, b"k") + field(2, b"v")),
    "moderate": field(7, bytes([0x08, 0x01]) + field(2, b"u") + bytes([0x18, 0xE8, 0x07])),
}
JSON_FRAMES = {
    "join": b'{"join":{"room":"r"}}',
    "leave": b'{"leave":{}}',
    "send": b'{"send":{"type":"chat","data":"aGk="}}',
    "ping": b'{"ping":{}}',
    "attr_sync": b'{"attrSync":{}}',
    "attr_set": b'{"attrSet":{"key":"k","value":"dg=="}}',
    "moderate": b'{"moderate":{"action":"MUTE","user":"u","durationMs":"1000"}}',
}
ORDER = ["join", "send", "ping", "attr_set", "attr_sync", "send", "moderate", "send", "leave"]


def session(frames):
    ops = b"".join(msg(frames[name]) for name in ORDER[:-1])
    return ops + driver(0, 20) + msg(frames["leave"]) + driver(0, 20)


SEEDS = {
    "proto_session": bytes([EVERYTHING]) + session(PROTO),
    "json_session": bytes([EVERYTHING | JSON]) + session(JSON_FRAMES),
    "json_two_shards": bytes([EVERYTHING | JSON | TWO_SHARDS]) + session(JSON_FRAMES),
    "proto_two_shards_jammed": bytes([EVERYTHING | TWO_SHARDS | JAMMED]) + msg(PROTO["send"]) * 3
    + msg(PROTO["join"]) + driver(0, 20) + driver(5) + session(PROTO),
    "anonymous_refused": bytes([0]) + msg(PROTO["join"]) + msg(PROTO["send"]) + msg(PROTO["attr_set"]),
    "garbage_proto": bytes([ROOM]) + msg(b"\xff\xff\xff"),
    "garbage_json": bytes([ROOM | JSON]) + msg(b'{"join":1}'),
    "wrong_type": bytes([JSON]) + frame(2, True, PROTO["ping"]),
    "fragmented_with_ping": bytes([SIGNED | SEND | JSON | ROOM]) + frame(1, False, b'{"send":{"da')
    + frame(9, True, b"p") + frame(0, True, b'ta":"aGk="}}') + frame(8, True, b"\x03\xe8bye"),
    "slow_reader": bytes([EVERYTHING]) + driver(1) + b"".join(msg(PROTO["ping"]) for _ in range(6))
    + driver(2, 3) + driver(0, 200) + driver(2, 100) + driver(1),
    "split_reads_then_eof": bytes([EVERYTHING | JSON]) + driver(6, 3) + msg(JSON_FRAMES["send"])
    + driver(3) + driver(4),
    "saturated_ticks": bytes([EVERYTHING]) + driver(7, 250) + msg(PROTO["send"]) + driver(0, 50) * 4,
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "envelope")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
