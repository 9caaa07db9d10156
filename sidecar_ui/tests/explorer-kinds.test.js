import { test } from "node:test";
import assert from "node:assert/strict";
import { seriesAgg, isBucketSeries, dataBegins, clockLabel, AGGS, parseState } from "../metric-explorer.js";
import { ChartManager, drawBegins } from "../chart-manager.js";

const counter = { name: "http_requests_total", kind: "counter", tag_keys: ["code"] };
const gauge = { name: "queue.depth", kind: "gauge", tag_keys: [] };
const histogram = { name: "req.latency", kind: "histogram", tag_keys: ["route"] };
const buckets = { name: "http_duration_seconds_bucket", kind: "counter", tag_keys: ["le", "route"] };

test("the default choice charts counters as a rate and histograms as p99; others as chosen", () => {
  assert.equal(parseState("").agg, "avg", "the default is the per-kind choice");
  assert.ok(AGGS.includes("rate") && AGGS.includes("p90"));
  assert.deepEqual(seriesAgg("avg", counter), { agg: "rate", label: "rate" });
  assert.deepEqual(seriesAgg("avg", histogram), { agg: "p99", label: "p99" });
  assert.deepEqual(seriesAgg("avg", gauge), { agg: "avg", label: "avg" });
  assert.deepEqual(seriesAgg("sum", counter), { agg: "sum", label: "sum" });
  assert.deepEqual(seriesAgg("p50", histogram), { agg: "p50", label: "p50" });
  assert.deepEqual(seriesAgg("rate", gauge), { agg: "rate", label: "rate" });
  assert.deepEqual(seriesAgg("max", undefined), { agg: "max", label: "max" }, "a name not in the catalogue");
});

test("bucket series are charted as a percentile from their le buckets, never averaged across them", () => {
  assert.equal(isBucketSeries(buckets), true);
  assert.equal(isBucketSeries({ ...buckets, tag_keys: ["route"] }), false, "no le tag: not a histogram's buckets");
  assert.equal(isBucketSeries({ ...counter, tag_keys: ["le"] }), false);
  assert.deepEqual(seriesAgg("p90", buckets), { agg: "quantile", q: 0.9, label: "p90" });
  assert.deepEqual(seriesAgg("p50", buckets), { agg: "quantile", q: 0.5, label: "p50" });
  for (const agg of ["avg", "sum", "min", "max", "rate"]) {
    assert.deepEqual(seriesAgg(agg, buckets), { agg: "quantile", q: 0.99, label: "p99" }, agg);
  }
  assert.deepEqual(seriesAgg("count", buckets), { agg: "count", label: "count" });
});

test("a chart marks where its data begins when the range starts empty", () => {
  const t = Array.from({ length: 300 }, (_, i) => 1000 + 12 * i);
  const v = t.map((_, i) => (i >= 240 ? 5 : null)); // a fresh agent: the last 12 minutes of the hour
  assert.equal(dataBegins({ t, v }, 36), t[240]);
  assert.equal(dataBegins({ t, v: t.map(() => 1) }, 36), null, "data over the whole range: no mark");
  assert.equal(dataBegins({ t, v: t.map(() => null) }, 36), null, "no data: the caption says so instead");
  // a sparse metric whose first sample falls two buckets in is not "beginning"
  assert.equal(dataBegins({ t: [0, 12, 24, 36], v: [null, null, 3, null] }, 36), null);
  const d = new Date(2026, 10, 30, 9, 5);
  assert.equal(clockLabel(d.getTime() / 1000, 3600), "09:05");
  assert.equal(clockLabel(d.getTime() / 1000, 604800), "Nov 30 09:05");
});

test("the mark travels to the plot and is redrawn when it moves; drawn as shading and a line", () => {
  const frames = [];
  const plots = [];
  const cm = new ChartManager({
    createPlot: (target, meta) => { const p = { meta, sets: 0, setData() { this.sets++; }, destroy() {} }; plots.push(p); return p; },
    requestFrame: (cb) => frames.push(cb), now: () => 1000,
  });
  cm.add("m", "el", { t: [900], v: [1], begins: 900, beginsText: "data begins 09:05" });
  assert.equal(plots[0].meta.begins, 900);
  assert.ok(cm.mark("m", 900, "data begins 09:05"));
  assert.equal(frames.length, 0, "an unchanged mark does not redraw");
  assert.ok(cm.mark("m", null, ""));
  frames.splice(0).forEach((f) => f());
  assert.equal(plots[0].meta.begins, null);
  assert.equal(plots[0].sets, 1);
  assert.equal(cm.mark("gone", 1), false);

  const calls = [];
  const ctx = new Proxy({}, { get: (o, k) => (k in o ? o[k] : (...a) => { calls.push([k, ...a]); return { width: 50 }; }), set: (o, k, val) => { o[k] = val; return true; } });
  const u = { bbox: { left: 10, top: 0, width: 200, height: 100 }, ctx, valToPos: (ts) => 10 + (ts - 800) };
  drawBegins(u, { begins: 900, beginsText: "data begins 09:05" });
  assert.deepEqual(calls.find((c) => c[0] === "fillRect"), ["fillRect", 10, 0, 100, 100], "the empty part is shaded");
  assert.deepEqual(calls.find((c) => c[0] === "fillText").slice(0, 2), ["fillText", "data begins 09:05"]);
  calls.length = 0;
  drawBegins(u, { begins: null });
  drawBegins(u, { begins: 5000, beginsText: "x" }); // outside the plot
  assert.deepEqual(calls, []);
});
