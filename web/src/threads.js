// Threads: a question may follow an earlier answer (`follows`); the record names the
// thread's first question (`thread`). Pure data, so node tests it.

/** How far back a thread is shown: the server looks back no further either. */
export const MAX_EARLIER_TURNS = 50;

/** The thread a record or an answer belongs to: its first question's id, else its own. */
export function threadOf(item) {
  return item?.thread || item?.meta?.thread || item?.id || "";
}

/**
 * Group history records (newest first) by thread, newest thread first.
 * @param {object[]} records
 * @returns {{key: string, latest: object, first: object, count: number}[]}
 */
export function groupThreads(records) {
  const groups = new Map();
  for (const record of records) {
    if (!record || typeof record.id !== "string") continue;
    const key = threadOf(record);
    const group = groups.get(key);
    if (group) {
      group.count += 1;
      group.first = record; // newest first: the last one seen is the oldest listed
    } else {
      groups.set(key, { key, latest: record, first: record, count: 1 });
    }
  }
  return [...groups.values()];
}

/**
 * The finished turns that `answer` follows, oldest first: walks `meta.follows` back with
 * `load(id)` (which resolves to an Answer). Stops at the thread's first question, at a
 * loop, after `max` turns, or at a turn that cannot be loaded (`onMissing(id, error)`).
 */
export async function earlierTurns(answer, load, { max = MAX_EARLIER_TURNS, onMissing } = {}) {
  const turns = [];
  const seen = new Set([answer.id]);
  let id = answer.meta?.follows;
  while (typeof id === "string" && id && !seen.has(id) && turns.length < max) {
    seen.add(id);
    let turn;
    try {
      turn = await load(id);
    } catch (error) {
      onMissing?.(id, error);
      break;
    }
    turns.unshift(turn);
    id = turn.meta?.follows;
  }
  return turns;
}
