#!/usr/bin/env bash
# Makes what the browser tests need: Debian's Chromium (installed with apt
# when missing and this runs as root, as on CI) and playwright-core from
# npm, installed once into target/browser (reused while package-lock.json
# is unchanged). Playwright never downloads a browser here: the tests start
# /usr/bin/chromium.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/../../target/browser"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "Chromium is missing: install Debian's package (sudo apt-get install chromium)" >&2
    exit 1
  fi
fi
command -v npm >/dev/null || { echo "npm is missing: install Node.js 20 or later" >&2; exit 1; }
if [ ! -d "$dest/node_modules/playwright-core" ] || ! cmp -s "$here/package-lock.json" "$dest/package-lock.json"; then
  mkdir -p "$dest"
  cp "$here/package.json" "$here/package-lock.json" "$dest/"
  (cd "$dest" && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "$dest/node_modules/playwright-core"
