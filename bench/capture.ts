// Table capture: (1) the write overhead of the capture triggers on a bulk INSERT ... SELECT and on
// single-row transactions, against the same table without capture; (2) change → webhook latency
// p50/p99: a writer inserts one row per transaction at a steady rate, the relay delivers each change
// (wire_format sequin) to a local webhook that records the arrival time.
//   bun bench/capture.ts [--rows 100000] [--singles 5000] [--rate 500] [--seconds 20]
// Figures go to stdout; nothing is asserted.

import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, scratchDatabase, spawnRelay, startReceiver, summarize,
} from "./support.ts";

const ROWS = intFlag("rows", 100_000);
const SINGLES = intFlag("singles", 5_000);
const RATE = intFlag("rate", 500);
const SECONDS = intFlag("seconds", 20);

const TABLE = `(id bigint PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2), status text, created_at timestamptz DEFAULT now())`;

async function writeOverhead() {
  const db = await scratchDatabase("capture");
  const sql = connectTo(db.url, 2);
  try {
    await sql.unsafe(`CREATE TABLE plain ${TABLE}; CREATE TABLE captured ${TABLE}`);
    await sql`SELECT tide.outbox_create('changes')`;
    await sql`SELECT tide.capture_table('captured', 'changes')`;
    const rows: (string | number)[][] = [];
    for (const table of ["plain", "captured"]) {
      const bulkStart = performance.now();
      await sql.unsafe(`INSERT INTO ${table} (id, customer_id, total, status)
                        SELECT g, g % 1000, g * 0.5, 'new' FROM generate_series(1, ${ROWS}) g`);
      const bulkMs = performance.now() - bulkStart;
      const updateStart = performance.now();
      await sql.unsafe(`UPDATE ${table} SET status = 'paid' WHERE id <= ${ROWS / 10}`);
      const updateMs = performance.now() - updateStart;
      const latencies: number[] = [];
      for (let i = 0; i < SINGLES; i++) {
        const start = performance.now();
        await sql.unsafe(`INSERT INTO ${table} (id, customer_id, total) VALUES (${ROWS + 1 + i}, 1, 9.99)`);
        latencies.push(performance.now() - start);
      }
      const single = summarize(latencies);
      rows.push([table, fixed(bulkMs, 0), fixed((ROWS / bulkMs) * 1000, 0), fixed(updateMs, 0), fixed(single.p50, 3), fixed(single.p99, 3)]);
    }
    const [{ n }] = await sql`SELECT count(*)::int AS n FROM tide.outbox_messages`;
    console.log(`\n### Capture write overhead (${ROWS} rows bulk, ${ROWS / 10} rows updated, ${SINGLES} single-row inserts)\n`);
    console.log(markdownTable(["table", "bulk INSERT ms", "rows/s", `UPDATE of ${ROWS / 10} rows ms`, "single insert p50 ms", "p99 ms"], rows));
    console.log(`\ncaptured events: ${n}`);
  } finally {
    await sql.end();
    await db.drop();
  }
}

async function changeLatency() {
  const db = await scratchDatabase("capture_latency");
  const sql = connectTo(db.url, 2);
  const latencies: number[] = [];
  const receiver = startReceiver((_request, body, arrived) => {
    const change = JSON.parse(body);
    latencies.push(arrived - Date.parse(change.record.created_at));
  });
  const relay = spawnRelay(db.url, ["--poll-interval-ms", "50"]);
  try {
    await sql.unsafe(`CREATE TABLE orders ${TABLE}`);
    await sql`SELECT tide.outbox_create('changes', p_notify := true)`;
    await sql`SELECT tide.capture_table('orders', 'changes')`;
    await sql`SELECT tide.relay_set_outbox('hook', 'changes', 'webhook', ${sql.json({ url: receiver.url, wire_format: "sequin" })})`;
    await relay.logged("pipeline started");
    const total = RATE * SECONDS;
    const interval = 1000 / RATE;
    const begin = performance.now();
    for (let i = 0; i < total; i++) {
      const due = begin + i * interval;
      const wait = due - performance.now();
      if (wait > 0) await Bun.sleep(wait);
      // clock_timestamp() inside the row: the change's time as the database saw it (same clock as the receiver).
      await sql`INSERT INTO orders (id, customer_id, total, created_at) VALUES (${i + 1}, 1, 9.99, clock_timestamp())`;
    }
    const deadline = Date.now() + 60_000;
    while (latencies.length < total && Date.now() < deadline) await Bun.sleep(20);
    const s = summarize(latencies);
    const memory = relay.memory();
    console.log(`\n### Change → webhook latency (${RATE} changes/s for ${SECONDS} s, sequin format, NOTIFY wake-up)\n`);
    console.log(markdownTable(["delivered", "p50 ms", "p90 ms", "p99 ms", "max ms", "relay RSS MiB"], [
      [`${latencies.length}/${total}`, fixed(s.p50), fixed(s.p90), fixed(s.p99), fixed(s.max), fixed(memory.rssMiB)],
    ]));
  } finally {
    await relay.stop();
    receiver.stop();
    await sql.end();
    await db.drop();
  }
}

console.log(await describeMachine());
await writeOverhead();
await changeLatency();
