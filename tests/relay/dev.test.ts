// `pg-tide dev` as a user meets it in a terminal: it works when the status page's default port is
// taken, and Ctrl-C (SIGINT to the whole process group) stops the relay, then PostgreSQL, cleanly.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { join } from "node:path";
import { collectLines, waitFor } from "../support/relay.ts";

const ROOT = join(import.meta.dir, "..", "..");
let occupier: ReturnType<typeof Bun.serve> | undefined;

beforeAll(() => {
  try {
    occupier = Bun.serve({ hostname: "127.0.0.1", port: 9090, fetch: () => new Response("someone else") });
  } catch {
    // Something else holds 127.0.0.1:9090 already, which is what this test needs.
  }
});
afterAll(() => occupier?.stop(true));

describe("pg-tide dev", () => {
  it("serves the status page on a free port when 9090 is taken, and stops cleanly on Ctrl-C", async () => {
    // Its own process group, signalled as a whole like a terminal's foreground job.
    const dev = Bun.spawn([process.execPath, "main.ts", "dev", "--publish-every", "0"], {
      cwd: ROOT,
      stdout: "pipe",
      stderr: "pipe",
      detached: true,
    });
    const stdout = collectLines(dev.stdout);
    const stderr = collectLines(dev.stderr);
    try {
      const exitedEarly = dev.exited.then((code) => {
        throw new Error(`pg-tide dev exited with ${code}:\n${stderr.lines.join("\n")}`);
      });
      const delivered = await Promise.race([
        waitFor("the demo events to be printed", () => {
          const events = stdout.lines.filter((line) => line.startsWith("{")).map((line) => JSON.parse(line));
          return events.length >= 3 && events;
        }, 60_000),
        exitedEarly,
      ]);
      expect(delivered.map((event) => event.payload.order_id)).toEqual([1, 2, 3]);
      const status = stdout.lines.find((line) => line.startsWith("Status page: "))!;
      expect(status).toContain("127.0.0.1:9090 is taken");
      const port = Number(/http:\/\/127\.0\.0\.1:(\d+)\//.exec(status)![1]);
      expect(port).not.toBe(9090);
      expect((await fetch(`http://127.0.0.1:${port}/livez`)).status).toBe(200);

      process.kill(-dev.pid, "SIGINT");
      expect(await dev.exited).toBe(0);
      await Promise.all([stdout.done, stderr.done]);
      expect(stderr.lines.filter((line) => / (WARN|ERROR) /.test(line))).toEqual([]);
      expect(stderr.lines.at(-1)).toContain("relay stopped");
    } finally {
      if (dev.exitCode === null) process.kill(-dev.pid, "SIGKILL");
    }
  }, 120_000);
});
