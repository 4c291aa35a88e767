import { describe, expect, it } from "bun:test";
import { ConfigError } from "../../core/errors.ts";
import { compileFilter, type FilterVars } from "../../core/filter.ts";

function vars(payload: unknown, overrides: Partial<FilterVars> = {}): FilterVars {
  return { payload, headers: {}, topic: null, op: "publish", ...overrides };
}

describe("filters", () => {
  it("compares JSON numbers with int literals, integral or not", () => {
    const filter = compileFilter("payload.total > 100", 'pipeline "orders"');
    expect(filter(vars({ total: 150 }))).toBe(true);
    expect(filter(vars({ total: 100.5 }))).toBe(true);
    expect(filter(vars({ total: 100 }))).toBe(false);
    expect(filter(vars({ total: 99.9 }))).toBe(false);
  });

  it("tests JSON numbers for equality against int and double literals", () => {
    expect(compileFilter("payload.qty == 2", "f")(vars({ qty: 2 }))).toBe(true);
    expect(compileFilter("payload.qty == 2", "f")(vars({ qty: 3 }))).toBe(false);
    expect(compileFilter("payload.price == 2.5", "f")(vars({ price: 2.5 }))).toBe(true);
    expect(compileFilter("payload.qty in [1, 2, 3]", "f")(vars({ qty: 2 }))).toBe(true);
  });

  it("does integer arithmetic on integral JSON numbers", () => {
    const even = compileFilter("payload.qty % 2 == 0 && payload.qty + 1 == 5", "f");
    expect(even(vars({ qty: 4 }))).toBe(true);
    expect(even(vars({ qty: 3 }))).toBe(false);
  });

  it("does double arithmetic once a field is converted with double()", () => {
    const filter = compileFilter("double(payload.price) * 2.0 > 5.0", "f");
    expect(filter(vars({ price: 3 }))).toBe(true);
    expect(filter(vars({ price: 2.25 }))).toBe(false);
  });

  it("sees headers, topic and op", () => {
    const filter = compileFilter('headers.tenant == "acme" && topic == "eu" && op == "insert"', "f");
    expect(filter(vars({}, { headers: { tenant: "acme" }, topic: "eu", op: "insert" }))).toBe(true);
    expect(filter(vars({}, { headers: { tenant: "acme" }, topic: null, op: "insert" }))).toBe(false);
  });

  it("supports macros over payload lists", () => {
    const filter = compileFilter('payload.lines.exists(l, l.sku.startsWith("GIFT-"))', "f");
    expect(filter(vars({ lines: [{ sku: "A-1" }, { sku: "GIFT-7" }] }))).toBe(true);
    expect(filter(vars({ lines: [{ sku: "A-1" }] }))).toBe(false);
  });

  it("treats a missing field as no match and reports why, without throwing", () => {
    const errors: Error[] = [];
    const filter = compileFilter("payload.total > 100", 'pipeline "orders"', { onError: (e) => errors.push(e) });
    expect(filter(vars({ other: 1 }))).toBe(false);
    expect(errors).toHaveLength(1);
    expect(errors[0]!.message).toContain('pipeline "orders": filter "payload.total > 100" could not be evaluated');
    expect(errors[0]!.message).toContain("total");
  });

  it("lets has() guard an optional field", () => {
    const errors: Error[] = [];
    const filter = compileFilter("has(payload.total) && payload.total > 100", "f", { onError: (e) => errors.push(e) });
    expect(filter(vars({ other: 1 }))).toBe(false);
    expect(filter(vars({ total: 101 }))).toBe(true);
    expect(errors).toHaveLength(0);
  });

  it("treats a non-boolean result as no match and reports it", () => {
    const errors: Error[] = [];
    const filter = compileFilter("payload.flag", "f", { onError: (e) => errors.push(e) });
    expect(filter(vars({ flag: "yes" }))).toBe(false);
    expect(filter(vars({ flag: true }))).toBe(true);
    expect(errors.map((e) => e.message)).toEqual(['f: filter "payload.flag" returned a string (yes) instead of a bool; treated as no match']);
  });

  it("does not need an error callback to survive an evaluation error", () => {
    expect(compileFilter("payload.a.b == 1", "f")(vars(null))).toBe(false);
  });

  it("leaves the message it evaluates unchanged", () => {
    const payload = { qty: 2, nested: { n: 3 } };
    compileFilter("payload.qty == 2", "f")(vars(payload));
    expect(payload).toEqual({ qty: 2, nested: { n: 3 } });
    expect(typeof payload.qty).toBe("number");
  });

  it("rejects a syntax error as a ConfigError naming the place and the expression", () => {
    const attempt = () => compileFilter("payload.total > > 1", 'pipeline "orders"');
    expect(attempt).toThrow(ConfigError);
    expect(attempt).toThrow('pipeline "orders": invalid filter "payload.total > > 1"');
  });

  it("rejects an unknown variable at compile time", () => {
    expect(() => compileFilter("paylod.total > 1", "f")).toThrow(/invalid filter "paylod.total > 1": .*paylod/);
  });

  it("rejects an expression that cannot produce a bool", () => {
    expect(() => compileFilter("1 + 2", "f")).toThrow('f: filter "1 + 2" must evaluate to a bool (got int)');
  });
});
