#!/usr/bin/env bash
# The reference the native executor is checked against: Hugging Face
# transformers on PyTorch CPU, from PyPI (PyPI's Linux torch is the CUDA
# build; it runs on a CPU and brings its CUDA libraries, ~3 GB, which is
# why it is cached). Also the tokenizers package the test models' tokenizers
# are trained with. Cached in target/torch-venv: a later run that finds it
# ready returns at once. Prints the venv's python.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/torch-venv"
mkdir -p "$root/target"
exec 9>"$root/target/torch-venv.lock"
flock 9
if [[ ! -f "$venv/.talon-ready" ]]; then
    echo "installing torch and transformers into $venv (cached for later runs)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'torch==2.15.0' 'transformers==5.25.0' 'tokenizers==0.23.3' \
        'safetensors==0.8.0' 'numpy==2.4.6' >&2
    "$venv/bin/python" -c 'import torch, transformers; torch.ones(2) @ torch.ones(2)' >&2
    touch "$venv/.talon-ready"
fi
echo "$venv/bin/python"
