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

/** A header value as text: a string as it is, anything else (number, boolean, object) as JSON text. */
export function headerText(value: unknown): string {
  return typeof value === "string" ? value : toJson(value);
}

/**
 * The `id` of a structured CloudEvents body (a JSON object with a string `specversion` and a
 * string `id`), which sources use as the message's own id when no header carries one.
 */
export function cloudEventId(payload: unknown): string | undefined {
  if (typeof payload !== "object" || payload === null || Array.isArray(payload)) return undefined;
  const { specversion, id } = payload as { specversion?: unknown; id?: unknown };
  return typeof specversion === "string" && typeof id === "string" && id !== "" ? id : undefined;
}

export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
