import assert from "node:assert/strict";
import { test } from "node:test";
import { applyRecord, newAnswer } from "../src/answer.js";
import { earlierTurns, groupThreads, threadOf } from "../src/threads.js";

test("history groups records by thread, newest thread first", () => {
  const records = [
    { id: "c", thread: "a", follows: "b" },
    { id: "x" },
    { id: "b", thread: "a", follows: "a" },
    { id: "a", thread: null },
  ];
  const groups = groupThreads(records);
  assert.deepEqual(groups.map((g) => [g.key, g.latest.id, g.first.id, g.count]), [
    ["a", "c", "a", 3],
    ["x", "x", "x", 1],
  ]);
});

test("a thread whose first question left the list is still one group", () => {
  const groups = groupThreads([{ id: "c", thread: "a" }, { id: "b", thread: "a" }]);
  assert.deepEqual(groups.map((g) => [g.key, g.first.id, g.count]), [["a", "b", 2]]);
});

test("threadOf reads records and answers", () => {
  assert.equal(threadOf({ id: "q", thread: "t" }), "t");
  assert.equal(threadOf({ id: "q", thread: null }), "q");
  assert.equal(threadOf(newAnswer("q", { thread: "t" })), "t");
  assert.equal(threadOf(newAnswer("q")), "q");
});

test("the record's follows and thread reach the answer's meta", () => {
  const a = newAnswer("c");
  applyRecord(a, { id: "c", status: "done", follows: "b", thread: "a" });
  assert.equal(a.meta.follows, "b");
  assert.equal(a.meta.thread, "a");
});

test("earlier turns are walked back oldest first", async () => {
  const stored = {
    a: newAnswer("a"),
    b: newAnswer("b", { follows: "a", thread: "a" }),
  };
  const asked = [];
  const turns = await earlierTurns(newAnswer("c", { follows: "b" }), async (id) => {
    asked.push(id);
    return stored[id];
  });
  assert.deepEqual(turns.map((t) => t.id), ["a", "b"]);
  assert.deepEqual(asked, ["b", "a"]);
});

test("a turn that cannot be loaded ends the walk; a loop or the cap ends it too", async () => {
  const missing = [];
  const turns = await earlierTurns(
    newAnswer("c", { follows: "b" }),
    async (id) => {
      if (id === "a") throw new Error("gone");
      return newAnswer(id, { follows: "a" });
    },
    { onMissing: (id, e) => missing.push([id, e.message]) },
  );
  assert.deepEqual(turns.map((t) => t.id), ["b"]);
  assert.deepEqual(missing, [["a", "gone"]]);

  const loop = await earlierTurns(newAnswer("c", { follows: "b" }), async (id) =>
    newAnswer(id, { follows: id === "b" ? "a" : "b" }),
  );
  assert.deepEqual(loop.map((t) => t.id), ["a", "b"]);

  let n = 0;
  const capped = await earlierTurns(
    newAnswer("q", { follows: "p0" }),
    async (id) => newAnswer(id, { follows: `p${++n}` }),
    { max: 3 },
  );
  assert.equal(capped.length, 3);
});
