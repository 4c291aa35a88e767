// What a forward pipeline sends as the message body (`wire_format` in its config):
//   payload      the payload itself; metadata travels in transport headers (the default)
//   envelope     {id, dedup_key, outbox, topic, event_type, op, headers, payload, created_at}
//   cloudevents  CloudEvents 1.0 structured JSON (id = dedup key, type = event type), sent with the
//                content type application/cloudevents+json
//   cloudevents-binary  CloudEvents 1.0 binary mode: the payload is the body, unchanged; the
//                attributes travel in transport headers (each sink follows its protocol binding)
//   sequin       {record, changes, action, metadata: {table_schema, table_name, commit_timestamp,
//                consumer: {id, name}}}, the shape Sequin sends, for table-capture messages

import { createHash } from "node:crypto";
import { ConfigError } from "../errors.ts";
import { jsonObject, mayHaveKey, stringifyJson } from "../json.ts";
import { withPayloadText } from "../message.ts";
import type { OutboxMessage } from "../plugin.ts";

export const WIRE_FORMATS = ["payload", "envelope", "cloudevents", "cloudevents-binary", "sequin"] as const;
export type WireFormat = (typeof WIRE_FORMATS)[number];

export type Formatter = (message: OutboxMessage) => OutboxMessage;

/**
 * The content type of a structured CloudEvent in the JSON format. The charset is written in lower
 * case: RFC 2046 makes it case-insensitive, and the official JavaScript SDK matches it exactly.
 */
export const CLOUDEVENTS_JSON = "application/cloudevents+json; charset=utf-8";
/** datacontenttype of tide's CloudEvents: the payload is always JSON. */
const DATA_CONTENT_TYPE = "application/json";

/**
 * The formatter of a wire format: a message whose payloadText is the body. The payload's own text
 * goes into the body as it is (envelope `payload`, CloudEvents `data`, sequin `record`); only the
 * fields around it are written by the relay.
 */
export function wireFormatter(format: unknown, pipeline: string): Formatter | undefined {
  if (format === undefined || format === "payload") return undefined;
  const consumer = { id: stableUuid(pipeline), name: pipeline };
  switch (format) {
    case "envelope":
      return (m) => withPayloadText(m, envelope(m));
    case "cloudevents":
      return (m) => {
        const structured = withPayloadText(m, cloudEvent(m));
        structured.contentType = CLOUDEVENTS_JSON;
        return structured;
      };
    case "cloudevents-binary":
      return (m) => {
        const binary = withPayloadText(m, m.payloadText);
        binary.contentType = DATA_CONTENT_TYPE;
        binary.cloudEventAttributes = cloudEventAttributes(m);
        return binary;
      };
    case "sequin":
      return (m) => withPayloadText(m, sequin(m, consumer));
    default:
      throw new ConfigError(
        `pipeline "${pipeline}": 'wire_format' must be one of ${WIRE_FORMATS.join(", ")} (got ${JSON.stringify(format)})`,
      );
  }
}

function envelope(m: OutboxMessage): string {
  return jsonObject([
    ...fields({ id: String(m.id), dedup_key: m.dedupKey, outbox: m.outbox, topic: m.topic, event_type: m.eventType, op: m.op, headers: m.headers }),
    ["payload", m.payloadText],
    ...fields({ created_at: new Date(m.createdAt).toISOString() }),
  ]);
}

function cloudEvent(m: OutboxMessage): string {
  return jsonObject([
    ...fields({ ...cloudEventAttributes(m), datacontenttype: DATA_CONTENT_TYPE }),
    ["data", m.payloadText],
  ]);
}

/** The context attributes of a message's CloudEvent, datacontenttype aside. */
function cloudEventAttributes(m: OutboxMessage): Record<string, string> {
  return {
    specversion: "1.0",
    id: m.dedupKey,
    source: `/tide/outbox/${m.outbox}`,
    type: m.eventType,
    ...(m.topic ? { subject: m.topic } : {}),
    time: new Date(m.createdAt).toISOString(),
  };
}

/**
 * A table-capture payload ({record, changes, action}) is taken apart, its parts written back
 * losslessly; any other payload is the record, as it is.
 */
function sequin(m: OutboxMessage, consumer: { id: string; name: string }): string {
  const payload = mayHaveKey(m.payloadText, "record") ? m.payload : undefined;
  const captured = typeof payload === "object" && payload !== null && !Array.isArray(payload) && "record" in payload;
  const parts = captured ? (payload as Record<string, unknown>) : undefined;
  const [schema, table] = (m.topic ?? "").includes(".") ? m.topic!.split(".", 2) : [undefined, m.topic];
  return jsonObject([
    ["record", parts ? stringifyJson(parts.record) : m.payloadText],
    ...fields({
      changes: parts ? parts.changes ?? null : null,
      action: parts ? parts.action : m.op,
      metadata: {
        table_schema: m.headers.table_schema ?? schema ?? null,
        table_name: m.headers.table_name ?? table ?? null,
        commit_timestamp: new Date(m.createdAt).toISOString(),
        consumer,
      },
    }),
  ]);
}

/** Each value as lossless JSON text. */
function fields(values: Record<string, unknown>): [string, string][] {
  return Object.entries(values).map(([key, value]) => [key, stringifyJson(value)]);
}

/** A UUID-shaped id that stays the same for a pipeline name (consumer.id in the sequin format). */
function stableUuid(name: string): string {
  const h = createHash("sha256").update(`tide-pipeline:${name}`).digest("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-5${h.slice(13, 16)}-${((parseInt(h[16], 16) & 3) | 8).toString(16)}${h.slice(17, 20)}-${h.slice(20, 32)}`;
}
