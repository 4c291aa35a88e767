// CEL filters over a message (`payload.total > 100 && op == "insert"`): checked once when a
// pipeline config enters (syntax, types and cost, see filter_cost.ts), then evaluated per message
// without ever throwing. Regular expressions (`matches`) run on RE2, in linear time.

import { type ASTNode, Environment } from "@marcbachmann/cel-js";
import type { RE2JS } from "re2js";
import { ConfigError, TideError, toError } from "../errors.ts";
import { JsonNumber } from "../json.ts";
import { costProblem, FILTER_VARIABLES, MAX_FILTER_TERMS, RE2_MATCHES } from "./filter_cost.ts";

/** What a filter expression can see. */
export interface FilterVars {
  payload: unknown;
  headers: Record<string, unknown>;
  topic: string | null;
  op: string;
}

/**
 * What a forward pipeline does with a message its filter cannot decide on (transform.on_error):
 * "skip" (the default) does not deliver it, "dead_letter" moves it to the dead-letter queue.
 */
export type FilterErrorPolicy = "skip" | "dead_letter";

export interface FilterOptions {
  /** Told about evaluation errors and non-boolean results, which the plain call treats as "no match". */
  onError?: (error: TideError) => void;
  errorPolicy?: FilterErrorPolicy;
}

/** The outcome of one evaluation: `error` when the expression could not decide (then `match` is false). */
export interface FilterResult {
  match: boolean;
  error?: TideError;
}

export interface FilterFn {
  /** True when the message matches; an evaluation error counts as no match (and goes to onError). */
  (vars: FilterVars): boolean;
  /** The same decision, with the error that kept the expression from deciding. */
  evaluate(vars: FilterVars): FilterResult;
  readonly errorPolicy: FilterErrorPolicy;
}

/**
 * Parses, type-checks and cost-checks `expression` once. `where` names its place in the config for
 * messages, e.g. `pipeline "orders"`. A syntax error, an unknown variable (`paylod.x`), a result
 * that cannot be a bool (`1 + 2`), an invalid or non-literal `matches()` pattern and an expression
 * whose work grows faster than the message (a scan inside a loop) are ConfigErrors.
 *
 * At evaluation, an error (a missing field: `payload.total` when there is no `total`) or a
 * non-boolean result means "could not decide"; guard optional fields with `has(payload.total)`.
 *
 * JSON numbers: CEL keeps int and double apart. Integral JSON numbers are handed to CEL as int
 * and the others as double, so `payload.qty == 2`, `payload.qty % 2 == 0` and `payload.total > 100`
 * work as written (comparisons mix int and double freely). Arithmetic does not mix: for a field
 * that may be fractional write `double(payload.price) * 1.2`. Integers beyond 2^53 keep every digit
 * (the payload is parsed losslessly), so `payload.id == 9007199254740993` is exact; other numbers
 * are doubles, as in CEL.
 */
export function compileFilter(expression: string, where: string, options: FilterOptions = {}): FilterFn {
  const run = parseChecked(expression, where);
  const evaluate = (vars: FilterVars): FilterResult => {
    let result: unknown;
    try {
      const payload = toCelValue(vars.payload) as Record<string, unknown> | null;
      const captured = typeof payload === "object" && payload !== null && !Array.isArray(payload);
      result = run({
        payload,
        headers: toCelValue(vars.headers ?? {}),
        topic: vars.topic,
        op: vars.op,
        // Shorthands for table-capture messages ({record, changes, action}); null otherwise.
        record: captured ? payload.record ?? null : null,
        changes: captured ? payload.changes ?? null : null,
        action: captured ? payload.action ?? null : null,
      });
    } catch (error) {
      return { match: false, error: filterError(where, expression, `could not be evaluated: ${summaryOf(error)}`, error) };
    }
    if (typeof result === "boolean") return result ? MATCH : NO_MATCH;
    return { match: false, error: filterError(where, expression, `returned ${describeType(result)} instead of a bool`) };
  };
  const filter = (vars: FilterVars): boolean => {
    const result = evaluate(vars);
    if (result.error) options.onError?.(result.error);
    return result.match;
  };
  return Object.assign(filter, { evaluate, errorPolicy: options.errorPolicy ?? "skip" });
}

const MATCH: FilterResult = Object.freeze({ match: true });
const NO_MATCH: FilterResult = Object.freeze({ match: false });

/** Compiled `matches()` patterns, filled when filters are checked (patterns are literals). */
const patterns = new Map<string, RE2JS>();

// Building an Environment is the expensive part of cel-js; one serves every filter.
const environment = Object.entries(FILTER_VARIABLES).reduce(
  (env, [name, type]) => env.registerVariable(name, type),
  new Environment({ limits: { maxAstNodes: MAX_FILTER_TERMS } }),
).registerFunction(`string.${RE2_MATCHES}(string): bool`, (text: string, pattern: string) => {
  const compiled = patterns.get(pattern);
  // Unreachable for a checked filter: every pattern is a literal compiled at the check.
  if (!compiled) throw new Error(`matches(): pattern ${JSON.stringify(pattern)} was not checked`);
  return compiled.test(text);
});

function parseChecked(expression: string, where: string): (vars: Record<string, unknown>) => unknown {
  const invalid = (error: unknown) =>
    new ConfigError(`${where}: invalid filter "${expression}": ${summaryOf(error)}`, { cause: error });
  let parsed;
  try {
    parsed = environment.parse(expression);
  } catch (error) {
    if ((error as { code?: unknown }).code === "limit_exceeded") {
      throw new ConfigError(`${where}: filter "${expression}" is too long: more than ${MAX_FILTER_TERMS} terms`, { cause: error });
    }
    throw invalid(error);
  }
  const checked = parsed.check();
  if (!checked.valid) throw invalid(checked.error);
  if (checked.type !== "bool" && checked.type !== "dyn") {
    throw new ConfigError(`${where}: filter "${expression}" must evaluate to a bool (got ${checked.type})`);
  }
  const problem = costProblem(parsed.ast, patterns);
  if (problem?.kind === "invalid_pattern") throw new ConfigError(`${where}: invalid filter "${expression}": ${problem.message}`);
  if (problem) throw new ConfigError(`${where}: filter "${expression}" is too expensive to run per message: ${problem.message}`);
  return withLinearMatches(expression, parsed);
}

/**
 * The same expression with every `x.matches(p)` evaluated by RE2. cel-js's built-in `matches` uses
 * the JavaScript engine, which backtracks (`(a+)+$` on a long string freezes the relay), and cannot
 * be replaced: so the method name is rewritten at its place in the source and the result is parsed
 * again, and proven to be the same tree but for that name.
 */
function withLinearMatches(
  expression: string,
  parsed: ((vars: Record<string, unknown>) => unknown) & { ast: ASTNode },
): (vars: Record<string, unknown>) => unknown {
  const calls: ASTNode[] = [];
  const collect = (value: unknown): void => {
    if (Array.isArray(value)) return value.forEach(collect);
    if (typeof value !== "object" || value === null || !("op" in value)) return;
    const node = value as ASTNode;
    if (node.op === "rcall" && node.args[0] === "matches" && node.args[2].length === 1) calls.push(node);
    if (node.op !== "value" && node.op !== "id") collect(node.args);
  };
  collect(parsed.ast);
  if (calls.length === 0) return parsed;

  let rewritten = expression;
  for (const call of calls.sort((a, b) => b.range.start - a.range.start)) {
    if (call.op !== "rcall") continue;
    // Between the receiver and the pattern there is only `).matches((`: parentheses, blanks, the name.
    const [, receiver, [pattern]] = call.args;
    const gap = expression.slice(receiver.range.end, pattern!.range.start);
    const name = /\.\s*(matches)\s*\(/.exec(gap);
    if (!name) throw cannotRewrite(expression);
    const offset = receiver.range.end + name.index + name[0].indexOf("matches");
    rewritten = `${rewritten.slice(0, offset)}${RE2_MATCHES}${rewritten.slice(offset + "matches".length)}`;
  }
  const linear = environment.parse(rewritten);
  if (!linear.check().valid || !sameTree(parsed.ast, linear.ast)) throw cannotRewrite(expression);
  return linear;
}

function cannotRewrite(expression: string): Error {
  return new TideError(`filter "${expression}": could not route matches() to RE2; please report this expression`, {
    code: "filter",
  });
}

/** Equal trees, where a `matches` call of the first is a RE2 call in the second. */
function sameTree(a: unknown, b: unknown): boolean {
  if (Array.isArray(a)) return Array.isArray(b) && a.length === b.length && a.every((item, i) => sameTree(item, b[i]));
  if (typeof a === "object" && a !== null && "op" in a) {
    if (typeof b !== "object" || b === null || !("op" in b)) return false;
    const [x, y] = [a as ASTNode, b as ASTNode];
    if (x.op !== y.op) return false;
    if (x.op === "rcall" && y.op === "rcall" && x.args[0] === "matches") {
      return y.args[0] === RE2_MATCHES && sameTree(x.args.slice(1), y.args.slice(1));
    }
    return sameTree(x.args, y.args);
  }
  if (typeof a === "object" && a !== null) return typeof b === "object" && b !== null && String(a) === String(b);
  return Object.is(a, b);
}

// cel-js messages carry a multi-line source excerpt; one line with a column reads better in a log.
function summaryOf(error: unknown): string {
  const cel = error as { summary?: unknown; range?: { start: number } } | undefined;
  const summary = cel && typeof cel.summary === "string"
    ? (cel.range ? `${cel.summary} (at column ${cel.range.start + 1})` : cel.summary)
    : toError(error).message;
  return summary.replaceAll(RE2_MATCHES, "matches");
}

function filterError(where: string, expression: string, problem: string, cause?: unknown): TideError {
  return new TideError(`${where}: filter "${expression}" ${problem}`, { code: "filter", retriable: false, cause });
}

// Integral numbers become BigInt (CEL int); integers beyond 2^53 arrive as BigInt already, other
// numbers a double cannot hold exactly as JsonNumber (its nearest double here). Plain objects and
// arrays are copied on the way, so the caller's message is never changed; anything else (Dates,
// class instances) passes through.
function toCelValue(value: unknown): unknown {
  if (value instanceof JsonNumber) return toCelValue(value.valueOf());
  if (typeof value === "number") return Number.isSafeInteger(value) ? BigInt(value) : value;
  if (typeof value !== "object" || value === null) return value;
  if (Array.isArray(value)) return value.map(toCelValue);
  if (Object.getPrototypeOf(value) !== Object.prototype && Object.getPrototypeOf(value) !== null) return value;
  return Object.fromEntries(Object.entries(value).map(([key, child]) => [key, toCelValue(child)]));
}

function describeType(value: unknown): string {
  if (value === null || value === undefined) return "null";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "bigint") return `an int (${value})`;
  if (typeof value === "object") return "a map";
  return `${typeof value === "number" ? "a double" : `a ${typeof value}`} (${String(value)})`;
}
