// Model output is untrusted: Markdown with raw HTML switched off (it is shown as text),
// then DOMPurify (sanitize.js) over the result as a second, independent wall.
import MarkdownIt from "markdown-it";

const md = new MarkdownIt({ html: false, linkify: true, typographer: false, breaks: false });

// markdown-it already refuses javascript:, vbscript:, file: and most data: URLs; this page
// only ever links to the web or mail.
const SAFE_URL = /^(?:https?:|mailto:|#)/i;
md.validateLink = (url) => SAFE_URL.test(url.trim());

// An answer must not make the browser fetch arbitrary addresses: images become links.
md.renderer.rules.image = (tokens, idx) => {
  const token = tokens[idx];
  const src = token.attrGet("src") || "";
  const alt = token.children ? md.renderer.renderInlineAsText(token.children, md.options, {}) : "";
  const label = md.utils.escapeHtml(`image: ${alt || src}`);
  return `<a href="${md.utils.escapeHtml(src)}">[${label}]</a>`;
};

/** Markdown text → HTML string (not yet sanitised). */
export function renderMarkdown(text) {
  return md.render(text);
}
