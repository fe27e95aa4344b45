import assert from "node:assert/strict";
import { test } from "node:test";
import { newAnswer } from "../src/answer.js";
import { clearSnapshots, loadSnapshot, saveSnapshot } from "../src/snapshot.js";

class MemoryStorage {
  #m = new Map();
  get length() { return this.#m.size; }
  key(i) { return [...this.#m.keys()][i] ?? null; }
  getItem(k) { return this.#m.has(k) ? this.#m.get(k) : null; }
  setItem(k, v) { this.#m.set(k, String(v)); }
  removeItem(k) { this.#m.delete(k); }
}

test("a snapshot round-trips the text and the cursor", () => {
  const s = new MemoryStorage();
  const a = newAnswer("q1", { topic: "Redis" });
  a.text = "so far";
  a.lastEntryId = "123-4";
  saveSnapshot(s, a);
  assert.deepEqual(loadSnapshot(s, "q1"), a);
  assert.equal(loadSnapshot(s, "q2"), null);
});

test("a corrupt snapshot is ignored", () => {
  const s = new MemoryStorage();
  s.setItem("tokenrelay:answer:q1", "{not json");
  assert.equal(loadSnapshot(s, "q1"), null);
  s.setItem("tokenrelay:answer:q1", JSON.stringify({ id: "q1", text: 1 }));
  assert.equal(loadSnapshot(s, "q1"), null);
});

test("only the newest snapshots are kept", () => {
  const s = new MemoryStorage();
  for (let i = 0; i < 30; i += 1) saveSnapshot(s, newAnswer(`q${i}`));
  assert.ok(s.length <= 20);
});

test("clearing forgets every kept answer and nothing else", () => {
  const s = new MemoryStorage();
  for (let i = 0; i < 3; i += 1) saveSnapshot(s, newAnswer(`q${i}`));
  s.setItem("other", "kept");
  clearSnapshots(s);
  assert.equal(s.length, 1);
  assert.equal(s.getItem("other"), "kept");
});
