#!/usr/bin/env bash
# The reference the native executor is checked against: Hugging Face
# transformers on PyTorch CPU, from PyPI (PyPI's Linux torch is the CUDA
# build; it runs on a CPU and brings its CUDA libraries, ~3 GB, which is
# why it is cached; triton, ~1 GB, is left out). Also the tokenizers
# package the test models' tokenizers are trained with. Cached in target/torch-venv: a later run that finds it
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
    pip=("$venv/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check)
    # torch without its dependencies first, then those it needs on this
    # platform except triton (torch.compile's GPU kernel compiler, ~1 GB,
    # which eager CPU inference never imports; pip warns that it is
    # missing); no wheel cache kept.
    "${pip[@]}" --no-deps 'torch==2.15.0' >&2
    mapfile -t needs < <("$venv/bin/python" - <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for line in requires("torch") or []:
    r = Requirement(line)
    if r.name.lower() != "triton" and (r.marker is None or r.marker.evaluate({"extra": ""})):
        r.marker = None
        print(r)  # name, extras (cuda-toolkit's pick the CUDA libraries) and version
PY
)
    "${pip[@]}" "${needs[@]}" 'transformers==5.25.0' 'tokenizers==0.23.3' \
        'safetensors==0.8.0' 'numpy==2.4.6' >&2
    "$venv/bin/python" -c 'import torch, transformers; torch.ones(2) @ torch.ones(2)' >&2
    touch "$venv/.talon-ready"
fi
echo "$venv/bin/python"
