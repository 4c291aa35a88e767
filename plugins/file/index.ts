// Sink "file": appends one JSON line per message to a file, durable before it acknowledges.
// The file is opened per batch, so a log rotation that moves the file away is picked up at once.

import { Buffer } from "node:buffer";
import { mkdir, open } from "node:fs/promises";
import { dirname } from "node:path";
import { z } from "zod";
import type { SinkDefinition } from "../../core/plugin.ts";
import { formatLine, lineFormatSchema } from "../stdout/index.ts";
import { messageOf } from "../shared.ts";

const configSchema = z.strictObject({
  path: z.string().min(1),
  format: lineFormatSchema,
  /** Flush to disk before acknowledging; off trades durability for speed. */
  fsync: z.boolean().default(true),
});

export type FileConfig = z.output<typeof configSchema>;

const fileSink: SinkDefinition<FileConfig> = {
  type: "file",
  kind: "sink",
  growBatches: true,
  summary: "Appends each message as one JSON line to a file (JSONL)",
  config: configSchema,
  example: { path: "./outbox.jsonl", format: "json", fsync: true },
  create(config, ctx) {
    const where = `file sink "${ctx.pipeline}"`;
    return {
      async connect() {
        try {
          await mkdir(dirname(config.path), { recursive: true });
          await dropTornLine(config.path);
        } catch (error) {
          throw ctx.errors.transient(`${where}: cannot create the directory of ${config.path}: ${messageOf(error)}`, error);
        }
      },
      async publish(batch) {
        if (batch.length === 0) return [];
        const text = batch.map((message) => formatLine(message, config.format)).join("");
        try {
          await appendDurably(config.path, text, config.fsync);
        } catch (error) {
          throw ctx.errors.transient(`${where}: cannot append to ${config.path}: ${messageOf(error)}`, error);
        }
        return [];
      },
      async close() {},
    };
  },
};

export default fileSink;

// "a" opens with O_APPEND, so writes land at the end even when another process appends too;
// writeFile loops until every byte is written.
async function appendDurably(path: string, text: string, fsync: boolean): Promise<void> {
  const handle = await open(path, "a");
  try {
    await handle.writeFile(text);
    if (fsync) await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * A relay killed in the middle of a write can leave half a line. That batch was never acknowledged
 * and will be written again, so the fragment is cut off rather than glued to the next line.
 */
async function dropTornLine(path: string): Promise<void> {
  let handle;
  try {
    handle = await open(path, "r+");
  } catch {
    return; // no file yet
  }
  try {
    const { size } = await handle.stat();
    if (size === 0) return;
    const tail = Buffer.alloc(Math.min(size, 64 * 1024));
    let end = size;
    for (;;) {
      const start = Math.max(0, end - tail.length);
      const { bytesRead } = await handle.read(tail, 0, end - start, start);
      if (end === size && tail[bytesRead - 1] === 0x0a) return; // ends cleanly
      const newline = tail.subarray(0, bytesRead).lastIndexOf(0x0a);
      if (newline >= 0) return await handle.truncate(start + newline + 1);
      if (start === 0) return await handle.truncate(0);
      end = start;
    }
  } finally {
    await handle.close();
  }
}
