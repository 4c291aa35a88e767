// The plugin loader: built-in and drop-in plugins go through the same path. A drop-in is a .ts or .js
// file whose default export is a PluginDefinition; it is loaded from disk at run time, also by the
// compiled binary. A drop-in may replace a built-in type only when the manifest says so
// (`override = true`): a file that happens to declare "webhook" must not silently take over every
// webhook pipeline.

import { isAbsolute, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import type { Sql } from "./db.ts";
import { z } from "zod";
import { ConfigError, PluginError, pluginErrors } from "./errors.ts";
import type { Logger } from "./log.ts";
import type { HttpRoutes, PluginContext, PluginDefinition, PluginKind, PluginKit } from "./plugin.ts";
import { renderTemplate } from "./config/template.ts";
import { VERSION } from "./version.ts";

/** Where a definition comes from: built into pg-tide, or a drop-in named in a manifest's [plugins]. */
export type PluginOrigin = "built-in" | DropIn;

export interface DropIn {
  /** The plugin's name in [plugins]. */
  name: string;
  file: string;
  /** The manifest allows it to replace a built-in type of the same kind and name. */
  override?: boolean;
}

export class PluginRegistry {
  readonly #plugins = new Map<string, { definition: PluginDefinition; origin: PluginOrigin; replaced: boolean }>();

  /** `definitions`: the built-in plugins (plugins/registry.ts), handed in by the CLI so core imports no plugin. */
  constructor(definitions: PluginDefinition[]) {
    for (const definition of definitions) this.add(definition, "built-in");
  }

  add(definition: PluginDefinition, origin: PluginOrigin): void {
    const from = describe(origin);
    checkDefinition(definition, from);
    const k = key(definition.kind, definition.type);
    const existing = this.#plugins.get(k)?.origin;
    if (existing !== undefined && origin !== "built-in") {
      const what = `${from} declares the ${definition.kind} type "${definition.type}"`;
      if (existing !== "built-in") {
        throw new ConfigError(`${what}, which ${describe(existing)} declares too: give one of them another type`);
      }
      if (!origin.override) {
        throw new ConfigError(
          `${what}, which is built in. To replace the built-in ${definition.kind} in every pipeline of that type, ` +
            `write its [plugins] entry as ${origin.name} = { path = ${JSON.stringify(origin.file)}, override = true } ` +
            `(in a JSON manifest: {"path": ..., "override": true}); otherwise give the plugin another type`,
        );
      }
    }
    this.#plugins.set(k, { definition, origin, replaced: existing === "built-in" });
  }

  /** Built-in types that a drop-in replaced (override = true), to say so at start and in check. */
  /** The drop-ins loaded: what the relay logs at start. */
  dropIns(): { kind: PluginKind; type: string; plugin: string; file: string; version?: string }[] {
    return [...this.#plugins.values()]
      .filter((entry) => entry.origin !== "built-in")
      .map(({ definition, origin }) => ({
        kind: definition.kind, type: definition.type, plugin: (origin as DropIn).name, file: (origin as DropIn).file,
        version: definition.version,
      }));
  }

  replaced(): { kind: PluginKind; type: string; plugin: string }[] {
    return [...this.#plugins.values()]
      .filter((entry) => entry.replaced)
      .map(({ definition, origin }) => ({ kind: definition.kind, type: definition.type, plugin: (origin as DropIn).name }));
  }

  get(kind: PluginKind, type: string): PluginDefinition {
    const entry = this.#plugins.get(key(kind, type));
    if (!entry) {
      throw new ConfigError(`unknown ${kind} type "${type}" (known: ${this.types(kind).join(", ")})`);
    }
    return entry.definition;
  }

  types(kind: PluginKind): string[] {
    return this.all().filter((d) => d.kind === kind).map((d) => d.type).sort();
  }

  all(): PluginDefinition[] {
    return [...this.#plugins.values()].map((entry) => entry.definition);
  }

  /** Loads a drop-in plugin module (path relative to `baseDir`) and registers its definition. */
  async load(name: string, path: string, baseDir: string, options: { override?: boolean } = {}): Promise<PluginDefinition> {
    const file = isAbsolute(path) ? path : resolve(baseDir, path);
    let module: { default?: unknown };
    try {
      module = await import(pathToFileURL(file).href);
    } catch (error) {
      throw new PluginError(`plugin "${name}": cannot load ${file}: ${(error as Error).message}`, { cause: error });
    }
    let definition = module.default as PluginDefinition | ((kit: PluginKit) => PluginDefinition);
    if (typeof definition === "function") {
      try {
        definition = definition({ z, errors: pluginErrors, tideVersion: VERSION });
      } catch (error) {
        throw new PluginError(`plugin "${name}": ${file}: its default export failed: ${(error as Error).message}`, { cause: error });
      }
    }
    this.add(definition, { name, file, override: options.override });
    return definition;
  }
}

/** Validates a plugin config with its Standard Schema; the error names the pipeline and each bad key. */
export async function validatePluginConfig(definition: PluginDefinition, config: unknown, where: string): Promise<unknown> {
  let result = definition.config["~standard"].validate(config);
  if (result instanceof Promise) result = await result;
  if (result.issues) {
    const problems = result.issues.map((issue) => {
      const path = (issue.path ?? []).map((p) => (typeof p === "object" ? p.key : p)).join(".");
      return path ? `'${path}': ${issue.message}` : issue.message;
    });
    throw new ConfigError(`${where}: ${definition.type} ${definition.kind} config is invalid: ${problems.join("; ")}`);
  }
  return result.value;
}

/** A JSON Schema, as far as tide reads one: a config's keys and which of them are required. */
export interface ConfigJsonSchema {
  type?: string | string[];
  const?: unknown;
  enum?: unknown[];
  items?: ConfigJsonSchema;
  properties?: Record<string, ConfigJsonSchema>;
  required?: string[];
  anyOf?: ConfigJsonSchema[];
  oneOf?: ConfigJsonSchema[];
  allOf?: ConfigJsonSchema[];
  default?: unknown;
}

/** The JSON Schema of what a plugin's config accepts, read from its zod schema (other Standard Schemas do not say). */
export function configJsonSchema(definition: PluginDefinition): ConfigJsonSchema | undefined {
  if (!("_zod" in (definition.config as object))) return undefined;
  try {
    return z.toJSONSchema(definition.config as unknown as z.ZodType, { unrepresentable: "any", io: "input" }) as ConfigJsonSchema;
  } catch {
    return undefined;
  }
}

/**
 * The keys a plugin's config must have, as tide.plugin_types.required_keys states them for the
 * catalog: groups of which a config must hold at least one key each, e.g. [["url"], ["topic",
 * "topic_template"]]. Derived from the config schema (its `required`, and `anyOf`/`oneOf` branches
 * that require keys, as keyOrInstead in plugins/shared.ts states them), so the catalog never asks
 * for more than the plugin does; a schema without a JSON Schema gives [] and the catalog checks no keys.
 */
export function requiredKeysOf(definition: PluginDefinition): string[][] {
  const schema = configJsonSchema(definition);
  return schema === undefined ? [] : keyGroups(schema);
}

/**
 * Writes every loaded type's required keys into the catalog (built-in and drop-in alike), so that
 * tide.relay_set_outbox / relay_set_inbox accept the types this relay runs and check what their
 * schemas require.
 */
export async function registerPluginTypes(sql: Sql, definitions: PluginDefinition[]): Promise<void> {
  for (const definition of definitions) {
    const keys = JSON.stringify(requiredKeysOf(definition));
    await sql`SELECT tide.register_plugin_type(${definition.type}, ${definition.kind}, ${keys}::text::jsonb)`;
  }
}

export function pluginContext(
  pipeline: string,
  logger: Logger,
  signal: AbortSignal,
  batchSize: number,
  postgresUrl?: string,
  http?: HttpRoutes,
): PluginContext {
  return { pipeline, logger, errors: pluginErrors, signal, batchSize, postgresUrl, http, render: renderTemplate };
}

function describe(origin: PluginOrigin): string {
  return origin === "built-in" ? "built-in" : `plugin "${origin.name}" (${origin.file})`;
}

function key(kind: string, type: string): string {
  return `${kind}:${type}`;
}

function checkDefinition(definition: PluginDefinition, origin: string): void {
  const problems: string[] = [];
  if (!definition || typeof definition !== "object") {
    throw new PluginError(`${origin}: the module must default-export a plugin definition object, or a function that takes the plugin kit ({ z, errors, tideVersion }) and returns one`);
  }
  if (typeof definition.type !== "string" || !/^[A-Za-z_][A-Za-z0-9_-]*$/.test(definition.type)) problems.push("'type' must be a name");
  if (definition.kind !== "sink" && definition.kind !== "source") problems.push("'kind' must be \"sink\" or \"source\"");
  if (typeof definition.create !== "function") problems.push("'create' must be a function");
  if (typeof definition.config?.["~standard"]?.validate !== "function") problems.push("'config' must be a Standard Schema");
  if (typeof definition.summary !== "string") problems.push("'summary' must be a string");
  if (problems.length) throw new PluginError(`${origin}: invalid plugin definition: ${problems.join("; ")}`);
}

function keyGroups(schema: ConfigJsonSchema): string[][] {
  const groups = (schema.required ?? []).map((key) => [key]);
  for (const part of schema.allOf ?? []) groups.push(...keyGroups(part));
  for (const branches of [schema.anyOf, schema.oneOf]) {
    if (!branches?.length) continue;
    // (a and b) or c holds exactly when (a or c) and (b or c): one group per choice of a key from
    // each branch. A branch that requires nothing makes no key required.
    let choices: string[][] = [[]];
    for (const branch of branches) choices = choices.flatMap((choice) => (branch.required ?? []).map((key) => [...choice, key]));
    groups.push(...choices.map((choice) => [...new Set(choice)]));
  }
  const seen = new Set<string>();
  return groups.filter((group) => !seen.has(JSON.stringify(group)) && seen.add(JSON.stringify(group)));
}
