#!/usr/bin/env bash
# Set up the llama.cpp baseline under .cache/llamacpp/ (never part of the project's install):
#   1. download llama-cpp-python's source archive from PyPI (it vendors llama.cpp, its converter and llama-bench),
#   2. unpack it,
#   3. build llama-bench, llama-tokenize and llama-completion for the CPU (static, -march=native),
#   4. make the converter's own venv (the vendored requirements, the vendored gguf-py, the project's torch).
# Idempotent: each step is skipped when its result is there; the build is incremental.
#
#   nice -n 19 bash benchmarks/llamacpp/setup.sh        # JOBS=2 by default; LLAMA_CPP_PYTHON_VERSION to change
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # the project's torch (README); the converter only moves tensors with it
JOBS="${JOBS:-2}"
CACHE="$ROOT/.cache/llamacpp"
SRC="$CACHE/src/llama_cpp_python-$VERSION"
LLAMA="$SRC/vendor/llama.cpp"
# -march=native: a build is only good for CPUs with the same instruction set, so the flags name the build folder.
CPU_MODEL="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
CPU_FLAGS_ID="$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-8)"
BUILD="$CACHE/build-$VERSION-$CPU_FLAGS_ID"
VENV="$CACHE/venv-$VERSION"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && PY="${PYTHON:-$ROOT/.venv/bin/python}"

# Static binaries, CPU only, every optional network/UI part off (no network at build or run time).
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF
)
# llama-cli is now the server-backed chat client (needs the server and its web UI): llama-completion is the
# plain one-shot generator that llama-cli used to be.
TARGETS=(llama-bench llama-tokenize llama-completion)

say() { printf '[llamacpp setup] %s\n' "$*"; }
secs() { echo $(( $(date +%s) - $1 )); }
mkdir -p "$CACHE/src"

t=$(date +%s)
ARCHIVE="$CACHE/src/llama_cpp_python-$VERSION.tar.gz"
if [ -f "$ARCHIVE" ]; then
  say "sdist present: $ARCHIVE"
else
  say "downloading llama-cpp-python==$VERSION source archive from PyPI"
  "$PY" -m pip download --quiet --no-binary :all: --no-deps -d "$CACHE/src" "llama-cpp-python==$VERSION"
  say "downloaded in $(secs "$t") s"
fi

if [ -f "$LLAMA/CMakeLists.txt" ]; then
  say "sources unpacked: $LLAMA"
else
  say "unpacking into $CACHE/src"
  tar -xzf "$ARCHIVE" -C "$CACHE/src"
fi
# The sdist has no .git, so llama.cpp's own build info says commit 'unknown': take it from the changelog.
COMMIT="$(awk -v v="## [$VERSION]" '$0 == v {f=1; next} f && /^## \[/ {exit} f' "$SRC/CHANGELOG.md" \
          | grep -o -m1 'llama.cpp@[0-9a-f]*' | cut -d@ -f2 || true)"
say "llama-cpp-python $VERSION vendors llama.cpp @ ${COMMIT:-unknown}"

t=$(date +%s)
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  say "configuring: cmake ${CMAKE_FLAGS[*]}"
  cmake -S "$LLAMA" -B "$BUILD" "${CMAKE_FLAGS[@]}" > "$CACHE/cmake-configure.log" 2>&1 \
    || { tail -20 "$CACHE/cmake-configure.log"; exit 1; }
fi
if [ -x "$BUILD/bin/llama-bench" ] && [ -x "$BUILD/bin/llama-tokenize" ] && [ -x "$BUILD/bin/llama-completion" ]; then
  say "binaries present in $BUILD/bin (checking they are up to date)"
else
  say "building ${TARGETS[*]} with -j$JOBS (log: $CACHE/build.log; takes a while on 2 cores)"
fi
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}" > "$CACHE/build.log" 2>&1 \
  || { grep -B2 -A8 -m5 'error' "$CACHE/build.log" || tail -30 "$CACHE/build.log"; exit 1; }
say "build done in $(secs "$t") s"

cat > "$CACHE/build-info.json" <<EOF
{
  "llama_cpp_python_version": "$VERSION",
  "llama_cpp_commit": "${COMMIT:-unknown}",
  "source": "$LLAMA",
  "bin": "$BUILD/bin",
  "converter_python": "$VENV/bin/python",
  "cmake_flags": "$(echo "${CMAKE_FLAGS[*]}")",
  "compiler": "$(${CC:-cc} --version | head -1)",
  "built_on_cpu": "$CPU_MODEL (flags $CPU_FLAGS_ID)",
  "cmake": "$(cmake --version | head -1)"
}
EOF
say "wrote $CACHE/build-info.json"

t=$(date +%s)
if [ -f "$VENV/.ready" ]; then
  say "converter venv ready: $VENV"
else
  say "creating the converter venv $VENV"
  "$PY" -m venv --clear "$VENV"
  REQS=("$LLAMA/requirements/requirements-convert_legacy_llama.txt")
  # The vendored pins, except torch (its CPU index is unreachable: the project's own torch instead)
  # and gguf (the converter's vendored gguf-py, installed from the source tree).
  mapfile -t PINS < <(grep -h -v -E '^\s*(#|-|torch|gguf|$)' "${REQS[@]}")
  say "installing $TORCH_SPEC ${PINS[*]} and the vendored gguf-py"
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" "${PINS[@]}" "$LLAMA/gguf-py"
  touch "$VENV/.ready"
  say "venv made in $(secs "$t") s"
fi
say "ready: $BUILD/bin/{llama-bench,llama-tokenize,llama-completion}, converter python $VENV/bin/python"
