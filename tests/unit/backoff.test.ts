// Retry delays: doubling from the initial delay, capped, jittered within [ceiling/2, ceiling].

import { describe, expect, it } from "bun:test";
import { backoffDelay, sleep, TIMED_OUT, Wakeup, within } from "../../core/engine/backoff.ts";

const policy = { initialMs: 100, maxMs: 1_000 };
const samples = (attempt: number) => Array.from({ length: 500 }, () => backoffDelay(attempt, policy));

describe("backoffDelay", () => {
  it("doubles the ceiling with each attempt and stays within [ceiling/2, ceiling]", () => {
    for (const [attempt, ceiling] of [[1, 100], [2, 200], [3, 400], [4, 800]]) {
      const delays = samples(attempt);
      expect(Math.min(...delays)).toBeGreaterThanOrEqual(ceiling / 2);
      expect(Math.max(...delays)).toBeLessThanOrEqual(ceiling);
    }
  });

  it("never exceeds the cap, however many attempts", () => {
    for (const attempt of [5, 10, 60, 1_000]) {
      const delays = samples(attempt);
      expect(Math.max(...delays)).toBeLessThanOrEqual(1_000);
      expect(Math.min(...delays)).toBeGreaterThanOrEqual(500);
    }
  });

  it("is jittered: retries of many relays do not line up", () => {
    expect(new Set(samples(3)).size).toBeGreaterThan(50);
  });
});

describe("sleep and Wakeup", () => {
  it("an aborted signal ends a sleep without throwing", async () => {
    const controller = new AbortController();
    const slept = sleep(60_000, controller.signal);
    controller.abort();
    await slept;
  });

  it("a wake-up set before the wait ends it at once", async () => {
    const wakeup = new Wakeup();
    wakeup.set();
    await wakeup.wait(60_000);
    const later = wakeup.wait(60_000);
    wakeup.set();
    await later;
  });
});

describe("within", () => {
  it("gives the value of a promise that settles in time, and TIMED_OUT for one that does not", async () => {
    expect(await within(Promise.resolve(7), 1_000)).toBe(7);
    expect(await within(new Promise(() => {}), 10)).toBe(TIMED_OUT);
  });

  it("passes a rejection on", async () => {
    await expect(within(Promise.reject(new Error("broken")), 1_000)).rejects.toThrow("broken");
  });
});
