// Headless Chromium driven over the DevTools protocol, for tests that click through the console:
// open a page, read the DOM, click a button and wait for the page it leads to. Every request the page
// makes carries the headers the test sets (the relay's HTTP token).

import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { waitFor } from "./relay.ts";

export const CHROMIUM = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find((path) => existsSync(path));

export interface Browser {
  /** Loads a URL and resolves once it has loaded. */
  open(url: string): Promise<void>;
  /** Evaluates an expression in the page and returns its (JSON) value. */
  evaluate<T = unknown>(expression: string): Promise<T>;
  /** Clicks the element `selector` finds (a form's button) and resolves once the next page has loaded. */
  clickAndWait(selector: string): Promise<void>;
  /** Sends these headers with every request from now on. */
  setHeaders(headers: Record<string, string>): Promise<void>;
  close(): Promise<void>;
}

export async function launchBrowser(): Promise<Browser> {
  if (!CHROMIUM) throw new Error("chromium is not installed");
  const profile = await mkdtemp(join(tmpdir(), "tide-chromium-"));
  const child = Bun.spawn(
    [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--remote-debugging-port=0",
      `--user-data-dir=${profile}`, "about:blank"],
    { stdout: "ignore", stderr: "pipe" },
  );
  // Chromium prints "DevTools listening on ws://..." once it accepts connections.
  const reader = child.stderr.getReader();
  let text = "";
  const endpoint = await waitFor("Chromium's DevTools endpoint", async () => {
    const { value, done } = await reader.read();
    if (done) throw new Error(`chromium exited: ${text}`);
    text += new TextDecoder().decode(value);
    return /DevTools listening on (ws:\/\/\S+)/.exec(text)?.[1];
  }, 30_000);
  reader.releaseLock();
  void child.stderr.pipeTo(new WritableStream()).catch(() => {});
  const port = new URL(endpoint).port;
  const targets = await waitFor("a page target", async () => {
    const list = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json() as { type: string; webSocketDebuggerUrl: string }[];
    return list.find((t) => t.type === "page");
  });

  const socket = new WebSocket(targets.webSocketDebuggerUrl);
  await new Promise<void>((resolve, reject) => {
    socket.onopen = () => resolve();
    socket.onerror = () => reject(new Error("cannot connect to Chromium's DevTools"));
  });
  let nextId = 1;
  const pending = new Map<number, { resolve(v: any): void; reject(e: Error): void }>();
  const listeners = new Set<(method: string, params: any) => void>();
  socket.onmessage = (event) => {
    const message = JSON.parse(String(event.data));
    if (message.id !== undefined) {
      const call = pending.get(message.id);
      pending.delete(message.id);
      if (message.error) call?.reject(new Error(message.error.message));
      else call?.resolve(message.result);
    } else {
      for (const listener of listeners) listener(message.method, message.params);
    }
  };
  const send = (method: string, params: object = {}): Promise<any> =>
    new Promise((resolve, reject) => {
      const id = nextId++;
      pending.set(id, { resolve, reject });
      socket.send(JSON.stringify({ id, method, params }));
    });
  const loaded = () =>
    new Promise<void>((resolve) => {
      const listener = (method: string) => {
        if (method !== "Page.loadEventFired") return;
        listeners.delete(listener);
        resolve();
      };
      listeners.add(listener);
    });
  await send("Page.enable");
  await send("Network.enable");

  const browser: Browser = {
    async open(url) {
      const done = loaded();
      await send("Page.navigate", { url });
      await done;
    },
    async evaluate<T>(expression: string) {
      const result = await send("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true });
      if (result.exceptionDetails) throw new Error(`in the page: ${result.exceptionDetails.exception?.description ?? result.exceptionDetails.text}`);
      return result.result.value as T;
    },
    async clickAndWait(selector) {
      const done = loaded();
      const found = await browser.evaluate<boolean>(`(() => { const e = document.querySelector(${JSON.stringify(selector)}); if (!e) return false; e.click(); return true; })()`);
      if (!found) throw new Error(`nothing on the page matches ${selector}`);
      await done;
    },
    async setHeaders(headers) {
      await send("Network.setExtraHTTPHeaders", { headers });
    },
    async close() {
      socket.close();
      child.kill();
      await child.exited;
      await rm(profile, { recursive: true, force: true });
    },
  };
  return browser;
}
