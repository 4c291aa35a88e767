// SQL files are imported as text (Bun and Deno both support `with { type: "text" }`).
declare module "*.sql" {
  const text: string;
  export default text;
}
