import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";

const UI = new URL("..", import.meta.url);
const modules = readdirSync(UI).filter((f) => f.endsWith(".js"));
const page = readFileSync(new URL("index.html", UI), "utf8");

test("index.html preloads every module of the page, so none waits for an import level", () => {
  const preloaded = [...page.matchAll(/<link rel="modulepreload" href="\/ui\/([^"]+)">/g)].map((m) => m[1]);
  const entry = [...page.matchAll(/<script type="module" src="\/ui\/([^"]+)">/g)].map((m) => m[1]);
  assert.deepEqual(entry, ["app.js"]);
  assert.deepEqual(modules.filter((f) => !preloaded.includes(f) && !entry.includes(f)), []);
  assert.equal(/<script(?![^>]*\bsrc=)/.test(page), false, "no inline script (the CSP forbids it)");
});

test("every module says what it does in a header comment", () => {
  for (const f of modules) {
    assert.match(readFileSync(new URL(f, UI), "utf8"), /^\/\/ \S/, `${f} has no header comment`);
  }
});
