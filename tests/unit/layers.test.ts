// The layers of docs/architecture.md, checked on the source: core/ imports nothing from cli/ or
// plugins/ (the CLI hands the built-in plugins to the loader), and plugins reach into core/ only
// through the plugin contract, core/plugin.ts, like a drop-in.

import { describe, expect, it } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const ROOT = resolve(import.meta.dir, "..", "..");
const IMPORT = /(?:from|import)\s*\(?\s*["'](\.{1,2}\/[^"']+)["']/g;

function sources(dir: string): string[] {
  return readdirSync(join(ROOT, dir), { recursive: true, encoding: "utf8" })
    .filter((file) => /\.(ts|js|mjs)$/.test(file) && !file.endsWith(".d.ts"))
    .map((file) => join(dir, file));
}

/** Every relative import of the files under `dir`, as "file → imported file" (paths from the root). */
function imports(dir: string): { from: string; to: string }[] {
  return sources(dir).flatMap((file) => {
    const text = readFileSync(join(ROOT, file), "utf8");
    return [...text.matchAll(IMPORT)].map((m) => ({ from: file, to: relative(ROOT, resolve(ROOT, dirname(file), m[1]!)) }));
  });
}

describe("layers", () => {
  it("core imports nothing from cli/ or plugins/", () => {
    const crossing = imports("core").filter(({ to }) => to.startsWith("cli/") || to.startsWith("plugins/"));
    expect(crossing.map(({ from, to }) => `${from} → ${to}`)).toEqual([]);
  });

  it("plugins use core only through the plugin contract", () => {
    const crossing = imports("plugins").filter(({ to }) => to.startsWith("core/") && to !== "core/plugin.ts");
    expect(crossing.map(({ from, to }) => `${from} → ${to}`)).toEqual([]);
  });
});
