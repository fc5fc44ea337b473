"""uWebSockets (via socketify, PyPI) broadcast peer for bench/fanout.sh (the peer contract in
bench/peers/README.md).

GET /sub?room=R subscribes, GET /pub?room=R publishes: every binary message a publisher sends goes
to every subscriber of R as one binary frame with that payload.

Broadcast path: uWS topics, as socketify documents them — a subscriber subscribes to topic R and a
publisher's message is `app.publish(R, msg, OpCode.BINARY)`; the C++ engine frames it once and
queues it to every subscriber (Python runs once per published message, not per subscriber).
Queue/drop policy, the library's own: publish skips a socket whose buffered amount exceeds
max_backpressure (the message is silently dropped for it) unless close_on_backpressure_limit; the
default limit is 64 KiB, raised here to MAX_BACKPRESSURE so a subscriber that is briefly behind
queues instead of losing messages. Idle timeout and automatic pings are off (subscribers never
send). Single-threaded: socketify's multi-process mode does not share topics between processes.

Run: PORT=8080 bench/out/venv/bin/python server.py   (or: server.py 8080)
"""
import os
import sys

from socketify import App, CompressOptions, OpCode

PORT = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8080"))
MAX_BACKPRESSURE = 16 * 1024 * 1024

app = App()


def upgrade(res, req, context):
    role = req.get_url()
    room = req.get_query("room")
    if room is None or role not in ("/sub", "/pub"):
        res.write_status(404).end("")
        return
    res.upgrade(
        req.get_header("sec-websocket-key"),
        req.get_header("sec-websocket-protocol"),
        req.get_header("sec-websocket-extensions"),
        context,
        (role, room),
    )


def on_open(ws):
    role, room = ws.get_user_data()
    if role == "/sub":
        ws.subscribe(room)


def on_message(ws, message, opcode):
    role, room = ws.get_user_data()
    if role == "/pub" and opcode == OpCode.BINARY:
        app.publish(room, message, OpCode.BINARY)


app.ws(
    "/*",
    {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": 1 << 20,
        "max_backpressure": MAX_BACKPRESSURE,
        "idle_timeout": 0,
        "send_pings_automatically": False,
        "upgrade": upgrade,
        "open": on_open,
        "message": on_message,
    },
)
app.any("/*", lambda res, req: res.write_status(404).end(""))


def listening(config):
    print(f"uWebSockets (socketify) peer on 127.0.0.1:{PORT}, 1 thread", file=sys.stderr, flush=True)


app.listen({"port": PORT, "host": "127.0.0.1"}, listening)
app.run()
