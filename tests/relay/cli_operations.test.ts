// The console's operations from a terminal: `pg-tide dlq list|replay|discard`, `pg-tide trace` and
// `pg-tide apply --wait`, run as a user runs them (a child process) against a real PostgreSQL.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Relay } from "../../core/relay.ts";
import { connect, type Sql } from "../../core/db.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { startRelay } from "../support/relay.ts";

const ROOT = join(import.meta.dir, "..", "..");
let db: TestDatabase;
let dir: string;
beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-cli-ops-"));
});
const connections: Sql[] = [];
afterAll(async () => {
  for (const c of connections) await c.end();
  await db.drop();
});

function connectAs(url: string): Sql {
  const sql = connect(url, { max: 1 });
  connections.push(sql);
  return sql;
}

async function pgTide(...args: string[]) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith("PG_TIDE_")));
  const child = Bun.spawn([process.execPath, "main.ts", ...args], { cwd: ROOT, env, stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  return { stdout, stderr, code };
}

describe("help", () => {
  it("lists dlq, trace and apply, and explains each", async () => {
    const main = await pgTide("--help");
    for (const command of ["apply", "dlq", "trace"]) expect(main.stdout).toContain(`  ${command}`);
    const dlq = await pgTide("dlq", "--help");
    expect(dlq.code).toBe(0);
    for (const text of ["pg-tide dlq list", "pg-tide dlq replay ID | --pipeline NAME", "pg-tide dlq discard ID", "never delivered"]) {
      expect(dlq.stdout).toContain(text);
    }
    const trace = await pgTide("trace", "--help");
    expect(trace.stdout).toContain("KEY is an outbox message id (42), its dedup key (<outbox>:<id>");
    const apply = await pgTide("apply", "--help");
    expect(apply.stdout).toContain("a message published before a relay\napplied a change may still go out under the old config");
  });

  it("says what is missing instead of guessing", async () => {
    const unknown = await pgTide("dlq", "purge", "--postgres-url", db.url);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain('unknown action "purge" (use list, replay or discard');
    const both = await pgTide("dlq", "replay", "5", "--pipeline", "x", "--postgres-url", db.url);
    expect(both.stderr).toContain("give either a dead letter's id or --pipeline NAME");
    const noKey = await pgTide("trace", "--postgres-url", db.url);
    expect(noKey.stderr).toContain("pg-tide trace: give the event to look for");
  });
});

describe("pg-tide dlq", () => {
  let ids: number[];
  beforeAll(async () => {
    await db.sql`SELECT tide.outbox_create('cli_dlq')`;
    await db.sql`SELECT tide.relay_set_outbox('cli-dlq', 'cli_dlq', 'stdout', '{}'::jsonb, p_enabled := false)`;
    ids = [];
    for (const n of [1, 2, 3]) {
      const [{ outbox_publish: id }] = await db.sql`SELECT tide.outbox_publish('cli_dlq', ${db.sql.json({ n })})`;
      const [{ relay_dlq_add: dead }] = await db.sql`SELECT tide.relay_dlq_add('cli-dlq', ${id}, ${`refused ${n}`}, 3)`;
      ids.push(Number(dead));
    }
  });

  it("lists dead letters as a table and as JSON with their payloads", async () => {
    const text = await pgTide("dlq", "list", "--postgres-url", db.url);
    expect(text.code).toBe(0);
    const lines = text.stdout.trim().split("\n");
    expect(lines[0]).toMatch(/^ID\s+PIPELINE\s+MESSAGE\s+ATTEMPTS\s+STATUS\s+FAILED AT\s+ERROR$/);
    expect(lines).toHaveLength(4);
    expect(lines[1]).toMatch(new RegExp(`^${ids[0]}\\s+cli-dlq\\s+cli_dlq:\\d+\\s+3\\s+open\\s+\\S+\\s+refused 1$`));

    const json = JSON.parse((await pgTide("dlq", "list", "--pipeline", "cli-dlq", "--output", "json", "--postgres-url", db.url)).stdout);
    expect(json.dead_letters.map((d: any) => [d.id, d.payload, d.error, d.attempts])).toEqual([
      [ids[0], '{"n": 1}', "refused 1", 3],
      [ids[1], '{"n": 2}', "refused 2", 3],
      [ids[2], '{"n": 3}', "refused 3", 3],
    ]);
  });

  it("discards one, replays one, then replays the rest of a pipeline", async () => {
    const discarded = await pgTide("dlq", "discard", String(ids[0]), "--postgres-url", db.url);
    expect([discarded.code, discarded.stdout]).toEqual([0, `dead letter ${ids[0]} discarded\n`]);
    const replayed = await pgTide("dlq", "replay", String(ids[1]), "--postgres-url", db.url);
    expect(replayed.code).toBe(0);
    const statuses = async () => (await db.sql`SELECT status FROM tide.relay_dlq ORDER BY id`).map((r) => r.status);
    expect(await statuses()).toEqual(["resolved", "requeued", "open"]);
    const all = await pgTide("dlq", "replay", "--pipeline", "cli-dlq", "--postgres-url", db.url);
    expect(all.stdout).toBe('1 dead letter(s) of "cli-dlq" requeued: the pipeline\'s owner delivers them again\n');
    expect(await statuses()).toEqual(["resolved", "requeued", "requeued"]);
    const open = await pgTide("dlq", "list", "--postgres-url", db.url);
    expect(open.stdout).toBe("no open dead letters\n");
    const resolved = await pgTide("dlq", "list", "--status", "resolved", "--output", "json", "--postgres-url", db.url);
    expect(JSON.parse(resolved.stdout).dead_letters.map((d: any) => d.id)).toEqual([ids[0]]);

    const again = await pgTide("dlq", "replay", String(ids[1]), "--postgres-url", db.url);
    expect(again.code).not.toBe(0);
    expect(again.stderr).toContain(`dead letter ${ids[1]} does not exist or is already requeued`);
  });
});

describe("pg-tide trace", () => {
  it("shows per consumer group where an outbox message is, and where an inbox event is", async () => {
    await db.sql`SELECT tide.outbox_create('cli_trace')`;
    await db.sql`SELECT tide.relay_set_outbox('cli-trace', 'cli_trace', 'stdout', '{}'::jsonb, p_enabled := false)`;
    const [{ outbox_publish: id }] = await db.sql`SELECT tide.outbox_publish('cli_trace', '{"n": 1}'::jsonb)`;
    const text = await pgTide("trace", `cli_trace:${id}`, "--postgres-url", db.url);
    expect(text.code).toBe(0);
    expect(text.stdout.split("\n")[1]).toMatch(/^outbox\s+cli_trace\s+cli-trace\s+default\s+cli-trace\s+pending\s+\S+$/);
    // The id alone finds it too.
    const json = JSON.parse((await pgTide("trace", String(id), "--output", "json", "--postgres-url", db.url)).stdout);
    expect(json.places.map((p: any) => [p.kind, p.place, p.consumer_group, p.state])).toEqual([["outbox", "cli_trace", "cli-trace", "pending"]]);

    await db.sql`SELECT tide.inbox_create('cli_trace_in', p_max_retries := 1)`;
    const event = { event_id: "payments:nats:seq-7", source: "nats", payload: { n: 7 }, headers: {} };
    await db.sql`SELECT * FROM tide.inbox_insert_batch('cli_trace_in', ${db.sql.json([event])})`;
    await db.sql`SELECT tide.inbox_mark_failed('cli_trace_in', 'payments:nats:seq-7', 'no such account')`;
    const inbox = JSON.parse((await pgTide("trace", "payments:nats:seq-7", "--output", "json", "--postgres-url", db.url)).stdout);
    expect(inbox.places.map((p: any) => [p.kind, p.place, p.event_id, p.state, p.detail])).toEqual([
      ["inbox", "cli_trace_in", "payments:nats:seq-7", "dead-lettered", "no such account"],
    ]);
  });

  it("works for tide_relay, the role a relay (and so an operator's CLI) logs in as", async () => {
    const role = await loginRole(db, "tide_relay", "tracer");
    const json = JSON.parse((await pgTide("trace", "payments:nats:seq-7", "--output", "json", "--postgres-url", role.url)).stdout);
    expect(json.places.map((p: any) => p.state)).toEqual(["dead-lettered"]);
    const list = await pgTide("dlq", "list", "--status", "all", "--postgres-url", role.url);
    expect(list.code).toBe(0);
    const [{ count }] = await connectAs(role.url)`SELECT tide.inbox_replay_failed('cli_trace_in') AS count`;
    expect(count).toBe(1);
  });

  it("exits 1 when nothing matches", async () => {
    const missing = await pgTide("trace", "no-such-event", "--postgres-url", db.url);
    expect([missing.code, missing.stdout]).toEqual([1, 'no outbox message or inbox event matches "no-such-event"\n']);
    const gone = await pgTide("trace", "99999999", "--postgres-url", db.url);
    expect(gone.code).toBe(1);
    expect(gone.stdout).toContain("not found");
  });
});

describe("pg-tide apply --wait", () => {
  let relay: Relay;
  beforeAll(async () => {
    relay = await startRelay(db.url);
    await db.sql`SELECT tide.outbox_create('applied')`;
  });
  afterAll(() => relay.stop());

  const manifest = async (path: string, enabled: boolean) => {
    const file = join(dir, `apply-${enabled}.toml`);
    await writeFile(file, `[relay]
postgres_url = "${db.url}"

[[pipelines]]
name = "applied-file"
outbox = "applied"
sink_type = "file"
enabled = ${enabled}
[pipelines.config]
path = "${path}"
`);
    return file;
  };

  it("returns once the running relay runs the manifest's config", async () => {
    const out = join(dir, "applied.jsonl");
    const result = await pgTide("apply", "--config", await manifest(out, true), "--wait");
    expect(result.stdout).toBe("1 of 1 pipeline(s) changed\nevery pipeline runs its current config\n");
    expect(result.code).toBe(0);
    const owned = relay.coordinator.owned().map((p) => p.name);
    expect(owned).toContain("applied-file");

    const disabled = await pgTide("apply", "--config", await manifest(out, false), "--wait");
    expect(disabled.code).toBe(0);
    expect(relay.coordinator.owned().map((p) => p.name)).not.toContain("applied-file");
  }, 60_000);

  it("exits 1 naming the pipelines no relay applied in time", async () => {
    await relay.stop();
    const result = await pgTide("apply", "--config", await manifest(join(dir, "again.jsonl"), true), "--wait", "--timeout", "0.5");
    expect(result.code).toBe(1);
    expect(result.stdout).toContain("not applied within 0.5 s: applied-file");
  }, 60_000);
});
