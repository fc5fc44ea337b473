import type { Attrs } from "./gen/barrage/v1/barrage_pb.js";

/** What applying an `attrs` frame did. */
export type AttrOutcome = "applied" | "stale" | "gap";

/**
 * A room's attributes at a version (the README's client algorithm, step 4): a snapshot
 * replaces everything; a delta applies when `fromVersion <= version < delta.version`; an older
 * one is stale; one starting past our version is a gap (send `attr_sync` from our version).
 */
export class AttrState {
  version = 0n;
  readonly values = new Map<string, Uint8Array>();

  apply(a: Attrs): AttrOutcome {
    if (a.snapshot) {
      this.values.clear();
    } else if (a.version <= this.version) {
      return "stale";
    } else if (a.fromVersion > this.version) {
      return "gap";
    }
    for (const e of a.entries) {
      if (e.deleted) this.values.delete(e.key);
      else this.values.set(e.key, e.value);
    }
    this.version = a.version;
    return "applied";
  }

  /** The values as text (UTF-8). */
  text(): Record<string, string> {
    const out: Record<string, string> = {};
    const dec = new TextDecoder();
    for (const [k, v] of this.values) out[k] = dec.decode(v);
    return out;
  }
}
