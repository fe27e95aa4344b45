// Bundles the page into src/tokenrelay/gateway/static/, served by the gateway at /static/.
// Hashed file names, so a browser never mixes an old script with a new page.
import { build } from "esbuild";
import { cp, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = path.resolve(here, process.argv[2] || "../src/tokenrelay/gateway/static");
const base = "/static/";

await rm(outdir, { recursive: true, force: true });
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

const template = await readFile(path.join(here, "index.html"), "utf8");
const html = template.replace("{{js}}", base + js).replace("{{css}}", base + css);
if (html.includes("{{")) throw new Error("index.html has an unfilled placeholder");
await writeFile(path.join(outdir, "index.html"), html);
await cp(path.join(here, "public"), outdir, { recursive: true });
console.log(`web: built ${js}, ${css} into ${path.relative(process.cwd(), outdir)}`);
