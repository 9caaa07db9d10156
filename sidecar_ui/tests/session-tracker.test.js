import { test } from "node:test";
import assert from "node:assert/strict";
import { SessionTracker, isError } from "../session-tracker.js";

test("sessions count events and errors; agents report a rate", () => {
  let now = 1000;
  const t = new SessionTracker({ idleSec: 60, rateWindowSec: 10, now: () => now });
  t.ingest([
    { id: "1", name: "page.view", ts: 990, session_id: "s1", agent_id: "a" },
    { id: "2", name: "checkout.error", ts: 995, session_id: "s1", agent_id: "a" },
    { id: "3", name: "x", ts: 900, session_id: "old", agent_id: "b", tags: { status: "503" } },
  ]);
  const [s] = t.activeSessions();
  assert.deepEqual([s.id, s.count, s.errors, s.first, s.last], ["s1", 2, 1, 990, 995]);
  assert.equal(t.activeSessions().length, 1);
  assert.deepEqual(t.agentList().map((a) => [a.id, a.count, a.rate]), [["a", 2, 0.2], ["b", 1, 0.1]]);
  now += 20;
  assert.equal(t.agentList()[0].rate, 0);
  assert.equal(isError({ name: "x", tags: { level: "error" } }), true);
  assert.equal(isError({ name: "x", tags: {} }), false);
});
