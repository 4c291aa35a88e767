// CEL filters cannot stall the relay: matches() runs on RE2 (linear time), so a catastrophic-
// backtracking pattern leaves /livez and the other pipelines answering; an expression whose work grows
// faster than the message is refused when the pipeline is checked or started, with a message that
// says why; and a message the filter cannot decide on is counted (metric, pipeline_status) and, when
// the pipeline says so, dead-lettered. The relay logs in as a LOGIN role that holds only tide_relay,
// messages are published by one that holds only tide_publisher, status is read by a tide_reader.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { JSONValue } from "postgres";
import { connect, type Sql } from "../../core/db.ts";
import { preparePipeline } from "../../core/config/pipeline_config.ts";
import { PluginRegistry } from "../../core/plugins.ts";
import { builtinPlugins } from "../../plugins/registry.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { collectLines, readJsonl, spawnRelay, startRelay, waitFor } from "../support/relay.ts";

setDefaultTimeout(60_000);

const ROOT = join(import.meta.dir, "..", "..");

let db: TestDatabase;
let dir: string;
let urls: Record<"relay" | "publisher" | "reader", string>;
let publisher: Sql;
let reader: Sql;

beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-cel-"));
  urls = {
    relay: (await loginRole(db, "tide_relay", "cel_relay")).url,
    publisher: (await loginRole(db, "tide_publisher", "cel_pub")).url,
    reader: (await loginRole(db, "tide_reader", "cel_reader")).url,
  };
  publisher = connect(urls.publisher, { max: 1 });
  reader = connect(urls.reader, { max: 1 });
});

afterAll(async () => {
  await publisher?.end();
  await reader?.end();
  await db.drop();
});

/** A forward pipeline from a new outbox to a JSONL file; returns the file. */
async function filePipeline(name: string, transform?: Record<string, JSONValue>): Promise<string> {
  const path = join(dir, `${name}.jsonl`);
  await db.sql`SELECT tide.outbox_create(${name})`;
  await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'file', ${db.sql.json({ path, ...(transform ? { transform } : {}) })})`;
  return path;
}

async function publish(outbox: string, payload: Record<string, JSONValue>): Promise<bigint> {
  const [{ id }] = await publisher`SELECT tide.outbox_publish(${outbox}, ${publisher.json(payload)}) AS id`;
  return BigInt(id);
}

async function lagOf(pipeline: string): Promise<number | undefined> {
  const [row] = await reader`SELECT lag FROM tide.pipeline_status WHERE pipeline = ${pipeline}`;
  return row?.lag === null || row?.lag === undefined ? undefined : Number(row.lag);
}

describe("a backtracking regular expression in a filter", () => {
  it("stalls neither /livez nor the other pipelines, and decides right: matches() runs in linear time", async () => {
    // A backtracking engine needs about 2^64 steps for the first branch on 64 a's and a "!"; Bun's
    // blocks the event loop for about a second per message, then gives up and answers false.
    const evil = await filePipeline("regex-evil", { filter: 'payload.text.matches("^(a+)+$|!$")' });
    const other = await filePipeline("regex-other");
    const relay = spawnRelay(urls.relay, ["--log-format", "json"]);
    try {
      const logs = collectLines(relay.stderr);
      const address = await waitFor("the relay to serve /livez", () =>
        logs.lines.map((line) => JSON.parse(line)).find((line) => line.message === "serving metrics and status")?.address);
      const livez = async () => {
        const response = await fetch(`http://${address}/livez`, { signal: AbortSignal.timeout(2_000) });
        return response.status === 200;
      };
      expect(await livez()).toBe(true);

      for (let n = 0; n < 30; n++) await publish("regex-evil", { text: `${"a".repeat(64)}!`, n });
      await publish("regex-evil", { text: `${"a".repeat(64)}?`, n: 30 }); // matches neither branch
      await publish("regex-other", { n: 1 });
      await waitFor("the other pipeline to deliver", async () => (await readJsonl(other)).length === 1);
      await waitFor("/livez to answer", livez);

      await waitFor("the filtered pipeline to get past every message", async () => (await lagOf("regex-evil")) === 0);
      expect((await readJsonl(evil)).map((m) => m.payload.n)).toEqual(Array.from({ length: 30 }, (_, n) => n));
    } finally {
      relay.kill("SIGKILL");
      await relay.exited;
    }
  });
});

describe("the cost check when a pipeline is created", () => {
  it("refuses expensive filters in pg-tide check, naming the pipeline and the reason", async () => {
    const quadratic = "payload.items.all(a, payload.items.exists(b, a.id == b.parent))";
    await filePipeline("cost-quadratic", { filter: quadratic });
    await filePipeline("cost-pattern", { filter: "payload.text.matches(payload.pattern)" });
    await filePipeline("cost-backref", { filter: 'payload.text.matches("(a+)\\\\1")' });
    const child = Bun.spawn([process.execPath, "main.ts", "check", "--postgres-url", urls.relay], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
    const [stdout, code] = await Promise.all([new Response(child.stdout).text(), child.exited]);
    expect(code).toBe(1);
    expect(stdout).toContain(
      `pipeline "cost-quadratic": transform.filter: filter "${quadratic}" is too expensive to run per message: ` +
        `the loop over "payload.items" (at column 22) runs once for every element of the loop over "a"`,
    );
    expect(stdout).toContain(`pipeline "cost-pattern": transform.filter: filter "payload.text.matches(payload.pattern)" is too expensive`);
    expect(stdout).toContain("matches() needs a string literal as its pattern");
    expect(stdout).toContain(`pipeline "cost-backref": transform.filter: invalid filter`);
    expect(stdout).toContain(`invalid regular expression "(a+)\\\\1" for matches()`);
    for (const name of ["cost-quadratic", "cost-pattern", "cost-backref"]) await db.sql`SELECT tide.relay_delete(${name})`;
  });

  it("does not start a pipeline with an expensive filter, and says why in pipeline_status", async () => {
    await filePipeline("cost-started", { filter: "payload.items.exists(i, i.sku in payload.allowed)" });
    const relay = await startRelay(urls.relay, { relayGroupId: "cost" });
    try {
      const [state] = await waitFor("the refusal in pipeline_status", async () =>
        (await reader`SELECT healthy, last_error FROM tide.pipeline_status WHERE pipeline = 'cost-started' AND last_error IS NOT NULL`));
      expect(state.healthy).toBe(false);
      expect(state.last_error).toContain('`in` scans "payload.allowed" (at column 34) once for every element of the loop over "i"');
    } finally {
      await relay.stop();
      await db.sql`SELECT tide.relay_delete('cost-started')`;
    }
  });
});

describe("a message the filter cannot decide on", () => {
  it("is counted in /metrics and shown in pipeline_status, and dead-lettered when on_error is dead_letter", async () => {
    const filter = "payload.total > 100";
    const skipped = await filePipeline("undecided-skip", { filter });
    const dead = await filePipeline("undecided-dlq", { filter, on_error: "dead_letter" });
    const relay = await startRelay(urls.relay, { relayGroupId: "undecided", metricsAddr: "127.0.0.1:0" });
    try {
      const ids: Record<string, bigint> = {};
      for (const outbox of ["undecided-skip", "undecided-dlq"]) {
        ids[outbox] = await publish(outbox, { other: 1 }); // no total: cannot be decided
        await publish(outbox, { total: 150 });
        await publish(outbox, { total: 50 });
      }
      await waitFor("both pipelines to get past their messages", async () =>
        (await readJsonl(skipped)).length === 1 && (await readJsonl(dead)).length === 1 && (await lagOf("undecided-dlq")) === 0);
      expect((await readJsonl(skipped)).map((m) => m.payload)).toEqual([{ total: 150 }]);
      expect((await readJsonl(dead)).map((m) => m.payload)).toEqual([{ total: 150 }]);

      const letters = await reader`SELECT pipeline, message_id, error, payload FROM tide.relay_dlq_list(NULL) ORDER BY id`;
      expect(letters).toHaveLength(1);
      expect(letters[0]).toMatchObject({ pipeline: "undecided-dlq", message_id: ids["undecided-dlq"], payload: { other: 1 } });
      expect(letters[0].error).toContain(`filter "${filter}" could not be evaluated`);

      const metrics = await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics`)).text();
      expect(metrics).toContain('pg_tide_relay_filter_errors_total{pipeline="undecided-skip"} 1');
      expect(metrics).toContain('pg_tide_relay_filter_errors_total{pipeline="undecided-dlq"} 1');
      expect(metrics).toContain('pg_tide_relay_dlq_entries_written_total{pipeline="undecided-dlq"} 1');

      const status = await waitFor("the filter error in pipeline_status", async () =>
        (await reader`SELECT pipeline, healthy, last_error FROM tide.pipeline_status
                       WHERE pipeline LIKE 'undecided-%' AND last_error IS NOT NULL ORDER BY pipeline`).length === 2 &&
        (await reader`SELECT pipeline, healthy, last_error FROM tide.pipeline_status WHERE pipeline LIKE 'undecided-%' ORDER BY pipeline`));
      for (const row of status) {
        expect(row.healthy).toBe(true); // the pipeline delivers on; the message was the problem
        expect(row.last_error).toContain(`pipeline "${row.pipeline}": transform.filter: filter "${filter}" could not be evaluated`);
      }
      const api = await (await fetch(`http://127.0.0.1:${relay.httpPort}/api/v1/pipelines`)).json();
      const listed = api.pipelines.find((p: { name: string }) => p.name === "undecided-skip");
      expect(listed.last_error).toContain(`filter "${filter}" could not be evaluated`);
    } finally {
      await relay.stop();
    }
  });

  it("refuses an unknown on_error policy, and dead_letter without a forward pipeline's DLQ", async () => {
    const registry = new PluginRegistry(builtinPlugins);
    const row = (direction: "forward" | "reverse", plugin_type: string, config: Record<string, unknown>) =>
      ({ name: "p", direction, plugin_type, config });
    await expect(preparePipeline(row("forward", "stdout", { transform: { filter: "true", on_error: "drop" } }), registry)).rejects.toThrow(
      `pipeline "p": 'transform.on_error' must be "skip" or "dead_letter" (got "drop")`,
    );
    await expect(
      preparePipeline(row("reverse", "webhook", { path: "in", allow_unsigned: true, transform: { filter: "true", on_error: "dead_letter" } }), registry),
    ).rejects.toThrow(`'transform.on_error' "dead_letter" applies to forward pipelines only`);
  });
});
