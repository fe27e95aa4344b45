// Replay a stored answer at the pace it was written: entry ids carry Redis's clock.
import { entryMs } from "./entry-id.js";

/** Long silences (a slow queue, a model warming up) are shortened to this. */
export const MAX_GAP_MS = 5000;

/** Delay of each entry from the start of the replay, in ms. */
export function schedule(entries, maxGapMs = MAX_GAP_MS) {
  const out = [];
  let at = 0;
  let prev = NaN;
  for (const e of entries) {
    const ms = entryMs(e.entry_id);
    if (Number.isFinite(ms) && Number.isFinite(prev)) at += Math.min(Math.max(0, ms - prev), maxGapMs);
    if (Number.isFinite(ms)) prev = ms;
    out.push(at);
  }
  return out;
}

/**
 * Feed `entries` to `apply` on their schedule; returns a function that stops the replay.
 * Timers are set against the start time so that drift never adds up.
 */
export function replay(entries, apply, onDone) {
  const delays = schedule(entries);
  const start = performance.now();
  let i = 0;
  let timer = 0;
  let stopped = false;
  function tick() {
    const now = performance.now() - start;
    while (i < entries.length && delays[i] <= now) apply(entries[i++]);
    if (i >= entries.length) {
      stopped = true;
      onDone();
      return;
    }
    timer = setTimeout(tick, Math.max(0, delays[i] - (performance.now() - start)));
  }
  tick();
  return () => {
    if (!stopped) clearTimeout(timer);
    stopped = true;
  };
}
