import assert from "node:assert/strict";
import { test } from "node:test";
import { cleanKey, forgetKey, KEY_NAME, loadKey, saveKey } from "../src/api-key.js";

class MemoryStorage {
  #m = new Map();
  getItem(k) { return this.#m.has(k) ? this.#m.get(k) : null; }
  setItem(k, v) { this.#m.set(k, String(v)); }
  removeItem(k) { this.#m.delete(k); }
}

const blocked = {
  getItem() { throw new Error("SecurityError"); },
  setItem() { throw new Error("SecurityError"); },
  removeItem() { throw new Error("SecurityError"); },
};

test("a key is kept, found again and forgotten", () => {
  const s = new MemoryStorage();
  assert.equal(loadKey(s), "");
  saveKey(s, "alpha-key-0123456789");
  assert.equal(loadKey(s), "alpha-key-0123456789");
  forgetKey(s);
  assert.equal(loadKey(s), "");
  assert.equal(s.getItem(KEY_NAME), null);
});

test("a damaged kept key is not sent", () => {
  const s = new MemoryStorage();
  s.setItem(KEY_NAME, " has spaces ");
  assert.equal(loadKey(s), "");
});

test("blocked storage costs the key after a reload, nothing more", () => {
  assert.equal(loadKey(blocked), "");
  assert.doesNotThrow(() => saveKey(blocked, "alpha-key-0123456789"));
  assert.doesNotThrow(() => forgetKey(blocked));
});

test("a pasted key loses its surrounding blanks; a broken one says why", () => {
  assert.deepEqual(cleanKey("  alpha-key-0123456789\n"), { key: "alpha-key-0123456789", problem: "" });
  assert.match(cleanKey("   ").problem, /Enter the API key/);
  assert.match(cleanKey("alpha key").problem, /no spaces/);
  assert.match(cleanKey("ключ-0123456789abcdef").problem, /printable/);
});
