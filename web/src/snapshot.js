// The answer as this tab last showed it, kept in sessionStorage keyed by question id, so a
// reload shows the text at once and resumes after its last entry id: nothing lost, nothing twice.
import { parseEntryId } from "./entry-id.js";

const PREFIX = "tokenrelay:answer:";
const MAX_KEPT = 20;

/** @param {Storage} storage */
export function saveSnapshot(storage, answer) {
  try {
    storage.setItem(PREFIX + answer.id, JSON.stringify({ ...answer, savedMs: Date.now() }));
    prune(storage, PREFIX + answer.id);
  } catch {
    // Full or unavailable storage only costs a re-fetch from the start on reload.
  }
}

/** @param {Storage} storage */
export function loadSnapshot(storage, id) {
  let a;
  try {
    a = JSON.parse(storage.getItem(PREFIX + id) || "null");
  } catch {
    return null;
  }
  const valid = a && typeof a === "object" && a.id === id && typeof a.text === "string"
    && typeof a.status === "string" && a.meta && typeof a.meta === "object"
    && (a.lastEntryId === "" || parseEntryId(a.lastEntryId) !== null);
  if (!valid) return null;
  delete a.savedMs;
  return a;
}

function prune(storage, justSaved) {
  const kept = [];
  for (let i = 0; i < storage.length; i += 1) {
    const key = storage.key(i);
    if (!key || !key.startsWith(PREFIX) || key === justSaved) continue;
    let saved = 0;
    try {
      saved = JSON.parse(storage.getItem(key) || "{}").savedMs || 0;
    } catch {
      // unreadable: sorts first, so it goes first
    }
    kept.push([saved, key]);
  }
  kept.sort((x, y) => x[0] - y[0]);
  for (const [, key] of kept.slice(0, Math.max(0, kept.length - (MAX_KEPT - 1)))) storage.removeItem(key);
}

/** Forget every kept answer: they belong to the API key being forgotten. @param {Storage} storage */
export function clearSnapshots(storage) {
  try {
    const keys = [];
    for (let i = 0; i < storage.length; i += 1) {
      const key = storage.key(i);
      if (key && key.startsWith(PREFIX)) keys.push(key);
    }
    for (const key of keys) storage.removeItem(key);
  } catch {
    // unavailable storage kept nothing
  }
}
