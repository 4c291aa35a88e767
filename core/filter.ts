// CEL filters over a message (`payload.total > 100 && op == "insert"`): checked once when a
// pipeline config enters, then evaluated per message without ever throwing.

import { Environment } from "@marcbachmann/cel-js";
import { ConfigError, TideError, toError } from "./errors.ts";

/** What a filter expression can see. */
export interface FilterVars {
  payload: unknown;
  headers: Record<string, unknown>;
  topic: string | null;
  op: string;
}

export interface FilterOptions {
  /** Told about evaluation errors and non-boolean results, which otherwise just mean "no match". */
  onError?: (error: Error) => void;
}

export type FilterFn = (vars: FilterVars) => boolean;

/**
 * Parses and type-checks `expression` once. `where` names its place in the config for messages,
 * e.g. `pipeline "orders"`. A syntax error, an unknown variable (`paylod.x`) or a result
 * that cannot be a bool (`1 + 2`) is a ConfigError.
 *
 * At evaluation, an error (a missing field: `payload.total` when there is no `total`) or a
 * non-boolean result counts as "does not match"; guard optional fields with `has(payload.total)`.
 *
 * JSON numbers: CEL keeps int and double apart. Integral JSON numbers are handed to CEL as int
 * and the others as double, so `payload.qty == 2`, `payload.qty % 2 == 0` and `payload.total > 100`
 * work as written (comparisons mix int and double freely). Arithmetic does not mix: for a field
 * that may be fractional write `double(payload.price) * 1.2`.
 */
export function compileFilter(expression: string, where: string, options: FilterOptions = {}): FilterFn {
  const evaluate = parseChecked(expression, where);
  const report = options.onError ?? (() => {});
  return (vars) => {
    let result: unknown;
    try {
      const payload = toCelValue(vars.payload) as Record<string, unknown> | null;
      const captured = typeof payload === "object" && payload !== null && !Array.isArray(payload);
      result = evaluate({
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
      report(filterError(where, expression, `could not be evaluated: ${summaryOf(error)}`, error));
      return false;
    }
    if (typeof result === "boolean") return result;
    report(filterError(where, expression, `returned ${describeType(result)} instead of a bool`));
    return false;
  };
}

// Building an Environment is the expensive part of cel-js; one serves every filter.
const environment = new Environment()
  .registerVariable("payload", "dyn")
  .registerVariable("headers", "map")
  .registerVariable("topic", "dyn")
  .registerVariable("op", "string")
  .registerVariable("record", "dyn")
  .registerVariable("changes", "dyn")
  .registerVariable("action", "dyn");

function parseChecked(expression: string, where: string): (vars: Record<string, unknown>) => unknown {
  let parsed;
  try {
    parsed = environment.parse(expression);
  } catch (error) {
    throw new ConfigError(`${where}: invalid filter "${expression}": ${summaryOf(error)}`, { cause: error });
  }
  const checked = parsed.check();
  if (!checked.valid) {
    throw new ConfigError(`${where}: invalid filter "${expression}": ${summaryOf(checked.error)}`, {
      cause: checked.error,
    });
  }
  if (checked.type !== "bool" && checked.type !== "dyn") {
    throw new ConfigError(`${where}: filter "${expression}" must evaluate to a bool (got ${checked.type})`);
  }
  return parsed;
}

// cel-js messages carry a multi-line source excerpt; one line with a column reads better in a log.
function summaryOf(error: unknown): string {
  const cel = error as { summary?: unknown; range?: { start: number } } | undefined;
  if (cel && typeof cel.summary === "string") {
    return cel.range ? `${cel.summary} (at column ${cel.range.start + 1})` : cel.summary;
  }
  return toError(error).message;
}

function filterError(where: string, expression: string, problem: string, cause?: unknown): Error {
  return new TideError(`${where}: filter "${expression}" ${problem}; treated as no match`, {
    code: "filter",
    retriable: false,
    cause,
  });
}

// Integral numbers become BigInt (CEL int). Plain objects and arrays are copied on the way, so the
// caller's message is never changed; anything else (Dates, class instances) passes through.
function toCelValue(value: unknown): unknown {
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
