// A relay that delivers to Kafka with --log-format json writes nothing but JSON lines: kafkajs
// schedules its throttle check with a negative delay when it is not throttled, and Bun prints a
// TimeoutNegativeWarning for that unless the relay clamps the delay (core/timers.ts).

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { collectLines, spawnRelay, waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

const up = await requireService("kafka", "127.0.0.1", 9092);

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(() => db?.drop());

describe.skipIf(!up)("a kafka sink with --log-format json", () => {
  it("prints only JSON lines on stdout and stderr while it delivers", async () => {
    const name = `json-logs-${Date.now()}`;
    await db.sql`SELECT tide.outbox_create(${name})`;
    await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'kafka', ${db.sql.json({ brokers: "127.0.0.1:9092", topic: name })})`;
    for (let i = 0; i < 20; i++) await db.sql`SELECT tide.outbox_publish(${name}, ${db.sql.json({ i })})`;
    const relay = spawnRelay(db.url, ["--log-format", "json"]);
    const stderr = collectLines(relay.stderr);
    const stdout = collectLines(relay.stdout);
    try {
      await waitFor("delivery to Kafka", async () =>
        (await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${name}`)[0]?.lag === 0n);
      // A second batch after the producer has been idle: its requests go through the throttle check.
      for (let i = 20; i < 40; i++) await db.sql`SELECT tide.outbox_publish(${name}, ${db.sql.json({ i })})`;
      await waitFor("the second batch", async () =>
        (await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${name}`)[0]?.lag === 0n);
    } finally {
      relay.kill("SIGTERM");
      await relay.exited;
    }
    await Promise.all([stderr.done, stdout.done]);
    const lines = [...stderr.lines, ...stdout.lines].filter((line) => line !== "");
    expect(lines.length).toBeGreaterThan(0);
    const notJson = lines.filter((line) => {
      try {
        return typeof JSON.parse(line) !== "object";
      } catch {
        return true;
      }
    });
    expect(notJson).toEqual([]);
  }, 60_000);
});
