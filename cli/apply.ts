// `pg-tide apply`: writes a manifest's [[pipelines]] into the catalog (as `pg-tide run` does when it
// starts) without running a relay, and with --wait returns only once the running relays have applied
// every change (tide.relay_wait_applied), so that what is published next goes out under it.

import { connect, verifyConnection } from "../core/db.ts";
import { ConfigError } from "../core/errors.ts";
import { createLogger } from "../core/log.ts";
import { syncManifestPipelines } from "../core/config/manifest_sync.ts";
import { writeStdout } from "../core/runtime.ts";
import { formatHelp, HELP_FLAG, parseFlags, POSTGRES_URL_FLAG, requireUrl } from "./args.ts";
import { CONFIG_FLAG, loadConfig } from "./manifest_flags.ts";

export const DEFAULT_WAIT_SECONDS = 30;

const FLAGS = {
  config: CONFIG_FLAG,
  "postgres-url": { ...POSTGRES_URL_FLAG, help: POSTGRES_URL_FLAG.help + " (default: the manifest's [relay] postgres_url)" },
  wait: { type: "boolean", help: "return once the running relays run every pipeline's new config" },
  timeout: { type: "string", default: String(DEFAULT_WAIT_SECONDS), placeholder: "SECONDS", help: "--wait: give up after this long (exit 1)" },
  help: HELP_FLAG,
} as const;

export const APPLY_HELP = formatHelp(
  "pg-tide apply --config FILE [--postgres-url URL] [--wait [--timeout SECONDS]]",
  "Creates or updates the manifest's [[pipelines]] in the catalog; unchanged ones are left alone.\n" +
    "Running relays pick changes up on their own, moments later: a message published before a relay\n" +
    "applied a change may still go out under the old config. With --wait, apply returns once every\n" +
    "pipeline of the manifest runs its current config (an enabled one on a live relay, a disabled\n" +
    "one nowhere), and exits 1 naming those that did not within --timeout.",
  FLAGS,
);

export async function applyCommand(args: string[]): Promise<number> {
  const first = parseFlags("apply", FLAGS, args);
  if (first.help) {
    writeStdout(APPLY_HELP);
    return 0;
  }
  if (!first.config) throw new ConfigError("pg-tide apply: --config FILE is required (the manifest whose [[pipelines]] to apply)");
  const { manifest } = await loadConfig(first.config);
  const flags = parseFlags("apply", FLAGS, args, { "postgres-url": manifest?.relay.postgres_url });
  const timeout = Number(flags.timeout);
  if (!Number.isFinite(timeout) || timeout < 0) throw new ConfigError(`pg-tide apply: --timeout must be a number of seconds (got "${flags.timeout}")`);
  const pipelines = manifest?.pipelines ?? [];
  const url = requireUrl("apply", flags["postgres-url"]);
  const sql = connect(url, { max: 1, applicationName: "pg-tide apply" });
  try {
    await verifyConnection(sql, url);
    const logger = createLogger({ level: "info", format: "text" });
    const changed = await syncManifestPipelines(sql, pipelines, logger);
    writeStdout(`${changed} of ${pipelines.length} pipeline(s) changed\n`);
    if (!flags.wait) return 0;
    const late: string[] = [];
    const deadline = Date.now() + timeout * 1000;
    for (const p of pipelines) {
      const left = Math.max(0, (deadline - Date.now()) / 1000);
      const [row] = await sql`SELECT tide.relay_wait_applied(${p.name}, make_interval(secs => ${left})) AS applied`;
      if (!row.applied) late.push(p.name);
    }
    if (late.length > 0) {
      writeStdout(`not applied within ${timeout} s: ${late.join(", ")} (is a relay running for them? see pg-tide status)\n`);
      return 1;
    }
    writeStdout("every pipeline runs its current config\n");
    return 0;
  } finally {
    await sql.end({ timeout: 5 });
  }
}
