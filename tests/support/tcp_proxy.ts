// A TCP proxy in the test process in front of a real server: cut() closes every connection through
// it and refuses new ones (what a client sees when the server goes away), freeze() keeps every
// connection open but carries no byte either way (a server that stopped answering), restore() accepts
// again on the same port. For outage scenarios on servers that other suites share and that cannot be stopped.

import { createServer, connect, type Server, type Socket } from "node:net";
import { freePort } from "./postgres.ts";

export class TcpProxy {
  readonly port: number;
  readonly #target: { host: string; port: number };
  readonly #sockets = new Set<Socket>();
  readonly #pairs = new Set<[Socket, Socket]>();
  #server: Server | undefined;
  #frozen = false;

  private constructor(port: number, target: { host: string; port: number }) {
    this.port = port;
    this.#target = target;
  }

  /** A proxy on a free port of 127.0.0.1 to host:port, accepting connections. */
  static async start(host: string, port: number): Promise<TcpProxy> {
    const proxy = new TcpProxy(await freePort(), { host, port });
    await proxy.restore();
    return proxy;
  }

  /** Accepts connections again (after cut()). */
  async restore(): Promise<void> {
    if (this.#server) return;
    const server = createServer((client) => {
      const upstream = connect(this.#target.port, this.#target.host);
      for (const socket of [client, upstream]) {
        this.#sockets.add(socket);
        socket.on("error", () => {});
        socket.on("close", () => {
          this.#sockets.delete(socket);
          client.destroy();
          upstream.destroy();
        });
      }
      const pair: [Socket, Socket] = [client, upstream];
      this.#pairs.add(pair);
      client.on("close", () => this.#pairs.delete(pair));
      if (this.#frozen) return;
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.port, "127.0.0.1", () => resolve());
    });
    this.#server = server;
  }

  /** Closes every connection through the proxy and refuses new ones until restore(). */
  async cut(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    const closed = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    for (const socket of this.#sockets) socket.destroy();
    this.#sockets.clear();
    await closed;
  }

  /** Every connection, open and new, stays open but carries nothing until the proxy is cut. */
  freeze(): void {
    this.#frozen = true;
    for (const [client, upstream] of this.#pairs) {
      client.unpipe(upstream);
      upstream.unpipe(client);
      client.pause();
      upstream.pause();
    }
  }

  /** Connections open through the proxy right now. */
  get connections(): number {
    return this.#sockets.size / 2;
  }

  async stop(): Promise<void> {
    await this.cut();
  }
}
