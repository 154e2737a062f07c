"""The API surface of a vendor's Python package, read from its source without importing it.

llmopt calls optimum-neuron, NVIDIA ModelOpt, TensorRT-LLM and onnxruntime on machines this project
cannot test on (Inferentia, NVIDIA GPUs). ``tests/test_vendor_conformance.py`` checks that every
class, function and keyword llmopt uses exists at the pinned version, from:

* a published wheel (``Surface.from_wheel``): downloaded once with ``pip download --no-deps`` into
  ``$LLMOPT_VENDOR_CACHE`` (default ``~/.cache/llmopt/vendor-wheels``) and read with ``ast``;
* a committed snapshot (``Surface.from_snapshot``) where the wheel is not on the package registry
  (TensorRT-LLM): ``tests/vendor/*.json``, written by ``scripts/extract_tensorrt_llm_api.py`` from the
  release's source at its tag.

``Surface.symbol("optimum.neuron.NeuronModelForCausalLM.export")`` follows re-exports (``from x
import Y``, star imports, transformers-style ``_import_structure`` tables) and class inheritance
inside the package, and returns where the symbol is defined with its parameters or fields.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

VENDOR_CACHE = Path(os.environ.get("LLMOPT_VENDOR_CACHE", Path.home() / ".cache" / "llmopt" / "vendor-wheels"))
SNAPSHOTS = Path(__file__).resolve().parent / "vendor"


class MissingSymbol(LookupError):
    pass


@dataclass
class Symbol:
    qualname: str
    file: str
    line: int
    kind: str  # class, function, method, constant
    parameters: list[str] = field(default_factory=list)  # without self/cls
    var_keyword: bool = False  # accepts **kwargs
    fields: list[str] = field(default_factory=list)  # annotated class attributes (dataclass / pydantic), inherited too
    members: list[str] = field(default_factory=list)  # plain class attributes (enum members), inherited too

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def accepts(self, keyword: str) -> bool:
        return keyword in self.parameters or keyword in self.fields

    def missing(self, keywords) -> list[str]:
        """Keywords this callable does not declare (a **kwargs catch-all does not count as declaring them)."""
        return sorted(keyword for keyword in keywords if not self.accepts(keyword))


def download_wheel(distribution: str, version: str) -> Path:
    """The wheel of ``distribution==version`` from the package registry, cached; never installed."""
    prefix = distribution.replace("-", "_").lower() + f"-{version}-"
    VENDOR_CACHE.mkdir(parents=True, exist_ok=True)
    found = [path for path in VENDOR_CACHE.glob("*.whl") if path.name.lower().startswith(prefix)]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             "-d", str(VENDOR_CACHE), f"{distribution}=={version}"],
            check=True, capture_output=True, text=True, timeout=600,
        )
        found = [path for path in VENDOR_CACHE.glob("*.whl") if path.name.lower().startswith(prefix)]
    if not found:
        raise FileNotFoundError(f"no wheel of {distribution}=={version} in {VENDOR_CACHE}")
    return found[0]


class Surface:
    """Symbols of one package version: resolved lazily from source files, or read from a snapshot."""

    def __init__(self, name: str, files: dict[str, str] | None = None, snapshot: dict | None = None):
        self.name = name
        self.files = files or {}
        self.snapshot = snapshot
        self._trees: dict[str, ast.Module] = {}

    @classmethod
    def from_wheel(cls, distribution: str, version: str) -> "Surface":
        with zipfile.ZipFile(download_wheel(distribution, version)) as wheel:
            files = {name: wheel.read(name).decode("utf-8", errors="replace")
                     for name in wheel.namelist() if name.endswith(".py")}
        return cls(f"{distribution}=={version}", files=files)

    @classmethod
    def from_snapshot(cls, path: Path) -> "Surface":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(f"{data['distribution']}=={data['version']} ({data['tag']}, {data['commit'][:12]})", snapshot=data)

    # -- lookup ------------------------------------------------------------------------------

    def symbol(self, qualname: str) -> Symbol:
        if self.snapshot is not None:
            entry = self.snapshot["symbols"].get(qualname)
            if entry is None:  # an enum member or a field: an attribute the owning class lists
                owner, _, attribute = qualname.rpartition(".")
                parent = self.snapshot["symbols"].get(owner)
                if parent is None or attribute not in (*parent.get("members", []), *parent.get("fields", [])):
                    raise MissingSymbol(f"{qualname} is not in the snapshot of {self.name}")
                return Symbol(qualname, parent["file"], parent["line"], "attribute")
            return Symbol(qualname, entry["file"], entry["line"], entry["kind"], list(entry.get("parameters", [])),
                          bool(entry.get("var_keyword")), list(entry.get("fields", [])), list(entry.get("members", [])))
        parts = qualname.split(".")
        for split in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:split])
            if self._module_file(module) is not None:
                found = self._resolve(module, parts[split], set())
                if found is None:
                    break
                file, node = found
                for attribute in parts[split + 1:]:
                    member = self._class_member(file, node, attribute, set())
                    if member is None:
                        raise MissingSymbol(f"{qualname}: {node.name} has no '{attribute}' in {self.name}")
                    file, node = member
                return self._describe(qualname, file, node)
        raise MissingSymbol(f"{qualname} is not defined in {self.name}")

    def text(self, module: str) -> str:
        """A module's source text (for constants and strings that are data, not symbols)."""
        file = self._module_file(module)
        if file is None:
            raise MissingSymbol(f"module {module} is not in {self.name}")
        return self.files[file]

    # -- internals ---------------------------------------------------------------------------

    def _module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self.files:
                return candidate
        return None

    def _tree(self, file: str) -> ast.Module:
        if file not in self._trees:
            self._trees[file] = ast.parse(self.files[file], filename=file)
        return self._trees[file]

    @staticmethod
    def _statements(body):
        """Top-level statements, looking inside if/try blocks (TYPE_CHECKING, optional imports)."""
        for node in body:
            if isinstance(node, ast.If):
                yield from Surface._statements(node.body)
                yield from Surface._statements(node.orelse)
            elif isinstance(node, ast.Try):
                yield from Surface._statements(node.body)
                for handler in node.handlers:
                    yield from Surface._statements(handler.body)
                yield from Surface._statements(node.orelse)
            else:
                yield node

    @staticmethod
    def _absolute(module: str, file: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module if file.endswith("__init__.py") else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def _resolve(self, module: str, name: str, seen: set) -> tuple[str, ast.AST] | None:
        """Where ``name`` is defined when imported from ``module``: (file, node)."""
        if (module, name) in seen:
            return None
        seen.add((module, name))
        file = self._module_file(module)
        if file is None:
            return None
        statements = list(self._statements(self._tree(file).body))
        for node in statements:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return file, node
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(target, ast.Name) and target.id == name for target in targets):
                    return file, node
        for node in statements:
            if isinstance(node, ast.ImportFrom):
                source = self._absolute(module, file, node)
                for alias in node.names:
                    if alias.name == "*" or (alias.asname or alias.name) == name:
                        original = name if alias.name == "*" else alias.name
                        found = self._resolve(source, original, seen)
                        if found is not None:
                            return found
        for node in statements:  # transformers-style lazy modules: _import_structure = {"sub": ["Name"]}
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_import_structure"
                                                    for t in node.targets) and isinstance(node.value, ast.Dict):
                for key, value in zip(node.value.keys, node.value.values):
                    names = [element.value for element in getattr(value, "elts", []) if isinstance(element, ast.Constant)]
                    if isinstance(key, ast.Constant) and name in names:
                        found = self._resolve(f"{module}.{key.value}", name, seen)
                        if found is not None:
                            return found
        return None

    def _module_of(self, file: str) -> str:
        return file[: -len("/__init__.py")].replace("/", ".") if file.endswith("/__init__.py") else file[:-3].replace("/", ".")

    def _bases(self, file: str, node: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
        module = self._module_of(file)
        resolved = []
        for base in node.bases:
            if isinstance(base, ast.Subscript):  # Generic[...] and the like
                base = base.value
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            if name is None:
                continue
            found = self._resolve(module, name, set())
            if found is not None and isinstance(found[1], ast.ClassDef):
                resolved.append(found)
        return resolved

    def _class_member(self, file: str, node: ast.AST, attribute: str, seen: set) -> tuple[str, ast.AST] | None:
        if not isinstance(node, ast.ClassDef) or (file, node.name) in seen:
            return None
        seen.add((file, node.name))
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and item.name == attribute:
                return file, item
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.target.id == attribute:
                return file, item
            if isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attribute for t in item.targets):
                return file, item
        for base_file, base in self._bases(file, node):
            found = self._class_member(base_file, base, attribute, seen)
            if found is not None:
                return found
        return None

    def _class_attributes(self, file: str, node: ast.ClassDef, seen: set) -> tuple[list[str], list[str]]:
        """(annotated fields, plain attributes) of a class and its bases inside the package."""
        if (file, node.name) in seen:
            return [], []
        seen.add((file, node.name))
        fields, members = [], []
        for base_file, base in self._bases(file, node):
            base_fields, base_members = self._class_attributes(base_file, base, seen)
            fields += base_fields
            members += base_members
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields.append(item.target.id)
            elif isinstance(item, ast.Assign):
                members += [target.id for target in item.targets if isinstance(target, ast.Name)]
        return list(dict.fromkeys(fields)), list(dict.fromkeys(members))

    @staticmethod
    def _parameters(node: ast.FunctionDef) -> tuple[list[str], bool]:
        arguments = node.args
        names = [arg.arg for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
        if names and names[0] in ("self", "cls"):
            names = names[1:]
        return names, arguments.kwarg is not None

    def _describe(self, qualname: str, file: str, node: ast.AST) -> Symbol:
        if isinstance(node, ast.ClassDef):
            fields, members = self._class_attributes(file, node, set())
            init = self._class_member(file, node, "__init__", set())
            parameters, var_keyword = self._parameters(init[1]) if init and isinstance(init[1], ast.FunctionDef) else ([], False)
            return Symbol(qualname, file, node.lineno, "class", parameters, var_keyword, fields, members)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parameters, var_keyword = self._parameters(node)
            return Symbol(qualname, file, node.lineno, "method" if node.col_offset else "function", parameters, var_keyword)
        return Symbol(qualname, file, node.lineno, "constant")
