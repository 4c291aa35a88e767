// During a Kafka outage kafkajs logs the same warning on every internal retry; the relay lets each
// line through once a minute, saying how often it came meanwhile (plugins/kafka/connection.ts).

import { describe, expect, it } from "bun:test";
import { RepeatedLines } from "../../plugins/kafka/connection.ts";

describe("repeated kafkajs warnings", () => {
  it("lets a line through once per window, then again with the count of what was held back", () => {
    let now = 0;
    const lines = new RepeatedLines(60_000, () => now);
    const line = (port: number, attempt: number) =>
      `kafkajs BrokerPool: Failed to connect to seed broker 127.0.0.1:${port}, attempt ${attempt}`;
    expect(lines.note(line(9092, 1))).toBe(0);
    for (let attempt = 2; attempt <= 50; attempt++) {
      now += 100;
      expect(lines.note(line(9092, attempt))).toBeUndefined();
    }
    // Another line is its own: it goes out at once.
    expect(lines.note("kafkajs Producer: Failed to send messages")).toBe(0);
    now = 60_000;
    expect(lines.note(line(9092, 51))).toBe(49);
    expect(lines.note(line(9092, 52))).toBeUndefined();
  });
});
