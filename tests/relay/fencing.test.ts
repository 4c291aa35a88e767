// Fencing: a relay that is no longer sure it owns a pipeline stops delivering it, and an
// acknowledgement that arrives late (a lost lock, a paused process, a loop cut off at shutdown) is
// refused instead of moving the position over messages nobody delivered.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { captureLogger, collectLines, heldWebhook, readJsonl, spawnRelay, startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
let dir: string;
const relays: Relay[] = [];
const children: ReturnType<typeof spawnRelay>[] = [];

beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-fencing-"));
});
afterAll(async () => {
  for (const child of children) {
    child.kill("SIGCONT");
    child.kill("SIGKILL");
  }
  await Promise.all(children.map((child) => child.exited));
  await Promise.all(relays.map((relay) => relay.stop().catch(() => {})));
  await db.drop();
});

async function lagOf(group: string, relayGroup = "default"): Promise<bigint | undefined> {
  const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group} AND relay_group_id = ${relayGroup}`;
  return row?.lag;
}

/** The backend holding a pipeline's ownership lock, if any. */
async function lockHolder(relayGroup: string, pipeline: string): Promise<number | undefined> {
  const [row] = await db.sql<{ pid: number }[]>`
    SELECT l.pid FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
       AND l.classid::int = hashtext(${relayGroup}) AND l.objid::int = hashtext(${pipeline})
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`;
  return row?.pid;
}

describe("acknowledgements are fenced (SQL)", () => {
  // ids 1-3 in a transaction that commits late, 4-5 committed; batch size 2. Workers A and B both
  // read [4,5]; B acknowledges and reads [1,2]; A's late acknowledgement of 5 used to close the new
  // interval: id 3 was never delivered and lag said 0.
  async function lateCommitScenario(outbox: string, reader: "consumer_next_batch" | "consumer_read_batch") {
    await db.sql`SELECT tide.outbox_create(${outbox})`;
    await db.sql`SELECT tide.create_consumer_group('g', ${outbox})`;
    const late = await db.sql.reserve();
    try {
      await late`BEGIN`;
      for (let n = 1; n <= 3; n++) await late`SELECT tide.outbox_publish(${outbox}, ${db.sql.json({ n })})`;
      for (let n = 4; n <= 5; n++) await db.sql`SELECT tide.outbox_publish(${outbox}, ${db.sql.json({ n })})`;
      const read = () => db.sql.unsafe(`SELECT * FROM tide.${reader}($1, 'g', 2)`, [outbox]);
      const a = await read();
      const b = await read();
      await late`COMMIT`;
      return { a, b };
    } finally {
      late.release();
    }
  }

  async function drain(outbox: string): Promise<number[]> {
    const seen: number[] = [];
    for (;;) {
      const rows = await db.sql`SELECT * FROM tide.consumer_next_batch(${outbox}, 'g', 2)`;
      if (rows.length === 0) return seen;
      seen.push(...rows.map((r) => r.payload.n));
      await db.sql`SELECT tide.consumer_commit(${outbox}, 'g', ${rows[rows.length - 1].id})`;
    }
  }

  it("refuses a late acknowledgement from an earlier interval (plain consumer_commit)", async () => {
    const { a, b } = await lateCommitScenario("late_plain", "consumer_next_batch");
    expect(a.map((r) => r.payload.n)).toEqual([4, 5]);
    expect(b.map((r) => r.payload.n)).toEqual([4, 5]);
    const [{ moved: bMoved }] = await db.sql`SELECT tide.consumer_commit('late_plain', 'g', ${b[1].id}) AS moved`;
    expect(bMoved).toBe(true);
    const next = await db.sql`SELECT * FROM tide.consumer_next_batch('late_plain', 'g', 2)`;
    expect(next.map((r) => r.payload.n)).toEqual([1, 2]);

    const [{ moved: aMoved }] = await db.sql`SELECT tide.consumer_commit('late_plain', 'g', ${a[1].id}) AS moved`;
    expect(aMoved).toBe(false);
    expect(await lagOf("g")).toBe(3n);
    expect(await drain("late_plain")).toEqual([1, 2, 3]);
    expect(await lagOf("g")).toBe(0n);
  });

  it("refuses an acknowledgement whose fence (interval, cursor) moved, even inside one interval", async () => {
    const { a, b } = await lateCommitScenario("late_fenced", "consumer_read_batch");
    const fence = (rows: any[]) => [rows[0].generation, rows[0].interval_seq, rows[0].read_cursor];
    const commit = async (rows: any[]) => {
      const [{ moved }] = await db.sql`
        SELECT tide.consumer_commit('late_fenced', 'g', ${rows[rows.length - 1].id}, ${rows.length}, 'default',
                                    ${fence(rows)[0]}, ${fence(rows)[1]}, ${fence(rows)[2]}) AS moved`;
      return moved;
    };
    expect(await commit(b)).toBe(true);
    expect(await commit(a)).toBe(false);
    // Two readers of the same batch inside one interval: only the first acknowledgement counts.
    const c = await db.sql`SELECT * FROM tide.consumer_read_batch('late_fenced', 'g', 1)`;
    const d = await db.sql`SELECT * FROM tide.consumer_read_batch('late_fenced', 'g', 2)`;
    expect(c.map((r) => r.payload.n)).toEqual([1]);
    expect(d.map((r) => r.payload.n)).toEqual([1, 2]);
    expect(await commit(c)).toBe(true);
    expect(await commit(d)).toBe(false); // read at cursor 0, which is 1 now
    expect(await drain("late_fenced")).toEqual([2, 3]);
  });
});

describe("ownership", () => {
  it("a relay whose lock session dies stops delivering at once; exactly one relay owns the pipeline after", async () => {
    const path = join(dir, "owned.jsonl");
    await db.sql`SELECT tide.outbox_create('owned')`;
    await db.sql`SELECT tide.relay_set_outbox('owned', 'owned', 'file', ${db.sql.json({ path })})`;
    const logsA = captureLogger();
    const a = await startRelay(db.url, { relayGroupId: "own", logger: logsA.logger });
    relays.push(a);
    await waitFor("relay A to own the pipeline", () => a.coordinator.owned().some((p) => p.name === "owned"));
    const b = await startRelay(db.url, { relayGroupId: "own" });
    relays.push(b);

    const first = (await lockHolder("own", "owned"))!;
    await db.sql`SELECT pg_terminate_backend(${first})`;

    // Converges to one owner in memory, holding the lock on a new session. Before the fix, A kept
    // its worker (its liveness check ran on a reconnected session) while B took the lock: two owners.
    await waitFor("exactly one relay to own the pipeline, on a new lock session", async () => {
      const holder = await lockHolder("own", "owned");
      const owners = [a, b].filter((r) => r.coordinator.owned().some((p) => p.name === "owned"));
      return holder !== undefined && holder !== first && owners.length === 1;
    });
    const lost = logsA.lines.filter((line) => line.includes("lost pipeline ownership"));
    expect(lost).toHaveLength(1);

    // Both relays' pools still work: whoever owns it delivers what comes next.
    for (let n = 1; n <= 20; n++) await db.sql`SELECT tide.outbox_publish('owned', ${db.sql.json({ n })})`;
    await waitFor("everything delivered", async () => (await lagOf("owned", "own")) === 0n);
    const ns = new Set((await readJsonl(path)).map((line) => line.payload.n));
    expect(ns.size).toBe(20);
    await Promise.all([a.stop(), b.stop()]);
  }, 60_000);

  it("a relay whose lock session dies acknowledges nothing of the batch it was delivering", async () => {
    const hook = heldWebhook();
    try {
      await db.sql`SELECT tide.outbox_create('cutoff')`;
      await db.sql`SELECT tide.relay_set_outbox('cutoff', 'cutoff', 'webhook', ${db.sql.json({ url: hook.url, mode: "batch" })})`;
      for (let n = 1; n <= 3; n++) await db.sql`SELECT tide.outbox_publish('cutoff', ${db.sql.json({ n })})`;
      const relay = await startRelay(db.url, { relayGroupId: "cutoff" });
      relays.push(relay);
      await hook.arrived;
      // Nobody takes the pipeline again: this session queues for its lock before the relay's lock
      // session is ended, so it gets the lock the moment that session is gone. The relay would
      // otherwise take the pipeline back at once and deliver the batch again (a duplicate it may
      // send); it only tries the lock, and would end this session only once the pipeline's heartbeat
      // is older than the lease (6 s), long after the pipeline is disabled below.
      const holder = (await lockHolder("cutoff", "cutoff"))!;
      const blocker = await db.sql.reserve();
      const [{ pid }] = await blocker<{ pid: number }[]>`SELECT pg_backend_pid() AS pid`;
      const blocked = blocker`SELECT pg_advisory_lock(hashtext('cutoff'), hashtext('cutoff'))`.execute();
      await waitFor("this session to queue for the lock", async () =>
        (await db.sql`SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid = ${pid}`).length > 0);
      try {
        await db.sql`SELECT pg_terminate_backend(${holder})`;
        await blocked;
        // (It may own other pipelines of this database, and take those back at once.)
        await waitFor("the relay to give the pipeline up", () => !relay.coordinator.owned().some((p) => p.name === "cutoff"));
        await db.sql`SELECT tide.relay_disable('cutoff')`;
        hook.release();
        await relay.stop();
      } finally {
        await blocker`SELECT pg_advisory_unlock_all()`;
        blocker.release();
      }
      // The sink accepted the batch after ownership was lost: a duplicate later, never a commit now.
      expect(hook.keys).toHaveLength(1);
      expect(await lagOf("cutoff", "cutoff")).toBe(3n);
    } finally {
      hook.stop();
    }
  }, 60_000);

  it("counts and logs an acknowledgement refused because the position moved meanwhile", async () => {
    const hook = heldWebhook();
    const { logger, lines } = captureLogger();
    try {
      await db.sql`SELECT tide.outbox_create('moved')`;
      await db.sql`SELECT tide.relay_set_outbox('moved', 'moved', 'webhook', ${db.sql.json({ url: hook.url, mode: "batch" })})`;
      for (let n = 1; n <= 3; n++) await db.sql`SELECT tide.outbox_publish('moved', ${db.sql.json({ n })})`;
      const relay = await startRelay(db.url, { relayGroupId: "moved", logger });
      relays.push(relay);
      await hook.arrived;
      // Meanwhile someone else delivers the same batch and moves the position (a second owner).
      const rows = await db.sql`SELECT * FROM tide.consumer_read_batch('moved', 'moved', 100, 'moved')`;
      const last = rows[rows.length - 1];
      const [{ moved }] = await db.sql`
        SELECT tide.consumer_commit('moved', 'moved', ${last.id}, ${rows.length}, 'moved',
                                    ${last.generation}, ${last.interval_seq}, ${last.read_cursor}) AS moved`;
      expect(moved).toBe(true);
      hook.release();
      await waitFor("the stale acknowledgement to be counted", async () =>
        /pg_tide_relay_stale_acks_total\{pipeline="moved"\} 1/.test(await relay.metrics.text()));
      expect(lines.some((line) => line.includes("stale acknowledgement refused") && line.includes('"pipeline":"moved"'))).toBe(true);
      await relay.stop();
    } finally {
      hook.stop();
    }
  }, 60_000);

  it("a frozen owner (SIGSTOP) loses its pipelines after the lease; when it resumes it delivers nothing stale", async () => {
    const path = join(dir, "frozen.jsonl");
    await db.sql`SELECT tide.outbox_create('frozen')`;
    await db.sql`SELECT tide.relay_set_outbox('frozen', 'frozen', 'file', ${db.sql.json({ path })}, p_batch_size := 10)`;
    const args = ["--relay-group-id", "frozen", "--log-format", "json", "--ownership-lease-ms", "2000", "--reconcile-interval-ms", "500"];
    const one = spawnRelay(db.url, args);
    children.push(one);
    const oneLog = collectLines(one.stderr);
    await waitFor("the first relay to own the pipeline", async () => (await lockHolder("frozen", "frozen")) !== undefined, 30_000);
    for (let n = 1; n <= 50; n++) await db.sql`SELECT tide.outbox_publish('frozen', ${db.sql.json({ n })})`;
    await waitFor("the first 50", async () => (await lagOf("frozen", "frozen")) === 0n, 30_000);

    one.kill("SIGSTOP");
    const two = spawnRelay(db.url, args);
    children.push(two);
    for (let n = 51; n <= 100; n++) await db.sql`SELECT tide.outbox_publish('frozen', ${db.sql.json({ n })})`;
    await waitFor("the second relay to take over and deliver", async () => (await lagOf("frozen", "frozen")) === 0n, 60_000);

    one.kill("SIGCONT");
    for (let n = 101; n <= 150; n++) await db.sql`SELECT tide.outbox_publish('frozen', ${db.sql.json({ n })})`;
    await waitFor("everything delivered after the resume", async () => (await lagOf("frozen", "frozen")) === 0n, 60_000);
    await waitFor("the resumed relay to notice it lost its pipelines", () =>
      oneLog.lines.some((line) => line.includes("lost pipeline ownership") || line.includes("ownership session was lost")), 30_000);
    const ns = new Set((await readJsonl(path)).map((line) => line.payload.n));
    expect(ns.size).toBe(150);
  }, 120_000);
});
