"""The GPU machine's Python, simulated on this one for ``scripts/gpu_check.sh --cpu-dry-run``.

Put on PYTHONPATH, this runs at interpreter start and refuses to import, from this machine's
site-packages, any top-level module whose distribution the GPU machine lacks (the list in
``box_packages.txt`` beside this file): ray among them. Modules found elsewhere on the path
(the repo, the wheels installed into the check's target directory, the standard library)
import as usual. So a dry run that passes shows that nothing the check runs needs Ray, and
that the carried wheels hold every package the GPU machine is missing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import re
import sys
import sysconfig
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SITE = [str(Path(p).resolve()) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_BOX = {_norm(line.strip()) for line in (_HERE / "box_packages.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")}


class _OnlyWhatTheBoxHas(importlib.machinery.PathFinder):
    """The path finder, except that a top-level module found in this venv's site-packages
    whose distribution is not on the GPU machine is not found at all (``import`` raises
    ModuleNotFoundError, ``importlib.util.find_spec`` returns None), as there."""

    _dists: dict[str, list[str]] | None = None

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        spec = super().find_spec(name, path, target)
        if spec is None or "." in name:
            return spec  # submodules follow their package
        where = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
        if not where or not all(str(Path(w).resolve()).startswith(tuple(_SITE)) for w in where):
            return spec  # the repo, the wheels' target, the standard library
        if cls._dists is None:
            cls._dists = importlib.metadata.packages_distributions()
        dists = cls._dists.get(name, [])
        if not dists or any(_norm(d) in _BOX for d in dists):
            return spec
        if os.environ.get("GPU_CHECK_DRY_RUN_VERBOSE"):
            print(f"gpu_check dry run: {name} ({dists[0]}) is not on the GPU machine", file=sys.stderr)
        return None


# In place of the path finder, so that no later finder finds what this one hides.
sys.meta_path[:] = [_OnlyWhatTheBoxHas if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
