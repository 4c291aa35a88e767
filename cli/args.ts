// Command-line parsing shared by every command: flags, their PG_TIDE_* environment forms, and errors
// that say which flag was wrong.

import { parseArgs } from "node:util";
import { ConfigError } from "../core/errors.ts";
import { env } from "../core/runtime.ts";

export interface FlagSpec {
  type: "string" | "boolean";
  short?: string;
  /** Environment variable read when the flag is absent. */
  env?: string;
  default?: string | boolean;
  help: string;
  placeholder?: string;
}

export type Flags = Record<string, FlagSpec>;
export type Parsed<F extends Flags> = { [K in keyof F]: F[K]["type"] extends "boolean" ? boolean : string | undefined };

/**
 * Precedence: the flag, then its environment variable, then `fallback` (a manifest's settings),
 * then the flag's default.
 */
export function parseFlags<F extends Flags>(
  command: string,
  flags: F,
  argv: string[],
  fallback: Record<string, string | boolean | undefined> = {},
): Parsed<F> {
  let values: Record<string, string | boolean | undefined>;
  try {
    const options = Object.fromEntries(
      Object.entries(flags).map(([name, spec]) => [name, spec.short ? { type: spec.type, short: spec.short } : { type: spec.type }]),
    );
    ({ values } = parseArgs({ args: argv, options, strict: true, allowPositionals: false }));
  } catch (error) {
    throw new ConfigError(`pg-tide ${command}: ${(error as Error).message.replace(/\.?\s*To specify.*$/s, "")}`);
  }
  const result: Record<string, string | boolean | undefined> = {};
  const sources: Record<string, string> = {};
  for (const [name, spec] of Object.entries(flags)) {
    let value = values[name];
    if (value === undefined && spec.env !== undefined) {
      const fromEnv = env(spec.env);
      if (fromEnv !== undefined && fromEnv !== "") {
        value = spec.type === "boolean" ? /^(1|true|yes)$/i.test(fromEnv) : fromEnv;
        sources[name] = spec.env;
      }
    }
    if (value === undefined && fallback[name] !== undefined) {
      value = fallback[name];
      sources[name] = `[relay] ${name.replaceAll("-", "_")}`;
    }
    result[name] = value ?? spec.default ?? (spec.type === "boolean" ? false : undefined);
  }
  SOURCES.set(result, sources);
  return result as Parsed<F>;
}

/**
 * Where a parsed value came from, named as the user gave it, for error messages: its environment
 * variable, or the manifest's `[relay]` key (fallback values), else the flag.
 */
export function sourceOf(parsed: object, flag: string): string {
  return SOURCES.get(parsed)?.[flag] ?? `--${flag}`;
}

const SOURCES = new WeakMap<object, Record<string, string>>();

export function formatHelp(usage: string, summary: string, flags: Flags): string {
  const rows = Object.entries(flags).map(([name, spec]) => {
    const left = `  ${spec.short ? `-${spec.short}, ` : ""}--${name}${spec.type === "string" ? ` ${spec.placeholder ?? "VALUE"}` : ""}`;
    const extras = [spec.env ? `env ${spec.env}` : "", spec.default !== undefined && spec.default !== false ? `default ${spec.default}` : ""]
      .filter(Boolean).join(", ");
    return [left, spec.help + (extras ? ` (${extras})` : "")];
  });
  const width = Math.max(...rows.map(([left]) => left.length)) + 2;
  return `Usage: ${usage}\n\n${summary}\n\nOptions:\n${rows.map(([l, r]) => l.padEnd(width) + r).join("\n")}\n`;
}

/** The --postgres-url flag, shared by every command that talks to the database. */
export const POSTGRES_URL_FLAG: FlagSpec = {
  type: "string",
  env: "PG_TIDE_POSTGRES_URL",
  placeholder: "URL",
  help: "PostgreSQL connection URL, e.g. postgres://user:pass@localhost:5432/mydb",
};

export const HELP_FLAG: FlagSpec = { type: "boolean", short: "h", help: "show this help" };

export function requireUrl(command: string, url: string | undefined): string {
  if (!url) {
    throw new ConfigError(`pg-tide ${command}: --postgres-url is required (or set PG_TIDE_POSTGRES_URL)`);
  }
  return url;
}
