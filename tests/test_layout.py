"""The dependency rule of the repository layout (see README "Layout").

* `streaming/` imports only the standard library, numpy, onnxruntime and itself;
  in particular no web or audio stack (fastapi, websockets, sounddevice, ...).
* `server/` and `client/` never import `models` or torch.
* `models/` never imports `streaming`, `server` or `client`: the two sides meet only through
  exported model directories (docs/model-interface.md).
* Nothing outside `models/` imports torch, except model tests: files named `test_model*.py`
  anywhere under tests/, and everything under `tests/models/`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from tests.import_scan import (
    PACKAGES,
    ROOT,
    STDLIB,
    Import,
    imports_in,
    imports_under,
    python_files,
    report,
)

STREAMING_ALLOWED = frozenset({"numpy", "onnxruntime", "streaming"})
STREAMING_FORBIDDEN = frozenset(
    {"fastapi", "starlette", "uvicorn", "websockets", "sounddevice", "soundfile"}
)
TORCH = frozenset({"torch", "torchaudio", "torchvision"})


def _pkg(name: str) -> Path:
    return ROOT / name


def _may_import_torch(path: Path) -> bool:
    relative = path.relative_to(ROOT)
    if relative.parts[0] == "models":
        return True
    if relative.parts[0] != "tests":
        return False
    return relative.parts[1] == "models" or path.name.startswith("test_model")


def test_pyproject_lists_the_four_packages() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = config["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(PACKAGES), f"[tool.setuptools] packages = {listed}"
    missing = [name for name in PACKAGES if not _pkg(name).is_dir()]
    assert not missing, f"package directories missing: {missing}"


def test_streaming_imports_only_stdlib_numpy_onnxruntime() -> None:
    bad = [
        imp
        for imp in imports_under(_pkg("streaming"))
        if imp.top not in STDLIB and imp.top not in STREAMING_ALLOWED
    ]
    assert not bad, "streaming/ may import only stdlib, numpy, onnxruntime:\n" + report(bad)


def test_streaming_imports_no_web_or_audio_stack() -> None:
    bad = [imp for imp in imports_under(_pkg("streaming")) if imp.top in STREAMING_FORBIDDEN]
    assert not bad, "streaming/ must stay free of the web and audio stack:\n" + report(bad)


def test_server_and_client_never_import_models_or_torch() -> None:
    bad = [
        imp
        for imp in imports_under(_pkg("server"), _pkg("client"))
        if imp.top == "models" or imp.top in TORCH
    ]
    assert not bad, "server/ and client/ run ONNX through streaming/ only:\n" + report(bad)


def test_models_never_imports_the_runtime_packages() -> None:
    runtime = {"streaming", "server", "client"}
    bad = [imp for imp in imports_under(_pkg("models")) if imp.top in runtime]
    assert not bad, "models/ meets streaming/ only through exported model dirs:\n" + report(bad)


def test_torch_only_in_models_and_model_tests() -> None:
    bad = [
        imp
        for path in python_files(ROOT)
        if not _may_import_torch(path)
        for imp in imports_in(path)
        if imp.top in TORCH
    ]
    assert not bad, "torch is allowed only in models/ and model tests:\n" + report(bad)


def test_scanner_finds_every_kind_of_import(tmp_path: Path) -> None:
    source = (
        "import os, torch.nn as nn\n"
        "from numpy import zeros\n"
        "from . import sibling\n"
        "import importlib\n"
        "def f() -> None:\n"
        "    import fastapi\n"
        "    importlib.import_module('sounddevice')\n"
        "    __import__('websockets')\n"
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(source, encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skipped.py").write_text("import torch\n", encoding="utf-8")

    found = imports_under(tmp_path)

    assert sorted(imp.module for imp in found) == [
        "fastapi",
        "importlib",
        "numpy",
        "os",
        "sounddevice",
        "torch.nn",
        "websockets",
    ]
    torch_import = next(imp for imp in found if imp.top == "torch")
    assert torch_import == Import(tmp_path / "pkg" / "mod.py", 1, "torch.nn")
    assert imports_under(tmp_path / "does-not-exist") == []
