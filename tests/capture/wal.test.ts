// Table capture from the write-ahead log (tide.capture_table(..., p_mode => 'wal')), against an
// embedded PostgreSQL 18 this file starts itself with wal_level=logical.

import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, type Sql } from "../../core/db.ts";
import { createLogger } from "../../core/log.ts";
import type { Relay } from "../../core/relay.ts";
import { startEmbeddedPostgres } from "../../core/embedded.ts";
import { installSchema } from "../../core/schema.ts";
import { startLogicalPostgres, type LogicalPostgres } from "../support/wal.ts";
import { collectLines, spawnRelay, startRelay, waitFor } from "../support/relay.ts";

let pg: LogicalPostgres;
let url: string;
let sql: Sql;

beforeAll(async () => {
  pg = await startLogicalPostgres("wal_test");
  ({ url, sql } = pg);
}, 120_000);
afterAll(async () => {
  await pg?.stop();
});

async function messages(outbox: string) {
  return await sql`SELECT id, payload::text AS text, payload, headers FROM tide.outbox_messages WHERE outbox = ${outbox} ORDER BY id`;
}

describe("capture_table with p_mode 'wal'", () => {
  it("creates a slot and a publication, sets REPLICA IDENTITY FULL, and uncapture drops them", async () => {
    await sql`SELECT tide.outbox_create('setup')`;
    await sql`CREATE TABLE setup_rows (id int PRIMARY KEY, v text)`;
    await sql`SELECT tide.capture_table('setup_rows', 'setup', p_mode => 'wal')`;
    const [capture] = await sql`SELECT slot_name FROM tide.wal_captures WHERE table_oid = 'setup_rows'::regclass`;
    expect(capture.slot_name).toMatch(/^tide_wal_setup_rows_\d+_[0-9a-f]{8}$/);
    const [slot] = await sql`SELECT plugin, slot_type FROM pg_replication_slots WHERE slot_name = ${capture.slot_name}`;
    expect(slot).toMatchObject({ plugin: "pgoutput", slot_type: "logical" });
    const [pub] = await sql`SELECT count(*)::int AS n FROM pg_publication_tables WHERE pubname = ${capture.slot_name} AND tablename = 'setup_rows'`;
    expect(pub.n).toBe(1);
    const [{ relreplident }] = await sql`SELECT relreplident FROM pg_class WHERE oid = 'setup_rows'::regclass`;
    expect(relreplident).toBe("f");
    await expect(sql`SELECT tide.capture_table('setup_rows', 'setup', p_mode => 'wal')`).rejects.toThrow("already captured");
    await expect(sql`SELECT tide.capture_table('setup_rows', 'setup')`).rejects.toThrow("already captured");

    await sql`SELECT tide.uncapture_table('setup_rows', 'setup')`;
    const [left] = await sql`
      SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = ${capture.slot_name})::int AS slots,
             (SELECT count(*) FROM pg_publication WHERE pubname = ${capture.slot_name})::int AS pubs,
             (SELECT count(*) FROM tide.wal_captures)::int AS rows,
             (SELECT relreplident FROM pg_class WHERE oid = 'setup_rows'::regclass) AS identity`;
    expect(left).toEqual({ slots: 0, pubs: 0, rows: 0, identity: "d" });
  });

  it("refuses an unknown mode, and trigger mode still works by default", async () => {
    await sql`CREATE TABLE trig_rows (id int PRIMARY KEY)`;
    await expect(sql`SELECT tide.capture_table('trig_rows', 'setup', p_mode => 'log')`).rejects.toThrow("p_mode must be");
    await sql`SELECT tide.capture_table('trig_rows', 'setup')`;
    await sql`INSERT INTO trig_rows VALUES (1)`;
    expect((await messages("setup")).map((m) => m.payload.action)).toEqual(["insert"]);
    await sql`SELECT tide.uncapture_table('trig_rows', 'setup')`;
  });
});

describe("the relay's WAL reader", () => {
  let relay: Relay;
  beforeAll(async () => {
    await sql`SELECT tide.outbox_create('wal')`;
    for (const table of ["items", "twin"]) {
      await sql.unsafe(`CREATE TABLE ${table} (id bigint PRIMARY KEY, qty int, price numeric, tags int[], doc jsonb, big text, note text,
                          total numeric GENERATED ALWAYS AS (price * qty) STORED)`);
    }
    await sql`SELECT tide.outbox_create('trig')`;
    await sql`SELECT tide.capture_table('items', 'wal', ARRAY['insert', 'update', 'delete', 'truncate'], 'wal')`;
    await sql`SELECT tide.capture_table('twin', 'trig')`;
    relay = await startRelay(url, process.env.WAL_DEBUG ? { logger: createLogger({ level: "debug", format: "text", write: (l) => console.error(l) }) } : {});
    await waitFor("the reader to stream the slot", () => relay.walCaptures.reading().length === 1);
  });
  afterAll(async () => {
    await relay?.stop();
  });

  it("writes the same messages as trigger capture: exact numbers, arrays, json, TOASTed columns", async () => {
    const big = "x".repeat(200_000); // TOASTed, out of line
    for (const table of ["items", "twin"]) {
      await sql.unsafe(`INSERT INTO ${table} VALUES
        (9223372036854775807, 1, 1.50, '{1,NULL,3}', '{"n": 12345678901234567890.10, "s": "é\\u00e9x"}'::text::jsonb, $1, 'a'),
        (2, 2, 0.000, '{}', '[1.0e3]', 'small', NULL)`, [big]);
      await sql.unsafe(`UPDATE ${table} SET qty = 5, note = 'b' WHERE id = 9223372036854775807`); // big unchanged: not in the WAL's new row
      await sql.unsafe(`UPDATE ${table} SET id = 3 WHERE id = 2`); // key change
      await sql.unsafe(`DELETE FROM ${table} WHERE id = 3`);
    }
    await waitFor("all WAL messages", async () => (await messages("wal")).length === 6);
    const wal = await messages("wal");
    const trig = await messages("trig");
    expect(wal.map((m) => m.payload.action)).toEqual(["insert", "insert", "update", "delete", "insert", "delete"]);
    expect(wal.map((m) => m.text)).toEqual(trig.map((m) => m.text));
    expect(wal.map((m) => ({ ...m.headers, table_name: "x" }))).toEqual(trig.map((m) => ({ ...m.headers, table_name: "x" })));
    expect(wal[0].text).toContain('"id": 9223372036854775807');
    expect(wal[0].text).toContain('"price": 1.50');
    expect(wal[0].text).toContain("12345678901234567890.10");
    expect(wal[1].text).toContain('"price": 0.000');
    expect(wal[0].text).toContain('"total": 1.50');
    expect(wal[2].payload.record.big).toBe(big);
    expect(wal[2].payload.changes).toEqual({ qty: 1, note: "a", total: 1.5 });
    const [{ headers }] = await sql`SELECT headers::text AS headers FROM tide.outbox_messages WHERE id = ${wal[0].id}`;
    expect(headers).toBe('{"op": "insert", "key": {"id": 9223372036854775807}, "table_name": "items", "table_schema": "public"}');
  });

  it("captures a truncate as one message", async () => {
    await sql`TRUNCATE items`;
    await waitFor("the truncate", async () => (await messages("wal")).at(-1)?.payload.action === "truncate");
    const last = (await messages("wal")).at(-1)!;
    expect(last.payload).toEqual({ record: null, changes: null, action: "truncate" });
  });

  it("writes a source transaction of 25,000 rows in one outbox transaction, and confirms the slot after it", async () => {
    const before = (await messages("wal")).length;
    await sql`INSERT INTO items (id, qty) SELECT g, g FROM generate_series(100000, 124999) g`;
    await waitFor("25,000 messages", async () => (await messages("wal")).length === before + 25_000, 60_000);
    const [{ xids }] = await sql`SELECT count(DISTINCT txid)::int AS xids FROM tide.outbox_messages WHERE outbox = 'wal' AND (headers -> 'key' ->> 'id')::bigint BETWEEN 100000 AND 124999`;
    expect(xids).toBe(1);
    await waitFor("the slot to be confirmed past it", async () => {
      const [row] = await sql`SELECT lag_bytes, active FROM tide.wal_capture_status WHERE outbox_name = 'wal'`;
      return row.active && row.lag_bytes < 1_000_000n;
    });
  }, 90_000);

  it("keeps each of many small source transactions whole and in order, however they are batched", async () => {
    const before = (await messages("wal")).length;
    // Written while the reader is busy with the first: the rest arrive behind it and share outbox transactions.
    await Promise.all(Array.from({ length: 4 }, async (_, writer) => {
      for (let t = 0; t < 25; t++) {
        const first = 200_000 + (writer * 25 + t) * 3;
        await sql.unsafe(`INSERT INTO items (id, qty) VALUES (${first}, 1), (${first + 1}, 1), (${first + 2}, 1)`);
      }
    }));
    await waitFor("300 messages", async () => (await messages("wal")).length === before + 300, 30_000);
    const rows = await sql`
      SELECT (headers -> 'key' ->> 'id')::int AS key_id, txid::text FROM tide.outbox_messages
       WHERE outbox = 'wal' AND (headers -> 'key' ->> 'id')::bigint BETWEEN 200000 AND 200299 ORDER BY id`;
    const keys: number[] = rows.map((r) => r.key_id);
    for (let i = 0; i < keys.length; i += 3) {
      // A source transaction's three rows are consecutive, in order, and in one outbox transaction.
      expect((keys[i] - 200_000) % 3).toBe(0);
      expect(keys.slice(i, i + 3)).toEqual([keys[i], keys[i] + 1, keys[i] + 2]);
      expect(new Set(rows.slice(i, i + 3).map((r) => r.txid)).size).toBe(1);
    }
    // Each writer's transactions arrive in the order it committed them.
    const source = (key: number) => Math.floor((key - 200_000) / 3);
    for (let writer = 0; writer < 4; writer++) {
      const mine = keys.map(source).filter((s) => Math.floor(s / 25) === writer);
      expect(mine).toEqual([...mine].sort((a, b) => a - b));
    }
  }, 60_000);

  it("moves an idle slot with heartbeats, and reports its health", async () => {
    await sql`SELECT tide.outbox_create('elsewhere')`;
    const [{ lsn }] = await sql`SELECT confirmed_flush_lsn::text AS lsn FROM tide.wal_capture_status WHERE outbox_name = 'wal'`;
    // WAL written for another table: nothing for this slot, which must still move past it.
    await sql`CREATE TABLE other (id int PRIMARY KEY)`;
    await sql`INSERT INTO other SELECT generate_series(1, 1000)`;
    const [{ target }] = await sql`SELECT pg_current_wal_lsn()::text AS target`;
    await waitFor("the slot to move past the unrelated WAL", async () => {
      const [row] = await sql`SELECT confirmed_flush_lsn >= ${target}::pg_lsn AS moved FROM tide.wal_capture_status WHERE outbox_name = 'wal'`;
      return row.moved;
    }, 30_000);
    const [status] = await sql`SELECT * FROM tide.wal_capture_status WHERE outbox_name = 'wal'`;
    expect(status.confirmed_flush_lsn).not.toBe(lsn);
    expect(status.over_limit).toBe(false);
    const text = await relay.metrics.registry.metrics();
    expect(text).toMatch(/pg_tide_relay_wal_slot_lag_bytes\{slot="tide_wal_items_\d+_[0-9a-f]{8}"\} \d+/);
  }, 60_000);
});

describe("pipelines", () => {
  it("deliver a WAL-captured table Sequin-style, unchanged, to a webhook", async () => {
    const received: any[] = [];
    const server = Bun.serve({ port: 0, hostname: "127.0.0.1", async fetch(request) {
      received.push(await request.json());
      return new Response("ok");
    } });
    const relay = await startRelay(url);
    try {
      await sql`SELECT tide.outbox_create('order_changes')`;
      await sql`CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2), status text)`;
      await sql`SELECT tide.capture_table('orders', 'order_changes', p_mode => 'wal')`;
      await sql`SELECT tide.relay_set_outbox('orders_hook', 'order_changes', 'webhook', ${sql.json({
        url: `http://127.0.0.1:${server.port}/hook`, wire_format: "sequin",
      })})`;
      await sql`INSERT INTO orders (customer_id, total, status) VALUES (42, 99.99, 'new')`;
      await sql`UPDATE orders SET status = 'paid'`;
      await sql`DELETE FROM orders`;
      await waitFor("three deliveries", () => received.length === 3, 30_000);
      expect(received.map((b) => [b.action, b.record.status, b.changes])).toEqual([
        ["insert", "new", null], ["update", "paid", { status: "new" }], ["delete", "paid", null],
      ]);
      expect(received[0].metadata).toMatchObject({ table_schema: "public", table_name: "orders" });
      expect(received[0].metadata.consumer.name).toBe("orders_hook");
    } finally {
      await relay.stop();
      server.stop(true);
    }
  }, 60_000);
});

describe("ownership and removal", () => {
  it("a role holding only tide_publisher cannot have a slot created, or dropped, for a table it does not own", async () => {
    const password = Math.random().toString(36).slice(2, 14);
    const role = `tide_test_wal_pub_${Math.random().toString(36).slice(2, 8)}`;
    await sql.unsafe(`CREATE ROLE ${role} LOGIN PASSWORD '${password}' IN ROLE tide_publisher`);
    const roleUrl = new URL(url);
    roleUrl.username = role;
    roleUrl.password = password;
    await sql`SELECT tide.outbox_create('not_theirs')`;
    await sql`CREATE TABLE not_theirs_rows (id int PRIMARY KEY)`;
    await sql`SELECT tide.capture_table('not_theirs_rows', 'not_theirs', p_mode => 'wal')`;
    const [{ slot_name: slot }] = await sql`SELECT slot_name FROM tide.wal_captures WHERE outbox_name = 'not_theirs'`;
    const publisher = postgres(roleUrl.toString(), { max: 1, onnotice: () => {} });
    try {
      const slotsBefore = (await sql`SELECT count(*)::int AS n FROM pg_replication_slots`)[0].n;
      await expect(publisher`SELECT tide.wal_slot_create('not_theirs_rows', 'not_theirs')`).rejects.toThrow("only the table's owner can capture it");
      await expect(publisher`SELECT tide.capture_table('not_theirs_rows', 'not_theirs', p_mode => 'wal')`).rejects.toThrow();
      // Nor can it forget the capture (row security) to then drop its slot as an orphan.
      await publisher`DELETE FROM tide.wal_captures WHERE slot_name = ${slot}`;
      await expect(publisher`SELECT tide.wal_slot_drop(${slot})`).rejects.toThrow("belongs to a capture");
      expect((await sql`SELECT count(*)::int AS n FROM pg_replication_slots`)[0].n).toBe(slotsBefore);
    } finally {
      await publisher.end();
      await sql`SELECT tide.uncapture_table('not_theirs_rows', 'not_theirs')`;
    }
  });

  it("a relay logging in with tide_relay and REPLICATION reads the slot; uncapture_table while it streams drops the slot", async () => {
    const password = Math.random().toString(36).slice(2, 14);
    const role = `tide_test_wal_relay_${Math.random().toString(36).slice(2, 8)}`;
    await sql.unsafe(`CREATE ROLE ${role} LOGIN REPLICATION PASSWORD '${password}' IN ROLE tide_relay`);
    const roleUrl = new URL(url);
    roleUrl.username = role;
    roleUrl.password = password;
    await sql`SELECT tide.outbox_create('owned')`;
    await sql`CREATE TABLE owned_rows (id int PRIMARY KEY, amount numeric)`;
    await sql`SELECT tide.capture_table('owned_rows', 'owned', p_mode => 'wal')`;
    const first = await startRelay(roleUrl.toString());
    const second = await startRelay(roleUrl.toString());
    try {
      const [{ slot_name: slot }] = await sql`SELECT slot_name FROM tide.wal_captures WHERE outbox_name = 'owned'`;
      await waitFor("one relay to stream the slot", () => first.walCaptures.reading().includes(slot) || second.walCaptures.reading().includes(slot));
      await sql`INSERT INTO owned_rows VALUES (1, 10.10), (2, 20.20)`;
      await waitFor("both rows", async () => (await messages("owned")).length === 2);
      expect([first, second].filter((r) => r.walCaptures.reading().includes(slot)).length).toBe(1);
      expect((await messages("owned")).map((m) => m.text)).toEqual([
        '{"action": "insert", "record": {"id": 1, "amount": 10.10}, "changes": null}',
        '{"action": "insert", "record": {"id": 2, "amount": 20.20}, "changes": null}',
      ]);
      await sql`SELECT tide.uncapture_table('owned_rows', 'owned')`;
      const [{ n }] = await sql`SELECT count(*)::int AS n FROM pg_replication_slots WHERE slot_name = ${slot}`;
      expect(n).toBe(0);
      await waitFor("the readers of the slot to stop", () => !first.walCaptures.reading().includes(slot) && !second.walCaptures.reading().includes(slot));
      await sql`INSERT INTO owned_rows VALUES (3, 30)`;
      expect((await messages("owned")).length).toBe(2);
    } finally {
      await first.stop();
      await second.stop();
    }
  }, 60_000);
});

describe("crashes at the failpoints lose nothing", () => {
  for (const [point, repeats] of [["wal.before-outbox-commit", false], ["wal.after-outbox-commit", true]] as const) {
    it(`${point}: every change arrives${repeats ? " (what it committed may repeat)" : ", once"}`, async () => {
      const outbox = `crash_${point.replace(/\W/g, "_")}`;
      const table = `${outbox}_rows`;
      await sql.unsafe(`SELECT tide.outbox_create('${outbox}')`);
      await sql.unsafe(`CREATE TABLE ${table} (id int PRIMARY KEY)`);
      await sql.unsafe(`SELECT tide.capture_table('${table}', '${outbox}', p_mode => 'wal')`);
      await sql.unsafe(`INSERT INTO ${table} SELECT generate_series(1, 10)`);
      await sql.unsafe(`INSERT INTO ${table} SELECT generate_series(11, 20)`);
      // The first relay dies at the failpoint on the first transaction.
      const crashing = spawnRelay(url, [], { TIDE_FAILPOINTS: `${point}=crash` });
      const log = collectLines(crashing.stderr);
      const exit = await Promise.race([crashing.exited, Bun.sleep(60_000).then(() => "running")]);
      if (exit === "running") {
        crashing.kill("SIGKILL");
        throw new Error(`the relay did not reach ${point}:\n${log.lines.join("\n")}`);
      }
      expect(exit).not.toBe(0);
      expect(crashing.signalCode).toBe("SIGKILL");
      const count = async () => (await sql.unsafe(`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = '${outbox}'`))[0].n;
      const afterCrash = await count();
      // After the commit: the first source transaction, or both when the second had arrived too (it
      // joins the same outbox transaction); each source transaction whole.
      if (repeats) expect([10, 20]).toContain(afterCrash);
      else expect(afterCrash).toBe(0);
      const healthy = spawnRelay(url);
      try {
        const ids = async () =>
          (await sql.unsafe(`SELECT (headers -> 'key' ->> 'id')::int AS key_id FROM tide.outbox_messages WHERE outbox = '${outbox}' ORDER BY id`)).map((r: any) => r.key_id);
        // The slot was not confirmed past what was committed before the crash: it all comes again.
        await waitFor("every change", async () => (await ids()).length === afterCrash + 20, 30_000);
        const all = await ids();
        const expected = Array.from({ length: 20 }, (_, i) => i + 1);
        // Nothing lost; the only repeat allowed is the transaction committed before the crash.
        expect(all.slice(afterCrash)).toEqual(expected);
        if (repeats) expect(all.slice(0, afterCrash)).toEqual(expected.slice(0, afterCrash));
      } finally {
        healthy.kill("SIGTERM");
        await healthy.exited;
      }
      await sql.unsafe(`SELECT tide.uncapture_table('${table}', '${outbox}')`);
    }, 90_000);
  }
});

describe("without wal_level = logical", () => {
  it("refuses with how to set it", async () => {
    const plain = await startEmbeddedPostgres();
    const admin = connect(plain.url, { max: 1 });
    try {
      await installSchema(admin);
      await admin`SELECT tide.outbox_create('o')`;
      await admin`CREATE TABLE t (id int PRIMARY KEY)`;
      await expect(admin`SELECT tide.capture_table('t', 'o', p_mode => 'wal')`).rejects.toThrow(
        "capture of public.t from the WAL needs wal_level = logical (the server has replica)",
      );
      const [{ n }] = await admin`SELECT count(*)::int AS n FROM pg_replication_slots`;
      expect(n).toBe(0);
    } finally {
      await admin.end();
      await plain.stop();
    }
  }, 120_000);
});

describe("the outbox transaction's connection dropped by the server", () => {
  // A server of its own: no other capture's slot reaches the failpoint first.
  let own: LogicalPostgres;
  beforeAll(async () => {
    own = await startLogicalPostgres("dropped_writer");
  }, 120_000);
  afterAll(async () => {
    await own?.stop();
  });

  it("is not handed back to the relay's pool: every connection of the pool still answers, and every change arrives", async () => {
    const outbox = "dropped_writer";
    const table = `${outbox}_rows`;
    await own.sql.unsafe(`SELECT tide.outbox_create('${outbox}')`);
    await own.sql.unsafe(`CREATE TABLE ${table} (id int PRIMARY KEY)`);
    await own.sql.unsafe(`SELECT tide.capture_table('${table}', '${outbox}', p_mode => 'wal')`);
    await own.sql.unsafe(`INSERT INTO ${table} SELECT generate_series(1, 10)`);
    // The first outbox transaction is held open at the failpoint; the server ends its session meanwhile.
    const previous = process.env.TIDE_FAILPOINTS;
    process.env.TIDE_FAILPOINTS = "wal.before-outbox-commit@1=pause=8000";
    let relay: Relay | undefined;
    try {
      relay = await startRelay(own.url);
      const pid = await waitFor("the outbox transaction held open", async () => (await own.sql<{ pid: number }[]>`
        SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND state = 'idle in transaction' AND pid <> pg_backend_pid()`)[0]?.pid);
      await own.sql`SELECT pg_terminate_backend(${pid})`;
      await own.sql.unsafe(`INSERT INTO ${table} SELECT generate_series(11, 20)`);
      const ids = async () =>
        (await own.sql.unsafe(`SELECT DISTINCT (headers -> 'key' ->> 'id')::int AS id FROM tide.outbox_messages WHERE outbox = '${outbox}'`)).length;
      await waitFor("every change, read again after the failed transaction", async () => (await ids()) === 20, 30_000);
      // As many statements at once as the relay's pool has connections: each one answers.
      const answers = await Promise.all(Array.from({ length: 10 }, () =>
        relay!.sql`SELECT 1 AS one, pg_sleep(0.05)`.then(() => "ok", (error: Error & { code?: string }) => error.code ?? error.message)));
      expect(answers.filter((a) => a !== "ok")).toEqual([]);
    } finally {
      if (previous === undefined) delete process.env.TIDE_FAILPOINTS;
      else process.env.TIDE_FAILPOINTS = previous;
      await relay?.stop();
    }
  }, 90_000);
});
