import { describe, expect, it } from "bun:test";
import { ConfigError } from "../../core/errors.ts";
import type { OutboxMessage } from "../../core/plugin.ts";
import { toJson } from "../../plugins/shared.ts";
import { compileTemplate, eventTypeOf, opOf, renderTemplate } from "../../core/config/template.ts";

function message(overrides: Partial<OutboxMessage> = {}): OutboxMessage {
  const fields = {
    id: 42n,
    outbox: "orders",
    topic: "eu",
    payload: { order: { id: "o-1", total: 99.5, lines: [{ sku: "A-1" }] }, region: "west", flag: false },
    headers: { tenant: "acme", trace: { id: "t-9" } },
    dedupKey: "orders:42",
    eventType: "order.created",
    op: "insert",
    createdAt: new Date("2026-01-01T00:00:00Z"),
    ...overrides,
  };
  return { ...fields, payloadText: overrides.payloadText ?? toJson(fields.payload) };
}

describe("templates", () => {
  it("renders every metadata placeholder with the literal text around it", () => {
    const render = compileTemplate("tide.{outbox}/{topic}/{op}/{event_type}#{id}!");
    expect(render(message())).toBe("tide.orders/eu/insert/order.created#42!");
  });

  it("renders nested payload and header paths, including array indexes", () => {
    const render = compileTemplate("{payload.order.id}:{payload.order.lines.0.sku}:{headers.tenant}:{headers.trace.id}");
    expect(render(message())).toBe("o-1:A-1:acme:t-9");
  });

  it("renders numbers and booleans as text and objects as compact JSON", () => {
    const render = compileTemplate("{payload.order.total}|{payload.flag}|{headers.trace}");
    expect(render(message())).toBe('99.5|false|{"id":"t-9"}');
  });

  it("renders a null topic and missing or null values as the empty string", () => {
    const render = compileTemplate("[{topic}][{payload.nope.deeper}][{headers.absent}][{payload.none}]");
    expect(render(message({ topic: null, payload: { none: null } }))).toBe("[][][][]");
  });

  it("does not walk into inherited properties", () => {
    expect(compileTemplate("{payload.constructor}")(message())).toBe("");
  });

  it("walks into a payload that is not an object without failing", () => {
    expect(compileTemplate("x{payload.a}y")(message({ payload: "just text" }))).toBe("xy");
  });

  it("treats doubled braces as literal braces", () => {
    expect(compileTemplate("{{{outbox}}}")(message())).toBe("{orders}");
  });

  it("rejects an unknown placeholder at compile time, naming it and the template", () => {
    const attempt = () => compileTemplate("orders.{foo}");
    expect(attempt).toThrow(ConfigError);
    expect(attempt).toThrow('template "orders.{foo}": unknown placeholder {foo}');
  });

  it("rejects a bare {payload}, an empty path segment and an unclosed brace", () => {
    expect(() => compileTemplate("{payload}")).toThrow("unknown placeholder {payload}");
    expect(() => compileTemplate("{headers..x}")).toThrow("unknown placeholder {headers..x}");
    expect(() => compileTemplate("orders.{outbox")).toThrow('unclosed "{"');
  });

  it("hands each substituted value, with its placeholder's name, to options.value and inserts what it returns", () => {
    const seen: [string, string][] = [];
    const rendered = renderTemplate("a.{topic}/{payload.region}.{{x}}", message(), {
      value: (value, placeholder) => (seen.push([placeholder, value]), value.toUpperCase()),
    });
    expect(rendered).toBe("a.EU/WEST.{x}");
    expect(seen).toEqual([["topic", "eu"], ["payload.region", "west"]]);
    expect(() => renderTemplate("orders.{payload.region}", message(), { value: () => { throw new Error("refused"); } })).toThrow("refused");
  });

  it("renderTemplate gives the same result as a compiled template and reports the same errors", () => {
    expect(renderTemplate("{outbox}.{payload.region}", message())).toBe("orders.west");
    expect(renderTemplate("{outbox}.{payload.region}", message({ outbox: "billing" }))).toBe("billing.west");
    expect(() => renderTemplate("{nope}", message())).toThrow(ConfigError);
  });
});

describe("event type and op", () => {
  it("takes the event type from the headers first", () => {
    expect(eventTypeOf({ event_type: "from.header" }, () => ({ event_type: "from.payload" }))).toBe("from.header");
  });

  it("does not look at the payload when the headers name them", () => {
    const untouched = () => {
      throw new Error("the payload was read");
    };
    expect(eventTypeOf({ event_type: "from.header" }, untouched)).toBe("from.header");
    expect(opOf({ op: "update" }, untouched)).toBe("update");
  });

  it("falls back to the payload, then to \"event\"", () => {
    expect(eventTypeOf({}, () => ({ event_type: "from.payload" }))).toBe("from.payload");
    expect(eventTypeOf({}, () => ({ other: 1 }))).toBe("event");
    expect(eventTypeOf({}, () => null)).toBe("event");
    expect(eventTypeOf({}, () => ["event_type"])).toBe("event");
  });

  it("ignores empty and non-string event types", () => {
    expect(eventTypeOf({ event_type: "" }, () => ({ event_type: 7 }))).toBe("event");
    expect(eventTypeOf({ event_type: 7 }, () => ({ event_type: "from.payload" }))).toBe("from.payload");
  });

  it("takes op from the headers, then the payload, then \"publish\"", () => {
    expect(opOf({ op: "update" }, () => ({ op: "insert" }))).toBe("update");
    expect(opOf({}, () => ({ op: "delete" }))).toBe("delete");
    expect(opOf({}, () => "text payload")).toBe("publish");
  });
});
