"""A small business backend for barrage's hooks (tests/hooks.rs), standard library only.

HTTP/1.1 keep-alive, JSON bodies (barrage's HookRequest / HookResponse in proto3 JSON):
  connect  token "user:NAME:LEVEL" signs in NAME at LEVEL with the `gift` grant; "deny" is
           refused (403); anything else goes on as the gateway decided
  join     rooms starting with "vip" are refused (403) unless the user is "vip"
  send     chat lines have "badword" replaced by "***"; a gift costs a coin ("rich" has 2)
  events   kept
Paths under /slow/ answer after 2 s; under /fail/ with a 500. GET /stats: requests and calls
per hook, and the events. Prints "LISTENING PORT" once serving.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
stats = {"requests": {}, "calls": {}, "events": []}
coins = {"rich": 2}


def connect(call):
    token = call.get("token", "")
    if token == "deny":
        return {"code": 403, "reason": "go away"}
    if token.startswith("user:"):
        _, name, level = token.split(":", 2)
        return {"user": name, "level": int(level), "types": ["gift"]}
    return {}


def join(call):
    if call.get("room", "").startswith("vip") and call.get("user") != "vip":
        return {"code": 403, "reason": "vip room"}
    return {}


def send(call):
    if call.get("type") == "gift":
        with lock:
            left = coins.get(call.get("user"), 0)
            if left < 1:
                return {"code": 402, "reason": "not enough coins"}
            coins[call["user"]] = left - 1
        return {}
    text = call.get("text", "")
    if "badword" in text:
        return {"text": text.replace("badword", "***")}
    return {}


HANDLERS = {"connect": connect, "join": join, "send": send}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            self.answer(200, stats)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        req = json.loads(self.rfile.read(length) or b"{}")
        if self.path.startswith("/slow/"):
            time.sleep(2)
        if self.path.startswith("/fail/"):
            return self.answer(500, {"error": "down for maintenance"})
        out = {}
        for hook in ("connect", "join", "send", "events"):
            calls = req.get(hook)
            if not calls:
                continue
            with lock:
                stats["requests"][hook] = stats["requests"].get(hook, 0) + 1
                stats["calls"][hook] = stats["calls"].get(hook, 0) + len(calls)
                if hook == "events":
                    stats["events"].extend(calls)
            if hook in HANDLERS:
                out[hook] = [HANDLERS[hook](c) for c in calls]
        self.answer(200, out)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print("LISTENING", server.server_address[1], flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    sys.exit(0)
