// Costs at a large backlog: the exact lag, opening an interval, the idle probe and the retention
// sweep on an outbox of --messages messages (default 10,000,000), each timed for the SQL as it is and
// for the SQL it replaced (recreated in the scratch database as public.before_*), side by side in
// one run, so that the ratio does not depend on what else the machine was doing.
//
//   ./node_modules/.bin/bun bench/backlog.ts [--messages 10000000] [--runs 3]
//
// The outbox is filled directly (10,000 messages per transaction, ~200-byte payloads); the first half
// is stamped two hours old. One group "g" has delivered nothing; another, "done", has delivered
// everything (its position is set to the current snapshot). The table is vacuumed once after the
// fill, as autovacuum would have done by then. Figures print as a Markdown table; nothing is asserted.

import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, scratchDatabase, summarize,
} from "./support.ts";

const MESSAGES = intFlag("messages", 10_000_000);
const RUNS = intFlag("runs", 3);
const PER_TRANSACTION = 10_000;

// The definitions these replaced, for the comparison (sql/002 and sql/005 before the change).
const BEFORE = `
CREATE FUNCTION public.before_interval_messages(p_outbox text, p_low pg_snapshot, p_high pg_snapshot)
RETURNS SETOF tide.outbox_messages LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT m.* FROM tide.outbox_messages m
   WHERE m.outbox = p_outbox
     AND m.txid >= pg_snapshot_xmax(p_low) AND m.txid < pg_snapshot_xmax(p_high)
     AND pg_visible_in_snapshot(m.txid, p_high) AND NOT pg_visible_in_snapshot(m.txid, p_low)
  UNION ALL
  SELECT m.* FROM tide.outbox_messages m
   WHERE m.outbox = p_outbox
     AND m.txid = ANY (ARRAY(SELECT pg_snapshot_xip(p_low)))
     AND pg_visible_in_snapshot(m.txid, p_high)
$$;
CREATE FUNCTION public.before_outbox_retention_sweep(p_outbox text, p_batch integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_count bigint;
BEGIN
  DELETE FROM tide.outbox_messages WHERE id IN (
    SELECT m.id FROM tide.outbox_messages m JOIN tide.outboxes o ON o.name = m.outbox
     WHERE (p_outbox IS NULL OR m.outbox = p_outbox)
       AND m.created_at < now() - make_interval(hours => o.retention_hours)
       AND NOT EXISTS (SELECT 1 FROM tide.consumer_groups g WHERE g.outbox_name = m.outbox
                        AND NOT tide.is_delivered(m.txid, m.id, g.low, g.high, g.cursor_id))
     ORDER BY m.id LIMIT p_batch);
  GET DIAGNOSTICS v_count = ROW_COUNT;
  RETURN v_count;
END $$;`;

interface Case {
  name: string;
  before: string;
  now: string;
  /** Statements that set the scene, run once before the case. */
  setUp?: string;
  /** Run each statement in a transaction that is rolled back (it deletes). */
  rollback?: boolean;
}

// Group g's position as the reader passes it (a value, not a subquery, which would stop inlining).
const SINCE_G = (fn: string) =>
  `tide.consumer_groups g CROSS JOIN LATERAL ${fn}('big', g.low, pg_current_snapshot()) m WHERE g.group_name = 'g'`;
const CASES: Case[] = [
  {
    name: "exact lag, no interval open (relay stopped), before any checkpoint",
    before: `SELECT tide.undelivered_count('big', low, high, cursor_id) FROM tide.consumer_groups WHERE group_name = 'g'`,
    now: `SELECT tide.consumer_group_lag('big', 'g')`,
  },
  {
    name: "exact lag, no interval open, after a checkpoint",
    setUp: `SELECT tide.consumer_lag_checkpoint()`,
    before: `SELECT tide.undelivered_count('big', low, high, cursor_id) FROM tide.consumer_groups WHERE group_name = 'g'`,
    now: `SELECT tide.consumer_group_lag('big', 'g')`,
  },
  {
    name: "idle probe: is anything committed since low?",
    before: `SELECT EXISTS (SELECT 1 FROM ${SINCE_G("public.before_interval_messages")})`,
    now: `SELECT EXISTS (SELECT 1 FROM ${SINCE_G("tide.interval_messages")})`,
  },
  {
    name: "opening an interval of the whole backlog (its bounds)",
    before: `SELECT min(m.id), max(m.id) FROM ${SINCE_G("public.before_interval_messages")}`,
    now: `SELECT min(m.id), max(m.id), count(*) FROM ${SINCE_G("tide.interval_messages")}`,
  },
  {
    name: "exact lag, interval open, 100 delivered",
    setUp: `SELECT count(*) FROM tide.consumer_next_batch('big', 'g', 100);
            SELECT tide.consumer_commit('big', 'g', (SELECT cursor_id FROM tide.consumer_groups WHERE group_name = 'g') + 100, 100)`,
    before: `SELECT tide.undelivered_count('big', low, high, cursor_id) FROM tide.consumer_groups WHERE group_name = 'g'`,
    now: `SELECT tide.consumer_group_lag('big', 'g')`,
  },
  {
    name: "retention sweep of 5,000, half the outbox expired, only group \"done\"",
    setUp: `DELETE FROM tide.consumer_groups WHERE group_name = 'g'`,
    before: `SELECT public.before_outbox_retention_sweep('big', 5000)`,
    now: `SELECT tide.outbox_retention_sweep('big', 5000)`,
    rollback: true,
  },
  {
    name: "retention sweep, nothing expired (retention 3 h)",
    setUp: `UPDATE tide.outboxes SET retention_hours = 3 WHERE name = 'big'`,
    before: `SELECT public.before_outbox_retention_sweep('big', 5000)`,
    now: `SELECT tide.outbox_retention_sweep('big', 5000)`,
    rollback: true,
  },
  {
    name: "retention sweep, half expired, a group that never moved holds everything",
    setUp: `UPDATE tide.outboxes SET retention_hours = 1 WHERE name = 'big';
            SELECT tide.create_consumer_group('gone', 'big')`,
    before: `SELECT public.before_outbox_retention_sweep('big', 5000)`,
    now: `SELECT tide.outbox_retention_sweep('big', 5000)`,
    rollback: true,
  },
];

const db = await scratchDatabase("backlog");
const sql = connectTo(db.url, 2);
try {
  console.log(await describeMachine());
  console.log(`${MESSAGES} messages, ${RUNS} runs per case\n`);
  await fill();
  await sql.unsafe(BEFORE);
  const rows: string[][] = [];
  for (const c of CASES) {
    if (c.setUp) console.log(`set-up for "${c.name}": ${fixed(await timed(c.setUp), 0)} ms (${c.setUp.replace(/\s+/g, " ")})`);
    const before: number[] = [];
    const now: number[] = [];
    for (let run = 0; run < RUNS; run++) { // interleaved
      before.push(await timed(c.before, c.rollback));
      now.push(await timed(c.now, c.rollback));
    }
    const b = summarize(before).p50;
    const n = summarize(now).p50;
    const ratios = before.map((value, i) => value / now[i]);
    console.log(`${c.name}: before ${fixed(b, 1)} ms, now ${fixed(n, 1)} ms`);
    rows.push([c.name, `${fixed(b, 1)} (${range(before)})`, `${fixed(n, 1)} (${range(now)})`, `${fixed(summarize(ratios).p50, summarize(ratios).p50 < 10 ? 1 : 0)}×`]);
  }
  console.log(`\n${markdownTable(["case", "before, ms (range)", "now, ms (range)", "before / now (median of runs)"], rows)}`);
} finally {
  await sql.end();
  await db.drop();
}

function range(values: number[]): string {
  return `${fixed(Math.min(...values), 1)}–${fixed(Math.max(...values), 1)}`;
}

/** Milliseconds for one statement (in a transaction rolled back when it changes data). */
async function timed(statement: string, rollback = false): Promise<number> {
  const conn = await sql.reserve();
  try {
    if (rollback) await conn.unsafe("BEGIN");
    const start = performance.now();
    await conn.unsafe(statement);
    const ms = performance.now() - start;
    if (rollback) await conn.unsafe("ROLLBACK");
    return ms;
  } finally {
    conn.release();
  }
}

async function fill() {
  await sql`SELECT tide.outbox_create('big', p_retention_hours := 1)`;
  await sql`SELECT tide.create_consumer_group('g', 'big')`;
  await sql`SELECT tide.create_consumer_group('done', 'big')`;
  await sql.unsafe(`
    CREATE PROCEDURE public.fill(p_count integer, p_per_tx integer) LANGUAGE plpgsql AS $$
    BEGIN
      FOR b IN 0 .. p_count / p_per_tx - 1 LOOP
        INSERT INTO tide.outbox_messages (outbox, payload, headers, created_at)
        SELECT 'big', jsonb_build_object('order_id', b * p_per_tx + n, 'customer', 'cus_8f14e45fceea167a5a36dedd4bea2543',
                                         'total', 149.99, 'note', repeat('x', 120)),
               '{"event_type": "order.created"}',
               CASE WHEN b < p_count / p_per_tx / 2 THEN now() - interval '2 hours' ELSE now() END
          FROM generate_series(1, p_per_tx) n;
        COMMIT;
      END LOOP;
    END $$`);
  const start = performance.now();
  await sql.unsafe(`CALL public.fill(${MESSAGES}, ${PER_TRANSACTION})`);
  console.log(`filled in ${fixed((performance.now() - start) / 1000, 0)} s`);
  await sql.unsafe("VACUUM (ANALYZE) tide.outbox_messages");
  await sql`UPDATE tide.consumer_groups SET low = pg_current_snapshot() WHERE group_name = 'done'`;
  const [size] = await sql`SELECT pg_size_pretty(pg_table_size('tide.outbox_messages')) AS heap,
                                  pg_size_pretty(pg_indexes_size('tide.outbox_messages')) AS indexes`;
  console.log(`tide.outbox_messages: ${size.heap} of rows, ${size.indexes} of indexes`);
}
