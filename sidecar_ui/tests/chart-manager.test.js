import { test } from "node:test";
import assert from "node:assert/strict";
import { ChartManager, sparse } from "../chart-manager.js";

function setup(opts = {}) {
  const frames = [];
  const plots = [];
  const cm = new ChartManager({
    createPlot: (target, meta, data) => { const p = { target, meta, sets: [], setData(d) { this.sets.push(d.map((a) => a.slice())); }, destroy() { this.gone = true; } }; plots.push(p); return p; },
    requestFrame: (cb) => frames.push(cb), now: () => 1000, ...opts,
  });
  return { cm, frames, plots, frame: () => frames.splice(0).forEach((f) => f()) };
}

test("many pushes in one frame cause one redraw per chart", () => {
  const { cm, frames, plots, frame } = setup();
  cm.add("a", "el-a");
  cm.add("b", "el-b");
  for (let i = 0; i < 1000; i++) { cm.push("a", 900 + i * 0.05, i); cm.push("b", 900 + i * 0.05, -i); }
  assert.equal(frames.length, 1);
  frame();
  assert.equal(plots[0].sets.length, 1);
  assert.equal(plots[1].sets.length, 1);
  assert.equal(plots[0].sets[0][0].length, 1000);
  frame();
  assert.equal(plots[0].sets.length, 1, "no redraw without new data");
});

test("history is kept; points outside the window or past the cap are dropped", () => {
  const { cm, plots, frame } = setup({ windowSec: 60, maxPoints: 5 });
  cm.add("a", "el", { t: [900, 950, 995], v: [1, 2, 3] });
  assert.deepEqual(plots[0].meta, { label: "a" });
  for (let i = 0; i < 4; i++) cm.push("a", 996 + i, i);
  frame();
  const [t] = plots[0].sets[0];
  assert.deepEqual(t, [995, 996, 997, 998, 999]);
});

test("out-of-order points are inserted in order; unknown charts are ignored", () => {
  const { cm, plots, frame } = setup();
  cm.add("a", "el");
  cm.push("a", 990, 1);
  cm.push("a", 980, 2);
  cm.push("a", 985, 3);
  assert.equal(cm.push("nope", 1, 1), false);
  frame();
  assert.deepEqual(plots[0].sets[0], [[980, 985, 990], [2, 3, 1]]);
  cm.remove("a");
  assert.equal(plots[0].gone, true);
});

test("the time axis shows at least a minute, also with no or one point", async () => {
  const { minuteAtLeast } = await import("../chart-manager.js");
  assert.deepEqual(minuteAtLeast(null, null, null, 1000), [940, 1000]);
  assert.deepEqual(minuteAtLeast(null, 500, 500, 1000), [440, 501]);
  assert.deepEqual(minuteAtLeast(null, 100, 900, 1000), [100, 900]);
});

test("a chart's own window overrides the manager's; replace() swaps its data in one redraw", () => {
  const { cm, plots, frame } = setup({ windowSec: 60 });
  cm.add("wide", "el", { t: [100, 500, 990], v: [1, 2, 3], windowSec: 1000 });
  cm.add("narrow", "el2", { t: [100, 990], v: [1, 2] });
  cm.push("wide", 995, 4);
  cm.push("narrow", 995, 3);
  frame();
  assert.deepEqual(plots[0].sets[0][0], [100, 500, 990, 995]);
  assert.deepEqual(plots[1].sets[0][0], [990, 995]);
  assert.ok(cm.replace("wide", [900, 950], [7, 8]));
  frame();
  assert.deepEqual(plots[0].sets[1], [[900, 950], [7, 8]]);
  assert.deepEqual(cm.data("wide"), { t: [900, 950], v: [7, 8] });
  assert.equal(cm.replace("missing", [], []), false);
});

test("point markers show only where values are sparse", () => {
  const u = { width: 80, data: [[], [1, null, null, 2, null]] }; // room for 10 markers
  assert.equal(sparse(u, 1, 0, 4), true);
  u.data[1] = Array.from({ length: 50 }, (_, i) => i);
  assert.equal(sparse(u, 1, 0, 49), false);
  assert.equal(sparse(u, 1, 0, 9), true, "only the visible range counts");
});
