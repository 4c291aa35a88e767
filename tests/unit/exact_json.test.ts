// Payload text and the values read from it: what a message carries is the text PostgreSQL produced;
// what filters, templates, wire formats and the stdout sink read from it keeps every digit.

import { describe, expect, it } from "bun:test";
import { compileFilter } from "../../core/config/filter.ts";
import { toMessage } from "../../core/engine/forward_batch.ts";
import { JsonNumber, parseJson, stringifyJson } from "../../core/json.ts";
import { withoutNulEscapes } from "../../core/engine/reverse.ts";
import { renderTemplate } from "../../core/config/template.ts";
import { wireFormatter } from "../../core/config/wire_format.ts";
import { formatLine } from "../../plugins/stdout/index.ts";

// As PostgreSQL writes jsonb: keys sorted by length, then bytes; ": " and ", " between them.
const PAYLOAD = `{"id": 9007199254740993, "big": 123456789012345678901234567890, "tiny": 0.1000000000000000055511151231257827, "price": 1.50, "amount": 12345678901234567890.12, "record": {"n": -18446744073709551617}, "event_type": "order.created"}`;

function stored(payload = PAYLOAD, headers: string | null = `{"trace": 9007199254740993}`) {
  return toMessage({
    id: 7n, topic: "public.orders", payload, headers, created_at: new Date("2026-01-01T00:00:00Z"),
  }, "orders");
}

describe("lossless JSON", () => {
  it("keeps integers beyond 2^53 as BigInt and other changed numbers as their text", () => {
    const value = parseJson(`{"a": 9007199254740993, "b": 1.50, "c": 1e400, "d": 12345678901234567890.12, "e": 2, "f": 0.5, "g": -0}`) as
      Record<string, unknown>;
    expect(value.a).toBe(9007199254740993n);
    expect(value.b).toEqual(new JsonNumber("1.50"));
    expect(String(value.c)).toBe("1e400");
    expect(String(value.d)).toBe("12345678901234567890.12");
    expect([value.e, value.f]).toEqual([2, 0.5]);
    expect(String(value.g)).toBe("-0");
  });

  it("writes parsed values back with the numbers exactly as they were", () => {
    const text = `{"a":9007199254740993,"b":[1.50,1e400,-18446744073709551617],"c":"caf\u00e9","d":{"e":0.1000000000000000055511151231257827}}`;
    expect(stringifyJson(parseJson(text))).toBe(text);
  });

  it("refuses text that is not JSON, like JSON.parse", () => {
    expect(() => parseJson(`{"a": 1,}`)).toThrow(SyntaxError);
  });
});

describe("an outbox message", () => {
  it("carries the payload text unchanged and reads fields from it exactly", () => {
    const message = stored();
    expect(message.payloadText).toBe(PAYLOAD);
    expect((message.payload as Record<string, unknown>).id).toBe(9007199254740993n);
    expect(message.headers.trace).toBe(9007199254740993n);
    expect(message.eventType).toBe("order.created");
    expect(message.dedupKey).toBe("orders:7");
  });

  it("takes the event type and op from headers first", () => {
    const message = stored(PAYLOAD, `{"op": "update", "event_type": "from.header"}`);
    expect([message.eventType, message.op]).toEqual(["from.header", "update"]);
  });
});

describe("filters on exact payloads", () => {
  const matches = (expression: string, message = stored()) =>
    compileFilter(expression, "test").evaluate({ payload: message.payload, headers: message.headers, topic: message.topic, op: message.op });

  it("compares integers beyond 2^53 exactly, in payload and headers", () => {
    expect(matches("payload.id == 9007199254740993").match).toBe(true);
    expect(matches("payload.id == 9007199254740992").match).toBe(false);
    expect(matches("payload.id > 9007199254740992").match).toBe(true);
    expect(matches("headers.trace == 9007199254740993").match).toBe(true);
    expect(matches("payload.record.n < -18446744073709551616").match).toBe(true);
  });

  it("reads other numbers as doubles, as CEL does", () => {
    expect(matches("payload.price == 1.5").match).toBe(true);
    expect(matches("payload.amount > 1.0e19").match).toBe(true);
  });
});

describe("templates on exact payloads", () => {
  it("renders numbers as the payload writes them", () => {
    const message = stored();
    expect(renderTemplate("{payload.id}/{payload.price}/{payload.amount}/{headers.trace}", message))
      .toBe("9007199254740993/1.50/12345678901234567890.12/9007199254740993");
    expect(renderTemplate("{payload.record}", message)).toBe(`{"n":-18446744073709551617}`);
  });
});

describe("wire formats on exact payloads", () => {
  it("embeds the payload text as it is in envelope and CloudEvents bodies", () => {
    const envelope = wireFormatter("envelope", "p")!(stored()).payloadText;
    expect(envelope).toContain(`"payload":${PAYLOAD},`);
    expect(envelope).toContain(`"headers":{"trace":9007199254740993}`);
    expect(JSON.parse(envelope).id).toBe("7");
    const cloudEvent = wireFormatter("cloudevents", "p")!(stored()).payloadText;
    expect(cloudEvent.endsWith(`"data":${PAYLOAD}}`)).toBe(true);
    expect(JSON.parse(cloudEvent).type).toBe("order.created");
  });

  it("writes the parts of a table-capture payload back exactly in the sequin shape", () => {
    const captured = `{"action": "insert", "record": {"id": 9007199254740993, "total": 10.10}, "changes": null}`;
    const body = wireFormatter("sequin", "p")!(stored(captured)).payloadText;
    expect(body.startsWith(`{"record":{"id":9007199254740993,"total":10.10},"changes":null,"action":"insert",`)).toBe(true);
    const plain = wireFormatter("sequin", "p")!(stored(`{"id": 9007199254740993}`)).payloadText;
    expect(plain.startsWith(`{"record":{"id": 9007199254740993},"changes":null,"action":"publish",`)).toBe(true);
  });
});

describe("stdout and file lines", () => {
  it("write the payload text as it is, alone or inside the JSON line", () => {
    expect(formatLine(stored(), "payload")).toBe(`${PAYLOAD}\n`);
    const line = formatLine(stored(), "json");
    expect(line).toBe(
      `{"id":"7","outbox":"orders","topic":"public.orders","event_type":"order.created","op":"publish","dedup_key":"orders:7",` +
        `"headers":{"trace":9007199254740993},"payload":${PAYLOAD}}\n`,
    );
  });
});

describe("inbound payload text", () => {
  it("turns a \\u0000 escape into \\ufffd, which jsonb can hold, and leaves an escaped backslash alone", () => {
    expect(withoutNulEscapes(String.raw`{"a": "x\u0000y", "b": "\\u0000"}`)).toBe(String.raw`{"a": "x\ufffdy", "b": "\\u0000"}`);
    expect(withoutNulEscapes(`{"a": 1}`)).toBe(`{"a": 1}`);
  });
});
