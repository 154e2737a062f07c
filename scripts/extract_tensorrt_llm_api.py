#!/usr/bin/env python3
"""Snapshot the TensorRT-LLM API surface llmopt uses, read from the source at a git tag.

TensorRT-LLM's wheels are not on PyPI (only stubs), so ``tests/vendor_api.py`` checks llmopt's calls
against a committed JSON snapshot instead. This script writes that snapshot from a clone or bare
mirror of github.com/NVIDIA/TensorRT-LLM, without importing anything (no GPU, no tensorrt). A
shallow, blob-less clone of the one tag is enough (the full history is ~2.5 GB):

    git clone --bare --depth 1 --filter=blob:none --branch v1.2.1 \\
        https://github.com/NVIDIA/TensorRT-LLM.git /tmp/trtllm.git
    python scripts/extract_tensorrt_llm_api.py --git-dir /tmp/trtllm.git --tag v1.2.1 \\
        > tests/vendor/tensorrt_llm-1.2.1.json

Every file is read with ``git show <commit>:<path>`` (the commit the tag points to) and parsed with
``ast``. A public import path such as ``tensorrt_llm._tensorrt_engine.LLM.save`` is resolved by
following re-exports (``from x import Y [as Z]``, star imports, ``Z = Y`` aliases, also inside
``if``/``try`` blocks) and class inheritance inside the package. For a class the snapshot lists
``fields`` (annotated attributes of it and its in-repo bases: dataclass and pydantic fields alike,
without ClassVar, ``_private`` or ``field(init=False)`` ones), ``members`` (plain public class
attributes: enum members) and the ``parameters`` of its ``__init__``. Names that cannot be resolved
are listed under ``missing`` with the reason, so a removed API shows up instead of vanishing.
``files`` records, for every file read, the commit it was read at.

Without a clone, ``--source-dir`` reads the same paths from a plain directory instead (for instance
file versions taken from a code index, each from whatever commit it was stored at), and
``--provenance`` names, for every path, the commit that version came from; the snapshot then says so
in ``source`` and under ``files``, so it never passes for a read at the tag:

    python scripts/extract_tensorrt_llm_api.py --source-dir /tmp/trtllm-src \\
        --provenance /tmp/trtllm-src/provenance.json --tag v1.2.1 --version 1.2.1 \\
        --commit 376f7e1bd8ed543f75014309e3fd4b237e9b0e73 > tests/vendor/tensorrt_llm-1.2.1.json

Standard library only (Python >= 3.9).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys

PACKAGE = "tensorrt_llm"
ENUM_BASES = {"Enum", "IntEnum", "StrEnum", "Flag", "IntFlag"}

# The public import paths llmopt uses (llmopt/exporters/tensorrt.py, llmopt/runners/tensorrt.py), plus
# the argument models LLM(**kwargs) validates into. Several spellings are listed on purpose: those that
# do not exist at a tag end up under "missing", which is itself the answer.
SYMBOLS = [
    "tensorrt_llm._tensorrt_engine.LLM",
    "tensorrt_llm._tensorrt_engine.LLM.__init__",
    "tensorrt_llm._tensorrt_engine.LLM.save",
    "tensorrt_llm._tensorrt_engine.LLM.shutdown",
    "tensorrt_llm._tensorrt_engine.LLM.generate",
    "tensorrt_llm._tensorrt_engine.LLM.generate_async",
    "tensorrt_llm._tensorrt_engine.LLM._check_arguments",
    "tensorrt_llm.SamplingParams",
    "tensorrt_llm.llmapi.SamplingParams",
    "tensorrt_llm.llmapi.BuildConfig",
    "tensorrt_llm.llmapi.QuantConfig",
    "tensorrt_llm.llmapi.QuantAlgo",
    "tensorrt_llm.llmapi.TrtLlmArgs",
    "tensorrt_llm.llmapi.llm_args.TrtLlmArgs",
    "tensorrt_llm.llmapi.llm_args.BaseLlmArgs",
    "tensorrt_llm._tensorrt_engine.llm_args.TrtLlmArgs",
    "tensorrt_llm.llmapi.RequestOutput",
    "tensorrt_llm.llmapi.llm.RequestOutput",
    "tensorrt_llm.llmapi.llm.RequestOutput.outputs",
    "tensorrt_llm.llmapi.llm.RequestOutput.context_logits",
    "tensorrt_llm.llmapi.CompletionOutput",
    "tensorrt_llm.llmapi.CompletionOutput.token_ids",
    "tensorrt_llm.llmapi.CompletionOutput.finish_reason",
    "tensorrt_llm.executor.result.CompletionOutput",
]


class Source:
    """The Python files of one commit of the repository, parsed on demand."""

    def __init__(self, git_dir: str, tag: str):
        self.git_dir = git_dir
        self.commit = self.git("rev-parse", "--verify", f"{tag}^{{commit}}").strip()
        self.date = self.git("log", "-1", "--format=%cI", self.commit).strip()
        listing = self.git("ls-tree", "-r", "--name-only", self.commit, "--", f"{PACKAGE}/")
        self.paths = {path for path in listing.splitlines() if path.endswith(".py")}
        self._trees: dict[str, ast.Module] = {}

    def git(self, *args: str) -> str:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", *args], check=True,
                              capture_output=True, text=True).stdout

    def text(self, path: str) -> str:
        return self.git("show", f"{self.commit}:{path}")

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self.text(path), filename=path)
        return self._trees[path]

    def files(self) -> dict:
        """Where each file read so far came from: here, all from the tag's commit."""
        return {path: {"commit": self.commit, "date": self.date} for path in sorted(self._trees)}

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        return next((path for path in (f"{base}.py", f"{base}/__init__.py") if path in self.paths), None)

    def version(self) -> str | None:
        """``__version__`` from tensorrt_llm/version.py."""
        path = f"{PACKAGE}/version.py"
        for node in flatten(self.tree(path).body) if path in self.paths else ():
            if "__version__" in targets(node):
                return ast.literal_eval(node.value)
        return None


class DirectorySource(Source):
    """The same files read from a plain directory; ``provenance`` says which commit each came from."""

    def __init__(self, root: str, provenance: dict, commit: str | None, date: str | None):
        self.root, self.provenance, self.commit, self.date = root, provenance, commit, date
        self.paths = {os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                      for folder, _, names in os.walk(os.path.join(root, PACKAGE))
                      for name in names if name.endswith(".py")}
        self._trees = {}

    def text(self, path: str) -> str:
        if path not in self.provenance:
            raise SystemExit(f"{path}: not in the provenance file, so the snapshot could not say where it came from")
        with open(os.path.join(self.root, path), encoding="utf-8") as handle:
            return handle.read()

    def files(self) -> dict:
        entries = {}
        for path in sorted(self._trees):
            known = self.provenance[path]
            entries[path] = {"commit": known["commit"], "date": known.get("date")}
            if known.get("note"):
                entries[path]["note"] = known["note"]
        return entries


def flatten(body):
    """Statements of a body, looking inside if/try blocks (TYPE_CHECKING, optional imports)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from flatten(node.body)
            yield from flatten(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(handler.body for handler in node.handlers), node.orelse, node.finalbody):
                yield from flatten(block)
        else:
            yield node


def module_of(path: str) -> str:
    return path.removesuffix("/__init__.py").removesuffix(".py").replace("/", ".")


def absolute(path: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module_of(path) if path.endswith("__init__.py") else module_of(path).rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def targets(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def base_name(expr: ast.expr) -> str | None:
    expr = expr.value if isinstance(expr, ast.Subscript) else expr  # Generic[T] -> Generic
    return expr.id if isinstance(expr, ast.Name) else expr.attr if isinstance(expr, ast.Attribute) else None


class Resolver:
    def __init__(self, source: Source):
        self.src = source

    def resolve(self, module: str, name: str, seen: set) -> tuple[str, ast.AST] | None:
        """Where ``name``, imported from ``module``, is defined: (file, node)."""
        path = self.src.module_file(module)
        if path is None or (module, name) in seen:
            return None
        seen.add((module, name))
        statements = list(flatten(self.src.tree(path).body))
        for node in statements:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return path, node
            if name in targets(node):
                if isinstance(node.value, ast.Name):  # LLM = _TrtLLM
                    return self.resolve(module, node.value.id, seen) or (path, node)
                return path, node
        for node in statements:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "*" or (alias.asname or alias.name) == name:
                        found = self.resolve(absolute(path, node), name if alias.name == "*" else alias.name, seen)
                        if found is not None:
                            return found
        return None

    def bases(self, path: str, node: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
        found = []
        for expr in node.bases:
            name = base_name(expr)
            hit = self.resolve(module_of(path), name, set()) if name else None
            if hit is not None and isinstance(hit[1], ast.ClassDef):
                found.append(hit)
        return found

    def mro(self, path: str, node: ast.ClassDef, seen=None) -> list[tuple[str, ast.ClassDef]]:
        """The class and its in-repo bases, depth first (a simple stand-in for the real MRO)."""
        seen = set() if seen is None else seen
        if (path, node.name) in seen:
            return []
        seen.add((path, node.name))
        order = [(path, node)]
        for base_path, base in self.bases(path, node):
            order += self.mro(base_path, base, seen)
        return order

    def is_enum(self, path: str, node: ast.ClassDef) -> bool:
        for _, cls in self.mro(path, node):
            names = [base_name(expr) for expr in cls.bases]
            names += [base_name(k.value) for k in cls.keywords if k.arg == "metaclass"]
            if any(name and (name in ENUM_BASES or name.endswith("EnumMeta")) for name in names):
                return True
        return False

    def member(self, path: str, node: ast.ClassDef, attribute: str) -> tuple[str, ast.AST, str] | None:
        """(file, node, kind) of a class attribute, looked up through the in-repo bases."""
        classes = self.mro(path, node)
        for cls_path, cls in classes:
            for item in cls.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == attribute:
                    decorators = {base_name(d) for d in item.decorator_list}
                    kind = "property" if decorators & {"property", "cached_property"} else "method"
                    return cls_path, item, kind
                if isinstance(item, ast.ClassDef) and item.name == attribute:
                    return cls_path, item, "class"
                if attribute in targets(item):
                    return cls_path, item, "field" if isinstance(item, ast.AnnAssign) else "attribute"
        for cls_path, cls in classes:  # self.<attribute> = ... in an __init__
            for item in cls.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    for stmt in ast.walk(item):
                        for target in getattr(stmt, "targets", [getattr(stmt, "target", None)]):
                            if (isinstance(target, ast.Attribute) and target.attr == attribute
                                    and isinstance(target.value, ast.Name) and target.value.id == "self"):
                                return cls_path, stmt, "attribute"
        return None

    def class_attributes(self, path: str, node: ast.ClassDef) -> tuple[list[str], list[str]]:
        """(fields, members) of a class and its in-repo bases, bases first."""
        fields, members = [], []
        for _, cls in reversed(self.mro(path, node)):
            for item in cls.body:
                for name in targets(item):
                    if name.startswith("_"):
                        continue
                    if isinstance(item, ast.AnnAssign):
                        if base_name(item.annotation) == "ClassVar" or not_init(item.value):
                            continue
                        fields.append(name)
                    else:
                        members.append(name)
        return list(dict.fromkeys(fields)), list(dict.fromkeys(members))

    def describe(self, path: str, node: ast.AST, kind: str | None = None) -> dict:
        entry = {"file": path, "line": node.lineno, "kind": kind, "parameters": [], "var_keyword": False,
                 "fields": [], "members": []}
        if isinstance(node, ast.ClassDef):
            entry["kind"] = "enum" if self.is_enum(path, node) else "class"
            entry["fields"], entry["members"] = self.class_attributes(path, node)
            init = self.member(path, node, "__init__")
            if init is not None and isinstance(init[1], ast.FunctionDef):
                entry["parameters"], entry["var_keyword"] = parameters(init[1])
            if entry["kind"] == "enum":
                entry["fields"] = []
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            entry["kind"] = kind or ("method" if node.col_offset else "function")
            entry["parameters"], entry["var_keyword"] = parameters(node)
        else:
            entry["kind"] = kind or "constant"
        return entry

    def symbol(self, qualname: str) -> dict:
        """The snapshot entry of a public import path; raises LookupError with the reason."""
        parts = qualname.split(".")
        for split in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:split])
            if self.src.module_file(module) is None:
                continue
            found = self.resolve(module, parts[split], set())
            if found is None:
                what = "module" if split + 1 < len(parts) else "symbol"
                raise LookupError(f"no {what} {parts[split]} in {module} (neither defined nor re-exported)")
            path, node, kind = found[0], found[1], None
            for attribute in parts[split + 1:]:
                if not isinstance(node, ast.ClassDef):
                    raise LookupError(f"{attribute}: {module_of(path)} {getattr(node, 'name', '')} is not a class")
                hit = self.member(path, node, attribute)
                if hit is None:
                    raise LookupError(f"class {node.name} ({path}) and its bases have no '{attribute}'")
                path, node, kind = hit
            return self.describe(path, node, kind)
        raise LookupError(f"no module of {qualname} exists")


def not_init(value: ast.expr | None) -> bool:
    """A dataclass ``field(init=False)``: an annotated attribute that is not a constructor argument."""
    return isinstance(value, ast.Call) and base_name(value.func) == "field" and any(
        k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False for k in value.keywords)


def parameters(node: ast.FunctionDef) -> tuple[list[str], bool]:
    args = node.args
    names = [arg.arg for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return names, args.kwarg is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--git-dir", help="a TensorRT-LLM clone's .git, or a bare mirror")
    where.add_argument("--source-dir", help="a directory holding tensorrt_llm/... files instead of a clone")
    parser.add_argument("--tag", required=True, help="the release tag, e.g. v1.2.1")
    parser.add_argument("--provenance", help="with --source-dir: JSON map path -> {commit, date, note}")
    parser.add_argument("--commit", help="with --source-dir: the commit the tag points to")
    parser.add_argument("--commit-date", help="with --source-dir: that commit's date")
    parser.add_argument("--version", help="the release version (default: tensorrt_llm/version.py)")
    parser.add_argument("--symbol", action="append", default=[], help="another public import path to include")
    args = parser.parse_args(argv)

    if args.git_dir:
        source = Source(args.git_dir, args.tag)
        origin = f"Every file was read at {args.tag} ({source.commit}) with git show."
    else:
        if not args.provenance:
            parser.error("--source-dir needs --provenance")
        with open(args.provenance, encoding="utf-8") as handle:
            source = DirectorySource(args.source_dir, json.load(handle), args.commit, args.commit_date)
        origin = (f"Not read at {args.tag}: every file is a stored version from the commit listed for it under "
                  f"'files' (none of them the tag's; its note says what was read of it); regenerate at the tag "
                  f"with scripts/extract_tensorrt_llm_api.py --git-dir CLONE --tag {args.tag}.")
    resolver = Resolver(source)
    snapshot = {"distribution": "tensorrt-llm", "version": args.version or source.version(), "tag": args.tag,
                "commit": source.commit, "commit_date": source.date, "source": origin, "files": {},
                "symbols": {}, "missing": {}}
    for qualname in dict.fromkeys(SYMBOLS + args.symbol):
        try:
            snapshot["symbols"][qualname] = resolver.symbol(qualname)
        except LookupError as exc:
            snapshot["missing"][qualname] = str(exc)
    snapshot["files"] = source.files()
    json.dump(snapshot, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
