// Redis stream entry ids ("<ms>-<seq>") are the resume cursor and the clock of an answer.

/** @returns {[number, number] | null} */
export function parseEntryId(id) {
  const m = typeof id === "string" ? /^(\d{1,20})-(\d{1,20})$/.exec(id) : null;
  return m ? [Number(m[1]), Number(m[2])] : null;
}

/** The time (ms since the epoch) at which Redis wrote the entry, or NaN. */
export function entryMs(id) {
  const p = parseEntryId(id);
  return p ? p[0] : NaN;
}

/** True when entry id `a` sorts strictly after `b`; anything is after "" (nothing seen yet). */
export function isAfter(a, b) {
  const pa = parseEntryId(a);
  if (!pa) return false;
  const pb = parseEntryId(b);
  if (!pb) return true;
  return pa[0] > pb[0] || (pa[0] === pb[0] && pa[1] > pb[1]);
}
