// tide's typed errors: one base class carrying a `code`, a `retriable` flag and a `cause`, a handful
// of subclasses, `toError` for anything caught, and the error constructors handed to plugins.

import type { PluginErrors } from "./plugin.ts";

export interface TideErrorOptions {
  /** Stable, machine-readable kind: "config", "plugin", "delivery", "connection", ... */
  code: string;
  retriable?: boolean;
  cause?: unknown;
}

/** Options of the subclasses: the code is fixed by the class. */
export interface ErrorDetails {
  retriable?: boolean;
  cause?: unknown;
}

export class TideError extends Error {
  readonly code: string;
  readonly retriable: boolean;
  override readonly cause: unknown;

  constructor(message: string, options: TideErrorOptions) {
    super(message);
    // Set explicitly: class names do not survive minification in a compiled binary.
    this.name = "TideError";
    this.code = options.code;
    this.retriable = options.retriable ?? false;
    this.cause = options.cause;
  }
}

/** Invalid configuration: retrying with the same config cannot help. */
export class ConfigError extends TideError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { code: "config", retriable: false, cause: options.cause });
    this.name = "ConfigError";
  }
}

/** A plugin failed to load or broke its contract. Not retriable unless said otherwise. */
export class PluginError extends TideError {
  constructor(message: string, options: ErrorDetails = {}) {
    super(message, { code: "plugin", retriable: options.retriable ?? false, cause: options.cause });
    this.name = "PluginError";
  }
}

/** A sink could not deliver. Retriable unless the target refused for good (4xx, bad payload). */
export class DeliveryError extends TideError {
  constructor(message: string, options: ErrorDetails = {}) {
    super(message, { code: "delivery", retriable: options.retriable ?? true, cause: options.cause });
    this.name = "DeliveryError";
  }
}

/** A connection (PostgreSQL, broker) failed or dropped; reconnecting may help. */
export class ConnectionError extends TideError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { code: "connection", retriable: true, cause: options.cause });
    this.name = "ConnectionError";
  }
}

/** Turns anything caught into an Error, once: Errors pass through untouched. */
export function toError(value: unknown): Error {
  if (value instanceof Error) return value;
  if (typeof value === "string") return new Error(value);
  if (isObject(value) && typeof value.message === "string") {
    return new Error(value.message, { cause: value });
  }
  return new Error(`non-error value thrown: ${describe(value)}`, { cause: value });
}

/** The `ctx.errors` of every plugin: tide's typed errors without importing tide. */
export const pluginErrors: PluginErrors = {
  transient: (message, cause) => new DeliveryError(message, { cause, retriable: true }),
  permanent: (message, cause) => new DeliveryError(message, { cause, retriable: false }),
  config: (message) => new ConfigError(message),
};

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null;
}

function describe(value: unknown): string {
  if (typeof value === "bigint") return `${value}n`;
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

/** The process exit code for an error that ends a command: 2 for bad input, 1 otherwise. */
export function exitCodeOf(error: Error): number {
  return error instanceof TideError && error.code === "config" ? 2 : 1;
}
