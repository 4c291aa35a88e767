#!/usr/bin/env node
// npm's entry for `npx pg-tide` in a source checkout: runs main.ts on the Bun that npm installed.
// The relay is a child process, so this shim forwards the signals that stop or reload it and exits
// as the child did: a supervisor's SIGTERM drains the relay instead of orphaning it.
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { constants } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const FORWARDED_SIGNALS = ["SIGTERM", "SIGINT", "SIGHUP"];

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
let bun;
try {
  // The bun package names its binary bun.exe on every platform.
  bun = join(dirname(require.resolve("bun/package.json")), "bin", "bun.exe");
} catch {
  bun = "bun";
}
const child = spawn(bun, [join(root, "main.ts"), ...process.argv.slice(2)], { stdio: "inherit" });
for (const signal of FORWARDED_SIGNALS) {
  // A terminal's Ctrl-C reaches both processes; the child decides what it means, this one waits.
  process.on(signal, () => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
  });
}
child.on("error", (error) => {
  process.stderr.write(`pg-tide: cannot start ${bun}: ${error.message}\n`);
  process.exit(1);
});
child.on("exit", (code, signal) => {
  if (signal === null) process.exit(code ?? 1);
  // Die of the same signal, so that the caller sees what the child saw.
  for (const forwarded of FORWARDED_SIGNALS) process.removeAllListeners(forwarded);
  process.kill(process.pid, signal);
  // Signals this process cannot die of (node handles a few itself): the shell's convention.
  process.exit(128 + (constants.signals[signal] ?? 0));
});
