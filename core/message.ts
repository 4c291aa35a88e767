// The OutboxMessage a sink receives. Its payload is the text PostgreSQL produced, carried as it is;
// it is parsed (losslessly, see json.ts) only when something reads a field of it: a filter, a
// template, the event type when no header names it. A backlog drained without filters parses no
// payload at all.

import { mayHaveKey, parseJson } from "./json.ts";
import type { OutboxMessage } from "./plugin.ts";
import { eventTypeOf, opOf } from "./config/template.ts";

export interface MessageFields {
  id: bigint;
  outbox: string;
  topic: string | null;
  payloadText: string;
  headers: Record<string, unknown>;
  createdAt: Date;
  /** Given when the payload is not where they come from (a wire format's envelope around it). */
  eventType?: string;
  op?: string;
}

export function outboxMessage(fields: MessageFields): OutboxMessage {
  const { payloadText, headers } = fields;
  let payload: unknown = UNPARSED;
  let eventType = fields.eventType;
  let op = fields.op;
  const parsed = () => (payload === UNPARSED ? (payload = parseText(payloadText)) : payload);
  // Only a payload that mentions the key is parsed to look for it.
  const field = (key: string) => (mayHaveKey(payloadText, key) ? parsed() : undefined);
  return {
    id: fields.id,
    outbox: fields.outbox,
    topic: fields.topic,
    payloadText,
    get payload() {
      return parsed();
    },
    headers,
    dedupKey: `${fields.outbox}:${fields.id}`,
    get eventType() {
      return (eventType ??= eventTypeOf(headers, field("event_type")));
    },
    get op() {
      return (op ??= opOf(headers, field("op")));
    },
    createdAt: fields.createdAt,
  };
}

/** The same message with another body (a wire format's), keeping the event type and op it had. */
export function withPayloadText(message: OutboxMessage, payloadText: string): OutboxMessage {
  const { id, outbox, topic, headers, createdAt, eventType, op } = message;
  return outboxMessage({ id, outbox, topic, headers, createdAt, eventType, op, payloadText });
}

const UNPARSED = Symbol("unparsed");

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
