#!/usr/bin/env bash
# Builds the real inference engine the tests serve through Talon:
# llama.cpp's OpenAI-compatible server as the llama-cpp-python package
# (built from source, a few minutes on 2 cores), with the gguf package the
# tests write their model with. Cached in target/llama-venv: a later run
# that finds it ready returns at once. Prints the venv's python.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/llama-venv"
mkdir -p "$root/target"
exec 9>"$root/target/llama-venv.lock"
flock 9
if [[ ! -f "$venv/.talon-ready" ]]; then
    echo "building llama-cpp-python into $venv (cached for later runs)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_OPENMP=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'llama-cpp-python[server]==0.3.36' 'gguf==0.19.0' 'numpy==2.4.6' >&2
    "$venv/bin/python" -c 'import llama_cpp.server.app, gguf' >&2
    touch "$venv/.talon-ready"
fi
echo "$venv/bin/python"
