// NATS message headers written straight into the text nats.js sends (`NATS/1.0`, then one
// `Name: value` line per value, then an empty line), with nats.js's own rules: a name is printable
// ASCII without ':' and kept as given; a value may not hold a line break and is trimmed. nats.js's
// MsgHdrs does the same through a map it searches on every append and a string it rebuilds per
// header, which was a tenth of a backlog drain's CPU at five headers a message. The client only calls
// encode() on what it is given as `headers`.

import type { MsgHdrs } from "@nats-io/transport-node";

/** Characters 33–126 but ':' (58). */
const NAME = /^[!-9;-~]+$/;
const LINE_BREAK = /[\r\n]/;
const encoder = new TextEncoder();

export class HeaderBlock {
  readonly #names: string[] = [];
  readonly #values: string[] = [];

  /** Whether `name` can be a NATS header name. */
  static validName(name: string): boolean {
    return NAME.test(name);
  }

  /** Adds a value; throws, as nats.js does, on a name it refuses or a value with a line break. */
  append(name: string, value: string): void {
    if (!NAME.test(name)) throw new Error(`'${name}' is not a valid NATS header name`);
    if (LINE_BREAK.test(value)) throw new Error(`header ${name}: values cannot contain \\r or \\n`);
    this.#names.push(name);
    this.#values.push(value.trim());
  }

  /** Replaces every value of exactly this name (placed last, as nats.js's set does). */
  set(name: string, value: string): void {
    for (let i = this.#names.length - 1; i >= 0; i--) {
      if (this.#names[i] === name) {
        this.#names.splice(i, 1);
        this.#values.splice(i, 1);
      }
    }
    this.append(name, value);
  }

  get(name: string): string | undefined {
    const i = this.#names.indexOf(name);
    return i < 0 ? undefined : this.#values[i];
  }

  /** The header block as nats.js would write it: the same bytes. */
  toString(): string {
    if (this.#names.length === 0) return "";
    let text = "NATS/1.0";
    for (let i = 0; i < this.#names.length; i++) text += `\r\n${this.#names[i]}: ${this.#values[i]}`;
    return `${text}\r\n\r\n`;
  }

  encode(): Uint8Array {
    return encoder.encode(this.toString());
  }

  /** For the client's publish(), which reads nothing but encode(). */
  asMsgHdrs(): MsgHdrs {
    return this as unknown as MsgHdrs;
  }
}
