#!/usr/bin/env bash
# `make run`: serve tokenrelay on its embedded defaults (embedded Valkey, a model, the web page).
# With OPENAI_API_KEY or OPENAI_BASE_URL (environment or .env) it uses that server and skips the
# local model; otherwise it installs the local model (compiled once, then cached) and uses it.
set -euo pipefail
cd "$(dirname "$0")/.."

from_dotenv() {
  [ -f .env ] && grep -E "^$1=." .env >/dev/null 2>&1
}

if [ -n "${OPENAI_API_KEY:-}" ] || [ -n "${OPENAI_BASE_URL:-}" ] \
   || from_dotenv OPENAI_API_KEY || from_dotenv OPENAI_BASE_URL; then
  echo "tokenrelay: using the OpenAI-compatible server from OPENAI_API_KEY / OPENAI_BASE_URL"
elif [ "${TOKENRELAY_PROVIDER:-auto}" = "auto" ] || [ "${TOKENRELAY_PROVIDER:-}" = "local" ]; then
  bash scripts/install-local.sh
fi

exec .venv/bin/tokenrelay serve "$@"
