// Bundles the page into src/tokenrelay/gateway/static/, served by the gateway at /static/.
// Hashed file names, so a browser never mixes an old script with a new page; the new files
// are written beside the old ones and index.html is swapped in last, so a running server
// always has a complete page to serve.
import { build } from "esbuild";
import { cp, mkdir, readFile, readdir, rename, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = path.resolve(here, process.argv[2] || "../src/tokenrelay/gateway/static");
const base = "/static/";
const KEEP = new Set([".source-hash"]); // build-web.sh's stamp

await mkdir(outdir, { recursive: true });

const result = await build({
  entryPoints: { app: path.join(here, "src/main.js") },
  bundle: true,
  format: "esm",
  target: ["es2020"],
  minify: true,
  sourcemap: "linked",
  legalComments: "linked",
  entryNames: "[name]-[hash]",
  outdir,
  publicPath: base,
  metafile: true,
  logLevel: "warning",
});

const outputs = Object.keys(result.metafile.outputs).map((p) => path.basename(p));
const js = outputs.find((f) => /^app-.*\.js$/.test(f));
const css = outputs.find((f) => /^app-.*\.css$/.test(f));
if (!js || !css) throw new Error(`esbuild produced no app js/css: ${outputs.join(", ")}`);

const publicDir = path.join(here, "public");
const publicFiles = await readdir(publicDir);
await cp(publicDir, outdir, { recursive: true });

const template = await readFile(path.join(here, "index.html"), "utf8");
const html = template.replace("{{js}}", base + js).replace("{{css}}", base + css);
if (html.includes("{{")) throw new Error("index.html has an unfilled placeholder");
await writeFile(path.join(outdir, "index.html.tmp"), html);
await rename(path.join(outdir, "index.html.tmp"), path.join(outdir, "index.html"));

const current = new Set([...outputs, ...publicFiles, "index.html", ...KEEP]);
for (const name of await readdir(outdir)) {
  if (!current.has(name)) await rm(path.join(outdir, name), { recursive: true, force: true });
}
console.log(`web: built ${js}, ${css} into ${path.relative(process.cwd(), outdir)}`);
