// pg-tide command-line entry: parse the command word, dispatch, turn errors into exit codes.

import { COMMANDS, MAIN_HELP } from "./cli/commands.ts";
import { exitCodeOf, toError } from "./core/errors.ts";
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

try {
  exit(await main(argv()));
} catch (error) {
  const err = toError(error);
  // A message that already names the command ("pg-tide install: ...") is not prefixed again.
  const text = redactText(err.message);
  writeStderr(`${text.startsWith("pg-tide ") ? "" : "pg-tide: "}${text}\n`);
  exit(exitCodeOf(err));
}
