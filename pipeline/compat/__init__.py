"""Where this project reaches into a dependency's internals: one module per dependency (ffcv.py, detectron2.py, ...).

A private name, an undocumented attribute or an import side effect we undo is used only through these modules, so
that an upgrade has one place to check. Each module calls `check_version` once: a version it was not tested with
gives a warning (the internals may still be there); a private name that is actually missing fails with a
CompatError that names the package, its version, the name and the module to update (`require`).
"""

from __future__ import annotations

import warnings
from importlib import metadata
from typing import Any


class CompatError(RuntimeError):
    """A dependency no longer has an internal name this project relies on."""


class UntestedVersionWarning(UserWarning):
    """A dependency at a version whose internals pipeline/compat/ was not checked against."""


_TESTED: dict[str, tuple[str, ...]] = {}


def installed_version(dist: str) -> str:
    """The installed version of distribution `dist` ("not installed" if absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def check_version(dist: str, tested: tuple[str, ...]) -> bool:
    """Warn (UntestedVersionWarning) if `dist` is installed at a version not in `tested`; True if it is tested.

    Versions compare on their public part: a local build tag (`2.14.1+cu130`) is the same release."""
    _TESTED[dist] = tested
    version = installed_version(dist)
    if version.split("+")[0] in tested:
        return True
    warnings.warn(f"{dist} {version} is not a version pipeline/compat/ was tested with ({', '.join(tested)}): the "
                  f"internals it uses are checked as they are reached", UntestedVersionWarning, stacklevel=2)
    return False


def require(owner: Any, name: str, dist: str, module: str) -> Any:
    """getattr(owner, name), or a CompatError naming what is missing and which compat module to update."""
    try:
        return getattr(owner, name)
    except AttributeError:
        owner_name = getattr(owner, "__qualname__", None) or type(owner).__qualname__
        raise CompatError(
            f"{dist} {installed_version(dist)} has no {owner_name}.{name}, which pipeline/compat/{module}.py relies "
            f"on (tested with {dist} {', '.join(_TESTED.get(dist, ())) or '?'}): update that module or install a "
            f"tested version") from None
