// Small helpers the built-in plugins share. Plugins import nothing from the engine; this file is
// theirs, so it may be imported by any of them (a drop-in plugin would carry its own copy).

import type { OutboxMessage } from "../core/plugin.ts";

/** A message to render templates against when a config is checked: an unknown placeholder fails here. */
export const PROBE_MESSAGE: OutboxMessage = {
  id: 0n,
  outbox: "outbox",
  topic: null,
  payload: {},
  headers: {},
  dedupKey: "outbox:0",
  eventType: "event",
  op: "publish",
  createdAt: new Date(0),
};

/** JSON text of a payload; BigInt values become strings instead of throwing. */
export function toJson(value: unknown): string {
  return JSON.stringify(value, (_key, v) => (typeof v === "bigint" ? v.toString() : v)) ?? "null";
}

export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
