import { test } from "node:test";
import assert from "node:assert/strict";
import { parseState, formatState, parseTags, refreshMs, mergeTail, lastValue, bridgeShortGaps, gapToBridge, MAX_CHARTS } from "../metric-explorer.js";

test("the explorer's choice round-trips through the URL hash", () => {
  const state = { names: ["http.latency", "queue depth", "bytes,by,kind"], range: 86400, agg: "p95", tags: "host=web-1, path=/a" };
  const hash = formatState(state);
  assert.match(hash, /^#metrics\?/);
  assert.deepEqual(parseState(hash), state);
  assert.equal(formatState({ names: [], range: 3600, agg: "avg", tags: "" }), "#metrics", "defaults are left out");
});

test("bad hash values fall back to defaults; names are de-duplicated and capped", () => {
  const many = Array.from({ length: MAX_CHARTS + 3 }, (_, i) => `m${i}`);
  const s = parseState(`#metrics?range=17&agg=median&names=a&names=a&names=&${many.map((m) => `names=${m}`).join("&")}`);
  assert.equal(s.range, 3600);
  assert.equal(s.agg, "avg");
  assert.equal(s.names.length, MAX_CHARTS);
  assert.deepEqual(s.names.slice(0, 2), ["a", "m0"]);
  assert.deepEqual(parseState(""), { names: [], range: 3600, agg: "avg", tags: "" });
});

test("tag filters parse k=v pairs and name the part that is not one", () => {
  assert.deepEqual(parseTags(" host = web-1 ,path=/a=b, "), { tags: { host: "web-1", path: "/a=b" } });
  assert.deepEqual(parseTags(""), { tags: {} });
  assert.deepEqual(parseTags("host=web-1, region"), { error: 'tag filter "region" is not key=value' });
  assert.deepEqual(parseTags("=x"), { error: 'tag filter "=x" is not key=value' });
});

test("charts re-read their newest buckets at a quarter step, between 1 s and 30 s", () => {
  assert.equal(refreshMs(1), 1000);
  assert.equal(refreshMs(12), 3000);
  assert.equal(refreshMs(300), 30000);
  assert.equal(refreshMs(3600), 30000);
});

test("a re-read tail replaces the buckets it covers, appends new ones and slides the window", () => {
  const series = { t: [100, 110, 120, 130], v: [1, null, 3, 4] };
  const tail = { t: [120, 130, 140], v: [30, 40, 50] };
  assert.deepEqual(mergeTail(series, tail, 105), { t: [110, 120, 130, 140], v: [null, 30, 40, 50] });
  // a tail that starts after the chart's end keeps everything and appends
  assert.deepEqual(mergeTail(series, { t: [150], v: [5] }, 0), { t: [100, 110, 120, 130, 150], v: [1, null, 3, 4, 5] });
  // an empty tail changes nothing but the window
  assert.deepEqual(mergeTail(series, { t: [], v: [] }, 115), { t: [120, 130], v: [3, 4] });
  assert.equal(lastValue([1, 2, null]), 2);
  assert.equal(lastValue([null]), null);
});

test("short gaps are bridged so sparse samples draw a line; long gaps still break it", () => {
  const t = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
  const v = [1, null, null, 2, null, null, null, null, null, null, null, null, 3];
  // gaps of 3 s are joined; the 9 s gap keeps one empty bucket, which breaks the line
  assert.deepEqual(bridgeShortGaps({ t, v }, 5), { t: [0, 3, 4, 12], v: [1, 2, null, 3] });
  assert.deepEqual(bridgeShortGaps({ t, v }, 60), { t: [0, 3, 12], v: [1, 2, 3] });
  assert.deepEqual(bridgeShortGaps({ t: [0, 1], v: [null, null] }, 60), { t: [], v: [] });
  assert.equal(gapToBridge(1), 30);
  assert.equal(gapToBridge(300), 900);
});
