// Sink "stdout": one JSON line per message on standard output. For trying tide out and for piping
// into other tools (`pg-tide run | jq`). Also owns the JSONL line shape that the file sink reuses.

import process from "node:process";
import { z } from "zod";
import type { OutboxMessage, SinkDefinition } from "../../core/plugin.ts";
import { messageOf, payloadBody, withPayload } from "../shared.ts";

export type LineFormat = "json" | "payload";

export const lineFormatSchema = z.enum(["json", "payload"]).default("json");

const configSchema = z.strictObject({
  /** json: the message with its metadata; payload: the payload alone. */
  format: lineFormatSchema,
});

export type StdoutConfig = z.output<typeof configSchema>;

/** Receives a batch's lines (newline-terminated); resolves once they were handed over. */
export type LineWriter = (text: string) => void | Promise<void>;

export interface StdoutSinkOptions {
  /** Defaults to process.stdout; tests inject their own. */
  write?: LineWriter;
}

/** Builds the stdout sink definition around a writer. */
export function defineStdoutSink(options: StdoutSinkOptions = {}): SinkDefinition<StdoutConfig> {
  const write = options.write ?? writeStdout;
  return {
    type: "stdout",
    kind: "sink",
    growBatches: true,
    summary: "Writes each message as one JSON line to standard output",
    config: configSchema,
    example: { format: "json" },
    create(config, ctx) {
      return {
        async connect() {},
        async publish(batch) {
          if (batch.length === 0) return [];
          const text = batch.map((message) => formatLine(message, config.format)).join("");
          try {
            await write(text);
          } catch (error) {
            throw ctx.errors.transient(`stdout sink "${ctx.pipeline}": write failed: ${messageOf(error)}`, error);
          }
          return [];
        },
        async close() {},
      };
    },
  };
}

const stdoutSink = defineStdoutSink();
export default stdoutSink;

/**
 * One JSONL line, newline included.
 * json: `{"id","outbox","topic","event_type","op","dedup_key","headers","payload"}`; the id is a
 * string because a bigint outbox id does not fit every consumer's number type.
 * payload: the payload alone.
 */
export function formatLine(message: OutboxMessage, format: LineFormat): string {
  if (format === "payload") return `${payloadBody(message)}\n`;
  const fields = {
    id: message.id.toString(),
    outbox: message.outbox,
    topic: message.topic,
    event_type: message.eventType,
    op: message.op,
    dedup_key: message.dedupKey,
    headers: message.headers,
  };
  return `${withPayload(fields, message)}\n`;
}

// Resolves on the write callback, so a slow reader of the pipe slows the pipeline instead of
// piling the batch up in memory.
function writeStdout(text: string): Promise<void> {
  return new Promise((resolve, reject) => {
    process.stdout.write(text, (error) => (error ? reject(error) : resolve()));
  });
}
