import assert from "node:assert/strict";
import { test } from "node:test";
import { applyEvent, applyRecord, figures, isFinished, newAnswer } from "../src/answer.js";
import { isAfter } from "../src/entry-id.js";

const ev = (entry_id, type, extra = {}) => ({ id: "q1", entry_id, type, text: "", ...extra });

function stream() {
  return [
    ev("1000-0", "start", { topic: "Redis", question: "Why?", model: "m1", provider: "p", created_ms: 900 }),
    ev("1100-0", "chunk", { text: "Hello" }),
    ev("1200-0", "chunk", { text: " big" }),
    ev("1200-1", "chunk", { text: " world" }),
    ev("1300-0", "end", { finish_reason: "stop", completion_tokens: 3, chunks: 3, ttft_ms: 200, duration_ms: 400 }),
  ];
}

test("entry ids compare by time then sequence", () => {
  assert.ok(isAfter("1-1", "1-0"));
  assert.ok(isAfter("2-0", "1-9"));
  assert.ok(isAfter("10-0", "9-0"), "numeric, not lexical");
  assert.ok(!isAfter("1-0", "1-0"));
  assert.ok(isAfter("1-0", ""));
  assert.ok(!isAfter("garbage", ""));
});

test("a full stream builds the text, the status and the figures", () => {
  const a = newAnswer("q1");
  for (const e of stream()) assert.ok(applyEvent(a, e));
  assert.equal(a.text, "Hello big world");
  assert.equal(a.status, "done");
  assert.ok(isFinished(a));
  const f = figures(a);
  assert.equal(f.ttftMs, 200);
  assert.equal(f.chunks, 3);
  assert.equal(f.model, "m1");
  assert.equal(f.tokensPerS, 3 / 0.2);
});

test("entries seen before are ignored: resume never doubles text", () => {
  const a = newAnswer("q1");
  const all = stream();
  for (const e of all.slice(0, 3)) applyEvent(a, e);
  const copy = JSON.parse(JSON.stringify(a));
  for (const e of all) applyEvent(copy, e); // a resume that re-sends from the start
  assert.equal(copy.text, "Hello big world");
  assert.equal(copy.chunks, 3);
});

test("other answers' events are ignored", () => {
  const a = newAnswer("q1");
  assert.equal(applyEvent(a, { ...ev("1-0", "chunk", { text: "x" }), id: "q2" }), false);
  assert.equal(a.text, "");
});

test("restart drops the text so far", () => {
  const a = newAnswer("q1");
  applyEvent(a, ev("1-0", "chunk", { text: "old" }));
  applyEvent(a, ev("2-0", "restart"));
  applyEvent(a, ev("3-0", "chunk", { text: "new" }));
  assert.equal(a.text, "new");
  assert.equal(a.chunks, 1);
});

test("an error entry fails the answer with a readable message", () => {
  const a = newAnswer("q1");
  applyEvent(a, ev("1-0", "error", { text: "rate limited", kind: "provider" }));
  assert.equal(a.status, "failed");
  assert.deepEqual(a.error, { text: "rate limited", kind: "provider" });
});

test("live figures come from entry times", () => {
  const a = newAnswer("q1");
  for (const e of stream().slice(0, 4)) applyEvent(a, e);
  const f = figures(a);
  assert.equal(f.ttftMs, 200);
  assert.equal(f.tokensPerS, 2 / 0.1);
});

test("a record fills gaps but never moves the status back", () => {
  const a = newAnswer("q1");
  applyEvent(a, ev("1-0", "start", { model: "m1" }));
  applyRecord(a, { id: "q1", status: "queued", topic: "T", question: "Q", model: "old", created_ms: 5 });
  assert.equal(a.status, "streaming");
  assert.equal(a.meta.model, "m1");
  assert.equal(a.meta.topic, "T");
  applyRecord(a, { id: "q1", status: "done", chunks: 4, completion_tokens: 4, ttft_ms: 10 });
  assert.equal(a.status, "done");
  assert.equal(figures(a).chunks, 4);
});

test("waiting says how many answers are ahead until the first chunk", () => {
  const a = newAnswer("q1");
  applyEvent(a, ev("1-0", "start", { model: "m" }));
  applyEvent(a, ev("2-0", "waiting", { ahead: 2 }));
  assert.equal(a.ahead, 2);
  applyEvent(a, ev("3-0", "waiting", { ahead: 0 }));
  assert.equal(a.ahead, 0);
  applyEvent(a, ev("4-0", "chunk", { text: "go" }));
  assert.equal(a.ahead, null);
  assert.equal(a.status, "streaming");
});
