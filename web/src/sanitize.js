// The last wall between model output and the DOM. Refuses to run where DOMPurify cannot
// work, rather than passing HTML through unsanitised.
import DOMPurify from "dompurify";

const FORBID_TAGS = ["style", "img", "svg", "math", "form", "input", "button", "iframe",
  "object", "embed", "video", "audio", "source", "picture", "link", "meta", "base"];

let purify = null;

function instance() {
  if (purify) return purify;
  const p = DOMPurify(window);
  if (!p.isSupported) throw new Error("DOMPurify is not supported in this browser");
  p.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });
  purify = p;
  return p;
}

/** Sanitised HTML string, safe to assign to innerHTML. */
export function sanitize(html) {
  return instance().sanitize(html, {
    FORBID_TAGS,
    FORBID_ATTR: ["style", "id", "name", "class"],
    ALLOW_DATA_ATTR: false,
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
  });
}
