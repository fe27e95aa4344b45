#!/usr/bin/env bash
# Builds the web page (web/) into src/tokenrelay/gateway/static/ for `make web`.
# Installs npm packages only when web/node_modules is missing or older than the lock file,
# rebuilds only when a source file changed, and fails loudly without node/npm.
set -euo pipefail
cd "$(dirname "$0")/../web"

OUT=../src/tokenrelay/gateway/static

die() {
    echo "build-web: ERROR: $*" >&2
    exit 1
}

command -v node >/dev/null 2>&1 \
    || die "node is not installed; the web page needs Node.js 18+ and npm (Debian: apt-get install -y nodejs npm)"
command -v npm >/dev/null 2>&1 \
    || die "npm is not installed; the web page needs it to fetch its packages (Debian: apt-get install -y npm)"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || die "node $(node --version) is too old; the web page needs Node.js 18+"

hash_of() {
    # Content, not mtimes: a fresh clone or a checkout must not look up to date.
    find "$@" -type f -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

deps_hash=$(hash_of package.json package-lock.json)
deps_stamp=node_modules/.tokenrelay-deps
if [ ! -d node_modules ] || [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_hash" ]; then
    echo "build-web: installing npm packages"
    if [ -f package-lock.json ]; then
        npm ci --no-audit --no-fund --loglevel=error
    else
        npm install --no-audit --no-fund --loglevel=error
        deps_hash=$(hash_of package.json package-lock.json)
    fi
    echo "$deps_hash" >"$deps_stamp"
fi

src_hash=$(hash_of package.json package-lock.json build.mjs index.html src public test)
build_stamp=$OUT/.source-hash
if [ -f "$OUT/index.html" ] && [ "$(cat "$build_stamp" 2>/dev/null)" = "$src_hash" ]; then
    echo "build-web: up to date"
    exit 0
fi
# The page's own unit tests (node's test runner) gate every new bundle.
node --test --test-reporter=dot test/
node build.mjs "$OUT"
echo "$src_hash" >"$build_stamp"
