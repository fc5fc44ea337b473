/**
 * barrage-client: the client side of barrage's protocol. See README.md.
 *
 * ```ts
 * import { BarrageClient } from "barrage-client";
 * const client = new BarrageClient({ url: "ws://127.0.0.1:8080/ws", room: "live1" });
 * client.onType("chat", (m) => console.log(new TextDecoder().decode(m.data)));
 * client.connect();
 * ```
 */
export { BarrageClient } from "./client.js";
export type { BlockEvent, ClientEvents, ClientOptions, State, Stats, WebSocketCtor, WebSocketLike } from "./client.js";
export { AttrState } from "./attrs.js";
export type { AttrOutcome } from "./attrs.js";
export { Backoff } from "./backoff.js";
export { RoomCursor } from "./cursor.js";
export type { Fresh } from "./cursor.js";
export { decode, encode, SUBPROTOCOL } from "./codec.js";
export type { Format } from "./codec.js";
export { httpBase, poll } from "./poll.js";
export type { FetchLike, PollAnswer } from "./poll.js";
export * as proto from "./gen/barrage/v1/barrage_pb.js";
export type { Ack, Attrs, Block, Message, Welcome } from "./gen/barrage/v1/barrage_pb.js";
