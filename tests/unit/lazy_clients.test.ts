// Broker client libraries load when a pipeline that uses one first connects, not with the relay:
// a relay without Kafka, RabbitMQ, Redis or MQTT pipelines does not hold them (~7 MiB resident).

import { describe, expect, it } from "bun:test";
import { CompressionTypes } from "kafkajs";
import { join } from "node:path";
import { COMPRESSION_TYPES } from "../../plugins/kafka/codecs.ts";

describe("broker client libraries", () => {
  it("are not loaded with the relay and its built-in plugins", async () => {
    const child = Bun.spawn([process.execPath, join(import.meta.dir, "../fixtures/loaded_clients.ts")], { stdout: "pipe", stderr: "pipe" });
    const [out, err, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
    expect(err).toBe("");
    expect(code).toBe(0);
    expect(JSON.parse(out)).toEqual([]);
  });

  it("Kafka's compression numbers, written out so kafkajs need not load, are kafkajs's", () => {
    expect(COMPRESSION_TYPES).toEqual({
      none: CompressionTypes.None,
      gzip: CompressionTypes.GZIP,
      snappy: CompressionTypes.Snappy,
      lz4: CompressionTypes.LZ4,
      zstd: CompressionTypes.ZSTD,
    });
  });
});
