// The client's pure parts: the seq cursor, attribute versions, backoff, the codec.
import { test } from "node:test";
import assert from "node:assert/strict";
import { create, toBinary } from "@bufbuild/protobuf";
import { AttrState, Backoff, RoomCursor, decode, encode, proto } from "../dist/index.js";

const msg = (seq) => create(proto.MessageSchema, { seq: BigInt(seq), type: "chat" });

test("the cursor drops duplicates and finds gaps", () => {
  const c = new RoomCursor();
  let f = c.fresh([msg(100), msg(101)]);
  assert.equal(f.messages.length, 2);
  assert.equal(f.gap, undefined, "the first messages seen set the cursor");
  c.advance(101n);
  f = c.fresh([msg(100), msg(101), msg(102)]);
  assert.deepEqual([f.messages.map((m) => m.seq), f.duplicates], [[102n], 2]);
  f = c.fresh([msg(105), msg(106)]);
  assert.deepEqual(f.gap, { after: 101n, before: 105n });
});

test("attributes: snapshots replace, deltas apply in order, a gap is reported", () => {
  const a = new AttrState();
  const entry = (key, value) => create(proto.AttrEntrySchema, { key, value: new TextEncoder().encode(value) });
  const attrs = (v) => create(proto.AttrsSchema, v);
  assert.equal(a.apply(attrs({ version: 3n, snapshot: true, entries: [entry("a", "1"), entry("b", "2")] })), "applied");
  assert.equal(a.apply(attrs({ fromVersion: 2n, version: 4n, entries: [entry("a", "9")] })), "applied", "a superset delta");
  assert.equal(a.apply(attrs({ fromVersion: 3n, version: 4n, entries: [entry("a", "x")] })), "stale");
  assert.equal(a.apply(attrs({ fromVersion: 6n, version: 7n, entries: [] })), "gap");
  assert.deepEqual(a.text(), { a: "9", b: "2" });
  assert.equal(a.version, 4n);
});

test("backoff is full jitter under a doubling ceiling", () => {
  const b = new Backoff(100, 1000, () => 0.999);
  const delays = Array.from({ length: 6 }, () => b.next());
  assert.deepEqual(delays, [99, 199, 399, 799, 999, 999]);
  b.reset();
  assert.equal(new Backoff(100, 1000, () => 0).next(), 0);
  assert.equal(b.next(), 99);
});

test("frames encode and decode in both formats", () => {
  for (const format of ["proto", "json"]) {
    const wire = encode({ case: "send", value: create(proto.SendSchema, { type: "chat", id: "x" }) }, format);
    assert.equal(typeof wire, format === "json" ? "string" : "object");
    const server = create(proto.ServerFrameSchema, {
      frame: { case: "ack", value: create(proto.AckSchema, { id: "x", seq: 9007199254740993n }) },
    });
    const bytes = format === "json" ? JSON.stringify({ ack: { id: "x", seq: "9007199254740993" } }) : binary(server);
    const back = decode(bytes, format);
    assert.equal(back.frame.case, "ack");
    assert.equal(back.frame.value.seq, 9007199254740993n, "64-bit seqs survive");
  }
});

/** A server frame's bytes as the browser's WebSocket hands them over (an ArrayBuffer). */
function binary(m) {
  return toBinary(proto.ServerFrameSchema, m).slice().buffer;
}
