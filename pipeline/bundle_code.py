"""Bundle-local Python code (``scripts/`` next to ``configs/``), importable for its own bundle only.

A Model Zoo bundle may name its own code in ``inference.json`` (lung_nodule_ct_detection:
``scripts.detection_inferer.RetinaNetInferer``). Every bundle calls that package ``scripts``, so
two bundles in one worker would see each other's code if the bundle directory went on ``sys.path``.
Instead:

- the modules are served from the **pinned bytes** (``scripts/**/*.py`` are covered by the bundle's
  sha256, :mod:`pipeline.bundle_pins`), never read from disk a second time;
- they exist in ``sys.modules`` only while their bundle is being built or run
  (:meth:`BundleCode.active`): before, any other ``scripts`` module (another bundle's, or the
  host's) is set aside, and afterwards it is put back and the bundle's own modules are kept by
  the bundle, not by the interpreter.

Activations are serialised by one process-wide lock: two bundles never share ``sys.modules``
at the same time. Code that a bundle's modules import themselves (``monai``, ``torch``) is shared
as usual.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Iterator, Mapping

__all__ = ["BUNDLE_CODE_DIRS", "BundleCode"]

#: Top-level packages of a bundle that are importable for that bundle (and pinned with it).
BUNDLE_CODE_DIRS: tuple[str, ...] = ("scripts",)

_lock = threading.RLock()  # one bundle's modules in sys.modules at a time


def _owned(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``scripts`` and ``scripts.*`` in the pinned files of one bundle."""

    def __init__(self, files: Mapping[str, bytes], packages: tuple[str, ...], origin: str) -> None:
        self.files = files
        self.packages = packages
        self.origin = origin

    def _source(self, fullname: str) -> tuple[str, bool] | None:
        base = fullname.replace(".", "/")
        if f"{base}/__init__.py" in self.files:
            return f"{base}/__init__.py", True
        if f"{base}.py" in self.files:
            return f"{base}.py", False
        if any(rel.startswith(base + "/") for rel in self.files):
            return "", True  # a namespace-like package without __init__.py
        return None

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not _owned(fullname, self.packages):
            return None
        found = self._source(fullname)
        if found is None:
            return None  # ModuleNotFoundError, naming the module
        rel, is_package = found
        spec = importlib.machinery.ModuleSpec(
            fullname, self, origin=f"{self.origin}/{rel or fullname}", is_package=is_package
        )
        if is_package:
            spec.submodule_search_locations = []
        spec.has_location = bool(rel)
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        found = self._source(module.__name__)
        if found is None or not found[0]:
            return
        rel = found[0]
        code = compile(self.files[rel], f"{self.origin}/{rel}", "exec", dont_inherit=True)
        exec(code, module.__dict__)


class BundleCode:
    """The bundle-local packages of one pinned bundle, and the modules imported from them so far."""

    def __init__(self, files: Mapping[str, bytes], origin: str) -> None:
        self.files = {rel: data for rel, data in files.items() if rel.split("/", 1)[0] in BUNDLE_CODE_DIRS}
        self.packages = tuple(sorted({rel.split("/", 1)[0] for rel in self.files}))
        self._finder = _Finder(self.files, self.packages, origin)
        self._modules: dict[str, types.ModuleType] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this bundle's packages (and only its) importable for the duration of the block."""
        if not self.packages:
            yield
            return
        with _lock:
            others = {n: m for n, m in sys.modules.items() if _owned(n, self.packages)}
            for name in others:
                del sys.modules[name]
            sys.modules.update(self._modules)
            sys.meta_path.insert(0, self._finder)
            try:
                yield
            finally:
                with contextlib.suppress(ValueError):
                    sys.meta_path.remove(self._finder)
                mine = {n: m for n, m in sys.modules.items() if _owned(n, self.packages)}
                for name in mine:
                    del sys.modules[name]
                self._modules = mine
                sys.modules.update(others)
