"""bench.gpu_smoke, the check users run on their GPU nodes, runs end to end here at toy shapes on the CPU
(same code paths: train_step in fp32 and bf16 + channels_last, feature extraction, chunked kNN, one
detectron2 iteration), so it cannot rot between GPU sessions."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_runs_at_toy_shapes_on_the_cpu():
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--device", "cpu", "--tiny", "--steps", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    rows = {(r["section"], r["setting"]): r for r in result["rows"]}
    for method in ("moco", "mochi"):
        fp32, bf16 = rows["pretrain", f"{method} fp32"], rows["pretrain", f"{method} bf16+channels_last"]
        assert fp32["images_per_s"] > 0 and bf16["images_per_s"] > 0
        assert math.isfinite(fp32["first_loss"]) and rows["pretrain", f"{method} loss bf16 vs fp32"][
            "relative_difference"] < 0.05  # encoders in bf16, similarities and loss in fp32
    assert any(section == "features" and r.get("queries_per_s", 0) > 0 for (section, _), r in rows.items())
    assert any(section == "detection" and math.isfinite(r.get("seconds", math.nan)) for (section, _), r in rows.items())
