import assert from "node:assert/strict";
import { test } from "node:test";
import { MAX_GAP_MS, replay, schedule } from "../src/replay.js";

test("the schedule follows the entry ids' clock and caps long silences", () => {
  const entries = ["1000-0", "1000-1", "1250-0", "99999-0"].map((entry_id) => ({ entry_id }));
  assert.deepEqual(schedule(entries), [0, 0, 250, 250 + MAX_GAP_MS]);
});

test("replay applies every entry in order, then reports done", async () => {
  const entries = ["1000-0", "1010-0", "1030-0"].map((entry_id) => ({ entry_id }));
  const seen = [];
  await new Promise((resolve) => replay(entries, (e) => seen.push(e.entry_id), resolve));
  assert.deepEqual(seen, ["1000-0", "1010-0", "1030-0"]);
});

test("a stopped replay applies nothing more", async () => {
  const entries = ["1000-0", "1500-0"].map((entry_id) => ({ entry_id }));
  const seen = [];
  const stop = replay(entries, (e) => seen.push(e.entry_id), () => seen.push("done"));
  stop();
  await new Promise((resolve) => setTimeout(resolve, 700));
  assert.deepEqual(seen, ["1000-0"]);
});
