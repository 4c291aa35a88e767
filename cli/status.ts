// `pg-tide status`: pipelines, owners, health, lag and DLQ depth, read from the catalog, the
// consumer groups no pipeline reads (they keep their waiting messages from the retention sweep), and
// the replication slots of tables captured from the WAL.

import { ConfigError } from "../core/errors.ts";
import { connect, verifyConnection } from "../core/db.ts";
import { redactText } from "../core/redact.ts";
import { writeStdout } from "../core/runtime.ts";
import {
  pipelineStatus, type PipelineStatus, type UnreadConsumerGroup, unreadConsumerGroups, walSlotStatus, type WalSlotStatus,
} from "../core/http/status.ts";
import { formatHelp, HELP_FLAG, parseFlags, POSTGRES_URL_FLAG, requireUrl } from "./args.ts";
import { CONFIG_FLAG, loadConfig } from "./manifest_flags.ts";
import { columns } from "./table.ts";

const FLAGS = {
  config: { ...CONFIG_FLAG, help: "manifest whose [relay] postgres_url and relay_group_id are used when the flags are not given" },
  "postgres-url": POSTGRES_URL_FLAG,
  "relay-group-id": { type: "string", env: "PG_TIDE_RELAY_GROUP_ID", default: "default", placeholder: "ID", help: "whose ownership and positions to show" },
  output: { type: "string", default: "text", placeholder: "text|json", help: "a table for people, or JSON" },
  help: HELP_FLAG,
} as const;

export const STATUS_HELP = formatHelp(
  "pg-tide status [--postgres-url URL | --config FILE] [--relay-group-id ID] [--output text|json]",
  "Shows every pipeline: direction, source and target, owner, health, position (forward), lag\n" +
    "(forward: undelivered outbox messages; reverse: unprocessed inbox rows), DLQ depth, the config\n" +
    "version the owner runs (\"v2 (v3 pending)\" while it restarts with a change), the last success\n" +
    "and the last error with its time (\"past:\" once the pipeline recovered);\n" +
    "then the consumer groups no pipeline reads that have messages waiting, which the retention sweep\n" +
    "keeps until they are read or the group is dropped; then the tables captured from the WAL with\n" +
    "their slot's state (streaming, not read, over limit, paused, dropped, missing, lost) and lag.",
  FLAGS,
);

export async function statusCommand(args: string[]): Promise<number> {
  const first = parseFlags("status", FLAGS, args);
  if (first.help) {
    writeStdout(STATUS_HELP);
    return 0;
  }
  const { manifest } = await loadConfig(first.config);
  const flags = parseFlags("status", FLAGS, args, {
    "postgres-url": manifest?.relay.postgres_url,
    "relay-group-id": manifest?.relay.relay_group_id,
  });
  if (flags.output !== "text" && flags.output !== "json") {
    throw new ConfigError(`pg-tide status: --output must be "text" or "json" (got "${flags.output}")`);
  }
  const url = requireUrl("status", flags["postgres-url"]);
  const sql = connect(url, { max: 1, applicationName: "pg-tide status" });
  try {
    await verifyConnection(sql, url);
    const rows = await pipelineStatus(sql, flags["relay-group-id"]!);
    for (const row of rows) if (row.last_error) row.last_error = redactText(row.last_error);
    const unread = await unreadConsumerGroups(sql);
    const slots = await walSlotStatus(sql);
    writeStdout(
      flags.output === "json"
        ? JSON.stringify({ pipelines: rows, unread_consumer_groups: unread, wal_captures: slots }, null, 2) + "\n"
        : table(rows) + unreadTable(unread) + walTable(slots),
    );
    return 0;
  } finally {
    await sql.end({ timeout: 5 });
  }
}

function table(rows: PipelineStatus[]): string {
  if (rows.length === 0) return "no pipelines (create one with tide.relay_set_outbox or tide.relay_set_inbox)\n";
  const header = ["PIPELINE", "DIRECTION", "FROM", "TO", "STATE", "OWNER", "CONFIG", "POSITION", "LAG", "DLQ", "LAST SUCCESS", "LAST ERROR"];
  return columns(header, rows.map((r) => [
    r.name,
    r.direction,
    r.direction === "forward" ? r.outbox ?? "" : r.plugin_type,
    r.direction === "forward" ? r.plugin_type : r.inbox ?? "",
    !r.enabled ? "disabled" : r.healthy === false ? `failing (attempt ${r.retry_attempt}${r.circuit && r.circuit !== "closed" ? `, circuit ${r.circuit}` : ""})` : r.owner_alive ? "healthy" : "no owner",
    r.owner_alive ? r.owner ?? "" : "",
    configVersion(r),
    r.committed_offset === null ? "" : String(r.committed_offset),
    lag(r),
    String(r.dlq_depth),
    r.last_success_at ? r.last_success_at.toISOString() : "",
    lastError(r),
  ]));
}

// A deleted pipeline's group stays (so that the pipeline, created again, resumes where it stopped):
// nothing moves it any more, and the retention sweep keeps every message after it.
function unreadTable(groups: UnreadConsumerGroup[]): string {
  if (groups.length === 0) return "";
  const header = ["OUTBOX", "GROUP", "RELAY GROUP", "WAITING", "POSITION MOVED", "TO DROP IT"];
  return "\nconsumer groups no pipeline reads: the retention sweep keeps their waiting messages until an " +
    "application reads them or the group is dropped\n" +
    columns(header, groups.map((g) => [g.outbox, g.group, g.relay_group_id, String(g.lag), g.position_moved_at.toISOString(),
      `SELECT tide.drop_consumer_group(${quote(g.group)}, ${quote(g.outbox)});`]));
}

// A slot holds the server's WAL until a relay confirms past it; paused and dropped say why.
function walTable(slots: WalSlotStatus[]): string {
  if (slots.length === 0) return "";
  const header = ["TABLE", "OUTBOX", "SLOT", "STATE", "LAG BYTES", "LIMIT", "CONFIRMED", "WHY"];
  return "\ntables captured from the WAL\n" +
    columns(header, slots.map((s) => [s.table, s.outbox, s.slot, s.state, s.lag_bytes === null ? "" : String(s.lag_bytes),
      `${s.lag_limit_bytes}, then ${s.on_lag_limit}`, `${Math.round(s.confirmed_age_seconds)} s ago`,
      s.state_reason ? `${s.state_reason}${s.state_at ? ` at ${s.state_at.toISOString()}` : ""}` : ""]));
}

function quote(name: string): string {
  return `'${name.replaceAll("'", "''")}'`;
}


// Reverse pipelines: what waits in the inbox for the application (the source keeps its own offsets).
function lag(r: PipelineStatus): string {
  if (r.direction === "reverse") return r.inbox_pending === null ? "" : `${r.inbox_pending} pending`;
  return r.lag === null ? "" : String(r.lag);
}

// "v3" when the owner runs the catalog's config, "v2 (v3 pending)" while it restarts with the new one.
function configVersion(r: PipelineStatus): string {
  if (!r.owner_alive || r.applied_version === null || r.applied_version === r.config_version) return `v${r.config_version}`;
  return `v${r.applied_version} (v${r.config_version} pending)`;
}

// An error the pipeline recovered from is history: marked past, with its time.
function lastError(r: PipelineStatus): string {
  if (!r.last_error) return "";
  const at = r.last_error_at ? ` at ${r.last_error_at.toISOString()}` : "";
  return `${r.error_is_past ? "past: " : ""}${r.last_error.slice(0, 60)}${at}`;
}
