import { describe, expect, it } from "bun:test";
import { ConfigError } from "../../core/errors.ts";
import { compileFilter, type FilterVars } from "../../core/config/filter.ts";
import { RE2_MATCHES } from "../../core/config/filter_cost.ts";

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
    expect(errors.map((e) => e.message)).toEqual(['f: filter "payload.flag" returned a string (yes) instead of a bool']);
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

  it("hands back the error that kept it from deciding, and the pipeline's policy for such messages", () => {
    const filter = compileFilter("payload.total > 100", "f", { errorPolicy: "dead_letter" });
    expect(filter.evaluate(vars({ total: 101 }))).toEqual({ match: true });
    const result = filter.evaluate(vars({ other: 1 }));
    expect(result.match).toBe(false);
    expect(result.error?.message).toContain('f: filter "payload.total > 100" could not be evaluated');
    expect(filter.errorPolicy).toBe("dead_letter");
    expect(compileFilter("true", "f").errorPolicy).toBe("skip");
  });
});

describe("regular expressions in filters", () => {
  it("match anywhere in the string, as CEL's matches() does", () => {
    const filter = compileFilter('payload.sku.matches("^GIFT-[0-9]+$") || payload.sku.matches("X")', "f");
    expect(filter(vars({ sku: "GIFT-42" }))).toBe(true);
    expect(filter(vars({ sku: "aXb" }))).toBe(true);
    expect(filter(vars({ sku: "GIFT-4a" }))).toBe(false);
  });

  it("run in linear time and answer right where a backtracking engine gives up", () => {
    // A backtracking engine needs about 2^64 steps for the first branch; Bun's gives up after about
    // a second and answers false. RE2 finds the second branch in one pass.
    const filter = compileFilter('payload.text.matches("^(a+)+$|!$")', "f");
    expect(filter(vars({ text: `${"a".repeat(64)}!` }))).toBe(true);
    expect(filter(vars({ text: `${"a".repeat(64)}?` }))).toBe(false);
    expect(filter(vars({ text: "aaaa" }))).toBe(true);
  });

  it("keep working inside loops, parentheses and method chains", () => {
    const filter = compileFilter('payload.lines.exists(l, (l.sku).matches(("^A")) && l.sku.lowerAscii().matches("-1$"))', "f");
    expect(filter(vars({ lines: [{ sku: "B-1" }, { sku: "A-1" }] }))).toBe(true);
    expect(filter(vars({ lines: [{ sku: "A-2" }] }))).toBe(false);
  });

  it("leave a string literal that reads like a matches() call alone", () => {
    const filter = compileFilter('"x.matches(\\"y\\")".matches("matches") && payload.a == ".matches("', "f");
    expect(filter(vars({ a: ".matches(" }))).toBe(true);
  });

  it("reject patterns RE2 cannot run, naming the pattern, when the filter is compiled", () => {
    expect(() => compileFilter('payload.a.matches("(a)\\\\1")', 'pipeline "p"')).toThrow(ConfigError);
    expect(() => compileFilter('payload.a.matches("(?=a)b")', 'pipeline "p"')).toThrow(/invalid regular expression "\(\?=a\)b" for matches\(\)/);
  });

  it("reject a pattern taken from the message", () => {
    expect(() => compileFilter("payload.text.matches(payload.pattern)", 'pipeline "p"')).toThrow(
      'pipeline "p": filter "payload.text.matches(payload.pattern)" is too expensive to run per message: matches() needs a string literal as its pattern (got "payload.pattern", at column 22)',
    );
  });

  it("report an evaluation error under the name the user wrote, at the column the user wrote", () => {
    const errors: Error[] = [];
    const filter = compileFilter('payload.a.matches("x") && payload.n.matches("1") && payload.total > 1', "f", { onError: (e) => errors.push(e) });
    expect(filter(vars({ a: "x", n: 1 }))).toBe(false);
    expect(filter(vars({ a: "x", n: "1" }))).toBe(false);
    expect(errors[0]!.message).toContain("matches");
    expect(errors[0]!.message).not.toContain(RE2_MATCHES);
    expect(errors[1]!.message).toContain("No such key: total (at column 61)"); // where "total" stands
  });
});

describe("filter cost", () => {
  it("allows loops over the message and loops inside them over the current element", () => {
    const filter = compileFilter('payload.orders.exists(o, o.items.exists(i, i.sku.startsWith("GIFT") && i.tags.exists(t, t in ["a", "b"])))', "f");
    expect(filter(vars({ orders: [{ items: [{ sku: "X", tags: [] }] }, { items: [{ sku: "GIFT-1", tags: ["b"] }] }] }))).toBe(true);
  });

  it("refuses a loop over the message inside a loop over the message", () => {
    expect(() => compileFilter("payload.items.all(a, payload.items.exists(b, a.id == b.parent))", "f")).toThrow(
      /too expensive to run per message: the loop over "payload.items" \(at column 22\) runs once for every element of the loop over "a"/,
    );
  });

  it("refuses a scan of the message inside a loop, and names the way out", () => {
    expect(() => compileFilter("payload.items.exists(i, i.sku in payload.allowed)", "f")).toThrow(
      /`in` scans "payload.allowed" \(at column 34\) once for every element of the loop over "i".*cel.bind/,
    );
    expect(() => compileFilter('payload.items.exists(i, payload.text.contains(i.sku))', "f")).toThrow(/contains\(\) scans "payload.text"/);
    expect(() => compileFilter("payload.items.all(i, size(payload.items) > 1)", "f")).toThrow(/size\(\) scans "payload.items"/);
    // Computed once outside the loop, the same value is fine.
    const bound = compileFilter("cel.bind(n, size(payload.items), payload.items.all(i, i.pos < n))", "f");
    expect(bound(vars({ items: [{ pos: 0 }, { pos: 1 }] }))).toBe(true);
  });

  it("refuses a loop over a cel.bind name inside another loop", () => {
    expect(() => compileFilter("cel.bind(xs, payload.items, xs.all(a, xs.exists(b, a == b)))", "f")).toThrow(/the loop over "xs"/);
  });

  it("refuses an expression longer than the term limit", () => {
    const long = Array.from({ length: 600 }, (_, i) => `payload.a == ${i}`).join(" || ");
    expect(() => compileFilter(long, 'pipeline "p"')).toThrow(/pipeline "p": filter ".*" is too long: more than 1000 terms/);
  });
});
