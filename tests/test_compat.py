"""pipeline/compat/: the version check warns on an untested version and fails, naming the package, the name and the
compat module, only when a private name is really missing; the detectron2 trainer set-up follows
DefaultTrainer.__init__."""

import types

import pytest

from pipeline.compat import CompatError, UntestedVersionWarning, check_version, installed_version, require


def test_a_tested_version_passes_quietly_and_an_untested_one_warns(recwarn):
    assert check_version("ffcv", (installed_version("ffcv"),)) is True
    assert not [w for w in recwarn if issubclass(w.category, UntestedVersionWarning)]
    with pytest.warns(UntestedVersionWarning, match=r"ffcv 1\.0\.2 is not a version pipeline/compat/ was tested "
                                                    r"with \(0\.9\.9\)"):
        assert check_version("ffcv", ("0.9.9",)) is False
    assert check_version("torch", ("2.14.1",)) is True  # the local build tag (+cu130) is the same release
    check_version("ffcv", ("1.0.2",))  # as pipeline.compat.ffcv declares it


def test_a_missing_private_name_fails_naming_it_and_the_module_to_update():
    loader = types.SimpleNamespace(next_epoch=0)
    assert require(loader, "next_epoch", "ffcv", "ffcv") == 0
    with pytest.raises(CompatError) as e:
        require(loader, "_epoch_hook", "ffcv", "ffcv")
    assert str(e.value) == ("ffcv 1.0.2 has no SimpleNamespace._epoch_hook, which pipeline/compat/ffcv.py relies on "
                            "(tested with ffcv 1.0.2): update that module or install a tested version")


def test_the_installed_dependencies_have_what_compat_uses():
    from detectron2.engine import DefaultTrainer

    from pipeline.compat import detectron2 as d2
    from pipeline.compat import ffcv as ffcv_compat  # noqa: F401  (imports and checks)

    d2._check_trainer_init()  # DefaultTrainer.__init__ sets exactly what init_trainer sets
    assert d2.TRAINER_ATTRIBUTES >= {"_trainer", "checkpointer"} and callable(DefaultTrainer.run_step)


def test_an_upgrade_that_changes_the_trainer_init_fails_naming_the_attribute(monkeypatch):
    from pipeline.compat import detectron2 as d2

    monkeypatch.setattr(d2, "TRAINER_ATTRIBUTES", d2.TRAINER_ATTRIBUTES - {"scheduler"})
    with pytest.raises(CompatError, match=r"DefaultTrainer.__init__ now sets \[.*'scheduler'.*\], "
                                          r"pipeline/compat/detectron2.py sets"):
        d2._check_trainer_init()


def test_importing_the_ffcv_io_module_leaves_torch_with_the_default_thread_count():
    import subprocess
    import sys

    code = ("import torch; from pipeline.data import ffcv_io; from pipeline.compat.ffcv import default_torch_threads; "
            "print(torch.get_num_threads(), default_torch_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and int(out[0]) >= 1  # ffcv's import alone would leave 1
