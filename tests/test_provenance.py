"""Provenance is truthful: `git_dirty` says whether code, configs or params differed from the commit, not whether
DVC rewrote its own outputs and dvc.lock during the run; the differing paths are listed; the params that
`dvc exp run -S` sets are recorded by params_hash, not as dirt."""

import json
from pathlib import Path

from tests.conftest import make_project, run

COMMIT = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm"]


def provenance(path: Path) -> dict:
    return json.loads((path / "metrics/ffcv.run.json").read_text())["provenance"]  # the stage's run record


def test_git_dirty_ignores_dvc_outputs_and_lists_what_differs(tmp_path: Path):
    path, set_params = make_project(tmp_path / "p")
    (path / ".gitignore").write_text("__pycache__/\n")  # as in this repo
    run(["git", "add", "-A"], path)
    run([*COMMIT, "ignore bytecode"], path)
    run(["dvc", "repro", "ffcv_convert"], path)
    run(["git", "add", "-A"], path)
    run([*COMMIT, "outputs of dvc repro"], path)  # dvc.lock and the metrics in git, as in this repo

    # dvc repro -f removes and rewrites metrics/ffcv.json and rewrites dvc.lock while the stage runs
    run(["dvc", "repro", "-f", "ffcv_convert"], path)
    prov = provenance(path)
    head = run(["git", "rev-parse", "HEAD"], path).stdout.strip()
    assert (prov["git_commit"], prov["git_dirty"], prov["git_changed"]) == (head, False, [])

    (path / "stages/report.py").write_text((path / "stages/report.py").read_text() + "# edited\n")
    (path / "pipeline/extra.py").write_text("X = 1\n")  # untracked code counts too
    (path / "dvc.lock").unlink()  # DVC's own file: never counts
    run(["dvc", "repro", "-f", "ffcv_convert"], path)
    prov = provenance(path)
    assert (prov["git_dirty"], prov["git_changed"]) == (True, ["pipeline/extra.py", "stages/report.py"])
    run(["git", "checkout", "--", "stages/report.py"], path)
    (path / "pipeline/extra.py").unlink()

    set_params({"data": {"jpeg_quality": 80}})  # params edited by hand, then dvc repro: they differ from the commit
    run(["dvc", "repro", "ffcv_convert"], path)
    assert (provenance(path)["git_dirty"], provenance(path)["git_changed"]) == (True, ["params.yaml"])
    run(["git", "checkout", "--", "params.yaml"], path)

    # an experiment: params.yaml differs from the commit by design; the params hash records it
    out = run(["dvc", "exp", "run", "-n", "q70", "-S", "data.jpeg_quality=70", "ffcv_convert"], path).stdout
    assert "Running stage 'ffcv_convert'" in out
    prov = provenance(path)
    assert (prov["git_dirty"], prov["git_changed"], prov["dvc_experiment"]) == (False, [], "q70")
    assert prov["params_hash"] != json.loads(run(["git", "show", "HEAD:metrics/ffcv.run.json"], path).stdout)[
        "provenance"]["params_hash"]
