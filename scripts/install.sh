#!/usr/bin/env bash
# Install auxhead and everything it needs into .venv at the repository root. Idempotent:
# a second run changes nothing. Fashion-MNIST comes from Debian's dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
  if ! $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; then
    $sudo apt-get update -qq >/dev/null 2>&1 || true
    $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || echo "note: could not install dataset-fashion-mnist; use --data PATH or --data digits" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision are pinned to the builds this machine kind serves from local disk.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[dev,docs]'
