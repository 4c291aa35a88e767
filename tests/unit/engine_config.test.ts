// The engine's keys of a pipeline config are checked once, where the pipeline enters, into a typed
// object: a key the engine has no use for, or a value of the wrong kind, is refused with the
// pipeline, the key, what is allowed and the value seen.

import { describe, expect, it } from "bun:test";
import { preparePipeline } from "../../core/config/pipeline_config.ts";
import { PluginRegistry } from "../../core/plugins.ts";
import { builtinPlugins } from "../../plugins/registry.ts";

const registry = new PluginRegistry(builtinPlugins);
const forward = (config: Record<string, unknown>) =>
  preparePipeline({ name: "out", direction: "forward", plugin_type: "stdout", config }, registry);
const reverse = (config: Record<string, unknown>) =>
  preparePipeline({ name: "in", direction: "reverse", plugin_type: "webhook", config: { path: "/in", allow_unsigned: true, ...config } }, registry);

describe("engine config", () => {
  it("refuses visibility_timeout_ms, which means nothing to a relay pipeline, and says what to use", async () => {
    for (const prepare of [forward, reverse]) {
      const refused = prepare({ visibility_timeout_ms: 30_000 });
      await expect(refused).rejects.toThrow(/pipeline "(out|in)": 'visibility_timeout_ms' has no meaning for a relay pipeline/);
      await expect(refused).rejects.toThrow(/--ownership-lease-ms/);
    }
  });

  it("refuses a retry value of the wrong kind, naming the key and the value seen", async () => {
    await expect(forward({ retry: { max_attempts: "x" } })).rejects.toThrow(
      `pipeline "out": 'retry.max_attempts' must be a whole number of 0 or more (got "x")`,
    );
    await expect(forward({ retry: { max_attemps: 3 } })).rejects.toThrow(
      `pipeline "out": 'retry.max_attemps': unknown key (known: initial_backoff_ms, max_backoff_ms, max_attempts)`,
    );
    await expect(forward({ retry: [] })).rejects.toThrow(`pipeline "out": 'retry' must be an object (got [])`);
  });

  it("refuses an unknown on_failure, naming the choices", async () => {
    await expect(forward({ on_failure: "explode" })).rejects.toThrow(`pipeline "out": 'on_failure' must be "dlq" or "pause" (got "explode")`);
  });

  it("names every bad key at once", async () => {
    const refused = forward({ on_failure: "explode", poll_interval_ms: "soon", isolate_poison: "yes" });
    await expect(refused).rejects.toThrow(`'on_failure' must be "dlq" or "pause" (got "explode")`);
    await expect(refused).rejects.toThrow(`'poll_interval_ms' must be a whole number of milliseconds, at least 1 (got "soon")`);
    await expect(refused).rejects.toThrow(`'isolate_poison' must be true or false (got "yes")`);
  });

  it("refuses the keys of the other direction", async () => {
    await expect(forward({ event_id: "{payload.id}" })).rejects.toThrow(`pipeline "out": 'event_id' applies to reverse pipelines only`);
    await expect(reverse({ wire_format: "envelope" })).rejects.toThrow(`pipeline "in": 'wire_format' applies to forward pipelines only`);
    await expect(reverse({ isolate_poison: true })).rejects.toThrow(`pipeline "in": 'isolate_poison' applies to forward pipelines only`);
  });

  it("gives the workers typed settings, with the defaults filled in", async () => {
    expect((await forward({})).engine).toMatchObject({
      direction: "forward",
      retry: { initialMs: 200, maxMs: 30_000, maxAttempts: 0 },
      onFailure: "dlq",
      isolatePoison: false,
      lanes: { lanes: 1, key: { text: "headers.key" } },
    });
    const tuned = await forward({
      retry: { initial_backoff_ms: 10, max_backoff_ms: 100, max_attempts: 3 }, on_failure: "pause", poll_interval_ms: 50, max_batch_size: 500,
    });
    expect(tuned.engine).toMatchObject({
      retry: { initialMs: 10, maxMs: 100, maxAttempts: 3 }, onFailure: "pause", pollIntervalMs: 50, maxBatchSize: 500,
    });
    // A reverse pipeline backs off by its retry keys between failed reads and inbox writes.
    expect((await reverse({ retry: { initial_backoff_ms: 50, max_backoff_ms: 500 } })).engine)
      .toEqual({ direction: "reverse", retry: { initialMs: 50, maxMs: 500 } });
  });
});
