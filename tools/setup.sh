#!/usr/bin/env bash
# Idempotent set-up: system packages for ffcv, a venv keyed by requirements.lock (cached outside the
# clone, so a second clone or a CI run on the same machine reuses it), and `dvc init`.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(pkg-config libopencv-dev libturbojpeg0-dev wordnet-base)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages (install them as root): ${missing[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
key=$(cat requirements.lock tools/install_detectron2.sh | sha256sum | cut -c1-16)
cache=${HNCL_VENV_CACHE:-$HOME/.cache/hncl}/venv-$key
if [ ! -f "$cache/.complete" ]; then
  echo "setup: creating venv $cache (first run: a few minutes)"
  rm -rf "$cache"
  "$PY" -m venv "$cache"
  # torch first, alone, so that pip takes the wheels on this machine's disk
  "$cache/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
  "$cache/bin/pip" install -q -r requirements.lock 2>&1 | grep -v "is ignored" || true
  bash tools/install_detectron2.sh "$cache"
  "$cache/bin/python" -c "import torch, torchvision, ffcv, dvc, dvclive, submitit, detectron2" \
    || { echo "setup: venv is broken: $cache" >&2; exit 1; }
  touch "$cache/.complete"
fi
if [ "$(readlink .venv 2>/dev/null)" != "$cache" ]; then
  rm -rf .venv
  ln -s "$cache" .venv
fi
[ -d .dvc ] || .venv/bin/dvc init -q
echo "setup: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
