// The live-room demo served at /demo/: danmaku over a stage, a gift banner, a PK bar driven by
// coalesced corrections, online count, enter notices, a send box and a status panel — all
// through barrage-client's public API.
import { BarrageClient, type Message } from "../src/index.js";

const params = new URLSearchParams(location.search);
const room = params.get("room") ?? "demo";
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const stage = $("stage");
const text = (m: Message) => new TextDecoder().decode(m.data);

/** Signs in through the development token route when the gateway offers it. */
async function devToken(): Promise<string> {
  const user = params.get("user") ?? `viewer${Math.floor(Math.random() * 1e6)}`;
  const res = await fetch(`/demo/token?user=${encodeURIComponent(user)}`);
  return res.ok ? (await res.json()).token : "";
}

const token = await devToken();
const client = new BarrageClient({ url: wsUrl, room, token: token ? () => devToken() : undefined });

// ---- danmaku: lanes without overlap ----
const LANE_PX = 30;
const TOP_PX = 48;
const SPEED_PX_S = 160;
/** When each lane's last item has fully entered the stage (ms timestamp). */
const laneFree: number[] = [];

/** Danmaku not shown because every lane was booked for longer than MAX_WAIT_MS. */
let skipped = 0;
const MAX_WAIT_MS = 2000;

function fly(m: Message): void {
  const el = document.createElement("div");
  el.className = m.priority > 0 ? "danmaku high" : "danmaku";
  el.textContent = `${m.sender ? m.sender + ": " : ""}${text(m)}`;
  // Lanes between the banner and the PK bar.
  const lanes = Math.max(1, Math.floor((stage.clientHeight - TOP_PX - 40) / LANE_PX));
  const now = performance.now();
  // The lane that frees first; an item waits for it (never overlaps), or is skipped when that
  // would be long: a saturated room shows what it can, the log keeps everything.
  let lane = 0;
  for (let i = 0; i < lanes; i++) if ((laneFree[i] ?? 0) < (laneFree[lane] ?? 0)) lane = i;
  const start = Math.max(now, laneFree[lane] ?? 0);
  if (start - now > MAX_WAIT_MS) {
    skipped++;
    return;
  }
  stage.appendChild(el);
  const width = el.offsetWidth;
  const distance = stage.clientWidth + width;
  // The lane frees once this item's tail is on stage, plus a gap.
  laneFree[lane] = start + ((width + 40) / SPEED_PX_S) * 1000;
  el.style.top = `${TOP_PX + lane * LANE_PX}px`;
  el.animate([{ transform: "translateX(0)" }, { transform: `translateX(${-distance}px)` }], {
    duration: (distance / SPEED_PX_S) * 1000,
    delay: start - now,
    easing: "linear",
  }).finished.then(() => el.remove(), () => el.remove());
}

// ---- the rest of the room ----
const log = $<HTMLUListElement>("log");
let bannerTimer: ReturnType<typeof setTimeout> | undefined;

function logLine(m: Message): void {
  const li = document.createElement("li");
  li.className = m.type;
  li.dataset.seq = m.seq.toString();
  li.dataset.type = m.type;
  li.textContent = `${m.type} ${m.sender || "system"}: ${text(m)}`;
  log.appendChild(li);
  while (log.children.length > 200) log.firstElementChild?.remove();
  log.scrollTop = log.scrollHeight;
}

client.on("message", (m) => {
  logLine(m);
  switch (m.type) {
    case "chat":
    case "like":
      fly(m);
      break;
    case "gift": {
      const banner = $("banner");
      banner.textContent = `${m.sender || "someone"} sent ${text(m)}`;
      banner.classList.add("show");
      clearTimeout(bannerTimer);
      bannerTimer = setTimeout(() => banner.classList.remove("show"), 3000);
      fly(m);
      break;
    }
    case "pk": {
      // "red:blue"; corrections coalesce on the server, so the newest score is what arrives.
      const [red, blue] = text(m).split(":").map(Number);
      const bar = $("pk");
      const [r, b] = [bar.children[0] as HTMLElement, bar.children[1] as HTMLElement];
      r.style.flexGrow = String(Math.max(red, 1));
      b.style.flexGrow = String(Math.max(blue, 1));
      r.textContent = String(red);
      b.textContent = String(blue);
      bar.dataset.score = `${red}:${blue}`;
      break;
    }
    case "enter": {
      // {"count": N, "users": [...]}: at most one a block, naming the first few.
      try {
        const e = JSON.parse(text(m));
        const more = e.count > e.users.length ? ` and ${e.count - e.users.length} more` : "";
        $("notices").textContent = `${e.users.join(", ")}${more} entered`;
      } catch {
        $("notices").textContent = "someone entered";
      }
      break;
    }
  }
});
client.on("online", (_room, n) => ($("online").textContent = n.toString()));

// ---- send box ----
const form = $<HTMLFormElement>("send");
const input = $<HTMLInputElement>("text");
client.on("welcome", (w) => {
  const canSend = w.user !== "";
  input.disabled = !canSend;
  (form.querySelector("button") as HTMLButtonElement).disabled = !canSend;
  input.placeholder = canSend ? `say something as ${w.user}` : "watching (start barrage with --demo-dev-tokens true to chat)";
});
form.addEventListener("submit", (e) => {
  e.preventDefault();
  const t = input.value.trim();
  if (!t) return;
  input.value = "";
  client.send("chat", t).catch((err) => ($("notices").textContent = `not sent: ${err.message}`));
});

// ---- status panel ----
setInterval(() => {
  const s = client.stats();
  $("panel").textContent =
    `room       ${s.room}\nstate      ${s.state}\nlast seq   ${s.lastSeq}\nmessages   ${s.messages}\n` +
    `gaps       ${s.gapsFilled} (${s.gapMessages} msgs)\nduplicates ${s.duplicatesDropped}\n` +
    `reconnects ${s.reconnects}\nlatency    ${s.latencyMs.toFixed(0)} ms\nskipped    ${skipped} danmaku`;
}, 250);

client.connect();
// For tests and the fps bench.
Object.assign(window, { barrage: client, demo: { skipped: () => skipped } });
