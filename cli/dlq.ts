// `pg-tide dlq list|replay|discard`: the forward dead-letter queue from a terminal, through the same
// functions as the console's actions (core/http/operations.ts).

import { connect, verifyConnection } from "../core/db.ts";
import { ConfigError } from "../core/errors.ts";
import {
  DEFAULT_DLQ_LIMIT,
  type DeadLetter,
  discardDeadLetter,
  DLQ_STATUSES,
  type DlqStatus,
  listDeadLetters,
  replayAllDeadLetters,
  replayDeadLetter,
} from "../core/http/operations.ts";
import { writeStdout } from "../core/runtime.ts";
import { formatHelp, HELP_FLAG, parseFlags, POSTGRES_URL_FLAG, requireUrl } from "./args.ts";
import { columns } from "./table.ts";

const FLAGS = {
  "postgres-url": POSTGRES_URL_FLAG,
  pipeline: { type: "string", placeholder: "NAME", help: "list: only this pipeline's; replay: every open dead letter of it" },
  status: { type: "string", default: "open", placeholder: "STATUS", help: `list: ${DLQ_STATUSES.join(", ")}` },
  limit: { type: "string", default: String(DEFAULT_DLQ_LIMIT), placeholder: "N", help: "list: at most N entries, oldest first" },
  output: { type: "string", default: "text", placeholder: "text|json", help: "list: a table for people, or JSON with payloads and headers" },
  help: HELP_FLAG,
} as const;

export const DLQ_HELP = formatHelp(
  "pg-tide dlq list [--pipeline NAME] [--status STATUS] [--limit N] [--output text|json]\n" +
    "       pg-tide dlq replay ID | --pipeline NAME\n" +
    "       pg-tide dlq discard ID",
  "The forward dead letters: messages a sink refused for good or past their retry budget.\n" +
    "  list     shows them (id, pipeline, message <outbox>:<id>, attempts, status, error; JSON adds\n" +
    "           the payload exactly as stored and the headers)\n" +
    "  replay   asks the pipeline's owner to deliver dead letter ID again, or with --pipeline every\n" +
    "           open one of that pipeline; the relay picks it up within moments\n" +
    "  discard  marks dead letter ID resolved: it is never delivered, and stays listed under\n" +
    "           --status resolved\n" +
    "The console at the relay's HTTP address does the same (with --http-token).",
  FLAGS,
);

export async function dlqCommand(args: string[]): Promise<number> {
  const [action, ...rest] = args;
  if (action === undefined || action === "--help" || action === "-h") {
    writeStdout(DLQ_HELP);
    return action === undefined ? 2 : 0;
  }
  if (!["list", "replay", "discard"].includes(action)) {
    throw new ConfigError(`pg-tide dlq: unknown action "${action}" (use list, replay or discard; see pg-tide dlq --help)`);
  }
  const id = rest[0] !== undefined && !rest[0].startsWith("-") ? rest.shift() : undefined;
  const flags = parseFlags(`dlq ${action}`, FLAGS, rest);
  if (flags.help) {
    writeStdout(DLQ_HELP);
    return 0;
  }
  const deadLetterId = id === undefined ? undefined : parseId(action, id);
  if (action === "list" && deadLetterId !== undefined) throw new ConfigError(`pg-tide dlq list: takes no id (got "${id}"); use --pipeline`);
  if (action === "discard" && deadLetterId === undefined) throw new ConfigError("pg-tide dlq discard: give the dead letter's id (pg-tide dlq list shows it)");
  if (action === "replay" && (deadLetterId === undefined) === (flags.pipeline === undefined)) {
    throw new ConfigError("pg-tide dlq replay: give either a dead letter's id or --pipeline NAME (every open one of it)");
  }
  const status = flags.status as DlqStatus;
  if (!DLQ_STATUSES.includes(status)) throw new ConfigError(`pg-tide dlq: --status must be one of ${DLQ_STATUSES.join(", ")} (got "${status}")`);
  const limit = Number(flags.limit);
  if (!Number.isInteger(limit) || limit < 1) throw new ConfigError(`pg-tide dlq: --limit must be a positive integer (got "${flags.limit}")`);
  if (flags.output !== "text" && flags.output !== "json") throw new ConfigError(`pg-tide dlq: --output must be "text" or "json" (got "${flags.output}")`);

  const url = requireUrl("dlq", flags["postgres-url"]);
  const sql = connect(url, { max: 1, applicationName: `pg-tide dlq ${action}` });
  try {
    await verifyConnection(sql, url);
    if (action === "list") {
      const rows = await listDeadLetters(sql, { pipeline: flags.pipeline, status, limit });
      writeStdout(flags.output === "json" ? JSON.stringify({ dead_letters: rows }, null, 2) + "\n" : table(rows, status));
    } else if (action === "discard") {
      await discardDeadLetter(sql, deadLetterId!);
      writeStdout(`dead letter ${deadLetterId} discarded\n`);
    } else if (deadLetterId !== undefined) {
      await replayDeadLetter(sql, deadLetterId);
      writeStdout(`dead letter ${deadLetterId} requeued: the pipeline's owner delivers it again\n`);
    } else {
      const count = await replayAllDeadLetters(sql, flags.pipeline!);
      writeStdout(`${count} dead letter(s) of "${flags.pipeline}" requeued: the pipeline's owner delivers them again\n`);
    }
    return 0;
  } finally {
    await sql.end({ timeout: 5 });
  }
}

function parseId(action: string, text: string): number {
  if (!/^[0-9]{1,15}$/.test(text)) throw new ConfigError(`pg-tide dlq ${action}: a dead letter id is a number (got "${text}")`);
  return Number(text);
}

function table(rows: DeadLetter[], status: string): string {
  if (rows.length === 0) return `no ${status === "all" ? "" : `${status} `}dead letters\n`;
  return columns(
    ["ID", "PIPELINE", "MESSAGE", "ATTEMPTS", "STATUS", "FAILED AT", "ERROR"],
    rows.map((d) => [String(d.id), d.pipeline, `${d.outbox}:${d.message_id}`, String(d.attempts), d.status, d.failed_at.toISOString(), d.error.slice(0, 80)]),
  );
}
