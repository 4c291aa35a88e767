// Loaded before every test file (bunfig.toml): stops the embedded PostgreSQL when the run ends.
import { afterAll } from "bun:test";
import { stopServer } from "./postgres.ts";

afterAll(async () => {
  await stopServer();
});
