// The slot of a WAL capture must not hurt the database: over its limit (tide.wal_capture_set_limit)
// the relay warns, then pauses or drops it as configured, and every state shows in
// tide.wal_capture_status, the metrics and the status page. Against an embedded PostgreSQL 18 this
// file starts itself with wal_level=logical, and the real relay.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, type Sql } from "../../core/db.ts";
import { createHttpApp } from "../../core/http/http.ts";
import { RelayMetrics } from "../../core/http/metrics.ts";
import { startLogicalPostgres, type LogicalPostgres } from "../support/wal.ts";
import { captureLogger, collectLines, spawnRelay, startRelay, waitFor } from "../support/relay.ts";

const LIMIT_BYTES = 8192;

let pg: LogicalPostgres;
let url: string;
let sql: Sql;

beforeAll(async () => {
  pg = await startLogicalPostgres("wal_limits");
  ({ url, sql } = pg);
}, 120_000);
afterAll(async () => {
  await pg?.stop();
});

/** A table captured from the WAL into an outbox of the same name, and its slot. */
async function capture(name: string): Promise<string> {
  await sql.unsafe(`SELECT tide.outbox_create('${name}')`);
  await sql.unsafe(`CREATE TABLE ${name}_rows (id int PRIMARY KEY, note text)`);
  await sql.unsafe(`SELECT tide.capture_table('${name}_rows', '${name}', p_mode => 'wal')`);
  const [{ slot_name }] = await sql`SELECT slot_name FROM tide.wal_captures WHERE outbox_name = ${name}`;
  return slot_name;
}

async function status(outbox: string) {
  const [row] = await sql`SELECT * FROM tide.wal_capture_status WHERE outbox_name = ${outbox}`;
  return row;
}

async function count(outbox: string): Promise<number> {
  return (await sql`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = ${outbox}`)[0].n;
}

async function slotExists(slot: string): Promise<boolean> {
  return (await sql`SELECT count(*)::int AS n FROM pg_replication_slots WHERE slot_name = ${slot}`)[0].n === 1;
}

/** The status page as a browser gets it, from the relay's HTTP app. */
async function statusPage(): Promise<string> {
  const app = createHttpApp({
    sql, metrics: new RelayMetrics(), relayGroupId: "default", relayId: "test", coordinatorRunning: () => true, owned: () => [],
  });
  return await (await app.request("/")).text();
}

describe("wal_capture_set_limit", () => {
  it("refuses an unknown action and a limit below one byte, naming what it got", async () => {
    await capture("setting");
    await expect(sql`SELECT tide.wal_capture_set_limit('setting_rows', 'setting', 1024, 'stop')`).rejects.toThrow(
      `p_on_lag_limit must be 'warn', 'pause' or 'drop' (got "stop")`,
    );
    await expect(sql`SELECT tide.wal_capture_set_limit('setting_rows', 'setting', 0)`).rejects.toThrow("p_lag_warn_bytes must be at least 1 (got 0)");
    await sql`SELECT tide.wal_capture_set_limit('setting_rows', 'setting', 2048, 'pause')`;
    await sql`SELECT tide.wal_capture_set_limit('setting_rows', 'setting', 4096)`; // the action stays
    expect(await status("setting")).toMatchObject({ lag_warn_bytes: 4096n, on_lag_limit: "pause" });
    await sql`SELECT tide.uncapture_table('setting_rows', 'setting')`;
  });
});

describe("a slot over its limit", () => {
  it("pause: no relay reads it, it keeps every change; resumed after the limit is raised, every change arrives", async () => {
    const slot = await capture("paused");
    await sql`SELECT tide.wal_capture_set_limit('paused_rows', 'paused', ${LIMIT_BYTES}, 'pause')`;
    // Written while no relay runs: the slot's lag passes the limit.
    await sql`INSERT INTO paused_rows SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g`;
    expect(await status("paused")).toMatchObject({ state: "over limit", over_limit: true });

    const { logger, lines } = captureLogger();
    const relay = await startRelay(url, { logger });
    try {
      await waitFor("the capture to be paused", async () => (await status("paused")).state === "paused");
      const paused = await status("paused");
      expect(paused.state_reason).toMatch(new RegExp(`^slot lag \\d+ bytes passed the limit of ${LIMIT_BYTES} bytes$`));
      expect(paused.state_at).toBeInstanceOf(Date);
      expect(paused.active).toBe(false);
      expect(await slotExists(slot)).toBe(true);
      expect(relay.walCaptures.reading()).not.toContain(slot);
      expect(await count("paused")).toBe(0);
      const logged = lines.map((l) => JSON.parse(l));
      expect(logged.find((l) => l.message.startsWith("WAL capture slot is behind"))).toMatchObject({ level: "warn", slot });
      expect(logged.find((l) => l.message.startsWith("WAL capture paused"))).toMatchObject({ level: "error", slot, limit_bytes: String(LIMIT_BYTES) });
      await waitFor("the paused state in the metrics", async () =>
        (await relay.metrics.registry.metrics()).includes(`pg_tide_relay_wal_capture_state{slot="${slot}",state="paused"} 1`));
      const page = await statusPage();
      expect(page).toContain(`data-wal-slot="${slot}" data-state="paused"`);
      expect(page).toContain(`passed the limit of ${LIMIT_BYTES} bytes`);

      await expect(sql`SELECT tide.wal_capture_resume('paused_rows', 'paused')`).rejects.toThrow("is still over its limit");
      await sql`SELECT tide.wal_capture_set_limit('paused_rows', 'paused', ${1024 * 1024 * 1024})`;
      await sql`SELECT tide.wal_capture_resume('paused_rows', 'paused')`;
      await waitFor("every change written while paused", async () => (await count("paused")) === 2000, 30_000);
      await waitFor("the slot to stream again", async () => (await status("paused")).state === "streaming");
    } finally {
      await relay.stop();
    }
    await sql`SELECT tide.uncapture_table('paused_rows', 'paused')`;
  }, 90_000);

  it("drop: a stuck reader's slot is dropped, the capture marked, logged and shown; captured again with a backfill, nothing is missing", async () => {
    const slot = await capture("dropped");
    await sql`SELECT tide.wal_capture_set_limit('dropped_rows', 'dropped', ${LIMIT_BYTES}, 'drop')`;
    // The reader holds its first source transaction's outbox commit: it streams the slot but confirms nothing.
    const relay = spawnRelay(url, ["--reconcile-interval-ms", "300", "--log-format", "json"], { TIDE_FAILPOINTS: "wal.before-outbox-commit@1=pause=600000" });
    const log = collectLines(relay.stderr);
    try {
      await waitFor("the relay to stream the slot", async () => (await status("dropped")).active, 30_000);
      await sql`INSERT INTO dropped_rows VALUES (1, 'first')`;
      await sql`INSERT INTO dropped_rows SELECT g, repeat('x', 100) FROM generate_series(2, 2001) g`;
      await waitFor("the capture to be dropped", async () => (await status("dropped")).state === "dropped", 30_000);
      const dropped = await status("dropped");
      expect(dropped.slot_exists).toBe(false);
      expect(dropped.state_reason).toMatch(new RegExp(`^slot lag \\d+ bytes passed the limit of ${LIMIT_BYTES} bytes$`));
      expect(dropped.state_at).toBeInstanceOf(Date);
      expect(await slotExists(slot)).toBe(false);
      const error = await waitFor("the error logged", () =>
        log.lines.filter((l) => l.startsWith("{")).map((l) => JSON.parse(l)).find((l) => l.message.startsWith("WAL capture slot dropped")));
      expect(error).toMatchObject({ level: "error", slot, limit_bytes: String(LIMIT_BYTES) });
      const page = await statusPage();
      expect(page).toContain(`data-wal-slot="${slot}" data-state="dropped"`);
      const cli = Bun.spawnSync([process.execPath, "main.ts", "status", "--postgres-url", url, "--output", "json"], { cwd: `${import.meta.dir}/../..` });
      expect(JSON.parse(cli.stdout.toString()).wal_captures.find((c: any) => c.slot === slot)).toMatchObject({
        state: "dropped", lag_bytes: null, on_lag_limit: "drop", state_reason: dropped.state_reason,
      });
      await expect(sql`SELECT tide.wal_capture_resume('dropped_rows', 'dropped')`).rejects.toThrow("its slot was dropped");
    } finally {
      relay.kill("SIGKILL");
      await relay.exited;
    }
    // Nothing from the held transaction was committed: the relay died holding it.
    expect(await count("dropped")).toBe(0);
    // Recovery as docs/relay.md gives it.
    await sql`SELECT tide.uncapture_table('dropped_rows', 'dropped')`;
    await sql`SELECT tide.capture_table('dropped_rows', 'dropped', p_mode => 'wal')`;
    await sql.unsafe(`CALL tide.capture_backfill('dropped_rows', 'dropped', p_restart => true)`);
    const ids = await sql`SELECT (payload -> 'record' ->> 'id')::int AS id FROM tide.outbox_messages WHERE outbox = 'dropped' AND payload ->> 'action' = 'read' ORDER BY 1`;
    expect(ids.map((r) => r.id)).toEqual(Array.from({ length: 2001 }, (_, i) => i + 1));
    await sql`SELECT tide.uncapture_table('dropped_rows', 'dropped')`;
  }, 90_000);

  it("warn (the default): only warns; the relay keeps reading and the slot catches up", async () => {
    const slot = await capture("warned");
    await sql`SELECT tide.wal_capture_set_limit('warned_rows', 'warned', ${LIMIT_BYTES})`;
    await sql`INSERT INTO warned_rows SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g`;
    const { logger, lines } = captureLogger();
    const relay = await startRelay(url, { logger });
    try {
      await waitFor("every change", async () => (await count("warned")) === 2000, 30_000);
      expect(lines.map((l) => JSON.parse(l)).find((l) => l.message.startsWith("WAL capture slot is behind"))).toMatchObject({ level: "warn", slot });
      expect(await slotExists(slot)).toBe(true);
      expect((await sql`SELECT state FROM tide.wal_captures WHERE slot_name = ${slot}`)[0].state).toBe("capturing");
    } finally {
      await relay.stop();
    }
    await sql`SELECT tide.uncapture_table('warned_rows', 'warned')`;
  }, 60_000);
});

describe("the status page", () => {
  it("shows each WAL capture's slot with its state and lag", async () => {
    const slot = await capture("shown");
    const relay = await startRelay(url);
    try {
      await waitFor("the slot to stream", async () => (await status("shown")).state === "streaming");
      await sql`INSERT INTO shown_rows VALUES (1, 'a')`;
      await waitFor("the change", async () => (await count("shown")) === 1);
      const page = await statusPage();
      const row = page.match(new RegExp(`<tr data-wal-slot="${slot}"[^]*?</tr>`))?.[0] ?? "";
      expect(row).toContain(`data-state="streaming"`);
      expect(row).toContain("<td>shown_rows</td><td>shown</td>");
      expect(row).toMatch(/data-lag-bytes="\d+">\d+(\.\d)? (B|KiB|MiB)</);
      expect(row).toContain("1.0 GiB, then warn");
      expect(page).toContain("<h2>WAL capture slots</h2>");
    } finally {
      await relay.stop();
    }
    await sql`SELECT tide.uncapture_table('shown_rows', 'shown')`;
  }, 60_000);
});
