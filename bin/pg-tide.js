#!/usr/bin/env node
// npm's entry for `npx pg-tide` in a source checkout: runs main.ts on the Bun that npm installed.
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
let bun;
try {
  bun = join(dirname(require.resolve("bun/package.json")), "bin", "bun.exe") // the bun package names its binary bun.exe on every platform;
} catch {
  bun = "bun";
}
const result = spawnSync(bun, [join(root, "main.ts"), ...process.argv.slice(2)], { stdio: "inherit" });
process.exit(result.status ?? 1);
