// The plugin loader: built-in and drop-in plugins go through the same path. A drop-in is a .ts or .js
// file whose default export is a PluginDefinition; it is loaded from disk at run time, also by the
// compiled binary.

import { isAbsolute, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { builtinPlugins } from "../plugins/registry.ts";
import { ConfigError, PluginError, pluginErrors } from "./errors.ts";
import type { Logger } from "./log.ts";
import type { HttpRoutes, PluginContext, PluginDefinition, PluginKind } from "./plugin.ts";
import { renderTemplate } from "./template.ts";

export class PluginRegistry {
  readonly #plugins = new Map<string, PluginDefinition>();

  constructor(definitions: PluginDefinition[] = builtinPlugins) {
    for (const definition of definitions) this.add(definition, "built-in");
  }

  add(definition: PluginDefinition, origin: string): void {
    checkDefinition(definition, origin);
    this.#plugins.set(key(definition.kind, definition.type), definition);
  }

  get(kind: PluginKind, type: string): PluginDefinition {
    const definition = this.#plugins.get(key(kind, type));
    if (!definition) {
      throw new ConfigError(`unknown ${kind} type "${type}" (known: ${this.types(kind).join(", ")})`);
    }
    return definition;
  }

  types(kind: PluginKind): string[] {
    return [...this.#plugins.values()].filter((d) => d.kind === kind).map((d) => d.type).sort();
  }

  all(): PluginDefinition[] {
    return [...this.#plugins.values()];
  }

  /** Loads a drop-in plugin module (path relative to `baseDir`) and registers its definition. */
  async load(name: string, path: string, baseDir: string): Promise<PluginDefinition> {
    const file = isAbsolute(path) ? path : resolve(baseDir, path);
    let module: { default?: unknown };
    try {
      module = await import(pathToFileURL(file).href);
    } catch (error) {
      throw new PluginError(`plugin "${name}": cannot load ${file}: ${(error as Error).message}`, { cause: error });
    }
    const definition = module.default as PluginDefinition;
    this.add(definition, `plugin "${name}" (${file})`);
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

function key(kind: string, type: string): string {
  return `${kind}:${type}`;
}

function checkDefinition(definition: PluginDefinition, origin: string): void {
  const problems: string[] = [];
  if (!definition || typeof definition !== "object") {
    throw new PluginError(`${origin}: the module must default-export a plugin definition object`);
  }
  if (typeof definition.type !== "string" || !/^[A-Za-z_][A-Za-z0-9_-]*$/.test(definition.type)) problems.push("'type' must be a name");
  if (definition.kind !== "sink" && definition.kind !== "source") problems.push("'kind' must be \"sink\" or \"source\"");
  if (typeof definition.create !== "function") problems.push("'create' must be a function");
  if (typeof definition.config?.["~standard"]?.validate !== "function") problems.push("'config' must be a Standard Schema");
  if (typeof definition.summary !== "string") problems.push("'summary' must be a string");
  if (problems.length) throw new PluginError(`${origin}: invalid plugin definition: ${problems.join("; ")}`);
}
