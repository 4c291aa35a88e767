// `pg-tide plugins`: the sink and source types this relay knows (built-in and drop-in), with a
// summary and an example config for each.

import { ConfigError } from "../core/errors.ts";
import type { PluginDefinition } from "../core/plugin.ts";
import { type ConfigJsonSchema, configJsonSchema } from "../core/plugins.ts";
import { redactConfig } from "../core/redact.ts";
import { writeStdout } from "../core/runtime.ts";
import { formatHelp, HELP_FLAG, parseFlags } from "./args.ts";
import { CONFIG_FLAG, loadConfig } from "./manifest_flags.ts";

const FLAGS = {
  config: CONFIG_FLAG,
  output: { type: "string", default: "text", placeholder: "text|json", help: "a list for people, or JSON" },
  help: HELP_FLAG,
} as const;

export const PLUGINS_HELP = formatHelp(
  "pg-tide plugins [TYPE] [--config FILE] [--output text|json]",
  "Lists the sink and source types: the built-in ones and the drop-ins a manifest names, each with\n" +
    "a one-line summary and an example config for tide.relay_set_outbox / tide.relay_set_inbox.\n" +
    "With a TYPE (`pg-tide plugins kafka`), shows that type's sink and source with every config key:\n" +
    "its type, whether it is required, and its default.",
  FLAGS,
);

export async function pluginsCommand(args: string[]): Promise<number> {
  const type = args[0] !== undefined && !args[0].startsWith("-") ? args[0] : undefined;
  const flags = parseFlags("plugins", FLAGS, type === undefined ? args : args.slice(1));
  if (flags.help) {
    writeStdout(PLUGINS_HELP);
    return 0;
  }
  const { registry } = await loadConfig(flags.config);
  let plugins = registry.all().sort((a, b) => a.kind.localeCompare(b.kind) || a.type.localeCompare(b.type));
  if (type !== undefined) {
    plugins = plugins.filter((p) => p.type === type);
    if (plugins.length === 0) {
      throw new ConfigError(`pg-tide plugins: no sink or source type "${type}" (known: ${[...new Set(registry.all().map((p) => p.type))].sort().join(", ")})`);
    }
  }
  if (flags.output === "json") {
    const listed = plugins.map((p) => ({
      type: p.type, kind: p.kind, summary: p.summary, example: p.example, ...(type !== undefined ? { options: optionsOf(p) } : {}),
    }));
    writeStdout(JSON.stringify(listed, null, 2) + "\n");
    return 0;
  }
  for (const p of plugins) {
    writeStdout(`${p.kind} ${p.type}\n  ${p.summary}\n  example: ${JSON.stringify(redactConfig(p.example))}\n`);
    if (type !== undefined) {
      const options = optionsOf(p);
      if (options === undefined) writeStdout("  its config schema does not list its keys (not a zod schema)\n");
      else {
        writeStdout("  config keys:\n");
        for (const o of options) {
          writeStdout(`    ${o.key}: ${o.type}${o.required ? ", required" : ""}${o.default !== undefined ? `, default ${JSON.stringify(o.default)}` : ""}\n`);
        }
      }
    }
    writeStdout("\n");
  }
  return 0;
}

interface Option {
  key: string;
  type: string;
  required: boolean;
  default?: unknown;
}

/** Every key of a plugin's config, read from its zod schema (other Standard Schemas do not say). */
function optionsOf(plugin: PluginDefinition): Option[] | undefined {
  const schema = configJsonSchema(plugin);
  if (schema === undefined) return undefined;
  const required = new Set(schema.required ?? []);
  return Object.entries(schema.properties ?? {}).map(([key, property]) => ({
    key, type: typeText(property), required: required.has(key), default: property.default,
  }));
}

/** A JSON Schema type as one short phrase: `string`, `"all" | -1 | 1`, `array of string`, `object`. */
function typeText(s: ConfigJsonSchema): string {
  if (s.const !== undefined) return JSON.stringify(s.const);
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (s.anyOf) return [...new Set(s.anyOf.map(typeText))].join(" | ");
  if (s.type === "array") return `array of ${s.items ? typeText(s.items) : "any"}`;
  if (s.type === "object" && s.properties) return `object {${Object.keys(s.properties).join(", ")}}`;
  if (Array.isArray(s.type)) return s.type.join(" | ");
  return s.type ?? "any";
}
