// Small pieces of the fencing work: TIDE_FAILPOINTS parsing (a typo must stop the relay, not make a
// fault test pass vacuously), the circuit state shown while a pipeline waits out its cooldown, and
// the engine keys a reverse pipeline refuses.

import { describe, expect, it } from "bun:test";
import { createLogger } from "../../core/log.ts";
import { FAILPOINTS, parseFailpoints } from "../../core/engine/failpoints.ts";
import { CIRCUIT_THRESHOLD, WorkerStatus } from "../../core/engine/worker_status.ts";
import { preparePipeline } from "../../core/config/pipeline_config.ts";
import { PluginRegistry } from "../../core/plugins.ts";
import { builtinPlugins } from "../../plugins/registry.ts";

describe("TIDE_FAILPOINTS", () => {
  it("reads every action, with and without @N", () => {
    const points = parseFailpoints("forward.after-publish=crash, forward.before-commit@3=pause=250,coordinator.reacquiring=error");
    expect(points.get("forward.after-publish")).toMatchObject({ action: { kind: "crash" }, at: undefined });
    expect(points.get("forward.before-commit")).toMatchObject({ action: { kind: "pause", ms: 250 }, at: 3 });
    expect(points.get("coordinator.reacquiring")).toMatchObject({ action: { kind: "error" } });
    expect(parseFailpoints(undefined).size).toBe(0);
    expect(parseFailpoints("").size).toBe(0);
  });

  it("refuses an unknown name or a malformed entry, naming it", () => {
    expect(() => parseFailpoints("forward.after-pubish=crash")).toThrow(/unknown failpoint "forward.after-pubish"/);
    expect(() => parseFailpoints("forward.after-publish=explode")).toThrow(/cannot read "forward.after-publish=explode"/);
    expect(() => parseFailpoints("forward.after-publish=pause")).toThrow(/expected name\[@N\]=crash\|error\|pause=<ms>/);
  });

  it("has a point at every stage the issue names", () => {
    expect([...FAILPOINTS].sort()).toEqual([
      "coordinator.holding-locks", "coordinator.reacquiring", "forward.after-commit", "forward.after-partial-publish",
      "forward.after-publish", "forward.after-read", "forward.before-commit", "kafka.before-commit", "reverse.after-inbox-commit",
      "wal.after-outbox-commit", "wal.before-outbox-commit",
    ]);
  });
});

describe("circuit state", () => {
  const quiet = createLogger({ level: "error", format: "json", write: () => {} });

  it("shows open for the whole cooldown and half-open only once the probe is due", () => {
    const status = new WorkerStatus("p", "forward", quiet);
    for (let i = 0; i < CIRCUIT_THRESHOLD; i++) status.fail(new Error("down"), "delivery failed");
    expect(status.circuit).toBe("open");
    // An open circuit probes at least every 5 s, however long the backoff may grow: delivery resumes
    // within seconds once the target is back.
    expect(status.retryDelay({ initialMs: 10, maxMs: 60_000 })).toBe(5_000);
    expect(status.retryDelay({ initialMs: 10, maxMs: 2_000 })).toBe(2_000);
    expect(status.circuit).toBe("open"); // waiting out the cooldown: still open
    status.retryDelay({ initialMs: 10, maxMs: 0 }); // a cooldown that is already over
    expect(status.circuit).toBe("half-open");
    status.fail(new Error("still down"), "delivery failed");
    expect(status.circuit).toBe("open");
    status.succeed();
    expect(status.circuit).toBe("closed");
  });
});

describe("engine keys of a reverse pipeline", () => {
  const registry = new PluginRegistry(builtinPlugins);
  const reverse = (config: Record<string, unknown>) =>
    preparePipeline({ name: "in", direction: "reverse", plugin_type: "webhook", config: { path: "/in", allow_unsigned: true, ...config } }, registry);

  it("refuses retry.max_attempts, which only forward pipelines have", async () => {
    await expect(reverse({ retry: { max_attempts: 3 } })).rejects.toThrow(/'retry.max_attempts' applies to forward pipelines only/);
    await reverse({ retry: { initial_backoff_ms: 50, max_backoff_ms: 500 } });
  });

  it("refuses a poll_interval_ms of 0 or below", async () => {
    const forward = (poll: unknown) =>
      preparePipeline({ name: "out", direction: "forward", plugin_type: "stdout", config: { poll_interval_ms: poll } }, registry);
    await expect(forward(0)).rejects.toThrow(/'poll_interval_ms' must be a whole number of milliseconds, at least 1 \(got 0\)/);
    await expect(forward(-5)).rejects.toThrow(/got -5/);
    await forward(100);
  });
});
