"""Cluster profiles: what wins between params.yaml and the profile (and the warning when params.yaml overrides
it), set-up lines, and those lines running in a real SLURM job before the task."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import launch
from pipeline.config import ConfigError, load_params
from tests.slurm_fixture import SlurmCluster

REPO = Path(__file__).resolve().parents[1]


def project_params(tmp_path: Path, launch_section: dict, profile: dict) -> Path:
    """tmp_path/params.yaml (the shipped one with `launch_section`) and slurm/profiles/site.yaml (`profile`)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["launch"] = {"executor": "slurm", "profile": "site"} | launch_section
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "slurm/profiles").mkdir(parents=True)
    (tmp_path / "slurm/profiles/site.yaml").write_text(yaml.safe_dump({"launch": profile}))
    return tmp_path / "params.yaml"


def test_params_yaml_wins_over_the_profile_and_each_override_is_named(tmp_path, capsys):
    profile = {"partition": "gpu", "mem_gb": 64, "cpus_per_task": 6, "setup": ["module load cuda"]}
    params = project_params(tmp_path, {"mem_gb": 480, "cpus_per_task": 6}, profile)
    p = load_params(params)
    assert (p.launch.partition, p.launch.mem_gb, p.launch.cpus_per_task) == ("gpu", 480, 6)
    assert p.launch.setup == ["module load cuda"]  # from the profile
    assert p.launch.timeout_min == 60  # neither sets it: the schema default
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [f"params: warning: launch.mem_gb = 480 in params.yaml overrides 64 of the profile "
                        f"{tmp_path / 'slurm/profiles/site.yaml'} (params.yaml wins; delete the key there to use "
                        f"the profile's)"]  # cpus_per_task: the same value in both, nothing overridden


def test_no_warning_without_overrides(tmp_path, capsys):
    load_params(project_params(tmp_path, {}, {"partition": "gpu", "setup": ["source /shared/venv/bin/activate"]}))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("profile, message", [
    ({"memory": 64}, "site.yaml: unknown key 'launch.memory'"),
    ({"setup": "module load cuda"}, "launch.setup = 'module load cuda' must be of type list"),
    ({"setup": ["module load cuda\nsrun x"]}, "must be a list of one-line shell commands"),
])
def test_bad_profile_values_name_the_key(tmp_path, profile, message):
    with pytest.raises(ConfigError) as e:
        load_params(project_params(tmp_path, {}, profile))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shipped_profiles_validate():
    for profile in sorted((REPO / "slurm/profiles").glob("*.yaml")):
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["launch"] = {"executor": "slurm", "profile": profile.stem}
        raw["pretrain"] |= {"batch_size": 32, "queue_size": 65536}  # a batch and K that 8 or 2 GPUs divide
        for task in ("voc", "coco"):
            raw["detection"][task]["ims_per_batch"] = 16
        tmp = REPO / f".params-{profile.stem}.check.yaml"  # beside slurm/, where profiles are looked up
        try:
            tmp.write_text(yaml.safe_dump(raw))
            load_params(tmp)
        finally:
            tmp.unlink(missing_ok=True)
    example = yaml.safe_load((REPO / "slurm/profiles/example-a100.yaml").read_text())["launch"]
    assert any(line.startswith("module load") for line in example["setup"])


def setup_probe() -> dict:
    """Runs as the SLURM job: what the profile's set-up lines left in the environment and the folder."""
    return {"probe": os.environ.get("HNCL_SETUP_PROBE"), "job": os.environ.get("SLURM_JOB_ID"),
            "marker": Path("setup-ran").read_text().strip() if Path("setup-ran").exists() else None}


def test_setup_lines_run_in_the_job_before_the_task(slurm_cluster: SlurmCluster, tmp_path, monkeypatch, capsys):
    profile = yaml.safe_load((REPO / "slurm/profiles/local-test.yaml").read_text())["launch"]
    profile["setup"] = ["export HNCL_SETUP_PROBE=job-$SLURM_JOB_ID", "echo node $SLURMD_NODENAME > setup-ran"]
    params = project_params(tmp_path, {}, profile)
    monkeypatch.chdir(tmp_path)  # launch.run keeps its logs under ./logs/slurm, and the job starts here
    p = load_params(params)
    result, job = launch.run(p, "probe", setup_probe, single_task=True, poll_s=0.5)
    assert job["executor"] == "slurm" and job["state"] == "COMPLETED"
    assert result["job"] == job["job_id"] and result["probe"] == f"job-{job['job_id']}"
    assert result["marker"].startswith("node ") and len(result["marker"]) > len("node ")
    script = (tmp_path / "logs/slurm/probe").glob("*_submission.sh")
    text = next(script).read_text()
    assert text.index("export HNCL_SETUP_PROBE") < text.index("srun")  # in the script, before the tasks
    shutil.rmtree(tmp_path / "logs")
