// `pg-tide check`: validates a manifest and every pipeline config (the manifest's, and the catalog's
// when a database is given) with the same code the relay runs at start, without touching any sink.

import { connect, verifyConnection } from "../core/db.ts";
import { toError } from "../core/errors.ts";
import type { PipelineRow } from "../core/forward.ts";
import { preparePipeline } from "../core/pipeline_config.ts";
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
  "Validates the manifest, loads its drop-in plugins, and checks every pipeline config against its\n" +
    "plugin's schema, filter and templates, without connecting to any sink or source. Exits 1 and\n" +
    "lists each problem when something is wrong.",
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
  if (url) {
    const sql = connect(url, { max: 1, applicationName: "pg-tide check" });
    try {
      await verifyConnection(sql, url);
      const catalog = await sql<PipelineRow[]>`SELECT * FROM tide.relay_pipelines ORDER BY name`;
      const declared = new Set(rows.map((r) => r.name));
      rows.push(...catalog.filter((row) => !declared.has(row.name)));
    } finally {
      await sql.end({ timeout: 5 });
    }
  }
  const problems: string[] = [];
  for (const row of rows) {
    try {
      await preparePipeline(row, registry);
    } catch (error) {
      problems.push(toError(error).message);
    }
  }
  if (manifest) writeStdout(`manifest ${manifest.path}: ok (${Object.keys(manifest.plugins).length} drop-in plugins)\n`);
  writeStdout(`${rows.length - problems.length} of ${rows.length} pipeline configs are valid\n`);
  for (const problem of problems) writeStdout(`  ${problem}\n`);
  return problems.length ? 1 : 0;
}
