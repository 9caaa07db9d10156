import { test } from "node:test";
import assert from "node:assert/strict";

import { healthView, overflowView } from "../overview.js";

test("the health card is green only when ready and no sink is degraded", () => {
  assert.deepEqual(healthView({ ready: true, status: "ready", problems: [], degraded: [] }), { text: "ready", cls: "good" });
  assert.deepEqual(healthView({ ready: false, status: "not_ready", problems: ["agent is stopping"] }), { text: "not ready", cls: "bad" });
  // An agent older than readiness' `status` field answers ready as before.
  assert.deepEqual(healthView({ ready: true, problems: [] }), { text: "ready", cls: "good" });
});

test("a lagging or failing sink makes the card say degraded, naming the sink and why", () => {
  const h = {
    ready: true,
    status: "degraded",
    problems: ["sink pg is degraded: ..."],
    degraded: [
      { sink: "pg", reasons: ["breaker_open", "lagging"], detail: "circuit breaker open; 900 events behind" },
      { sink: "supabase", reasons: ["failing"], detail: "its last batch failed" },
    ],
  };
  assert.deepEqual(healthView(h), { text: "degraded: pg (breaker_open, lagging), supabase (failing)", cls: "warn" });
});

test("the names past max_series_per_name are listed with their counts, five at most", () => {
  assert.equal(overflowView({ max_series_per_name: 2000, overflowed: {} }), null);
  assert.equal(overflowView(undefined), null); // an agent without the cap
  assert.equal(overflowView({ max_series_per_name: 3, overflowed: { "user.events": 12345, udp: 2 } }),
    "past 3 tag sets per hour, events kept with tags {overflow: true}: user.events (12,345), udp (2)");
  const many = Object.fromEntries(["a", "b", "c", "d", "e", "f", "g"].map((n) => [n, 1]));
  assert.match(overflowView({ max_series_per_name: 1, overflowed: many }), /: a \(1\), b \(1\), c \(1\), d \(1\), e \(1\) and 2 more$/);
});
