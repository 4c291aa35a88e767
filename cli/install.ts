// `pg-tide install`: applies the schema to a database, or writes the CREATE EXTENSION files.

import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { connect, verifyConnection } from "../core/db.ts";
import { extensionFiles, installSchema } from "../core/schema.ts";
import { writeStdout } from "../core/runtime.ts";
import { ConfigError } from "../core/errors.ts";
import { formatHelp, HELP_FLAG, parseFlags, POSTGRES_URL_FLAG } from "./args.ts";

const FLAGS = {
  "postgres-url": POSTGRES_URL_FLAG,
  "extension-dir": {
    type: "string",
    placeholder: "DIR",
    help: "write pg_tide.control and pg_tide--<version>.sql into DIR instead of installing; " +
      "use $(pg_config --sharedir)/extension, then run CREATE EXTENSION pg_tide;",
  },
  help: HELP_FLAG,
} as const;

export const INSTALL_HELP = formatHelp(
  "pg-tide install --postgres-url URL | --extension-dir DIR",
  "Installs or upgrades the tide schema. Safe to run again and from several relays at once: only\n" +
    "missing migrations are applied, under a lock. A database whose schema is newer than this\n" +
    "pg-tide is refused. With --extension-dir, writes the files for CREATE EXTENSION pg_tide instead;\n" +
    "both paths produce the same schema.",
  FLAGS,
);

export async function installCommand(args: string[]): Promise<number> {
  const flags = parseFlags("install", FLAGS, args);
  if (flags.help) {
    writeStdout(INSTALL_HELP);
    return 0;
  }
  const dir = flags["extension-dir"];
  const urlGiven = args.some((arg) => arg === "--postgres-url" || arg.startsWith("--postgres-url="));
  if (dir && urlGiven) {
    throw new ConfigError(
      "pg-tide install: give either --postgres-url (install into that database) or --extension-dir " +
        "(write the CREATE EXTENSION files), not both",
    );
  }
  if (dir) {
    const files = extensionFiles();
    await mkdir(dir, { recursive: true });
    for (const file of [files.control, files.script]) {
      await writeFile(join(dir, file.name), file.text);
      writeStdout(`wrote ${join(dir, file.name)}\n`);
    }
    writeStdout("now run: CREATE EXTENSION pg_tide;\n");
    return 0;
  }
  const url = flags["postgres-url"];
  if (!url) {
    throw new ConfigError(
      "pg-tide install: say where the schema goes: --postgres-url URL (or PG_TIDE_POSTGRES_URL) installs it into " +
        "that database; --extension-dir DIR writes the files for CREATE EXTENSION pg_tide instead",
    );
  }
  const sql = connect(url, { max: 1, applicationName: "pg-tide install" });
  try {
    await verifyConnection(sql, url);
    const result = await installSchema(sql);
    writeStdout(
      result.applied.length === 0
        ? `tide schema is up to date (version ${result.version})\n`
        : `tide schema installed: applied migration${result.applied.length > 1 ? "s" : ""} ${result.applied.join(", ")} (now version ${result.version})\n`,
    );
    return 0;
  } finally {
    await sql.end({ timeout: 5 });
  }
}
