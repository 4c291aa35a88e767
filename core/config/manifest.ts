// The manifest (`pg-tide.toml` or `pg-tide.json`): reads it, resolves `${env:VAR}` / `${file:path}`
// references, and validates it once, here, with messages that name the file and the key path. After
// this, the relay settings, drop-in plugin paths and declared pipelines can be trusted as typed.

import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, extname, isAbsolute, resolve } from "node:path";
import { parse as parseToml, TomlError } from "smol-toml";
import { z } from "zod";
import { ConfigError } from "../errors.ts";
import { httpTokenProblem } from "../http/http_auth.ts";
import { isSecretKey, REDACTED, redactText, SECRET_KEY_PATTERN } from "../redact.ts";
import { env as runtimeEnv } from "../runtime.ts";

export interface ManifestPipeline {
  name: string;
  direction: "forward" | "reverse";
  outbox?: string; // forward
  inbox?: string; // reverse
  sink_type?: string; // forward
  source_type?: string; // reverse
  consumer_group?: string; // forward, optional
  batch_size?: number;
  enabled?: boolean; // default true
  /** Reverse only, as p_idempotent of tide.relay_set_inbox. */
  idempotent?: boolean;
  /** The plugin/engine config, as passed to tide.relay_set_outbox / relay_set_inbox. */
  config: Record<string, unknown>;
}

export interface Manifest {
  /** Absolute path of the file. */
  path: string;
  /** Mirrors the flags of `pg-tide run` (cli/run.ts); drain_timeout is in seconds, like --drain-timeout. */
  relay: {
    postgres_url?: string;
    relay_group_id?: string;
    metrics_addr?: string;
    max_pipelines?: number;
    poll_interval_ms?: number;
    drain_timeout?: number;
    memory_target_mib?: number;
    ownership_lease_ms?: number;
    log_format?: "text" | "json";
    log_level?: "debug" | "info" | "warn" | "error";
    http_token?: string;
    http_token_scope?: "api" | "all";
    otlp_endpoint?: string;
    /** "manifest" (default): [[pipelines]] are upserted into the catalog at start; "catalog_only": they are ignored. */
    pipelines_mode?: "manifest" | "catalog_only";
  };
  /** plugin name → absolute path of the drop-in module (resolved relative to the manifest's directory). */
  plugins: Record<string, string>;
  /** Names of [plugins] written `{ path = "...", override = true }`: they may replace a built-in type. */
  overrides: string[];
  pipelines: ManifestPipeline[];
}

export type ManifestFormat = "toml" | "json";
export type ManifestEnv = Record<string, string | undefined>;

/** Reads, resolves and validates a manifest; every problem is a ConfigError naming the file and key. */
export async function loadManifest(path: string, env?: ManifestEnv): Promise<Manifest> {
  const format = manifestFormat(path);
  const text = await readFile(path, "utf8").catch((error: Error) => {
    throw new ConfigError(`${path}: cannot read the manifest: ${error.message}`, { cause: error });
  });
  return parseManifest(text, format, path, env);
}

/** The format a manifest path implies: `.toml` or `.json`; anything else is an error naming it. */
export function manifestFormat(path: string): ManifestFormat {
  const extension = extname(path).toLowerCase();
  if (extension === ".toml") return "toml";
  if (extension === ".json") return "json";
  const seen = extension ? `"${extension}"` : "no extension";
  throw new ConfigError(`${path}: unsupported manifest extension ${seen} (use .toml or .json)`);
}

/**
 * Parses manifest text. `path` names the file in messages and anchors relative `${file:...}` and
 * plugin paths; `readFile` reads `${file:...}` references (absolute paths), defaulting to the disk.
 */
export function parseManifest(
  text: string,
  format: ManifestFormat,
  path: string,
  env?: ManifestEnv,
  readFile: (p: string) => string = (p) => readFileSync(p, "utf8"),
): Manifest {
  const absolutePath = resolve(path);
  const baseDir = dirname(absolutePath);
  const raw = parseText(text, format, path);
  const problems: string[] = [];
  const lookup = env ? (name: string) => env[name] : runtimeEnv;
  const { value, references, unresolved } = resolveReferences(raw, baseDir, lookup, readFile, problems);

  const parsed = manifestSchema.safeParse(value, { reportInput: true });
  if (!parsed.success) {
    const issues = parsed.error.issues.filter((issue) => !unresolved.has(formatPath(issue.path)));
    for (const issue of issues) problems.push(...describeIssue(issue, format, references));
  }
  if (problems.length > 0 || !parsed.success) fail(path, problems);

  const data = parsed.data;
  const plugins: Record<string, string> = {};
  const overrides: string[] = [];
  for (const [name, entry] of Object.entries(data.plugins ?? {})) {
    const file = typeof entry === "string" ? entry : entry.path;
    if (typeof entry !== "string" && entry.override) overrides.push(name);
    if (!PLUGIN_EXTENSIONS.includes(extname(file).toLowerCase())) {
      problems.push(`plugins${keySuffix(name)}: a plugin path must end in .ts, .js, .mjs or .mts (got ${seen(file)})`);
    }
    plugins[name] = isAbsolute(file) ? file : resolve(baseDir, file);
  }
  const pipelines = (data.pipelines ?? []).map((p, i) => toPipeline(p, `pipelines[${i}]`, problems));
  const firstIndex = new Map<string, number>();
  pipelines.forEach((p, i) => {
    const first = firstIndex.get(p.name);
    if (first === undefined) firstIndex.set(p.name, i);
    else problems.push(`pipelines[${i}].name: duplicate pipeline name "${p.name}" (also pipelines[${first}])`);
  });
  if (problems.length > 0) fail(path, problems);
  return { path: absolutePath, relay: data.relay ?? {}, plugins, overrides, pipelines };
}

// Names go into the catalog, where tide.check_name applies the same rule.
const NAME = /^[A-Za-z_][A-Za-z0-9_-]{0,62}$/;
const NAME_RULE = 'letters, digits, "_" and "-", start with a letter or "_", at most 63 characters';
const PLUGIN_EXTENSIONS = [".ts", ".js", ".mjs", ".mts"];

const name = z.string().regex(NAME, { message: `must use ${NAME_RULE}` });
const positiveInt = z.number().int().min(1);

const relaySchema = z.strictObject({
  postgres_url: z.string().min(1).optional(),
  relay_group_id: name.optional(),
  metrics_addr: z.string().regex(/^(off|.+:\d+)$/, { message: 'must be "host:port" or "off"' }).optional(),
  max_pipelines: positiveInt.optional(),
  poll_interval_ms: positiveInt.optional(),
  drain_timeout: positiveInt.optional(),
  memory_target_mib: positiveInt.optional(),
  ownership_lease_ms: z.number().int().min(1000, { message: "must be at least 1000" }).optional(),
  log_format: z.enum(["text", "json"]).optional(),
  log_level: z.enum(["debug", "info", "warn", "error"]).optional(),
  http_token: z.string().superRefine((token, ctx) => {
    const problem = httpTokenProblem(token);
    if (problem) ctx.addIssue({ code: "custom", message: problem });
  }).optional(),
  http_token_scope: z.enum(["api", "all"]).optional(),
  otlp_endpoint: z.string().regex(/^https?:\/\/[^/]+/, { message: "must be an http(s) URL" }).optional(),
  pipelines_mode: z.enum(["manifest", "catalog_only"]).optional(),
});

const pipelineSchema = z.strictObject({
  name,
  outbox: name.optional(),
  inbox: name.optional(),
  sink_type: z.string().min(1).optional(),
  source_type: z.string().min(1).optional(),
  consumer_group: name.optional(),
  batch_size: z.number().int().min(1).max(100_000).optional(),
  enabled: z.boolean().optional(),
  idempotent: z.boolean().optional(),
  // Free-form here: the plugin's own schema checks it once the pipeline is built.
  config: z.record(z.string(), z.unknown()).optional(),
});

/** `name = { path = "...", override = true }`: a drop-in allowed to replace a built-in type. */
const pluginTableSchema = z.strictObject({ path: z.string(), override: z.boolean().optional() });

const manifestSchema = z.strictObject({
  relay: relaySchema.optional(),
  plugins: z.record(
    z.string(),
    z.union([z.string(), pluginTableSchema], {
      error: 'must be a file path, or a table like { path = "./my_sink.ts", override = true }',
    }),
  ).optional(),
  pipelines: z.array(pipelineSchema).optional(),
});

const KNOWN_KEYS = {
  top: Object.keys(manifestSchema.shape),
  relay: Object.keys(relaySchema.shape),
  pipeline: Object.keys(pipelineSchema.shape),
  plugin: Object.keys(pluginTableSchema.shape),
};

type RawPipeline = z.infer<typeof pipelineSchema>;
const DIRECTION_KEYS = ["outbox", "sink_type", "inbox", "source_type"] as const;

function toPipeline(raw: RawPipeline, at: string, problems: string[]): ManifestPipeline {
  const { config = {}, enabled = true, ...rest } = raw;
  const forward = raw.outbox !== undefined && raw.sink_type !== undefined && !raw.inbox && !raw.source_type;
  const reverse = raw.inbox !== undefined && raw.source_type !== undefined && !raw.outbox && !raw.sink_type;
  if (!forward && !reverse) {
    const given = DIRECTION_KEYS.filter((key) => raw[key] !== undefined);
    problems.push(
      `${at} ("${raw.name}"): cannot tell the direction: a forward pipeline sets outbox and sink_type, a reverse ` +
        `one inbox and source_type (got ${given.length ? given.join(", ") : "none of them"})`,
    );
  }
  if (reverse && raw.consumer_group !== undefined) {
    problems.push(`${at}.consumer_group: only forward pipelines have a consumer group`);
  }
  if (forward && raw.idempotent !== undefined) {
    problems.push(`${at}.idempotent: only reverse pipelines take idempotent`);
  }
  // relay_set_outbox reads a differing config.sink_type as "the third argument is a consumer group".
  for (const key of ["sink_type", "source_type"] as const) {
    if (config[key] !== undefined && raw[key] !== undefined && config[key] !== raw[key]) {
      problems.push(`${at}.config.${key}: ${seen(config[key])} disagrees with ${key} "${raw[key]}"`);
    }
  }
  return { ...rest, direction: reverse ? "reverse" : "forward", enabled, config };
}

function parseText(text: string, format: ManifestFormat, path: string): unknown {
  try {
    return format === "toml" ? parseToml(text) : JSON.parse(text);
  } catch (error) {
    if (error instanceof TomlError) {
      const reason = error.message.replace(/^Invalid TOML document: /, "").split("\n")[0];
      const where = `line ${error.line}, column ${error.column}`;
      throw new ConfigError(`${path}: ${where}: invalid TOML: ${reason}\n${maskTomlExcerpt(error.codeblock)}`);
    }
    throw new ConfigError(`${path}: invalid ${format.toUpperCase()}: ${(error as Error).message}`, { cause: error });
  }
}

/**
 * The lines smol-toml quotes around a syntax error (`3:  password = "abc`, then a caret line) are
 * the very lines whose strings the error may have cut short. Values under secret-looking keys are
 * masked (inline tables too), the other values go through redactText, and a line that is not
 * `key = value`, a table header or a comment (the inside of a multi-line string or array) is masked
 * whole.
 */
function maskTomlExcerpt(codeblock: string): string {
  return codeblock.split("\n").map((line) => {
    const numbered = /^(\d+:\s+)(.*)$/.exec(line);
    if (!numbered) return line; // the caret under the column
    const [, number, text] = numbered as unknown as [string, string, string];
    const trimmed = text.trim();
    if (trimmed === "" || TOML_TABLE_HEADER.test(trimmed)) return line;
    if (trimmed.startsWith("#") || TOML_ASSIGNMENT.test(trimmed)) {
      return `${number}${redactText(text.replace(TOML_SECRET_VALUE, `$1${REDACTED}`))}`;
    }
    return `${number}${REDACTED}`;
  }).join("\n");
}

const TOML_TABLE_HEADER = /^\[\[?[^=\]]*\]\]?\s*(#.*)?$/;
const TOML_ASSIGNMENT = /^(?:[\w-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[\w-]+|"[^"]*"|'[^']*'))*\s*=/;
// `password = "..."`, `sasl = { password = '...' }`: the value, up to its end or to the end of the
// line when the error cut it short. A triple-quoted string runs to the end of the line.
const TOML_SECRET_VALUE = new RegExp(
  `((?:^|[\\s{,])["']?[\\w.-]*(?:${SECRET_KEY_PATTERN.source})[\\w.-]*["']?\\s*=\\s*)` +
    `("""[\\s\\S]*|'''[\\s\\S]*|"(?:[^"\\\\]|\\\\.)*"?|'[^']*'?|[^,}\\s]+)`,
  "gi",
);

// `$${` is a literal `${`; `${...}` must be a reference; a lone `${` is a mistake worth reporting.
const REFERENCE = /\$\$\{|\$\{([^}]*)\}|\$\{/g;

interface Resolved {
  value: unknown;
  /** key path → the text as written, so that messages quote the reference, never the secret. */
  references: Map<string, string>;
  /** key paths whose references failed: already reported, their placeholders would only add noise. */
  unresolved: Set<string>;
}

/** Copies the parsed tree into plain objects, resolving references in every string. */
function resolveReferences(
  root: unknown,
  baseDir: string,
  lookup: (name: string) => string | undefined,
  readFile: (path: string) => string,
  problems: string[],
): Resolved {
  const references = new Map<string, string>();
  const unresolved = new Set<string>();
  const resolveString = (text: string, at: string) =>
    text.replace(REFERENCE, (match, body: string | undefined) => {
      if (match === "$${") return "${";
      const problem = (message: string) => (unresolved.add(at), problems.push(`${at}: ${message}`), "");
      const [, kind, target] = /^(env|file):(.+)$/.exec(body ?? "") ?? [];
      if (kind === "env") return lookup(target) ?? problem(`environment variable ${target} is not set`);
      if (kind !== "file") {
        return problem(`"${match}" is not a reference: use \${env:VAR} or \${file:path} ($\${ is a literal \${)`);
      }
      const file = isAbsolute(target) ? target : resolve(baseDir, target);
      try {
        return readFile(file).replace(/\r?\n$/, "");
      } catch (error) {
        return problem(`cannot read ${file}: ${(error as Error).message}`);
      }
    });
  const walk = (value: unknown, path: PropertyKey[]): unknown => {
    if (typeof value === "string" && value.includes("${")) {
      references.set(formatPath(path), value);
      return resolveString(value, formatPath(path));
    }
    if (Array.isArray(value)) return value.map((item, i) => walk(item, [...path, i]));
    // TOML dates become their TOML text: the config goes to jsonb, which has no date type.
    if (value instanceof Date) return value.toISOString();
    if (typeof value === "object" && value !== null) {
      return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, walk(v, [...path, k])]));
    }
    return value;
  };
  return { value: walk(root, []), references, unresolved };
}

function describeIssue(issue: z.core.$ZodIssue, format: ManifestFormat, references: Map<string, string>): string[] {
  const at = formatPath(issue.path) || "the top level";
  if (issue.code === "unrecognized_keys") {
    const known = knownKeysAt(issue.path);
    return issue.keys.map((key) => {
      const suggestion = closest(key, known);
      return `${formatPath([...issue.path, key])}: unknown key${suggestion ? ` (did you mean "${suggestion}"?)` : ""}`;
    });
  }
  const input = references.get(at) ?? issue.input;
  // A value under a secret-looking key (http_token, password) is never quoted back; a reference is.
  const secret = !references.has(at) && issue.path.some((key) => typeof key === "string" && isSecretKey(key));
  const got = input === undefined || secret ? "" : ` (got ${seen(input, format)})`;
  switch (issue.code) {
    case "invalid_type":
      if (input === undefined) return [`${at}: required, expected ${expected(issue.expected, format)}`];
      return [`${at}: expected ${expected(issue.expected, format)}${got}`];
    case "invalid_value":
      return [`${at}: expected one of ${issue.values.map((v) => JSON.stringify(v)).join(", ")}${got}`];
    case "too_small":
      return [`${at}: must be ${issue.origin === "string" ? "non-empty" : `at least ${issue.minimum}`}${got}`];
    case "too_big":
      return [`${at}: must be at most ${issue.maximum}${got}`];
    default:
      return [`${at}: ${issue.message}${got}`];
  }
}

function knownKeysAt(path: PropertyKey[]): string[] {
  if (path.length === 0) return KNOWN_KEYS.top;
  if (path.length === 1 && path[0] === "relay") return KNOWN_KEYS.relay;
  if (path.length === 2 && path[0] === "pipelines") return KNOWN_KEYS.pipeline;
  if (path.length === 2 && path[0] === "plugins") return KNOWN_KEYS.plugin;
  return [];
}

/** The known key nearest to a typo, when it is close enough to be the likely intent. */
function closest(key: string, known: string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(key.length / 4)) + 1;
  for (const candidate of known) {
    const distance = editDistance(key.toLowerCase(), candidate);
    if (distance < bestDistance) [best, bestDistance] = [candidate, distance];
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}

function expected(type: string, format: ManifestFormat): string {
  const table = format === "toml" ? "a table" : "an object";
  const names: Record<string, string> = { int: "an integer", record: table, object: table, array: "an array" };
  return names[type] ?? `a ${type}`;
}

function seen(value: unknown, format: ManifestFormat = "toml"): string {
  if (Array.isArray(value)) return "an array";
  if (typeof value === "object" && value !== null) return format === "toml" ? "a table" : "an object";
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

function formatPath(path: PropertyKey[]): string {
  const text = path.map((key) => (typeof key === "number" ? `[${key}]` : keySuffix(String(key)))).join("");
  return text.startsWith(".") ? text.slice(1) : text;
}

function keySuffix(key: string): string {
  return /^[A-Za-z_][A-Za-z0-9_]*$/.test(key) ? `.${key}` : `[${JSON.stringify(key)}]`;
}

function fail(path: string, problems: string[]): never {
  throw new ConfigError(problems.map((problem) => `${path}: ${problem}`).join("\n"));
}
