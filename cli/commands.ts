// The command table: each command's entry point and one line of help.

import { installCommand } from "./install.ts";
import { runCommand } from "./run.ts";
import { devCommand } from "./dev.ts";
import { statusCommand } from "./status.ts";
import { checkCommand } from "./check.ts";
import { pluginsCommand } from "./plugins.ts";
import { applyCommand } from "./apply.ts";
import { dlqCommand } from "./dlq.ts";
import { traceCommand } from "./trace.ts";
import { VERSION } from "../core/version.ts";
import { runtimeName, writeStdout } from "../core/runtime.ts";

export interface Command {
  summary: string;
  run(args: string[]): Promise<number>;
}

export const COMMANDS: Record<string, Command> = {
  run: { summary: "run the relay (the default when the first argument is a flag)", run: runCommand },
  dev: { summary: "try tide: embedded PostgreSQL 18, a demo pipeline, the relay delivering", run: devCommand },
  install: { summary: "install or upgrade the tide schema (or write CREATE EXTENSION files)", run: installCommand },
  check: { summary: "validate a manifest and every pipeline config without touching sinks", run: checkCommand },
  plugins: { summary: "list sink and source types with example configs", run: pluginsCommand },
  status: { summary: "show pipelines, owners, health, lag and DLQ depth", run: statusCommand },
  apply: { summary: "write a manifest's pipelines into the catalog; --wait until the relays run them", run: applyCommand },
  dlq: { summary: "list, replay or discard dead letters", run: dlqCommand },
  trace: { summary: "where is my event? an outbox message or inbox event, per consumer group", run: traceCommand },
  version: {
    summary: "print the version",
    run: async (args) => {
      if (args.includes("--help") || args.includes("-h")) {
        writeStdout("Usage: pg-tide version\n\nPrints the version of pg-tide and the runtime it runs on (bun or deno).\n");
        return 0;
      }
      writeStdout(`pg-tide ${VERSION} (${runtimeName})\n`);
      return 0;
    },
  },
};

export const MAIN_HELP = `pg-tide ${VERSION}: a PostgreSQL transactional outbox / inbox relay

Usage: pg-tide <command> [options]      (pg-tide <command> --help for its options)

Commands:
${Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(10)}${c.summary}`).join("\n")}

Run without a command word (pg-tide --postgres-url URL) to start the relay.
`;
