// Templates for subjects, topics, keys and URLs (`orders.{event_type}`), and the rules that derive
// a message's event type and op from its headers and payload.

import { ConfigError } from "../errors.ts";
import { JsonNumber, stringifyJson } from "../json.ts";
import type { OutboxMessage, RenderOptions } from "../plugin.ts";

/**
 * Renders a compiled template. `options.value` sees every substituted value (never the template's
 * own text) with its placeholder's name, and returns what to insert: sinks use it to escape values
 * or to refuse one that would change where a message goes (a `.` in a NATS subject token, a `/` in
 * a URL path segment).
 */
export type RenderFn = (message: OutboxMessage, options?: RenderOptions) => string;

/**
 * Compiles a template once; rendering is then a join of precomputed parts.
 *
 * Placeholders: `{outbox}`, `{topic}`, `{op}`, `{event_type}`, `{id}`, `{payload.a.b}`, `{headers.x}`.
 * Paths walk nested objects (and arrays by index: `{payload.items.0.sku}`). A missing value, null
 * and a null topic render as the empty string, so `orders.{payload.region}` can yield `orders.`:
 * choose fields that are always present. Numbers render exactly as the payload writes them
 * (`9007199254740993`, `1.50`); objects and arrays as compact JSON, their numbers exact too.
 * `{{` and `}}` are a literal brace. An unknown placeholder or an unclosed `{` is a ConfigError.
 */
export function compileTemplate(template: string): RenderFn {
  const parts = parseTemplate(template);
  if (parts.every((part) => typeof part === "string")) {
    const constant = parts.join("");
    return () => constant;
  }
  return (message, options) => {
    let out = "";
    for (const part of parts) {
      if (typeof part === "string") out += part;
      else out += options?.value ? options.value(part.get(message), part.name) : part.get(message);
    }
    return out;
  };
}

/** Renders with a compiled template from a small cache (templates come from a handful of configs). */
export function renderTemplate(template: string, message: OutboxMessage, options?: RenderOptions): string {
  let render = cache.get(template);
  if (!render) {
    render = compileTemplate(template);
    if (cache.size >= TEMPLATE_CACHE_SIZE) cache.delete(cache.keys().next().value as string);
    cache.set(template, render);
  }
  return render(message, options);
}

/**
 * `headers.event_type`, else `payload.event_type`, else "event". Only non-empty strings count. The
 * payload is asked for only when the headers have none (a payload may not even be decoded yet).
 */
export function eventTypeOf(headers: Record<string, unknown>, payload: () => unknown): string {
  return stringField(headers, "event_type") ?? stringField(payload(), "event_type") ?? "event";
}

/** `headers.op`, else `payload.op`, else "publish". Only non-empty strings count; payload as in eventTypeOf. */
export function opOf(headers: Record<string, unknown>, payload: () => unknown): string {
  return stringField(headers, "op") ?? stringField(payload(), "op") ?? "publish";
}

const TEMPLATE_CACHE_SIZE = 256;
const cache = new Map<string, RenderFn>();

type Getter = (message: OutboxMessage) => string;

/** A placeholder: its name as written (`payload.region`) and how to read its value. */
interface Placeholder {
  name: string;
  get: Getter;
}

const FIELDS: Record<string, Getter> = {
  outbox: (m) => m.outbox,
  topic: (m) => m.topic ?? "",
  op: (m) => m.op,
  event_type: (m) => m.eventType,
  id: (m) => m.id.toString(),
};

const KNOWN = "{outbox}, {topic}, {op}, {event_type}, {id}, {payload.<path>}, {headers.<path>}";

function parseTemplate(template: string): (string | Placeholder)[] {
  const parts: (string | Placeholder)[] = [];
  let literal = "";
  let i = 0;
  while (i < template.length) {
    const char = template[i]!;
    if ((char === "{" || char === "}") && template[i + 1] === char) {
      literal += char;
      i += 2;
      continue;
    }
    if (char !== "{") {
      literal += char;
      i += 1;
      continue;
    }
    const end = template.indexOf("}", i + 1);
    if (end === -1) {
      throw new ConfigError(`template "${template}": unclosed "{" at position ${i} (write "{{" for a literal brace)`);
    }
    if (literal) parts.push(literal);
    literal = "";
    parts.push(compilePlaceholder(template.slice(i + 1, end).trim(), template));
    i = end + 1;
  }
  if (literal) parts.push(literal);
  return parts;
}

function compilePlaceholder(name: string, template: string): Placeholder {
  if (Object.hasOwn(FIELDS, name)) return { name, get: FIELDS[name]! };
  const [root, ...path] = name.split(".");
  if ((root === "payload" || root === "headers") && path.length > 0 && path.every((s) => s !== "")) {
    const get: Getter = root === "payload"
      ? (m) => stringify(valueAt(m.payload, path))
      : (m) => stringify(valueAt(m.headers, path));
    return { name, get };
  }
  throw new ConfigError(`template "${template}": unknown placeholder {${name}} (expected one of ${KNOWN})`);
}

function valueAt(value: unknown, path: string[]): unknown {
  let current = value;
  for (const segment of path) {
    if (typeof current !== "object" || current === null || current instanceof JsonNumber || !Object.hasOwn(current, segment)) {
      return undefined;
    }
    current = (current as Record<string, unknown>)[segment];
  }
  return current;
}

function stringify(value: unknown): string {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  if (typeof value === "object") return value instanceof JsonNumber ? value.text : stringifyJson(value);
  return String(value);
}

function stringField(value: unknown, key: string): string | undefined {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return undefined;
  const field = (value as Record<string, unknown>)[key];
  return typeof field === "string" && field !== "" ? field : undefined;
}
