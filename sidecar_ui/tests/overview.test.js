import { test } from "node:test";
import assert from "node:assert/strict";

import { healthView } from "../overview.js";

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
