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

from torch._subclasses.fake_tensor import (  # noqa: F401 (re-exported for the tests)
    DataDependentOutputException,
    FakeTensor,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
)


@contextmanager
def fake_cuda() -> Iterator[None]:
    """Inside, device="cuda" works without a GPU (fake tensors); real CPU tensors may enter ops with fake
    ones, so data from a real loader flows in and a missing .to(device) raises a device mismatch."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def is_fake(t: object) -> bool:
    return isinstance(t, FakeTensor)
