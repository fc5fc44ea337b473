// How many messages a second one browser tab renders from the demo's room while keeping at least
// 50 frames a second: headless Chromium on the demo page, chat lines published through the API's
// batch route at rising rates, and the page's frame times (requestAnimationFrame, the rendering
// timeline as the page sees it) per one-second window. Prints one JSON line per rate.
//
//   node bench/fps.js WS_PORT API_PORT [RATES] [SECONDS]
import puppeteer from "puppeteer-core";
import { existsSync } from "node:fs";

const [wsPort, apiPort, ratesArg = "50,100,200,400,800,1600", secondsArg = "6"] = process.argv.slice(2);
const rates = ratesArg.split(",").map(Number);
const seconds = Number(secondsArg);
const chromium = process.env.CHROMIUM_BIN ?? ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find(existsSync);
const lines = ["666", "主播好帅", "前排", "this PK is close", "哈哈哈哈", "what a shot", "gg", "来了来了", "awesome stream", "666666"];

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-timer-throttling", "--disable-renderer-backgrounding"],
});
const page = await browser.newPage();
await page.setViewport({ width: 1280, height: 720 });
await page.goto(`http://127.0.0.1:${wsPort}/demo/?room=fps`);
await page.waitForFunction(() => window.barrage?.stats().state === "open", { timeout: 15_000 });
await page.evaluate(() => {
  window.__frames = [];
  const tick = (t) => {
    window.__frames.push(t);
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
});

async function publish(n, k) {
  const items = Array.from({ length: n }, (_, i) => ({ room: "fps", text: lines[(k + i) % lines.length], sender: `u${(k + i) % 97}` }));
  const res = await fetch(`http://127.0.0.1:${apiPort}/v1/publish`, { method: "POST", body: JSON.stringify(items) });
  await res.text();
}

for (const rate of rates) {
  const before = await page.evaluate(() => ({
    frames: window.__frames.length,
    messages: window.barrage.stats().messages,
    skipped: window.demo.skipped(),
  }));
  const start = Date.now();
  let k = 0;
  // Ten batches a second.
  while (Date.now() - start < seconds * 1000) {
    const tick = Date.now();
    await publish(Math.max(1, Math.round(rate / 10)), k++);
    await new Promise((r) => setTimeout(r, Math.max(0, 100 - (Date.now() - tick))));
  }
  await new Promise((r) => setTimeout(r, 500));
  const r = await page.evaluate((from) => {
    const t = window.__frames.slice(from);
    const windows = new Map();
    for (const x of t) windows.set(Math.floor(x / 1000), (windows.get(Math.floor(x / 1000)) ?? 0) + 1);
    // Whole windows only (not the first and last, which are cut).
    const fps = [...windows.entries()].sort((a, b) => a[0] - b[0]).slice(1, -1).map(([, n]) => n);
    let longest = 0;
    for (let i = 1; i < t.length; i++) longest = Math.max(longest, t[i] - t[i - 1]);
    return { fps, longestFrameMs: longest, messages: window.barrage.stats().messages, skipped: window.demo.skipped() };
  }, before.frames);
  const sorted = [...r.fps].sort((a, b) => a - b);
  const elapsed = (Date.now() - start) / 1000;
  const delivered = (r.messages - before.messages) / elapsed;
  const flown = (r.messages - before.messages - (r.skipped - before.skipped)) / elapsed;
  console.log(JSON.stringify({
    rate,
    deliveredPerS: Math.round(delivered),
    danmakuPerS: Math.round(flown),
    minFps: sorted[0] ?? 0,
    medianFps: sorted[Math.floor(sorted.length / 2)] ?? 0,
    longestFrameMs: Math.round(r.longestFrameMs),
  }));
}
await browser.close();
