// `pg-tide check`: validates a manifest and every pipeline config (the manifest's, and the catalog's
// when a database is given) with the same code the relay runs at start, without touching any sink:
// the engine's keys, the plugin's schema, and the plugin's create() (which compiles its templates
// and does no I/O by contract), then close(). Every message names its pipeline.

import { connect, verifyConnection } from "../core/db.ts";
import { ConfigError, toError } from "../core/errors.ts";
import type { PipelineRow } from "../core/pipeline.ts";
import { createLogger } from "../core/log.ts";
import { manifestPipelineProblems } from "../core/config/manifest_sync.ts";
import { preparePipeline } from "../core/config/pipeline_config.ts";
import { pluginContext, type PluginRegistry } from "../core/plugins.ts";
import { writeStdout } from "../core/runtime.ts";
import { formatHelp, HELP_FLAG, parseFlags, POSTGRES_URL_FLAG } from "./args.ts";
import { CONFIG_FLAG, loadConfig } from "./manifest_flags.ts";

const FLAGS = {
  config: CONFIG_FLAG,
  "postgres-url": { ...POSTGRES_URL_FLAG, help: POSTGRES_URL_FLAG.help + "; when given, the catalog's pipelines are checked too" },
  help: HELP_FLAG,
} as const;

export const CHECK_HELP = formatHelp(
  "pg-tide check [--config FILE] [--postgres-url URL]",
  "Validates the manifest, loads its drop-in plugins (one that declares a built-in type needs\n" +
    "override = true), and checks every pipeline config against its plugin's schema, its filter and\n" +
    "every template (an unknown placeholder is an error), without connecting to any sink or source:\n" +
    "the manifest's [[pipelines]], and the catalog's when a database URL is given (flag,\n" +
    "PG_TIDE_POSTGRES_URL or the manifest's [relay] postgres_url). Exits 1 and lists each problem,\n" +
    "named after its pipeline, when a pipeline config is invalid; 2 when the manifest or a plugin\n" +
    "cannot be used (the message names the file and the key).",
  FLAGS,
);

export async function checkCommand(args: string[]): Promise<number> {
  const first = parseFlags("check", FLAGS, args);
  if (first.help) {
    writeStdout(CHECK_HELP);
    return 0;
  }
  const { manifest, registry } = await loadConfig(first.config);
  const flags = parseFlags("check", FLAGS, args, { "postgres-url": manifest?.relay.postgres_url });
  const rows: Pick<PipelineRow, "name" | "direction" | "plugin_type" | "config">[] = (manifest?.pipelines ?? []).map((p) => ({
    name: p.name,
    direction: p.direction,
    plugin_type: (p.direction === "forward" ? p.sink_type : p.source_type)!,
    config: p.config,
  }));
  const url = flags["postgres-url"];
  /** What the catalog refuses of the manifest's pipelines, as the relay would at start. */
  let refused = new Map<string, string>();
  if (!manifest && !url) {
    throw new ConfigError(
      "pg-tide check: nothing to check: give --config FILE (or PG_TIDE_CONFIG), --postgres-url URL (or PG_TIDE_POSTGRES_URL), or both",
    );
  }
  if (url) {
    const sql = connect(url, { max: 1, applicationName: "pg-tide check" });
    try {
      await verifyConnection(sql, url);
      if (manifest?.pipelines.length) {
        refused = await manifestPipelineProblems(sql, manifest.pipelines, registry.all());
      }
      const catalog = await sql<PipelineRow[]>`SELECT * FROM tide.relay_pipelines ORDER BY name`;
      const declared = new Set(rows.map((r) => r.name));
      rows.push(...catalog.filter((row) => !declared.has(row.name)));
    } finally {
      await sql.end({ timeout: 5 });
    }
  }
  const problems: string[] = [];
  for (const row of rows) {
    const problem = (await pipelineProblem(row, registry)) ?? refused.get(row.name);
    if (problem) problems.push(problem);
  }
  if (manifest) writeStdout(`manifest ${manifest.path}: ok (${Object.keys(manifest.plugins).length} drop-in plugins)\n`);
  for (const { kind, type, plugin } of registry.replaced()) {
    writeStdout(`plugin "${plugin}" replaces the built-in ${kind} "${type}" (override = true)\n`);
  }
  if (!url) {
    writeStdout(
      "catalog not checked: no database URL (--postgres-url, PG_TIDE_POSTGRES_URL or [relay] postgres_url); " +
        "only the manifest's [[pipelines]] were checked\n",
    );
  }
  const where = url ? (manifest ? "manifest and catalog" : "catalog") : "manifest only";
  writeStdout(
    rows.length === 0
      ? `no pipeline configs to check (${where})\n`
      : `${rows.length - problems.length} of ${rows.length} pipeline configs are valid (${where})\n`,
  );
  for (const problem of problems) writeStdout(`  ${problem}\n`);
  return problems.length ? 1 : 0;
}

/**
 * What the relay would refuse when it starts this pipeline, named after it: the config checks, then
 * the plugin's create() (templates compile there), then close() on the unconnected instance.
 */
async function pipelineProblem(
  row: Pick<PipelineRow, "name" | "direction" | "plugin_type" | "config">,
  registry: PluginRegistry,
): Promise<string | undefined> {
  const abort = new AbortController();
  try {
    const prepared = await preparePipeline(row, registry);
    const silent = createLogger({ level: "error", format: "text", write: () => {} });
    const ctx = pluginContext(row.name, silent, abort.signal, CHECK_BATCH_SIZE);
    const instance = prepared.definition.create(prepared.pluginConfig as never, ctx);
    await instance.close();
    return undefined;
  } catch (error) {
    const message = toError(error).message;
    return message.startsWith(`pipeline "${row.name}"`) ? message : `pipeline "${row.name}": ${message}`;
  } finally {
    abort.abort();
  }
}

/** ctx.batchSize for create(); a config is valid or not whatever its value. */
const CHECK_BATCH_SIZE = 100;
