import type { Message } from "./gen/barrage/v1/barrage_pb.js";

/** What a block (or a poll's answer) holds that was not shown yet. */
export interface Fresh {
  /** Messages after the cursor, in seq order. */
  messages: Message[];
  /** Messages repeated from before the cursor (a backfill after a reconnect), dropped. */
  duplicates: number;
  /**
   * Set when the first fresh message is not the one after the cursor: the seqs from `after + 1`
   * to `before - 1` are missing and should be short-polled (`after=after`) before showing.
   */
  gap?: { after: bigint; before: bigint };
}

/**
 * One room's position: the highest seq shown (the README's client algorithm, steps 1 and 2).
 * Seqs within a room strictly increase by one per message; they start from a time-based base,
 * so the first message seen sets the cursor without a gap.
 */
export class RoomCursor {
  /** Highest seq shown; 0n: nothing yet. */
  last = 0n;

  /** Splits `messages` (in seq order) into fresh ones and duplicates, and finds a gap. */
  fresh(messages: readonly Message[]): Fresh {
    const fresh = messages.filter((m) => m.seq > this.last);
    const out: Fresh = { messages: fresh, duplicates: messages.length - fresh.length };
    if (this.last > 0n && fresh.length > 0 && fresh[0].seq > this.last + 1n) {
      out.gap = { after: this.last, before: fresh[0].seq };
    }
    return out;
  }

  /** Marks messages up to `seq` as shown. */
  advance(seq: bigint): void {
    if (seq > this.last) this.last = seq;
  }
}
