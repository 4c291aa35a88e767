// Small helpers the built-in plugins share. Plugins import nothing from the engine; this file is
// theirs, so it may be imported by any of them (a drop-in plugin would carry its own copy).

import type { OutboxMessage, PluginContext, RenderOptions } from "../core/plugin.ts";

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
/**
 * The body a sink sends for a message: its payload as JSON text. Every sink goes through this one
 * function, so the way payload text is carried (byte for byte as PostgreSQL produced it) is decided
 * in one place.
 */
export function payloadBody(message: OutboxMessage): string {
  return toJson(message.payload);
}

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

/**
 * Render options for a destination name made of "."-separated parts (a NATS subject, a Kafka
 * topic): a substituted value may not contain "." unless it is the message's {topic} (the
 * publisher's routing label, often "orders.created") or its placeholder is listed in allow_dots_in.
 * Otherwise a value could reach a subject or topic the template was not written for.
 */
export function oneTokenValues(allowDotsIn: string[], parts: string): RenderOptions {
  const allowed = new Set(["topic", ...allowDotsIn]);
  return {
    value(value, placeholder) {
      if (value.includes(".") && !allowed.has(placeholder)) {
        throw new Error(
          `{${placeholder}} is "${value}", whose "." would add ${parts}; ` +
            `add "${placeholder}" to 'allow_dots_in' if its values may span several`,
        );
      }
      return value;
    },
  };
}

/**
 * Renders a template with the probe message, which reports an unknown placeholder as a config
 * error, and checks that every allow_dots_in entry names one of its placeholders.
 */
export function checkAllowDotsIn(template: string, allowDotsIn: string[], ctx: PluginContext, where: string): void {
  const placeholders = new Set<string>();
  ctx.render(template, PROBE_MESSAGE, { value: (value, placeholder) => (placeholders.add(placeholder), value) });
  const stray = allowDotsIn.find((name) => !placeholders.has(name));
  if (stray !== undefined) {
    const known = [...placeholders].map((p) => `"${p}"`).join(", ") || "none";
    throw ctx.errors.config(`${where} "${template}" has no placeholder {${stray}} named in 'allow_dots_in' (its placeholders: ${known})`);
  }
}
