// pg-tide command-line entry: parse the command word, dispatch, turn errors into exit codes.

import { parseFlags } from "./cli/args.ts";
import { COMMANDS, MAIN_HELP } from "./cli/commands.ts";
import { relayFallback } from "./cli/manifest_flags.ts";
import { RUN_FLAGS } from "./cli/run.ts";
import { TideError, toError } from "./core/errors.ts";
import { createLogger } from "./core/log.ts";
import { loadManifest } from "./core/manifest.ts";
import { redactText } from "./core/redact.ts";
import { argv, exit, writeStderr, writeStdout } from "./core/runtime.ts";

async function main(args: string[]): Promise<number> {
  const [word, ...rest] = args;
  if (word === undefined || word === "help" || word === "--help" || word === "-h") {
    writeStdout(MAIN_HELP);
    return 0;
  }
  if (word === "--version" || word === "-V") return await COMMANDS.version.run([]);
  // Flags first means `run`, as in `pg-tide --postgres-url ...`.
  const command = word.startsWith("-") ? COMMANDS.run : COMMANDS[word];
  if (command === undefined) {
    writeStderr(`pg-tide: unknown command "${word}"\n\n${MAIN_HELP}`);
    return 2;
  }
  return await command.run(word.startsWith("-") ? args : rest);
}

/**
 * The log format `pg-tide run` was asked for (flag, environment or manifest), so that a relay
 * logging JSON also reports the error that ends it as a JSON line. "text" for other commands, and
 * when the flags or the manifest are themselves what failed.
 */
async function runLogFormat(args: string[]): Promise<string> {
  const [word, ...rest] = args;
  if (word !== "run" && !word?.startsWith("-")) return "text";
  const runArgs = word === "run" ? rest : args;
  try {
    const { config } = parseFlags("run", RUN_FLAGS, runArgs);
    const manifest = config ? await loadManifest(config) : undefined;
    return parseFlags("run", RUN_FLAGS, runArgs, relayFallback(manifest))["log-format"] ?? "text";
  } catch {
    return "text";
  }
}

try {
  exit(await main(argv()));
} catch (error) {
  const err = toError(error);
  const code = err instanceof TideError && err.code === "config" ? 2 : 1;
  if ((await runLogFormat(argv())) === "json") {
    // The logger masks secrets in the message and the fields.
    createLogger({ format: "json", level: "error" }).error(`pg-tide: ${err.message}`, { error: err, exit_code: code });
  } else {
    writeStderr(`pg-tide: ${redactText(err.message)}\n`);
  }
  exit(code);
}
