// What a filter may cost per message, checked once when the pipeline config enters (relay start,
// `pg-tide check`). A filter runs on the relay's event loop for every message, so one slow evaluation
// stalls every pipeline and the health endpoints with it. Work that grows with the size of a message
// once (a loop over a list, a regular expression over a string) is fine. Work that repeats such a
// scan for every element of a list grows with the square of the message and is refused, and so is a
// regular expression taken from the message itself.

import type { ASTNode } from "@marcbachmann/cel-js";
import { RE2JS } from "re2js";

/** Longer expressions (in parsed terms) are refused: every term may scan the message once. */
export const MAX_FILTER_TERMS = 1_000;

/** The variables a filter sees, with their CEL types; every one of them holds message data. */
export const FILTER_VARIABLES = {
  payload: "dyn",
  headers: "map",
  topic: "dyn",
  op: "string",
  // Shorthands for table-capture messages ({record, changes, action}).
  record: "dyn",
  changes: "dyn",
  action: "dyn",
} as const;

/**
 * The name filters are evaluated with in place of `matches` (cel-js's own `matches` runs the
 * backtracking JavaScript engine and cannot be replaced). As long as "matches", so that columns in
 * evaluation errors stay right. Checked like `matches` where a filter writes it.
 */
export const RE2_MATCHES = "re2find";

/** The macros that loop over a list or map: `list.all(x, predicate)` and friends. */
const LOOPS = new Set(["all", "exists", "exists_one", "map", "filter"]);

/**
 * Functions and operators whose cost grows with the size of what they work on: their receiver, or
 * for the global forms (`size(x)`) and `in`, their operand.
 */
const SCANS = new Set([
  "contains", "startsWith", "endsWith", "matches", "indexOf", "lastIndexOf", "split", "join", "replace",
  "lowerAscii", "upperAscii", "trim", "substring", "charAt", "size", "json", "base64", "hex", RE2_MATCHES,
]);

/** Why a filter cannot run: its cost grows faster than the message, or a pattern is not RE2. */
export interface CostProblem {
  kind: "expensive" | "invalid_pattern";
  message: string;
}

/**
 * Returns why `ast` cannot run per message, or undefined when it can. Compiles every `matches()`
 * pattern with RE2 into `patterns` (pattern → compiled), so that a syntax error is reported here and
 * evaluation never compiles one.
 */
export function costProblem(ast: ASTNode, patterns: Map<string, RE2JS>): CostProblem | undefined {
  try {
    visit(ast, { loopVar: null, nonLocal: new Set(Object.keys(FILTER_VARIABLES)) }, patterns);
    return undefined;
  } catch (error) {
    if (error instanceof TooExpensive) return { kind: "expensive", message: error.message };
    if (error instanceof InvalidPattern) return { kind: "invalid_pattern", message: error.message };
    throw error;
  }
}

/**
 * `loopVar`: the iteration variable of the innermost loop around a node (null outside loops).
 * `nonLocal`: names whose values are not the current element: the message variables, the
 * variables of the outer loops and `cel.bind` names.
 */
interface Scope {
  loopVar: string | null;
  nonLocal: ReadonlySet<string>;
}

class TooExpensive extends Error {}
class InvalidPattern extends Error {}

function visit(node: ASTNode, scope: Scope, patterns: Map<string, RE2JS>): void {
  const { loopVar } = scope;
  if (node.op === "rcall") {
    const [name, receiver, args] = node.args;
    const declared = args[0]?.op === "id" ? args[0].args : undefined;
    if (LOOPS.has(name) && declared !== undefined) {
      visit(receiver, scope, patterns);
      if (loopVar !== null && !isLocal(receiver, scope)) {
        throw new TooExpensive(
          `the loop over ${quote(receiver)} (${at(receiver)}) runs once for every element of the loop over ` +
            `"${loopVar}", so its work grows with the square of the message size; inside a loop, loop only ` +
            `over the current element (e.g. "${loopVar}.items.exists(...)")`,
        );
      }
      const nonLocal = new Set(scope.nonLocal);
      if (loopVar !== null) nonLocal.add(loopVar);
      nonLocal.delete(declared);
      for (const arg of args.slice(1)) visit(arg, { loopVar: declared, nonLocal }, patterns);
      return;
    }
    if (name === "bind" && receiver.op === "id" && receiver.args === "cel" && declared !== undefined && args.length === 3) {
      visit(args[1]!, scope, patterns);
      visit(args[2]!, { loopVar: loopVar === declared ? null : loopVar, nonLocal: new Set([...scope.nonLocal, declared]) }, patterns);
      return;
    }
    if ((name === "matches" || name === RE2_MATCHES) && args.length === 1) compilePattern(args[0]!, patterns);
    if (loopVar !== null && SCANS.has(name) && !isLocal(receiver, scope)) throw scanning(`${name}()`, receiver, loopVar);
    visit(receiver, scope, patterns);
    for (const arg of args) visit(arg, scope, patterns);
    return;
  }
  if (node.op === "call") {
    const [name, args] = node.args;
    const scanned = loopVar !== null && SCANS.has(name) ? args.find((arg) => !isLocal(arg, scope)) : undefined;
    if (scanned) throw scanning(`${name}()`, scanned, loopVar!);
    for (const arg of args) visit(arg, scope, patterns);
    return;
  }
  if (node.op === "in" && loopVar !== null && !isLocal(node.args[1], scope)) throw scanning("`in`", node.args[1], loopVar);
  for (const child of children(node)) visit(child, scope, patterns);
}

/** Patterns are literals, compiled (and so checked) here with RE2: linear time, whatever the input. */
function compilePattern(pattern: ASTNode, patterns: Map<string, RE2JS>): void {
  if (pattern.op !== "value" || typeof pattern.args !== "string") {
    throw new TooExpensive(
      `matches() needs a string literal as its pattern (got ${quote(pattern)}, ${at(pattern)}): patterns are ` +
        "compiled once, when the pipeline is created, never from a message",
    );
  }
  if (patterns.has(pattern.args)) return;
  try {
    patterns.set(pattern.args, RE2JS.compile(pattern.args));
  } catch (error) {
    throw new InvalidPattern(
      `invalid regular expression ${JSON.stringify(pattern.args)} for matches() (${at(pattern)}): ` +
        `${(error as Error).message} (RE2 syntax: no backreferences, no lookarounds)`,
    );
  }
}

function scanning(what: string, scanned: ASTNode, loopVar: string): TooExpensive {
  return new TooExpensive(
    `${what} scans ${quote(scanned)} (${at(scanned)}) once for every element of the loop over "${loopVar}", so ` +
      `its work grows with the square of the message size; inside a loop, scan only the current element ` +
      `("${loopVar}" and its fields) or literals, or compute the value once outside the loop with ` +
      `cel.bind(name, value, expression)`,
  );
}

/** Computed from the current element and literals only: it references no non-local name. */
function isLocal(node: ASTNode, scope: Scope): boolean {
  return freeNames(node).every((name) => !scope.nonLocal.has(name));
}

/** The names an expression reads, less those its own loops and binds declare. */
function freeNames(node: ASTNode): string[] {
  if (node.op === "id") return [node.args];
  if (node.op === "rcall") {
    const [name, receiver, args] = node.args;
    const declared = args[0]?.op === "id" ? args[0].args : undefined;
    const isBind = name === "bind" && receiver.op === "id" && receiver.args === "cel";
    if (declared !== undefined && (LOOPS.has(name) || isBind)) {
      const head = isBind ? freeNames(args[1]!) : freeNames(receiver);
      const body = args.slice(isBind ? 2 : 1).flatMap(freeNames).filter((n) => n !== declared);
      return [...head, ...body];
    }
  }
  return children(node).flatMap(freeNames);
}

/** The sub-expressions of a node, whatever its operator. */
function children(node: ASTNode): ASTNode[] {
  const found: ASTNode[] = [];
  const collect = (value: unknown): void => {
    if (Array.isArray(value)) value.forEach(collect);
    else if (isNode(value)) found.push(value);
  };
  if (node.op !== "value" && node.op !== "id") collect(node.args);
  return found;
}

function isNode(value: unknown): value is ASTNode {
  return typeof value === "object" && value !== null && "op" in value && "range" in value;
}

function at(node: ASTNode): string {
  return `at column ${node.range.start + 1}`;
}

function quote(node: ASTNode): string {
  const text = node.input.slice(node.range.start, node.range.end);
  return JSON.stringify(text.length > 60 ? `${text.slice(0, 57)}...` : text);
}
