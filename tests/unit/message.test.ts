// The OutboxMessage made of a row read as bytes (core/message.ts): its payload is decoded only when
// something reads it. The event type and op come from the headers when they name them, without
// touching the payload: a drain to Kafka or NATS decodes no payload at all.

import { describe, expect, it } from "bun:test";
import { outboxMessage } from "../../core/message.ts";

/** Bytes that cannot be decoded: reading the payload's text fails the test. */
const UNDECODABLE = new Proxy(new Uint8Array([123, 125]), {}) as Uint8Array;

const message = (payload: string | Uint8Array, headers: Record<string, unknown>) =>
  outboxMessage({ id: 7n, outbox: "orders", topic: null, payload, headers, createdAt: new Date(0) });

describe("a message read as bytes", () => {
  it("takes the event type and op from the headers without decoding the payload", () => {
    const m = message(UNDECODABLE, { event_type: "order.paid", op: "update" });
    expect(m.eventType).toBe("order.paid");
    expect(m.op).toBe("update");
    expect(m.dedupKey).toBe("orders:7");
    expect(m.payloadBytes).toBe(UNDECODABLE);
  });

  it("decodes the payload on first read, and looks there when the headers lack a field", () => {
    const bytes = new TextEncoder().encode('{"event_type": "order.créé", "id": 9007199254740993}');
    const m = message(bytes, {});
    expect(m.eventType).toBe("order.créé");
    expect(m.op).toBe("publish");
    expect(m.payloadText).toBe('{"event_type": "order.créé", "id": 9007199254740993}');
    expect((m.payload as { id: bigint }).id).toBe(9007199254740993n);
  });

  it("has no bytes when it was made from text", () => {
    const m = message('{"a": 1}', {});
    expect(m.payloadBytes).toBeUndefined();
    expect(m.payloadText).toBe('{"a": 1}');
  });
});
