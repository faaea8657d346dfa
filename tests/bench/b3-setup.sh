#!/usr/bin/env bash
# Installs the peers benchmark B3 compares against: nginx (Debian) and
# LiteLLM's proxy (PyPI, into a virtualenv under target/), and builds Talon in
# release. Run from the repository root.
set -euo pipefail
if ! command -v nginx >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
if [ ! -x target/litellm-venv/bin/litellm ]; then
  python3 -m venv target/litellm-venv
  target/litellm-venv/bin/pip install --quiet 'litellm[proxy]'
fi
cargo build --release -p talon-coordinator -p talon-node-agent -p talon-client -p talon-tests --bins
