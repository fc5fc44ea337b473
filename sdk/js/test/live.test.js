// The SDK against a real barrage process over loopback: order without duplicates, gap filling,
// resume across a server restart, attribute sync, short-poll fallback, acknowledged sends.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { BarrageClient, decode } from "../dist/index.js";
import { Gateway, sleep, token, until } from "./gateway.js";

const gateways = [];
after(async () => {
  for (const g of gateways) await g.stop();
});
async function gateway(extra, ports) {
  const g = await Gateway.start(extra, ports);
  gateways.push(g);
  return g;
}

/** A `ws` WebSocket whose incoming frames pass through `filter` (a lossy or repeating network). */
function network(filter) {
  return class extends WebSocket {
    set onmessage(fn) {
      super.onmessage = (ev) => {
        for (const data of filter(ev.data)) fn({ data });
      };
    }
    get onmessage() {
      return super.onmessage;
    }
  };
}

const text = (m) => new TextDecoder().decode(m.data);

/** Collects a client's messages. */
function collect(client) {
  const seen = [];
  client.on("message", (m) => seen.push(m));
  return seen;
}

test("messages arrive once, in order, with the backfill first", async () => {
  const g = await gateway();
  for (let i = 0; i < 5; i++) await g.publish("order", `m${i}`);
  // Each block arrives twice: duplicates are dropped.
  const twice = network((data) => [data, data]);
  const c = new BarrageClient({ url: g.url, room: "order", WebSocket: twice });
  const seen = collect(c);
  c.connect();
  await until("the backfill", () => seen.length >= 5);
  for (let i = 5; i < 10; i++) await g.publish("order", `m${i}`);
  await until("ten messages", () => seen.length >= 10);
  await sleep(200);
  assert.deepEqual(seen.map(text), Array.from({ length: 10 }, (_, i) => `m${i}`));
  const seqs = seen.map((m) => m.seq);
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), "strictly increasing");
  assert.ok(c.stats().duplicatesDropped >= 5, `dropped ${c.stats().duplicatesDropped}`);
  c.close();
});

test("a lost block is filled by short poll before the next one is shown", async () => {
  const g = await gateway();
  let blocks = 0;
  const lossy = network((data) => {
    const f = decode(data, "proto");
    if (f.frame.case === "block" && !f.frame.value.backfill && ++blocks === 2) return [];
    return [data];
  });
  const c = new BarrageClient({ url: g.url, room: "gap", WebSocket: lossy });
  const seen = collect(c);
  const gaps = [];
  c.on("gap", (room, n) => gaps.push(n));
  c.connect();
  await until("welcome", () => c.stats().state === "open");
  await g.waitOnline("gap", 1);
  for (let i = 0; i < 3; i++) {
    await g.publish("gap", `b${i}`);
    await sleep(150); // one block each
  }
  await until("three messages", () => seen.length >= 3);
  assert.deepEqual(seen.map(text), ["b0", "b1", "b2"]);
  assert.deepEqual(gaps, [1], "the dropped block's message came by poll");
  c.close();
});

test("a client resumes across a server restart without gaps or duplicates", async () => {
  const g = await gateway();
  const c = new BarrageClient({ url: g.url, room: "restart", WebSocket, reconnectBaseMs: 50, reconnectMaxMs: 200 });
  const seen = collect(c);
  c.connect();
  await until("welcome", () => c.stats().state === "open");
  await g.waitOnline("restart", 1);
  for (let i = 0; i < 3; i++) await g.publish("restart", `before${i}`);
  await until("three", () => seen.length >= 3);
  await g.stop();
  const g2 = await gateway([], g.ports);
  await until("reconnected", () => c.stats().state === "open" && c.stats().reconnects >= 1);
  await g2.waitOnline("restart", 1);
  for (let i = 0; i < 3; i++) await g2.publish("restart", `after${i}`);
  await until("six", () => seen.length >= 6);
  await sleep(200);
  assert.deepEqual(seen.map(text), ["before0", "before1", "before2", "after0", "after1", "after2"]);
  c.close();
});

test("attributes sync: a snapshot, deltas, and a lost delta resynced", async () => {
  const g = await gateway();
  let attrsFrames = 0;
  const lossy = network((data) => {
    const f = decode(data, "proto");
    if (f.frame.case === "attrs" && !f.frame.value.snapshot && ++attrsFrames === 2) return [];
    return [data];
  });
  await g.api("PUT", "/v1/rooms/pk/attributes/score", { value: "0:0" });
  const c = new BarrageClient({ url: g.url, room: "pk", WebSocket: lossy });
  c.connect();
  await until("snapshot", () => c.attributes("pk").text().score === "0:0");
  await g.waitOnline("pk", 1);
  await g.api("PUT", "/v1/rooms/pk/attributes/score", { value: "1:0" });
  await until("delta", () => c.attributes("pk").text().score === "1:0");
  await g.api("PUT", "/v1/rooms/pk/attributes/score", { value: "2:0" }); // this delta is lost
  await sleep(150);
  await g.api("PUT", "/v1/rooms/pk/attributes/host", { value: "alice" });
  await until("resynced", () => c.attributes("pk").text().score === "2:0" && c.attributes("pk").text().host === "alice");
  c.close();
});

test("without a WebSocket the client short-polls", async () => {
  const g = await gateway();
  class Refused {
    constructor() {
      throw new Error("blocked by a proxy");
    }
  }
  const c = new BarrageClient({ url: g.url, room: "poll", WebSocket: Refused, reconnectBaseMs: 10, reconnectMaxMs: 20 });
  const seen = collect(c);
  c.connect();
  await until("polling", () => c.stats().state === "polling");
  await g.publish("poll", "p0");
  await g.publish("poll", "p1");
  await until("two polled", () => seen.length >= 2, 15_000);
  assert.deepEqual(seen.map(text), ["p0", "p1"]);
  c.close();
});

test("a signed-in client sends and gets its ack with the message's seq", async () => {
  const g = await gateway();
  const c = new BarrageClient({ url: g.url, room: "chat", WebSocket, format: "json", token: () => token("alice") });
  const seen = collect(c);
  c.connect();
  await until("welcome", () => c.stats().state === "open");
  await g.waitOnline("chat", 1);
  const ack = await c.send("chat", "hello");
  assert.ok(ack.seq > 0n);
  await until("echo", () => seen.length >= 1);
  assert.equal(text(seen[0]), "hello");
  assert.equal(seen[0].sender, "alice");
  assert.equal(seen[0].seq, ack.seq);
  await assert.rejects(c.send("notice", "nope"), /403/);
  c.close();
});
