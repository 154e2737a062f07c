"""Check that `make install-tensorrt` can resolve: llmopt's tensorrt extra against TensorRT-LLM's own pins.

TensorRT-LLM's wheels live on NVIDIA's index only, so the release itself cannot be installed here.
What can be checked is everything around it, with pip's own resolver against the package registry:
llmopt's dependencies (base, pytorch, tensorrt and dev extras, tensorrt-llm left out) together with
every requirement the release declares (``tests/vendor/tensorrt_llm-<version>.requires.txt``, its
published metadata), for each Python version it ships wheels for, on Linux x86_64. Requirements
served only by NVIDIA's index (TensorRT itself) are left out and listed.

    python scripts/check_tensorrt_pins.py            # exit 0 when every Python version resolves
    python scripts/check_tensorrt_pins.py --json     # the resolved versions, for a CI log
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
RELEASE = "1.2.1"
REQUIRES = ROOT / "tests" / "vendor" / f"tensorrt_llm-{RELEASE}.requires.txt"
PYTHONS = ("3.10", "3.12")  # the release's classifiers (its wheels: cp310, cp312)
NVIDIA_INDEX_ONLY = {"tensorrt"}  # on the registry as a source stub that downloads from NVIDIA at build time
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "linux_x86_64", "any")
REPORTED = ("tensorrt-llm", "transformers", "nvidia-modelopt", "torch", "numpy", "pydantic", "onnx", "accelerate")


def release_requirements() -> list[Requirement]:
    lines = [line.strip() for line in REQUIRES.read_text(encoding="utf-8").splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def llmopt_requirements() -> list[Requirement]:
    """llmopt's own requirements for the tensorrt environment, extras expanded, tensorrt-llm excluded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    wanted, pending, seen = [Requirement(text) for text in project["dependencies"]], ["tensorrt", "dev"], set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in extras[extra]:
            requirement = Requirement(text)
            if requirement.name == "llmopt":
                pending.extend(requirement.extras)
            elif requirement.name != "tensorrt-llm":
                wanted.append(requirement)
    return wanted


def consistency_errors() -> list[str]:
    """llmopt's tensorrt extra must name the release and repeat its transformers and ModelOpt pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = {Requirement(text).name: Requirement(text) for text in project["optional-dependencies"]["tensorrt"]}
    release = {requirement.name: requirement for requirement in release_requirements()}
    errors = []
    if "tensorrt-llm" not in extra or str(extra["tensorrt-llm"].specifier) != f"=={RELEASE}":
        errors.append(f"the tensorrt extra does not pin tensorrt-llm=={RELEASE}")
    for name in ("transformers", "nvidia-modelopt"):
        if name not in extra or str(extra[name].specifier) != str(release[name].specifier):
            errors.append(f"the tensorrt extra's {name} is not the release's {release[name].specifier}")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    python = next((line.split("?=")[1].strip() for line in makefile.splitlines()
                   if line.startswith("TENSORRT_PYTHON")), "")
    if python.removeprefix("python") not in PYTHONS:
        errors.append(f"make install-tensorrt uses {python}; the release ships wheels for Python {', '.join(PYTHONS)}")
    return errors


def resolve(python: str, requirements: list[str]) -> dict[str, str]:
    """pip's resolver for ``python`` on Linux x86_64, binary wheels only; {name: version} or CalledProcessError."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report), "--python-version", python, "--implementation", "cp",
                   "--only-binary=:all:", "--target", str(Path(scratch) / "target"),
                   *[argument for platform in PLATFORMS for argument in ("--platform", platform)], *requirements]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
        installed = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", choices=PYTHONS, help="only these Python versions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    errors = consistency_errors()
    requirements = [str(r) for r in llmopt_requirements()]
    requirements += [str(r) for r in release_requirements() if r.name not in NVIDIA_INDEX_ONLY]
    results: dict[str, dict] = {}
    for python in args.python or PYTHONS:
        try:
            resolved = resolve(python, requirements)
        except subprocess.CalledProcessError as exc:
            lines = [line for line in exc.stderr.splitlines() if line.startswith("ERROR")] or exc.stderr.splitlines()[-3:]
            errors.append(f"Python {python}: pip cannot resolve: {' / '.join(lines)}")
            continue
        results[python] = {name: resolved.get(name) for name in REPORTED if name in resolved}
    summary = {"release": RELEASE, "left_to_nvidia_index": sorted(NVIDIA_INDEX_ONLY), "resolved": results,
               "errors": errors}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for python, versions in results.items():
            print(f"Python {python}: resolves: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
