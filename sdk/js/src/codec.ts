import { create, fromBinary, fromJson, fromJsonString, toBinary, toJsonString } from "@bufbuild/protobuf";
import type { JsonValue } from "@bufbuild/protobuf";
import {
  ClientFrameSchema,
  MessageSchema,
  ServerFrameSchema,
  type ClientFrame,
  type Message,
  type ServerFrame,
} from "./gen/barrage/v1/barrage_pb.js";

/** The wire format: protobuf binary frames, or the same messages as proto3 JSON text frames. */
export type Format = "proto" | "json";

export const SUBPROTOCOL: Record<Format, string> = { proto: "barrage.v1.proto", json: "barrage.v1.json" };

/** A client frame as the WebSocket sends it. */
export function encode(frame: ClientFrame["frame"], format: Format): string | Uint8Array {
  const f = create(ClientFrameSchema, { frame });
  return format === "json" ? toJsonString(ClientFrameSchema, f) : toBinary(ClientFrameSchema, f);
}

/** A server frame from what the WebSocket received (text, ArrayBuffer, or a Node Buffer). */
export function decode(data: unknown, format: Format): ServerFrame {
  if (format === "json") {
    const text = typeof data === "string" ? data : new TextDecoder().decode(bytes(data));
    return fromJsonString(ServerFrameSchema, text, { ignoreUnknownFields: true });
  }
  return fromBinary(ServerFrameSchema, bytes(data), { readUnknownFields: false });
}

function bytes(data: unknown): Uint8Array {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (typeof data === "string") return new TextEncoder().encode(data);
  throw new TypeError("barrage-client: a frame that is neither text nor binary");
}

/** A message as JSON (short polls answer in the WebSocket's JSON). */
export function messageFromJson(json: JsonValue): Message {
  return fromJson(MessageSchema, json, { ignoreUnknownFields: true });
}
