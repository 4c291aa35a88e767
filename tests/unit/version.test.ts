// The version the binary reports is the package's version (and the extension's default_version).

import { describe, expect, it } from "bun:test";
import pkg from "../../package.json" with { type: "json" };
import { extensionFiles } from "../../core/schema.ts";
import { VERSION } from "../../core/version.ts";

describe("version", () => {
  it("matches package.json and the extension files", () => {
    expect(VERSION).toBe(pkg.version);
    const files = extensionFiles();
    expect(files.control.text).toContain(`default_version = '${VERSION}'`);
    expect(files.script.name).toBe(`pg_tide--${VERSION}.sql`);
  });
});
