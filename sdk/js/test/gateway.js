// Starts the real barrage binary (BARRAGE_BIN, else the debug build) on loopback ports for a
// test, and talks to its API.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";

export const SECRET = "sdk-test-secret-0123456789-0123456789";
const here = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.BARRAGE_BIN ?? path.join(here, "../../../target/debug/barrage");

/** A free loopback port below 32768 (the ephemeral range starts there). */
export async function freePort() {
  for (;;) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    const ok = await new Promise((resolve) => {
      const s = createServer().once("error", () => resolve(false));
      s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
    });
    if (ok) return port;
  }
}

export class Gateway {
  static async start(extra = [], ports = null) {
    const ws = ports?.ws ?? (await freePort());
    const api = ports?.api ?? (await freePort());
    // `extra` holds flag/value pairs; a flag given there replaces its default.
    const flags = new Map([
      ["--listen", `127.0.0.1:${ws}`], ["--api-listen", `127.0.0.1:${api}`], ["--shards", "2"],
      ["--block-interval-ms", "50"], ["--presence-events", "false"], ["--jwt-secret", SECRET],
      ["--drain-on-sigterm", "false"], ["--connections-max", "2000"],
    ]);
    for (let i = 0; i < extra.length; i += 2) flags.set(extra[i], extra[i + 1]);
    const args = [...flags].flat();
    const child = spawn(BIN, args, { stdio: ["ignore", "pipe", "inherit"] });
    await new Promise((resolve, reject) => {
      let out = "";
      child.stdout.on("data", (d) => {
        out += d;
        if (out.includes("API        http://")) resolve();
      });
      child.once("exit", (code) => reject(new Error(`barrage exited (${code}) before listening: ${out}`)));
    });
    child.stdout.resume();
    const g = new Gateway();
    Object.assign(g, { child, ports: { ws, api }, url: `ws://127.0.0.1:${ws}/ws` });
    return g;
  }

  async api(method, route, body) {
    const res = await fetch(`http://127.0.0.1:${this.ports.api}${route}`, {
      method,
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${route}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  publish(room, text, extra = {}) {
    return this.api("POST", `/v1/rooms/${room}/messages`, { text, ...extra });
  }

  /** The sum over shards of one of barrage's counters (`name`, optionally with a label). */
  async metric(name, label = "") {
    const res = await fetch(`http://127.0.0.1:${this.ports.api}/metrics`);
    let sum = 0;
    for (const line of (await res.text()).split("\n")) {
      const [series, value] = line.split(" ");
      if ((series === name || series?.startsWith(`${name}{`)) && series.includes(label)) sum += Number(value);
    }
    return sum;
  }

  async waitOnline(room, n) {
    for (let i = 0; i < 500; i++) {
      const r = await this.api("GET", `/v1/rooms/${room}`);
      if (r.online === n) return;
      await sleep(10);
    }
    throw new Error(`${room} never had ${n} online`);
  }

  async stop(signal = "SIGKILL") {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once("exit", r));
    this.child.kill(signal);
    await exited;
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Waits until `f()` is true (or fails after `ms`). */
export async function until(what, f, ms = 10_000) {
  const end = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** An HS256 JWT for `user`, valid for an hour. */
export function token(user, claims = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600, ...claims })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}
