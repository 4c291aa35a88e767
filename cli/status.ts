// `pg-tide status`: pipelines, owners, health, lag and DLQ depth, read from the catalog.

import { ConfigError } from "../core/errors.ts";
import { connect, verifyConnection } from "../core/db.ts";
import { redactText } from "../core/redact.ts";
import { writeStdout } from "../core/runtime.ts";
import { pipelineStatus, type PipelineStatus } from "../core/status.ts";
import { formatHelp, HELP_FLAG, parseFlags, POSTGRES_URL_FLAG, requireUrl } from "./args.ts";

const FLAGS = {
  "postgres-url": POSTGRES_URL_FLAG,
  "relay-group-id": { type: "string", env: "PG_TIDE_RELAY_GROUP_ID", default: "default", placeholder: "ID", help: "whose ownership and positions to show" },
  output: { type: "string", default: "text", placeholder: "text|json", help: "a table for people, or JSON" },
  help: HELP_FLAG,
} as const;

export const STATUS_HELP = formatHelp(
  "pg-tide status --postgres-url URL [--relay-group-id ID] [--output text|json]",
  "Shows every pipeline: direction, source and target, owner, health, position (forward), lag\n" +
    "(forward: undelivered outbox messages; reverse: unprocessed inbox rows), DLQ depth and last error.",
  FLAGS,
);

export async function statusCommand(args: string[]): Promise<number> {
  const flags = parseFlags("status", FLAGS, args);
  if (flags.help) {
    writeStdout(STATUS_HELP);
    return 0;
  }
  if (flags.output !== "text" && flags.output !== "json") {
    throw new ConfigError(`pg-tide status: --output must be "text" or "json" (got "${flags.output}")`);
  }
  const url = requireUrl("status", flags["postgres-url"]);
  const sql = connect(url, { max: 1, applicationName: "pg-tide status" });
  try {
    await verifyConnection(sql, url);
    const rows = await pipelineStatus(sql, flags["relay-group-id"]!);
    for (const row of rows) if (row.last_error) row.last_error = redactText(row.last_error);
    writeStdout(flags.output === "json" ? JSON.stringify({ pipelines: rows }, null, 2) + "\n" : table(rows));
    return 0;
  } finally {
    await sql.end({ timeout: 5 });
  }
}

function table(rows: PipelineStatus[]): string {
  if (rows.length === 0) return "no pipelines (create one with tide.relay_set_outbox or tide.relay_set_inbox)\n";
  const header = ["PIPELINE", "DIRECTION", "FROM", "TO", "STATE", "OWNER", "POSITION", "LAG", "DLQ", "LAST ERROR"];
  const body = rows.map((r) => [
    r.name,
    r.direction,
    r.direction === "forward" ? r.outbox ?? "" : r.plugin_type,
    r.direction === "forward" ? r.plugin_type : r.inbox ?? "",
    !r.enabled ? "disabled" : r.healthy === false ? `failing (attempt ${r.retry_attempt}${r.circuit && r.circuit !== "closed" ? `, circuit ${r.circuit}` : ""})` : r.owner_alive ? "healthy" : "no owner",
    r.owner_alive ? r.owner ?? "" : "",
    r.committed_offset === null ? "" : String(r.committed_offset),
    lag(r),
    String(r.dlq_depth),
    (r.last_error ?? "").slice(0, 60),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i].length)));
  return [header, ...body].map((row) => row.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd()).join("\n") + "\n";
}

// Reverse pipelines: what waits in the inbox for the application (the source keeps its own offsets).
function lag(r: PipelineStatus): string {
  if (r.direction === "reverse") return r.inbox_pending === null ? "" : `${r.inbox_pending} pending`;
  return r.lag === null ? "" : String(r.lag);
}
