"""Pinning a MONAI bundle: which files its sha256 covers, how the digest is computed, and checking a pin.

A bundle is code (``_target_`` imports anything, ``$...`` is ``eval``'d), so it is parsed only when
the digest of exactly the bytes about to be parsed equals the digest it was pinned by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.bundle_code import BUNDLE_CODE_DIRS
from pipeline.errors import BundleError
from vocabulary import is_sha256_hex

__all__ = ["bundle_sha256", "digest", "read_bundle_files", "read_pinned"]


def digest(files: Mapping[str, bytes]) -> str:
    sha = hashlib.sha256()
    for rel in sorted(files):
        name = rel.encode("utf-8")
        data = files[rel]
        sha.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big"))
        sha.update(data)
    return sha.hexdigest()


def read_bundle_files(bundle_dir: Path, roots: Sequence[Path] = ()) -> dict[str, bytes]:
    """The covered files (see :func:`bundle_sha256`) by relative POSIX path, each read once."""
    paths = [p for p in (bundle_dir / "configs").glob("*.json") if p.is_file()]
    paths += [p for p in (bundle_dir / "models").rglob("*") if p.is_file()]
    paths += [p for d in BUNDLE_CODE_DIRS for p in (bundle_dir / d).rglob("*.py") if p.is_file()]
    files: dict[str, bytes] = {}
    for path in sorted(paths):
        real = path.resolve()
        if roots and not any(real.is_relative_to(root) for root in roots):
            raise BundleError(
                f"bundle file {path} resolves to {real}, outside the allowed bundle directories"
            )
        files[path.relative_to(bundle_dir).as_posix()] = real.read_bytes()
    return files


def bundle_sha256(bundle_dir: str | Path) -> str:
    """Hex sha256 pinning a bundle: every file of ``configs/*.json``, ``models/**`` and ``scripts/**/*.py``.

    Files are taken in sorted order of their POSIX path relative to the bundle directory; for each,
    the digest is fed ``len(path) || path || len(content) || content`` (lengths as 8-byte big-endian,
    path in UTF-8). Nothing else is covered: ``docs/``, ``LICENSE`` and ``configs/*.yaml`` are not
    read by this runtime. The bundle's own code (``scripts/``, :mod:`pipeline.bundle_code`) is
    imported from the pinned bytes, never from disk (the bundle directory is never on ``sys.path``).
    """
    return digest(read_bundle_files(Path(bundle_dir)))


def read_pinned(path: Path, sha256: str, roots: Sequence[Path]) -> tuple[dict[str, bytes], str]:
    """The covered files of the bundle at ``path`` and their digest, which must equal the pin ``sha256``.

    The bytes returned are the bytes that were hashed: the caller parses and loads those, never a
    second read from disk. BundleError for a malformed pin, a file outside ``roots``, no weights or
    a digest that differs from the pin.
    """
    pinned = sha256.strip().lower()
    if not is_sha256_hex(pinned):
        raise BundleError(f"pinned sha256 for bundle {path} must be 64 hex digits, got {sha256!r}")
    files = read_bundle_files(path, roots)
    if not any(rel.startswith("models/") for rel in files):
        raise BundleError(f"bundle {path} has no weights: models/ is missing or empty")
    actual = digest(files)
    if actual != pinned:
        raise BundleError(
            f"bundle {path} sha256 mismatch: pinned {pinned}, found {actual}; "
            "the bundle changed since it was pinned (re-pin it only if the change is trusted)"
        )
    return files, actual
