// The API key a gateway may require, kept in localStorage so reloads and new tabs have it.
// Only a key the server accepted is kept: a mistyped one is never remembered.

export const KEY_NAME = "tokenrelay:api-key";

/** @param {Storage} storage @returns {string} the kept key, or "" */
export function loadKey(storage) {
  try {
    const kept = storage.getItem(KEY_NAME);
    if (typeof kept !== "string") return "";
    const { key, problem } = cleanKey(kept);
    return !problem && key === kept ? key : "";
  } catch {
    return ""; // storage blocked (a privacy setting): the key lasts as long as the page
  }
}

/** @param {Storage} storage */
export function saveKey(storage, key) {
  try {
    if (storage.getItem(KEY_NAME) !== key) storage.setItem(KEY_NAME, key);
  } catch {
    // as above: the page still works, the user types the key again after a reload
  }
}

/** @param {Storage} storage */
export function forgetKey(storage) {
  try {
    storage.removeItem(KEY_NAME);
  } catch {
    // nothing was kept
  }
}

/**
 * What the user typed or pasted, as a key: surrounding blanks dropped (a paste often
 * brings a newline), or a problem a person can fix.
 * @returns {{key: string, problem: string}}
 */
export function cleanKey(typed) {
  const key = String(typed ?? "").trim();
  if (!key) return { key, problem: "Enter the API key first." };
  if (/\s/.test(key)) return { key, problem: "An API key has no spaces or line breaks in it." };
  // fetch() refuses a header it cannot send as Latin-1: say so instead of failing later.
  if (/[^\x21-\x7e\xa1-\xff]/.test(key)) {
    return { key, problem: "An API key is made of printable characters only." };
  }
  return { key, problem: "" };
}
