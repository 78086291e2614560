"""torch internals the project relies on, in one place: fake CUDA tensors for device-placement tests.

torch._subclasses.fake_tensor is private. Without a GPU, FakeTensorMode creates "cuda" tensors that carry
shapes, dtypes and devices but no data, and raises FakeTensorDeviceMismatchError when a CPU tensor meets a
cuda one in an op: exactly the bug a CPU-only test suite never sees. Limits (torch 2.14): modules must be
built outside the mode and moved in with .to("cuda"); backward, autocast on "cuda" and data-dependent
calls (.item(), bool(), int()) do not run (the last raise DataDependentOutputException).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.compat import check_version

check_version("torch", ("2.14.1",))

try:
    from torch._subclasses.fake_tensor import (  # noqa: F401 (re-exported for the tests)
        DataDependentOutputException,
        FakeTensor,
        FakeTensorDeviceMismatchError,
        FakeTensorMode,
    )
except ImportError as e:  # a private module: it may move between releases
    from pipeline.compat import CompatError, installed_version

    raise CompatError(f"torch {installed_version('torch')} has no {e.name or 'torch._subclasses.fake_tensor'} name "
                      f"this project's device tests rely on ({e}): update pipeline/compat/torch.py") from None


@contextmanager
def fake_cuda() -> Iterator[None]:
    """Inside, device="cuda" works without a GPU (fake tensors); real CPU tensors may enter ops with fake
    ones, so data from a real loader flows in and a missing .to(device) raises a device mismatch."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def is_fake(t: object) -> bool:
    return isinstance(t, FakeTensor)
