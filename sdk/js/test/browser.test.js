// The demo page in headless Chromium against a real barrage: messages in priority order, the PK
// bar at the newest (coalesced) score, the send box through a development token, and no gap or
// duplicate across a server restart. Saves docs/demo.png (shown in the README). And Chromium's
// own permessage-deflate against barrage's: compressed blocks in, compressed sends out.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import puppeteer from "puppeteer-core";
import { Gateway, sleep, until } from "./gateway.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM_BIN ?? ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find(existsSync);

const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

test("the demo shows a live room in Chromium, across a server restart", async () => {
  assert.ok(CHROMIUM, "Chromium is needed (apt-get install chromium), or set CHROMIUM_BIN");
  const extra = ["--demo-dev-tokens", "true", "--block-interval-ms", "400", "--presence-events", "true"];
  let g = await Gateway.start(extra);
  cleanup.push(() => g.stop());
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  cleanup.push(() => browser.close());
  const page = await browser.newPage();
  await page.setViewport({ width: 1100, height: 520 });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`http://127.0.0.1:${g.ports.ws}/demo/?room=live&user=alice`);
  await page.waitForFunction(() => window.barrage?.stats().state === "open", { timeout: 10_000 });
  await g.waitOnline("live", 1);

  // One batch, so one block: two chat lines, then a gift — the gift (high) comes first.
  await g.api("POST", "/v1/publish", [
    { room: "live", text: "hello", sender: "bob" },
    { room: "live", text: "nice stream", sender: "carol" },
    { room: "live", text: "a rocket", type: "gift", sender: "dave" },
  ]);
  await page.waitForFunction(() => document.querySelectorAll("#log li").length >= 4, { timeout: 10_000 });
  const types = await page.$$eval("#log li", (lis) => lis.map((li) => li.dataset.type).filter((t) => t !== "enter"));
  assert.deepEqual(types.slice(0, 3), ["gift", "chat", "chat"], "priority order inside the block");

  // PK corrections with one coalesce key: the bar shows the newest score.
  await g.api("POST", "/v1/publish", ["10:20", "15:20", "30:25"].map((text) => ({ room: "live", text, type: "pk", coalesce_key: "pk" })));
  await page.waitForFunction(() => document.getElementById("pk").dataset.score === "30:25", { timeout: 10_000 });

  // The send box, signed in by the development token route.
  await page.waitForFunction(() => !document.getElementById("text").disabled, { timeout: 10_000 });
  await page.type("#text", "hi from the page");
  await page.click("#send button");
  await page.waitForFunction(
    () => [...document.querySelectorAll("#log li")].some((li) => li.textContent.includes("alice: hi from the page")),
    { timeout: 10_000 },
  );

  // Restart the gateway on the same ports: the page reconnects and goes on.
  await g.stop();
  g = await Gateway.start(extra, g.ports);
  cleanup.push(() => g.stop());
  await page.waitForFunction(() => window.barrage.stats().reconnects >= 1 && window.barrage.stats().state === "open", {
    timeout: 20_000,
  });
  await g.waitOnline("live", 1);
  await g.publish("live", "after the restart", { sender: "bob" });
  await g.publish("live", "still here", { sender: "carol" });
  await page.waitForFunction(
    () => [...document.querySelectorAll("#log li")].some((li) => li.textContent.includes("still here")),
    { timeout: 10_000 },
  );
  const seqs = await page.$$eval("#log li", (lis) => lis.map((li) => li.dataset.seq));
  assert.equal(new Set(seqs).size, seqs.length, "no duplicate");
  const big = seqs.map(BigInt);
  assert.ok(big.every((s, i) => i === 0 || s > big[i - 1]), `seqs increase: ${seqs}`);
  const stats = await page.evaluate(() => ({ ...window.barrage.stats(), lastSeq: String(window.barrage.stats().lastSeq) }));
  assert.equal(stats.duplicatesDropped, 0);

  // A few more lines in flight for the picture.
  for (const [who, line] of [["erin", "666"], ["frank", "what a shot"], ["gina", "gg"], ["hank", "this PK is close"]]) {
    await g.publish("live", line, { sender: who });
  }
  await sleep(700);
  const docs = path.join(here, "../../../docs");
  mkdirSync(docs, { recursive: true });
  await page.screenshot({ path: path.join(docs, "demo.png") });
  assert.deepEqual(errors, [], "no error on the page");
});

test("Chromium negotiates permessage-deflate: compressed blocks shown, compressed sends inflated", async () => {
  assert.ok(CHROMIUM, "Chromium is needed (apt-get install chromium), or set CHROMIUM_BIN");
  const g = await Gateway.start(["--demo-dev-tokens", "true", "--deflate", "true", "--deflate-min-bytes", "32"]);
  cleanup.push(() => g.stop());
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  cleanup.push(() => browser.close());
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`http://127.0.0.1:${g.ports.ws}/demo/?room=zip&user=alice`);
  await page.waitForFunction(() => window.barrage?.stats().state === "open", { timeout: 10_000 });
  await g.waitOnline("zip", 1);
  // Counters reach /metrics within 50 ms.
  await until("Chromium's offer accepted", async () => (await g.metric("barrage_deflate_connections_total")) === 1);

  const lines = Array.from({ length: 12 }, (_, i) => `弹幕 ${i}: 主播好，这波操作太秀了 666666`);
  await g.api("POST", "/v1/publish", lines.map((text, i) => ({ room: "zip", text, sender: `viewer${i}` })));
  await page.waitForFunction(
    () => [...document.querySelectorAll("#log li")].some((li) => li.textContent.includes("弹幕 11:")),
    { timeout: 10_000 },
  );
  assert.ok((await g.metric("barrage_deflate_frames_total")) >= 1, "the block went compressed");

  // Two sends from the page: Chromium compresses its messages (each on its own, as told).
  await page.waitForFunction(() => !document.getElementById("text").disabled, { timeout: 10_000 });
  for (const text of ["first compressed line from the page", "second compressed line from the page"]) {
    await page.type("#text", text);
    await page.click("#send button");
    await page.waitForFunction(
      (t) => [...document.querySelectorAll("#log li")].some((li) => li.textContent.includes(t)),
      { timeout: 10_000 },
      text,
    );
  }
  await until("the sends inflated", async () => (await g.metric("barrage_inflated_messages_total")) >= 2);
  assert.equal(await g.metric("barrage_inflate_refused_total"), 0);
  assert.equal(await g.metric("barrage_closed_total", 'reason="inflate"'), 0);
  assert.deepEqual(errors, [], "no error on the page");
});
