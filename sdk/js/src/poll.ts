import type { Message } from "./gen/barrage/v1/barrage_pb.js";
import { messageFromJson } from "./codec.js";

/** One short poll's answer (`GET /v1/rooms/{room}/messages?after=SEQ`). */
export interface PollAnswer {
  messages: Message[];
  /** The seq to poll after next time. */
  next: bigint;
  /** Messages after the cursor may be missing (evicted, or from before a restart). */
  truncated: boolean;
  pollIntervalMs: number;
}

export type FetchLike = (url: string, init?: { headers?: Record<string, string> }) => Promise<{
  ok: boolean;
  status: number;
  text(): Promise<string>;
}>;

/** The public listener's HTTP base (`ws://h:p/ws` → `http://h:p`). */
export function httpBase(wsUrl: string): string {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  return `${u.protocol}//${u.host}`;
}

/** Polls `room` for what came after `after`. */
export async function poll(
  fetchFn: FetchLike,
  base: string,
  room: string,
  after: bigint,
  limit: number,
  token?: string,
): Promise<PollAnswer> {
  const url = `${base}/v1/rooms/${encodeURIComponent(room)}/messages?after=${after}&limit=${limit}`;
  const headers: Record<string, string> = token ? { Authorization: `Bearer ${token}` } : {};
  const res = await fetchFn(url, { headers });
  const text = await res.text();
  if (!res.ok) throw new Error(`barrage-client: poll ${res.status}: ${text}`);
  const body = JSON.parse(text);
  // `next` can pass 2^53: read it from the text, not the parsed number.
  const next = /"next":\s*"?(\d+)/.exec(text)?.[1];
  return {
    messages: (body.messages ?? []).map(messageFromJson),
    next: next ? BigInt(next) : after,
    truncated: Boolean(body.truncated),
    pollIntervalMs: Number(body.poll_interval_ms ?? 2000),
  };
}
