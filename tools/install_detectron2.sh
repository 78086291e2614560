#!/usr/bin/env bash
# Install detectron2 into a venv as pure Python. detectron2 is not on PyPI under its own name; the wheel
# sal-detectron2==0.7.2 (built from upstream main) is, but only for cp310 and with a compiled _C module,
# a top-level `tools` package (which would shadow this repo's tools/) and a numpy<2 pin. Everything the
# C4/FPN detectors need runs without _C on CPU (roi_align and nms come from torchvision), so we repack
# the wheel as py3-none-any without those parts and install it with exact pins of what it needs.
# Idempotent: does nothing when the venv already passes the check at the bottom.
# Usage: tools/install_detectron2.sh VENV_DIR
set -euo pipefail

VENV=${1:?usage: tools/install_detectron2.sh VENV_DIR}
PY="$VENV/bin/python"
D2_VERSION=0.7.2
# what detectron2 needs but its wheel does not pin (upstream setup.py: fvcore<0.1.6, iopath<0.1.10;
# model_zoo imports pkg_resources, gone from setuptools 81)
COMPANIONS=(fvcore==0.1.5.post20221221 iopath==0.1.9 pycocotools==2.0.11 setuptools==80.10.2)
# the rest of what the wheel pulls in and the venv does not already have, pinned for reproducibility
CONSTRAINTS=(yacs==0.1.8 termcolor==3.3.0 portalocker==4.4.2 tensorboard==2.21.0 tensorboard-data-server==0.7.2
  absl-py==2.5.1 grpcio==1.85.1 Markdown==3.11.3 protobuf==7.36.2 Werkzeug==3.1.9 black==26.10.1
  mypy_extensions==1.2.0 pytokens==0.4.1)

die() { echo "install_detectron2: $*" >&2; exit 1; }
[ -x "$PY" ] || die "no python at $PY (create the venv first)"

# Imports detectron2, checks it is the repacked wheel with the pinned companions, builds a small
# R50-C4 Faster R-CNN on CPU and runs one inference forward (exercises torchvision's roi_align and nms).
check() {
  "$PY" -W ignore - "$D2_VERSION" "${COMPANIONS[@]}" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

import torch

version, pins = sys.argv[1], sys.argv[2:]
import detectron2

assert detectron2.__version__ == version, f"detectron2 {detectron2.__version__} != {version}"
assert importlib.util.find_spec("detectron2._C") is None, "compiled detectron2._C present (not the repacked wheel)"
for pin in pins:
    name, want = pin.split("==")
    assert md.version(name) == want, f"{name} {md.version(name)} != {want}"
from detectron2.config import get_cfg
from detectron2.modeling import build_model

cfg = get_cfg()
cfg.MODEL.DEVICE = "cpu"
cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 8
model = build_model(cfg).eval()
with torch.no_grad():
    out = model([{"image": torch.rand(3, 64, 64) * 255}])  # one image, C x H x W in 0-255
assert "instances" in out[0]
EOF
}

if check >/dev/null 2>&1; then
  echo "install_detectron2: detectron2 $D2_VERSION already installed in $VENV"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "install_detectron2: downloading sal-detectron2==$D2_VERSION"
"$PY" -m pip download -q --no-deps --python-version 3.10 --only-binary=:all: \
  "sal-detectron2==$D2_VERSION" -d "$tmp/dl" 2> >(grep -v "is ignored" >&2) || die "pip download of sal-detectron2==$D2_VERSION failed"
src=("$tmp"/dl/sal_detectron2-"$D2_VERSION"-*.whl)
[ -f "${src[0]}" ] || die "downloaded wheel not found in $tmp/dl"

echo "install_detectron2: repacking as pure Python"
mkdir "$tmp/whl"
"$PY" - "${src[0]}" "$tmp/whl" "$D2_VERSION" <<'EOF' || die "repacking the wheel failed"
import base64
import hashlib
import sys
import zipfile

src, out_dir, version = sys.argv[1:]
info_dir = f"sal_detectron2-{version}.dist-info/"
edits = {  # file -> (old bytes, new bytes) that must each be found once
    info_dir + "METADATA": [(b"Requires-Dist: numpy<2\n", b"Requires-Dist: numpy\n")],
    info_dir + "WHEEL": [(b"Root-Is-Purelib: false", b"Root-Is-Purelib: true"),
                         (b"Tag: cp310-cp310-linux_x86_64", b"Tag: py3-none-any")],
    info_dir + "top_level.txt": [(b"detectron2\ntools\n", b"detectron2\n")],
}
dropped, record = [], []
with zipfile.ZipFile(src) as zin, \
        zipfile.ZipFile(f"{out_dir}/sal_detectron2-{version}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as zout:
    for name in zin.namelist():
        if name.startswith(("tools/", "detectron2/_C.")) or name == info_dir + "RECORD":
            dropped.append(name)
            continue
        data = zin.read(name)
        for old, new in edits.pop(name, []):
            assert data.count(old) == 1, f"{name}: expected one {old!r}"
            data = data.replace(old, new)
        zout.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(info_dir + "RECORD,,")
    zout.writestr(info_dir + "RECORD", "\n".join(record) + "\n")
assert not edits, f"files not found in the wheel: {list(edits)}"
assert any(n.startswith("detectron2/_C.") for n in dropped), "no compiled _C module found to drop"
print(f"dropped {len(dropped)} files (_C, tools/, RECORD)")
EOF

echo "install_detectron2: installing into $VENV"
printf '%s\n' "${CONSTRAINTS[@]}" > "$tmp/constraints.txt"
# a same-version install (say the original wheel with _C) would count as satisfied: remove it first
"$PY" -m pip uninstall -q -y sal-detectron2 2>/dev/null || true
"$PY" -m pip install -q -c "$tmp/constraints.txt" "$tmp"/whl/*.whl "${COMPANIONS[@]}" \
  2> >(grep -v "is ignored" >&2) || die "pip install failed"

out=$(check 2>&1) || { echo "$out" >&2; die "installed, but the check failed (see the error above)"; }
echo "install_detectron2: ok (detectron2 $D2_VERSION, pure Python, in $VENV)"
