#!/usr/bin/env bash
# Install Debian's dataset-fashion-mnist package (the offline source of Fashion-MNIST).
# Needs root (or sudo); without it, `mnist-cnn data fetch` falls back to the web mirror.
set -u
pkg=dataset-fashion-mnist
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  echo "note: not root, skipping 'apt-get install $pkg'; Fashion-MNIST will be tried online" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get here; Fashion-MNIST will be tried online" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -qq "$pkg" >/dev/null 2>&1 \
  || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq "$pkg" >/dev/null 2>&1; } \
  || echo "note: 'apt-get install $pkg' failed; Fashion-MNIST will be tried online" >&2
exit 0
