// Lossless JSON. The relay carries payloads as text (as PostgreSQL produced it, or as a broker
// delivered it) and parses it only when a filter, a template or a wire format needs a field. This
// file does that parse without changing a number: a JavaScript number holds integers exactly only up
// to 2^53 and decimals to about 17 digits, so plain JSON.parse turns 9007199254740993 into
// 9007199254740992 and 12345678901234567890.12 into 12345678901234567000.
//
// It relies on JSON.parse handing a reviver each number's source text and on JSON.rawJSON, which
// Bun, Deno and the compiled binary all have.

/**
 * A JSON number that a JavaScript number would change (`1.50`, `1e400`, a decimal beyond double
 * precision), kept as its text. `Number(n)` gives the nearest double; `String(n)` and JSON.stringify
 * give the text exactly as it was.
 */
export class JsonNumber {
  readonly text: string;

  constructor(text: string) {
    this.text = text;
  }

  valueOf(): number {
    return Number(this.text);
  }

  toString(): string {
    return this.text;
  }

  toJSON(): unknown {
    return rawJSON(this.text);
  }
}

/**
 * Parses JSON text without losing a digit: numbers whose JavaScript value reads back as the same
 * text stay numbers, integers beyond 2^53 become BigInt, and every other number a JsonNumber.
 * Throws a SyntaxError on text that is not JSON, like JSON.parse.
 */
export function parseJson(text: string): unknown {
  return JSON.parse(text, exactNumbers);
}

/** JSON text of a value, writing BigInt and JsonNumber values back as the numbers they were. */
export function stringifyJson(value: unknown): string {
  return JSON.stringify(value, bigintAsNumber) ?? "null";
}

/**
 * `{"key": <text>, ...}` from JSON texts that are already JSON, so that a payload's text can be
 * embedded in an envelope as it is, never parsed and written again.
 */
export function jsonObject(fields: [key: string, json: string][]): string {
  return `{${fields.map(([key, json]) => `${JSON.stringify(key)}:${json}`).join(",")}}`;
}

/**
 * False only when `text` (JSON as PostgreSQL writes it: no escapes in plain keys) certainly has no
 * key `key`, so that looking for it needs no parse.
 */
export function mayHaveKey(text: string, key: string): boolean {
  return text.includes(`"${key}"`);
}

const rawJSON = (JSON as unknown as { rawJSON(text: string): unknown }).rawJSON;

function exactNumbers(_key: string, value: unknown, context?: { source?: string }): unknown {
  if (typeof value !== "number" || context?.source === undefined) return value;
  const source = context.source;
  if (String(value) === source) return value;
  if (INTEGER.test(source) && !Number.isSafeInteger(value)) return BigInt(source);
  return new JsonNumber(source);
}

const INTEGER = /^-?\d+$/;

function bigintAsNumber(_key: string, value: unknown): unknown {
  return typeof value === "bigint" ? rawJSON(value.toString()) : value;
}
