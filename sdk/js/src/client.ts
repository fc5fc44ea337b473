import { create } from "@bufbuild/protobuf";
import {
  AttrSyncSchema,
  JoinSchema,
  LeaveSchema,
  PingSchema,
  RefreshSchema,
  SendSchema,
  type Ack,
  type Block,
  type Message,
  type ServerFrame,
  type Welcome,
} from "./gen/barrage/v1/barrage_pb.js";
import { AttrState } from "./attrs.js";
import { Backoff } from "./backoff.js";
import { decode, encode, SUBPROTOCOL, type Format } from "./codec.js";
import { RoomCursor } from "./cursor.js";
import { Emitter } from "./events.js";
import { httpBase, poll, type FetchLike } from "./poll.js";

/** What the client needs of a WebSocket: the browser's, or `ws` in Node. */
export interface WebSocketLike {
  binaryType: string;
  readyState: number;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketCtor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export type State = "idle" | "connecting" | "open" | "polling" | "closed";

export interface ClientOptions {
  /** The gateway's WebSocket URL, `ws://host:8080/ws` (or `wss://`). */
  url: string;
  /** The room to join (also after every reconnect). */
  room?: string;
  /** A token, or a function giving a fresh one: called at every connect and when one expires. */
  token?: string | (() => string | Promise<string>);
  /** `proto` (default, smaller) or `json`. */
  format?: Format;
  /** A WebSocket constructor; default `globalThis.WebSocket` (in Node 20, pass `ws`). */
  WebSocket?: WebSocketCtor;
  /** `fetch` for short polls; default `globalThis.fetch`. */
  fetch?: FetchLike;
  /** Reconnect backoff: full jitter between 0 and min(maxMs, baseMs × 2^attempt). */
  reconnectBaseMs?: number;
  reconnectMaxMs?: number;
  /** After this many failed WebSocket opens in a row, short-poll instead (0: never). */
  pollAfterFailures?: number;
  /** While polling, try the WebSocket again this often. */
  wsRetryMs?: number;
  /** How long `send` waits for its ack. */
  ackTimeoutMs?: number;
}

/** A room's new messages, in order, without duplicates, any gap filled before them. */
export interface BlockEvent {
  room: string;
  messages: Message[];
  online: bigint;
  backfill: boolean;
}

export interface ClientEvents {
  state: (state: State) => void;
  welcome: (w: Welcome) => void;
  block: (b: BlockEvent) => void;
  /** Each new message of the room, in seq order. */
  message: (m: Message) => void;
  online: (room: string, count: bigint) => void;
  attrs: (room: string, attrs: AttrState) => void;
  direct: (m: Message) => void;
  broadcast: (m: Message) => void;
  kicked: (room: string, reason: string) => void;
  error: (code: number, reason: string) => void;
  /** A gap was short-polled: how many messages it held, and whether some were gone for good. */
  gap: (room: string, filled: number, truncated: boolean) => void;
}

/** Counters for a status panel. */
export interface Stats {
  state: State;
  room: string;
  lastSeq: bigint;
  messages: number;
  duplicatesDropped: number;
  gapsFilled: number;
  gapMessages: number;
  reconnects: number;
  /** Time from the server stamping a message to its delivery here, smoothed (ms). */
  latencyMs: number;
}

const POLL_LIMIT = 100;

/**
 * A barrage client: joins a room and delivers its messages in seq order exactly once — across
 * duplicates, gaps (filled by short poll before the block is shown), reconnects (resumed with
 * `after`), `reconnect` frames and short-poll fallback — plus attributes, online counts, direct and
 * broadcast messages, and acknowledged sends.
 */
export class BarrageClient extends Emitter<ClientEvents> {
  private readonly opts: Required<Omit<ClientOptions, "room" | "token" | "WebSocket" | "fetch">>;
  private readonly WS: WebSocketCtor;
  private readonly fetchFn: FetchLike;
  private room: string;
  private url: string;
  private ws: WebSocketLike | null = null;
  private state: State = "idle";
  private readonly backoff: Backoff;
  private readonly cursors = new Map<string, RoomCursor>();
  private readonly attrStates = new Map<string, AttrState>();
  private readonly acks = new Map<string, { resolve: (a: Ack) => void; reject: (e: Error) => void; timer: ReturnType<typeof setTimeout> }>();
  private nextAck = 0;
  private failures = 0;
  private closing = false;
  private kicked = false;
  private redirect: { url: string; delayMs: number } | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private heartbeat: ReturnType<typeof setInterval> | null = null;
  private lastRx = 0;
  private serverOffsetMs = 0;
  private token = "";
  /** Block handling, in order (a gap fill is awaited before the next block). */
  private queue: Promise<void> = Promise.resolve();
  private readonly counters = { messages: 0, duplicatesDropped: 0, gapsFilled: 0, gapMessages: 0, reconnects: 0, latencyMs: 0 };

  constructor(private readonly options: ClientOptions) {
    super();
    this.opts = {
      url: options.url,
      format: options.format ?? "proto",
      reconnectBaseMs: options.reconnectBaseMs ?? 500,
      reconnectMaxMs: options.reconnectMaxMs ?? 30_000,
      pollAfterFailures: options.pollAfterFailures ?? 3,
      wsRetryMs: options.wsRetryMs ?? 30_000,
      ackTimeoutMs: options.ackTimeoutMs ?? 10_000,
    };
    const ws = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
    if (!ws) throw new Error("barrage-client: no WebSocket here; pass options.WebSocket (e.g. the `ws` package)");
    this.WS = ws;
    const f = options.fetch ?? (globalThis as { fetch?: FetchLike }).fetch;
    this.fetchFn = f ? f.bind(globalThis) : () => Promise.reject(new Error("barrage-client: no fetch for short polls"));
    this.room = options.room ?? "";
    this.url = options.url;
    this.backoff = new Backoff(this.opts.reconnectBaseMs, this.opts.reconnectMaxMs);
  }

  // ---- public API ----

  /** Connects (and keeps reconnecting until `close`). */
  connect(): void {
    this.closing = false;
    this.kicked = false;
    if (this.state === "idle" || this.state === "closed") this.open();
  }

  /** Closes for good. */
  close(): void {
    this.closing = true;
    this.clearTimers();
    this.ws?.close(1000, "bye");
    this.ws = null;
    for (const [, a] of this.acks) a.reject(new Error("closed"));
    this.acks.clear();
    this.setState("closed");
  }

  /** Joins `room` (leaving the current one), resuming after what was shown there. */
  join(room: string): void {
    this.room = room;
    if (this.state === "open") {
      this.sendFrame({ case: "join", value: create(JoinSchema, { room, afterSeq: this.cursor(room).last }) });
    }
  }

  leave(): void {
    if (this.state === "open") this.sendFrame({ case: "leave", value: create(LeaveSchema, { room: this.room }) });
    this.room = "";
  }

  /**
   * Sends a message into the current room (signed-in users); resolves with its ack (`seq` once
   * its block is cut), rejects on a refusal (`code`, `reason`) or a timeout.
   */
  send(type: string, data: string | Uint8Array): Promise<Ack> {
    if (this.state !== "open") return Promise.reject(new Error("barrage-client: not connected"));
    const id = `c${++this.nextAck}`;
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    return new Promise<Ack>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.acks.delete(id);
        reject(new Error("barrage-client: no ack in time"));
      }, this.opts.ackTimeoutMs);
      this.acks.set(id, { resolve, reject, timer });
      this.sendFrame({ case: "send", value: create(SendSchema, { type, data: bytes, id }) });
    });
  }

  /** Calls `fn` for each new message of `type` (`chat`, `gift`, `pk`, ...). */
  onType(type: string, fn: (m: Message) => void): () => void {
    return this.on("message", (m) => {
      if (m.type === type) fn(m);
    });
  }

  /** A room's attributes as last synced. */
  attributes(room = this.room): AttrState {
    return this.attrs(room);
  }

  stats(): Stats {
    return { state: this.state, room: this.room, lastSeq: this.cursor(this.room).last, ...this.counters };
  }

  // ---- connection ----

  private async open(): Promise<void> {
    this.setState("connecting");
    try {
      this.token = await this.resolveToken();
    } catch (e) {
      this.emit("error", 0, `token callback failed: ${e}`);
    }
    if (this.closing) return;
    const u = new URL(this.redirect?.url || this.url);
    this.redirect = null;
    if (this.room) {
      u.searchParams.set("room", this.room);
      const after = this.cursor(this.room).last;
      if (after > 0n) u.searchParams.set("after", after.toString());
    }
    if (this.token) u.searchParams.set("token", this.token);
    let ws: WebSocketLike;
    try {
      ws = new this.WS(u.toString(), [SUBPROTOCOL[this.opts.format]]);
    } catch {
      return this.failed();
    }
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastRx = Date.now();
      let frame: ServerFrame;
      try {
        frame = decode(ev.data, this.opts.format);
      } catch (e) {
        this.emit("error", 0, `undecodable frame: ${e}`);
        return;
      }
      this.onFrame(frame);
    };
    ws.onerror = () => {};
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.stopHeartbeat();
      if (!opened) return this.failed();
      this.lost();
    };
  }

  /** A WebSocket could not be opened. */
  private failed(): void {
    if (this.closing) return;
    this.failures++;
    const n = this.opts.pollAfterFailures;
    if (n > 0 && this.failures >= n && this.room) return this.startPolling();
    this.retryLater(this.backoff.next());
  }

  /** An open connection ended: reconnect (after a `reconnect` frame's delay, or backoff). */
  private lost(): void {
    if (this.closing || this.kicked) {
      this.setState("closed");
      return;
    }
    this.counters.reconnects++;
    const delay = this.redirect ? this.redirect.delayMs : this.backoff.next();
    this.retryLater(delay);
  }

  private retryLater(delayMs: number): void {
    this.setState("connecting");
    this.clearTimer();
    this.timer = setTimeout(() => void this.open(), delayMs);
  }

  private async resolveToken(): Promise<string> {
    const t = this.options.token;
    return typeof t === "function" ? await t() : (t ?? "");
  }

  // ---- frames ----

  private onFrame(f: ServerFrame): void {
    const frame = f.frame;
    switch (frame.case) {
      case "welcome": {
        this.failures = 0;
        this.backoff.reset();
        this.serverOffsetMs = Date.now() - Number(frame.value.serverMs);
        this.setState("open");
        this.startHeartbeat(frame.value.heartbeatMs);
        this.emit("welcome", frame.value);
        // The URL joined the room; a room chosen since is joined now.
        if (this.room && frame.value.room !== this.room) this.join(this.room);
        break;
      }
      case "block":
        this.enqueue(() => this.deliver(frame.value));
        break;
      case "attrs": {
        const a = frame.value;
        const st = this.attrs(a.room);
        const outcome = st.apply(a);
        if (outcome === "gap") {
          this.sendFrame({ case: "attrSync", value: create(AttrSyncSchema, { room: a.room, afterVersion: st.version }) });
        } else if (outcome === "applied") {
          this.emit("attrs", a.room, st);
        }
        break;
      }
      case "direct":
        if (frame.value.message) this.emit("direct", frame.value.message);
        break;
      case "broadcast":
        if (frame.value.message) this.emit("broadcast", frame.value.message);
        break;
      case "error": {
        const { code, reason } = frame.value;
        if (code === 401 && reason.startsWith("token expired") && typeof this.options.token === "function") {
          void this.refresh();
        }
        this.emit("error", code, reason);
        break;
      }
      case "kicked":
        this.kicked = true;
        this.emit("kicked", frame.value.room, frame.value.reason);
        break;
      case "reconnect":
        // A 1001 close follows; come back where and when the server says.
        this.redirect = { url: frame.value.url, delayMs: frame.value.delayMs };
        break;
      case "ack": {
        const a = frame.value;
        const waiting = this.acks.get(a.id);
        if (!waiting) break;
        this.acks.delete(a.id);
        clearTimeout(waiting.timer);
        if (a.code === 0) waiting.resolve(a);
        else waiting.reject(Object.assign(new Error(`barrage: ${a.code} ${a.reason}`), { code: a.code, reason: a.reason }));
        break;
      }
      default:
        break;
    }
  }

  private async refresh(): Promise<void> {
    try {
      const token = await this.resolveToken();
      this.token = token;
      this.sendFrame({ case: "refresh", value: create(RefreshSchema, { token }) });
    } catch (e) {
      this.emit("error", 0, `token callback failed: ${e}`);
    }
  }

  /** Shows a block's new messages, short-polling a gap before them first. */
  private async deliver(b: Pick<Block, "room" | "messages" | "online" | "backfill" | "truncated" | "lastSeq">): Promise<void> {
    const cursor = this.cursor(b.room);
    const fresh = cursor.fresh(b.messages);
    this.counters.duplicatesDropped += fresh.duplicates;
    let messages = fresh.messages;
    if (fresh.gap && !b.truncated) {
      const filled = await this.fillGap(b.room, fresh.gap.after, fresh.gap.before);
      messages = [...filled.messages, ...messages];
      this.counters.gapsFilled++;
      this.counters.gapMessages += filled.messages.length;
      this.emit("gap", b.room, filled.messages.length, filled.truncated);
    }
    if (messages.length > 0) cursor.advance(messages[messages.length - 1].seq);
    const now = Date.now();
    for (const m of messages) {
      const latency = now - Number(m.createdMs) - this.serverOffsetMs;
      this.counters.latencyMs = this.counters.messages === 0 ? latency : this.counters.latencyMs * 0.9 + latency * 0.1;
      this.counters.messages++;
    }
    if (b.room === this.room) this.emit("online", b.room, b.online);
    if (messages.length === 0) return;
    this.emit("block", { room: b.room, messages, online: b.online, backfill: b.backfill });
    for (const m of messages) this.emit("message", m);
  }

  /** The messages between `after` and `before` (exclusive), by short poll. */
  private async fillGap(room: string, after: bigint, before: bigint): Promise<{ messages: Message[]; truncated: boolean }> {
    const out: Message[] = [];
    let cursor = after;
    let truncated = false;
    try {
      for (let i = 0; i < 10 && cursor < before - 1n; i++) {
        const a = await poll(this.fetchFn, httpBase(this.url), room, cursor, POLL_LIMIT, this.token);
        truncated ||= a.truncated;
        for (const m of a.messages) if (m.seq > cursor && m.seq < before) out.push(m);
        if (a.next <= cursor) break;
        cursor = a.next;
      }
    } catch (e) {
      this.emit("error", 0, `gap fill failed: ${e}`);
    }
    return { messages: out, truncated };
  }

  // ---- short-poll fallback ----

  private startPolling(): void {
    this.setState("polling");
    const since = Date.now();
    const loop = async (): Promise<void> => {
      if (this.closing || this.state !== "polling") return;
      let wait = 2000;
      try {
        const room = this.room;
        const a = await poll(this.fetchFn, httpBase(this.url), room, this.cursor(room).last, POLL_LIMIT, this.token);
        await this.deliver({ room, messages: a.messages, online: 0n, backfill: false, truncated: true, lastSeq: a.next });
        this.cursor(room).advance(a.next);
        wait = a.messages.length >= POLL_LIMIT ? 0 : a.pollIntervalMs;
      } catch (e) {
        this.emit("error", 0, `poll failed: ${e}`);
      }
      if (this.closing) return;
      if (Date.now() - since >= this.opts.wsRetryMs) {
        // Try the WebSocket again; a failure comes back here.
        this.failures = this.opts.pollAfterFailures - 1;
        void this.open();
        return;
      }
      this.clearTimer();
      this.timer = setTimeout(() => void loop(), wait);
    };
    void loop();
  }

  // ---- plumbing ----

  /** Blocks are handled one at a time: one waiting on a gap fill holds the ones after it. */
  private enqueue(task: () => Promise<void>): void {
    this.queue = this.queue.then(task, task);
  }

  private sendFrame(frame: Parameters<typeof encode>[0]): void {
    if (this.ws && this.ws.readyState === 1) this.ws.send(encode(frame, this.opts.format));
  }

  private startHeartbeat(heartbeatMs: number): void {
    this.stopHeartbeat();
    const every = Math.max(1000, heartbeatMs / 2);
    this.heartbeat = setInterval(() => {
      if (Date.now() - this.lastRx > heartbeatMs * 2) {
        // Silent for two heartbeats: the connection is dead even if TCP has not noticed.
        this.ws?.close(4000, "heartbeat timeout");
        return;
      }
      this.sendFrame({ case: "ping", value: create(PingSchema, {}) });
    }, every);
  }

  private stopHeartbeat(): void {
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private clearTimers(): void {
    this.clearTimer();
    this.stopHeartbeat();
  }

  private setState(s: State): void {
    if (s === this.state) return;
    this.state = s;
    this.emit("state", s);
  }

  private cursor(room: string): RoomCursor {
    let c = this.cursors.get(room);
    if (!c) this.cursors.set(room, (c = new RoomCursor()));
    return c;
  }

  private attrs(room: string): AttrState {
    let a = this.attrStates.get(room);
    if (!a) this.attrStates.set(room, (a = new AttrState()));
    return a;
  }
}
