// The relay's logger: leveled lines in a human text format or one JSON object per line, with
// secrets masked on the way out. Small on purpose; plugins see it as a PluginLogger.

import type { PluginLogger } from "./plugin.ts";
import { redactConfig, redactText } from "./redact.ts";
import { writeStderr } from "./runtime.ts";

export type LogLevel = "debug" | "info" | "warn" | "error";
export type LogFormat = "text" | "json";
export type LogFields = Record<string, unknown>;

export interface LoggerOptions {
  /** Lines below this level are dropped. */
  level: LogLevel;
  format: LogFormat;
  /** Receives each finished line, newline included. Defaults to stderr. */
  write?: (line: string) => void;
  /** Clock, injectable so that tests can pin the timestamp. */
  now?: () => Date;
}

export interface Logger extends PluginLogger {
  /** A logger that adds `fields` to every line; the call's own fields win on a clash. */
  child(fields: LogFields): Logger;
}

export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];

export function isLogLevel(value: string): value is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(value);
}

/**
 * Text: `2026-11-22T07:00:00.000Z INFO  message key=value key2="with space"`.
 * JSON: `{"level":"info","time":"...","message":"...","pipeline":"...","error":"...","key":"value"}`.
 * Error values in fields render as their message, plus `<key>_code` when they carry a code.
 * Values under secret-looking keys and URL passwords anywhere are masked (core/redact.ts).
 */
export function createLogger(options: LoggerOptions): Logger {
  const sink: Sink = {
    minimum: LOG_LEVELS.indexOf(options.level),
    format: options.format,
    write: options.write ?? writeStderr,
    now: options.now ?? (() => new Date()),
  };
  return makeLogger(sink, {});
}

interface Sink {
  minimum: number;
  format: LogFormat;
  write: (line: string) => void;
  now: () => Date;
}

function makeLogger(sink: Sink, bound: LogFields): Logger {
  const log = (level: LogLevel) => (message: string, fields?: LogFields) => {
    if (LOG_LEVELS.indexOf(level) < sink.minimum) return;
    const merged = fields ? { ...bound, ...fields } : bound;
    sink.write(formatLine(sink.format, level, sink.now(), message, merged));
  };
  return {
    debug: log("debug"),
    info: log("info"),
    warn: log("warn"),
    error: log("error"),
    child: (fields) => makeLogger(sink, { ...bound, ...fields }),
  };
}

function formatLine(format: LogFormat, level: LogLevel, time: Date, text: string, fields: LogFields): string {
  const message = redactText(text);
  const safe = redactConfig(normalizeFields(fields));
  if (format === "json") {
    // Fields may not overwrite the line's own keys.
    return JSON.stringify({ ...safe, level, time: time.toISOString(), message }) + "\n";
  }
  const pairs = Object.entries(safe).map(([key, value]) => `${key}=${formatTextValue(value)}`);
  // One record, one line: a multi-line message would read as several records.
  const head = `${time.toISOString()} ${level.toUpperCase().padEnd(5)} ${message.replace(/\r?\n/g, "\\n")}`;
  return (pairs.length > 0 ? `${head} ${pairs.join(" ")}` : head) + "\n";
}

// Turns field values into plain JSON values once, so that both formats and the redaction see
// the same thing: Errors become message (+ code), bigints and Dates become strings.
function normalizeFields(fields: LogFields): LogFields {
  const entries: [string, unknown][] = [];
  for (const [key, value] of Object.entries(fields)) {
    if (value === undefined) continue;
    entries.push([key, toJsonValue(value, 0)]);
    const code = value instanceof Error ? (value as { code?: unknown }).code : undefined;
    if (typeof code === "string" || typeof code === "number") entries.push([`${key}_code`, code]);
  }
  return Object.fromEntries(entries);
}

// Depth-limited so that a cyclic or huge object in a field cannot take the logger down.
const MAX_FIELD_DEPTH = 6;

function toJsonValue(value: unknown, depth: number): unknown {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Date) return value.toISOString();
  if (value instanceof Error) return value.message;
  if (typeof value === "function" || typeof value === "symbol") return String(value);
  if (typeof value !== "object" || value === null) return value;
  if (depth >= MAX_FIELD_DEPTH) return "[…]";
  if (Array.isArray(value)) return value.map((item) => toJsonValue(item, depth + 1));
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toJsonValue(v, depth + 1)]));
}

// Bare words stay bare; anything a reader could misparse (spaces, quotes, "=", empty) is quoted.
function formatTextValue(value: unknown): string {
  if (typeof value === "string") return /^[^\s"=]+$/.test(value) ? value : JSON.stringify(value);
  if (value === null || typeof value !== "object") return String(value);
  return JSON.stringify(value);
}
