"""The server image (docker/) ships what server/ and streaming/ need, and nothing of torch."""

from __future__ import annotations

import fnmatch
import re
import tomllib

from tests.import_scan import ROOT, imports_under, is_third_party, report

DOCKER = ROOT / "docker"
REQUIREMENTS = DOCKER / "requirements-server.txt"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE_PACKAGES = frozenset({"streaming", "server"})
MODEL_ASSETS = (
    "streaming/assets/default/card.json",
    "streaming/assets/default/encoder.onnx",
    "streaming/assets/default/decoder.onnx",
)

# Import name -> distribution that provides it, where the two differ. starlette and pydantic
# come with fastapi, which the server depends on directly.
IMPORT_TO_DIST = {
    "prometheus_client": "prometheus-client",
    "starlette": "fastapi",
    "pydantic": "fastapi",
    "yaml": "pyyaml",
    "multipart": "python-multipart",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines: list[str]) -> set[str]:
    """Distribution names of requirement lines (comments, blanks and options skipped)."""
    names = set()
    for line in lines:
        match = _NAME.match(line.split("#", 1)[0])
        if match:
            names.add(normalize(match.group(1)))
    return names


def image_requirements() -> set[str]:
    return requirement_names(REQUIREMENTS.read_text(encoding="utf-8").splitlines())


def dockerfile_instructions() -> list[str]:
    """Dockerfile lines without comments, continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def copied_sources() -> list[str]:
    sources = []
    for line in dockerfile_instructions():
        words = line.split()
        if words[0].upper() == "COPY":
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_requirement_names_parsing() -> None:
    lines = ["# comment", "", "numpy>=1.26", "Prometheus_Client >=0.20  # metrics", "-r x.txt"]
    assert requirement_names(lines) == {"numpy", "prometheus-client"}


def test_requirements_cover_third_party_imports_of_server_and_streaming() -> None:
    wanted = image_requirements()
    imports = imports_under(ROOT / "server", ROOT / "streaming")
    missing = [
        imp
        for imp in imports
        if is_third_party(imp) and normalize(IMPORT_TO_DIST.get(imp.top, imp.top)) not in wanted
    ]
    assert not missing, (
        f"add to {REQUIREMENTS.relative_to(ROOT)} (or map the import name in IMPORT_TO_DIST):\n"
        + report(missing)
    )


def test_image_code_imports_only_packages_the_image_copies() -> None:
    first_party = {"models", "client"}
    bad = [
        imp for imp in imports_under(ROOT / "server", ROOT / "streaming") if imp.top in first_party
    ]
    assert not bad, f"the image contains only {sorted(IMAGE_PACKAGES)}:\n" + report(bad)


def test_requirements_match_pyproject_runtime_dependencies() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    runtime = requirement_names(config["project"]["dependencies"])
    assert image_requirements() == runtime


def test_dockerfile_installs_requirements_and_no_torch() -> None:
    instructions = dockerfile_instructions()
    assert any("pip install" in i and "requirements-server.txt" in i for i in instructions)
    torch_lines = [i for i in instructions if re.search(r"\btorch", i)]
    assert not torch_lines, f"the server image must not install torch: {torch_lines}"
    assert not {"torch", "torchaudio", "torchvision"} & image_requirements()


def test_dockerfile_copies_server_and_streaming_with_model_assets() -> None:
    sources = copied_sources()
    missing = sorted(IMAGE_PACKAGES - set(sources))
    assert not missing, f"Dockerfile must COPY {missing} (streaming/ holds the model assets)"


def test_dockerignore_keeps_the_build_inputs() -> None:
    patterns = [
        line.strip().lstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    needed = ["server/__main__.py", "docker/requirements-server.txt", *MODEL_ASSETS]
    excluded = [
        (path, pattern)
        for path in needed
        for pattern in patterns
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in _prefixes(path))
    ]
    assert not excluded, f".dockerignore excludes what the image needs: {excluded}"


def _prefixes(path: str) -> list[str]:
    """'a/b/c' -> ['a', 'a/b', 'a/b/c']: a pattern matching a parent excludes the file too."""
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
