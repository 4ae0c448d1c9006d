#!/usr/bin/env bash
# Install one Debian package quietly, as root or through passwordless sudo.
# Usage: apt-install.sh PACKAGE WHAT-HAPPENS-WITHOUT-IT
# Never fails: without the package the project falls back (the message says how).
set -u
pkg=$1
fallback=$2
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  echo "note: not root, skipping 'apt-get install $pkg'; $fallback" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get here; $fallback" >&2
  exit 0
fi
echo "installing Debian's $pkg (once)" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -qq "$pkg" >/dev/null 2>&1 \
  || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq "$pkg" >/dev/null 2>&1; } \
  || echo "note: 'apt-get install $pkg' failed; $fallback" >&2
exit 0
