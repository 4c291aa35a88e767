// The OutboxMessage a sink receives. Its payload is what PostgreSQL produced, carried as it is: the
// bytes of its text when the relay read them as bytes (payloadBytes, which a sink whose client takes
// bytes sends as they are), decoded to text only when something reads payloadText, and parsed
// (losslessly, see json.ts) only when something reads a field of it: a filter, a template, the event
// type when no header names it. A backlog drained to Kafka or NATS without filters neither decodes
// nor parses a payload.

import { mayHaveKey, parseJson } from "./json.ts";
import type { OutboxMessage } from "./plugin.ts";
import { eventTypeOf, opOf } from "./config/template.ts";

export interface MessageFields {
  id: bigint;
  outbox: string;
  topic: string | null;
  /** The payload's text, or the UTF-8 bytes of it (one of the two). */
  payload: string | Uint8Array;
  headers: Record<string, unknown>;
  createdAt: Date;
  /** Given when the payload is not where they come from (a wire format's envelope around it). */
  eventType?: string;
  op?: string;
}

export function outboxMessage(fields: MessageFields): OutboxMessage {
  const { headers } = fields;
  const payloadBytes = typeof fields.payload === "string" ? undefined : fields.payload;
  let payloadText = typeof fields.payload === "string" ? fields.payload : undefined;
  let payload: unknown = UNPARSED;
  let eventType = fields.eventType;
  let op = fields.op;
  const text = () => (payloadText ??= UTF8.decode(payloadBytes));
  const parsed = () => (payload === UNPARSED ? (payload = parseText(text())) : payload);
  // Only a payload that mentions the key is parsed to look for it.
  const field = (key: string) => (mayHaveKey(text(), key) ? parsed() : undefined);
  return {
    id: fields.id,
    outbox: fields.outbox,
    topic: fields.topic,
    get payloadText() {
      return text();
    },
    payloadBytes,
    get payload() {
      return parsed();
    },
    headers,
    dedupKey: `${fields.outbox}:${fields.id}`,
    get eventType() {
      return (eventType ??= eventTypeOf(headers, () => field("event_type")));
    },
    get op() {
      return (op ??= opOf(headers, () => field("op")));
    },
    createdAt: fields.createdAt,
  };
}

/** The same message with another body (a wire format's), keeping the event type and op it had. */
export function withPayloadText(message: OutboxMessage, payloadText: string): OutboxMessage {
  const { id, outbox, topic, headers, createdAt, eventType, op } = message;
  return outboxMessage({ id, outbox, topic, headers, createdAt, eventType, op, payload: payloadText });
}

/** How many bytes of payload `message` carries (its text's length when it has no bytes: near enough). */
export function payloadSize(message: OutboxMessage): number {
  return message.payloadBytes?.byteLength ?? message.payloadText.length;
}

const UNPARSED = Symbol("unparsed");
const UTF8 = new TextDecoder();

/**
 * PostgreSQL's text is always JSON; a source's may not be (a drop-in's mistake). Such text is read
 * as the string it is, as the inbox then stores it, rather than failing the batch it is in.
 */
function parseText(text: string): unknown {
  try {
    return parseJson(text);
  } catch {
    return text;
  }
}
