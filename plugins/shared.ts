// Small helpers the built-in plugins share. Plugins import nothing from the engine; this file is
// theirs, so it may be imported by any of them (a drop-in plugin would carry its own copy).

import type { z } from "zod";
import type { OutboxMessage, PluginContext, RenderOptions } from "../core/plugin.ts";

const rawJSON = (JSON as unknown as { rawJSON(text: string): unknown }).rawJSON;

/** A message to render templates against when a config is checked: an unknown placeholder fails here. */
export const PROBE_MESSAGE: OutboxMessage = {
  id: 0n,
  outbox: "outbox",
  topic: null,
  payloadText: "{}",
  payload: {},
  headers: {},
  dedupKey: "outbox:0",
  eventType: "event",
  op: "publish",
  createdAt: new Date(0),
};

/**
 * The body a sink sends for a message: its payload's JSON text, byte for byte as PostgreSQL produced
 * it (or as a wire format wrapped it). Every sink goes through this one function, so the way payload
 * text is carried is decided in one place.
 */
export function payloadBody(message: OutboxMessage): string {
  return message.payloadText;
}

/**
 * The same body as bytes, for a client that sends bytes: the payload's bytes as PostgreSQL sent them
 * when the message has them (no decoding, no encoding), else the UTF-8 of payloadBody.
 */
export function payloadBodyBytes(message: OutboxMessage): Buffer {
  const bytes = message.payloadBytes;
  if (bytes === undefined) return Buffer.from(payloadBody(message));
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * A config needs `key` unless it has `instead`, and never both: the one statement of such a pair. It
 * adds the check (the first issues the schema reports) and states the pair in the schema's JSON
 * Schema as `anyOf: [{required: [key]}, {required: [instead]}]`, which is where the catalog's
 * required keys come from (requiredKeysOf in core/plugins.ts). `empty`: "" counts as set (a RabbitMQ
 * routing key); `hint` is added to the "required" message.
 */
export function keyOrInstead<T extends z.ZodObject>(schema: T, key: string, instead: string, options: { empty?: boolean; hint?: string } = {}): T {
  const has = (value: unknown) => (options.empty ? value !== undefined : Boolean(value));
  return schema
    .superRefine((config: Record<string, unknown>, issues) => {
      if (!has(config[key]) && !has(config[instead])) {
        issues.addIssue({ code: "custom", path: [key], message: `required unless '${instead}' is set${options.hint ? ` ${options.hint}` : ""}` });
      }
      if (has(config[key]) && has(config[instead])) {
        issues.addIssue({ code: "custom", path: [instead], message: `cannot be combined with '${key}'` });
      }
    })
    .meta({ anyOf: [{ required: [key] }, { required: [instead] }] });
}

/**
 * JSON text of a value. Integers beyond 2^53 (BigInt) and exact numbers in a parsed payload or
 * headers are written back as the numbers they were, never rounded and never quoted.
 */
export function toJson(value: unknown): string {
  return JSON.stringify(value, (_key, v) => (typeof v === "bigint" ? rawJSON(v.toString()) : v)) ?? "null";
}

/**
 * `fields` as a JSON object with a last member `"payload"` that is the message's payload text,
 * embedded as it is (payloadBody), so that wrapping a payload never parses and re-writes it.
 */
export function withPayload(fields: Record<string, unknown>, message: OutboxMessage): string {
  const head = toJson(fields);
  return `${head === "{}" ? "{" : `${head.slice(0, -1)},`}"payload":${payloadBody(message)}}`;
}

/** A header value as text: a string as it is, anything else (number, boolean, object) as JSON text. */
export function headerText(value: unknown): string {
  return typeof value === "string" ? value : toJson(value);
}

/**
 * What a source hands over as a message's payload: `payloadText` is a JSON body exactly as it came
 * (the engine stores it with a cast to jsonb), a body that is not JSON as a JSON string of its text,
 * and no body (a Kafka tombstone) as null. `parsed` is the body parsed with JSON.parse, its numbers
 * only approximate: for looking up an id in it, never for sending on.
 */
export function inboundPayload(body: Uint8Array | null): { payloadText: string; parsed: unknown } {
  if (body === null) return { payloadText: "null", parsed: null };
  const text = new TextDecoder().decode(body);
  try {
    return { payloadText: text, parsed: JSON.parse(text) };
  } catch {
    return { payloadText: JSON.stringify(text), parsed: text };
  }
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

/**
 * The W3C trace context among a message's headers (`traceparent`, and `tracestate` with it), for a
 * sink that sends only chosen headers (the webhook). A value that could not be a header value (not
 * a string, a line break) is left out rather than failing the message.
 */
export function traceContextOf(headers: Record<string, unknown>): Record<string, string> {
  const { traceparent, tracestate } = headers;
  if (typeof traceparent !== "string" || !HEADER_TEXT.test(traceparent)) return {};
  return typeof tracestate === "string" && HEADER_TEXT.test(tracestate) ? { traceparent, tracestate } : { traceparent };
}

const HEADER_TEXT = /^[\x20-\x7e]{1,8192}$/;

/**
 * A CloudEvents attribute as an HTTP or NATS header value, percent-encoded as both bindings say:
 * space, double quote, percent and every character outside printable ASCII, as UTF-8 bytes.
 */
export function cloudEventHeaderValue(value: string): string {
  return /^[\x21\x23\x24\x26-\x7e]*$/.test(value)
    ? value
    : Array.from(value, (c) => (/^[\x21\x23\x24\x26-\x7e]$/.test(c) ? c : percentEncoded(c))).join("");
}

function percentEncoded(character: string): string {
  return Array.from(new TextEncoder().encode(character), (b) => `%${b.toString(16).toUpperCase().padStart(2, "0")}`).join("");
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

/**
 * oneTokenValues for names whose parts are split by another separator: an MQTT topic ("/"), a Redis
 * key (":"). A substituted value may not contain `separator` unless it is the message's {topic} or
 * its placeholder is listed under the config key `allowKey`.
 */
export function oneSegmentValues(separator: string, allowKey: string, allowIn: string[], parts: string): RenderOptions {
  const allowed = new Set(["topic", ...allowIn]);
  return {
    value(value, placeholder) {
      if (value.includes(separator) && !allowed.has(placeholder)) {
        throw new Error(
          `{${placeholder}} is "${value}", whose "${separator}" would add ${parts}; ` +
            `add "${placeholder}" to '${allowKey}' if its values may span several`,
        );
      }
      return value;
    },
  };
}

/** checkAllowDotsIn for a list kept under another config key (see oneSegmentValues). */
export function checkAllowedIn(template: string, allowIn: string[], allowKey: string, ctx: PluginContext, where: string): void {
  const placeholders = new Set<string>();
  ctx.render(template, PROBE_MESSAGE, { value: (value, placeholder) => (placeholders.add(placeholder), value) });
  const stray = allowIn.find((name) => !placeholders.has(name));
  if (stray !== undefined) {
    const known = [...placeholders].map((p) => `"${p}"`).join(", ") || "none";
    throw ctx.errors.config(`${where} "${template}" has no placeholder {${stray}} named in '${allowKey}' (its placeholders: ${known})`);
  }
}
