// `pg-tide trace <id>`: where is my event? The same lookup as the console's (tide.trace_event).

import { connect, verifyConnection } from "../core/db.ts";
import { ConfigError } from "../core/errors.ts";
import { traceEvent } from "../core/http/operations.ts";
import { writeStdout } from "../core/runtime.ts";
import { formatHelp, HELP_FLAG, parseFlags, POSTGRES_URL_FLAG, requireUrl } from "./args.ts";
import { columns } from "./table.ts";

const FLAGS = {
  "postgres-url": POSTGRES_URL_FLAG,
  output: { type: "string", default: "text", placeholder: "text|json", help: "a table for people, or JSON" },
  help: HELP_FLAG,
} as const;

export const TRACE_HELP = formatHelp(
  "pg-tide trace KEY --postgres-url URL [--output text|json]",
  "Finds one event. KEY is an outbox message id (42), its dedup key (<outbox>:<id>, what sinks\n" +
    "send as the message id) or an inbox event id. For an outbox message it shows, per consumer\n" +
    "group (one per pipeline and relay group), whether the message is delivered, pending,\n" +
    "dead-lettered, replay requested or discarded; for an inbox event, whether it is processed,\n" +
    "pending, failed (retried later) or dead-lettered, with the last error. Exits 1 when nothing\n" +
    "matches (never published, or removed by the retention sweep).",
  FLAGS,
);

export async function traceCommand(args: string[]): Promise<number> {
  const key = args[0] !== undefined && !args[0].startsWith("-") ? args[0] : undefined;
  const flags = parseFlags("trace", FLAGS, key === undefined ? args : args.slice(1));
  if (flags.help) {
    writeStdout(TRACE_HELP);
    return 0;
  }
  if (key === undefined) throw new ConfigError("pg-tide trace: give the event to look for: an outbox message id, <outbox>:<id>, or an inbox event id");
  if (flags.output !== "text" && flags.output !== "json") throw new ConfigError(`pg-tide trace: --output must be "text" or "json" (got "${flags.output}")`);
  const url = requireUrl("trace", flags["postgres-url"]);
  const sql = connect(url, { max: 1, applicationName: "pg-tide trace" });
  try {
    await verifyConnection(sql, url);
    const places = await traceEvent(sql, key);
    const found = places.some((p) => p.state !== "not found");
    if (flags.output === "json") {
      writeStdout(JSON.stringify({ key, places }, null, 2) + "\n");
    } else if (places.length === 0) {
      writeStdout(`no outbox message or inbox event matches "${key}"\n`);
    } else {
      writeStdout(columns(
        ["KIND", "OUTBOX/INBOX", "GROUP/EVENT ID", "RELAY GROUP", "PIPELINE", "STATE", "ATTEMPTS", "SINCE", "DETAIL"],
        places.map((p) => [
          p.kind,
          p.place ?? "",
          (p.kind === "outbox" ? p.consumer_group : p.event_id) ?? "",
          p.relay_group_id ?? "",
          p.pipeline ?? "",
          p.state,
          p.attempts === null ? "" : String(p.attempts),
          p.at ? p.at.toISOString() : "",
          (p.detail ?? "").slice(0, 80),
        ]),
      ));
    }
    return found ? 0 : 1;
  } finally {
    await sql.end({ timeout: 5 });
  }
}
