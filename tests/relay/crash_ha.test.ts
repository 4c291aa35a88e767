// Relays as real processes: kill -9 in the middle of a stream loses nothing and repeats at most the
// unacknowledged batch; relays sharing a relay_group_id split the pipelines with one owner each and
// take over from a dead one; different relay_group_ids each deliver everything.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { readJsonl, spawnRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
let dir: string;
const children: ReturnType<typeof spawnRelay>[] = [];

/** Other tests' relays would deliver this test's pipelines too (default group): stop them first. */
async function killAll(): Promise<void> {
  for (const child of children) child.kill("SIGKILL");
  await Promise.all(children.map((child) => child.exited));
}

function relay(...args: string[]) {
  const child = spawnRelay(db.url, ["--log-format", "json", ...args]);
  children.push(child);
  return child;
}

beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-crash-"));
});
afterAll(async () => {
  await killAll();
  await db.drop();
});

async function publishMany(outbox: string, count: number): Promise<void> {
  await db.sql`INSERT INTO tide.outbox_messages (outbox, payload)
               SELECT ${outbox}, jsonb_build_object('n', g) FROM generate_series(1, ${count}) g`;
}

async function lagOf(group: string, relayGroup = "default"): Promise<bigint | undefined> {
  const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group} AND relay_group_id = ${relayGroup}`;
  return row?.lag;
}

/** Owner process ids per pipeline, from the advisory locks PostgreSQL holds right now. */
async function lockHolders(relayGroup: string, pipelines: string[]): Promise<Map<string, number[]>> {
  const rows = await db.sql<{ pipeline: string; pid: number }[]>`
    SELECT p.name AS pipeline, a.pid FROM unnest(${pipelines}::text[]) p(name)
      JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                     AND l.classid::int = hashtext(${relayGroup}) AND l.objid::int = hashtext(p.name)
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      JOIN pg_stat_activity a ON a.pid = l.pid`;
  const holders = new Map<string, number[]>();
  for (const row of rows) holders.set(row.pipeline, [...(holders.get(row.pipeline) ?? []), row.pid]);
  return holders;
}

describe("relay crashes", () => {
  it("delivers everything after kill -9 and a restart, repeating at most the unacknowledged batch", async () => {
    const path = join(dir, "crash.jsonl");
    const batch = 50;
    await db.sql`SELECT tide.outbox_create('crash')`;
    await db.sql`SELECT tide.relay_set_outbox('crash', 'crash', 'file', ${db.sql.json({ path, max_batch_size: batch })}, p_batch_size := ${batch})`;
    await publishMany("crash", 3000);
    const first = relay();
    await waitFor("part of the stream to arrive", async () => (await readJsonl(path)).length >= 500, 60_000);
    first.kill("SIGKILL");
    await first.exited;
    const delivered = (await readJsonl(path)).length;
    expect(delivered).toBeLessThan(3000); // really killed in the middle

    relay();
    await waitFor("the rest to arrive", async () => (await lagOf("crash")) === 0n, 60_000);
    const ns: number[] = (await readJsonl(path)).map((line) => line.payload.n);
    expect(new Set(ns).size).toBe(3000);
    // In order, except for one step back at the restart, no longer than one batch.
    const steps = ns.flatMap((n, i) => (i > 0 && n <= ns[i - 1] ? [ns[i - 1] - n + 1] : []));
    expect(steps.length).toBeLessThanOrEqual(1);
    expect(ns.length - 3000).toBeLessThanOrEqual(batch);
    expect(ns.length - 3000).toBe(steps[0] ?? 0);
  }, 120_000);
});

describe("several relays", () => {
  const pipelines = ["ha-a", "ha-b", "ha-c"];

  it("gives each pipeline exactly one owner, and takes over from a killed one", async () => {
    for (const name of pipelines) {
      await db.sql`SELECT tide.outbox_create(${name})`;
      await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'file', ${db.sql.json({ path: join(dir, `${name}.jsonl`) })})`;
    }
    const one = relay("--relay-group-id", "ha");
    const two = relay("--relay-group-id", "ha");
    const holders = await waitFor("every pipeline to be owned", async () => {
      const holders = await lockHolders("ha", pipelines);
      return pipelines.every((p) => holders.has(p)) && holders;
    });
    for (const name of pipelines) expect(holders.get(name)!.length).toBe(1);
    for (const name of pipelines) await publishMany(name, 10);
    for (const name of pipelines) {
      await waitFor(`${name} delivered`, async () => (await lagOf(name, "ha")) === 0n);
    }

    // Kill the process that owns ha-a; the other relay takes its pipelines over.
    const [{ owner_id }] = await db.sql`SELECT owner_id FROM tide.relay_pipeline_state WHERE pipeline = 'ha-a' AND relay_group_id = 'ha'`;
    const victim = owner_id.endsWith(`:${one.pid}`) ? one : two;
    const survivor = victim === one ? two : one;
    victim.kill("SIGKILL");
    await victim.exited;
    await waitFor("the survivor to own every pipeline", async () => {
      const rows = await db.sql`SELECT owner_id FROM tide.relay_pipeline_state WHERE relay_group_id = 'ha' AND pipeline IN ${db.sql(pipelines)}`;
      return rows.length === 3 && rows.every((r) => r.owner_id?.endsWith(`:${survivor.pid}`));
    }, 30_000);
    for (const name of pipelines) await publishMany(name, 10);
    for (const name of pipelines) {
      await waitFor(`${name} delivered after takeover`, async () => (await lagOf(name, "ha")) === 0n, 30_000);
      const ns = (await readJsonl(join(dir, `${name}.jsonl`))).map((line) => line.payload.n);
      expect(new Set(ns).size).toBe(10); // n runs 1..10 twice: each value delivered in both rounds
      expect(ns.length).toBeGreaterThanOrEqual(20);
    }
  }, 120_000);

  it("delivers everything once per relay group when two groups run the same pipeline", async () => {
    await killAll();
    const path = join(dir, "groups.jsonl");
    await db.sql`SELECT tide.outbox_create('groups')`;
    await db.sql`SELECT tide.relay_set_outbox('groups', 'groups', 'file', ${db.sql.json({ path })})`;
    await publishMany("groups", 100);
    relay("--relay-group-id", "blue");
    relay("--relay-group-id", "green");
    await waitFor("both groups to finish", async () => (await lagOf("groups", "blue")) === 0n && (await lagOf("groups", "green")) === 0n, 30_000);
    const counts = new Map<number, number>();
    for (const line of await readJsonl(path)) counts.set(line.payload.n, (counts.get(line.payload.n) ?? 0) + 1);
    expect(counts.size).toBe(100);
    expect([...counts.values()].every((c) => c === 2)).toBe(true);
  }, 60_000);

  it("drains and exits 0 on SIGTERM", async () => {
    const child = relay("--relay-group-id", "term");
    await waitFor("the relay to start", async () => {
      const [row] = await db.sql`SELECT count(*)::int AS n FROM tide.relay_pipeline_state WHERE relay_group_id = 'term' AND owner_id IS NOT NULL`;
      return row.n > 0;
    });
    child.kill("SIGTERM");
    expect(await child.exited).toBe(0);
    const [row] = await db.sql`SELECT count(*)::int AS n FROM tide.relay_pipeline_state WHERE relay_group_id = 'term' AND owner_id IS NOT NULL`;
    expect(row.n).toBe(0);
  }, 60_000);
});
