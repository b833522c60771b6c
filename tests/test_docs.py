"""The names the documentation cites exist in the code.

Documents checked: README.md and every ``docs/*.md``. Fenced code blocks (```` ``` ````) are left out;
inline code spans (text between single backticks, which may wrap over a line break) are read.

A span is a *citation* when, after collapsing whitespace, it has one of three forms:

1. A dotted name, optionally followed by a call's parentheses, which are ignored:
   ``IDENT(.IDENT)+`` then optionally ``(...)``, e.g. ``flashtile.utils.get_alibi_slopes``,
   ``dispatch.implementation``, ``settings.reload()``. Its first part must be ``flashtile`` or the
   last part of the dotted path of a module or package inside flashtile (``decode``, ``_core``,
   ``launch``, ``prefill_work``, ...); other dotted names (``torch.*``, ``triton.*``, ``flashinfer.*``,
   ``tl.*``, ``F.*``, and names of tests or benchmarks) are not citations of flashtile and are skipped.
   ``triton`` and ``flashinfer`` are skipped explicitly even though flashtile has a ``triton`` package,
   since the docs use them for the Triton library and upstream FlashInfer.
   The name exists when, for at least one flashtile module whose path ends in the first part, the
   remaining parts resolve one by one: an attribute of the object so far, or else a submodule of it
   (imported).
2. A file and a name in it: ``PATH.py::NAME`` (optionally ``::NAME.ATTR``), e.g.
   ``scheduler/split_kv.py::plan_kv_splits``, ``tests/oracles.py::merge_states_f64``. PATH is
   relative to the repository root or to ``flashtile/``; the file must exist and define NAME at its
   top level (a function, class or assignment; found by parsing, nothing is imported), and ATTR in
   NAME's class body when given.

3. A relative path to a ``.py`` file (``flashtile/kernels/attention.py``, ``kernels/smem.py``,
   ``benchmarks/run.py``): the file exists, relative to the repository root or to ``flashtile/``.
   A span ending in ``.py`` is always read as a path, never as a dotted name; a bare file name
   (``softmax.py``) and paths with wildcards or braces (``ops*.py``, ``{rope,norm}.py``) are skipped.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import flashtile

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flashtile"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# First parts that name other libraries though flashtile has a module of that name (flashtile.triton).
NOT_FLASHTILE = {"torch", "triton", "flashinfer"}

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_SPAN = re.compile(r"`([^`]+)`")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"({_IDENT}(?:\.{_IDENT})+)(?:\(.*\))?")
_FILE_NAME = re.compile(rf"([\w./-]+\.py)::({_IDENT}(?:\.{_IDENT})?)")
_PY_PATH = re.compile(r"[\w.-]+(?:/[\w.-]+)*\.py")


def code_spans(text: str) -> list[str]:
    """Inline code spans of markdown text, fenced blocks left out, whitespace collapsed."""
    text = _FENCE.sub("", text)
    return [" ".join(span.split()) for span in _SPAN.findall(text)]


@functools.lru_cache(maxsize=None)
def module_names() -> tuple[str, ...]:
    """Dotted paths of flashtile and every module and package in it."""
    names = ["flashtile"]
    for info in pkgutil.walk_packages(flashtile.__path__, "flashtile."):
        names.append(info.name)
    return tuple(names)


def _resolve(module_name: str, parts: list[str]) -> bool:
    obj = importlib.import_module(module_name)
    for part in parts:
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        package_path = getattr(obj, "__path__", None)
        if package_path is None:
            return False
        try:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        except ModuleNotFoundError:
            return False
    return True


def dotted_name_exists(name: str) -> bool:
    first, *rest = name.split(".")
    candidates = [m for m in module_names() if m == first or m.endswith("." + first)]
    return any(_resolve(m, rest) for m in candidates)


def _find_file(path: str) -> Path | None:
    for base in (ROOT, PACKAGE):
        if (base / path).is_file():
            return base / path
    return None


def _top_level_names(body) -> dict:
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names[leaf.id] = node
    return names


def file_name_exists(path: str, name: str) -> bool:
    found = _find_file(path)
    if found is None:
        return False
    names = _top_level_names(ast.parse(found.read_text()).body)
    outer, _, inner = name.partition(".")
    if outer not in names:
        return False
    if not inner:
        return True
    node = names[outer]
    return isinstance(node, ast.ClassDef) and inner in _top_level_names(node.body)


def citations(path: Path) -> list[tuple[str, str]]:
    """``(kind, text)`` for every citation in one document (module doc): kind is "name", "file::name"
    or "file"."""
    return citations_in(path.read_text())


def citations_in(text: str) -> list[tuple[str, str]]:
    found = []
    first_parts = {m.rsplit(".", 1)[-1] for m in module_names()}
    for span in code_spans(text):
        if m := _FILE_NAME.fullmatch(span):
            found.append(("file::name", span))
        elif _PY_PATH.fullmatch(span):
            if "/" in span:  # a bare file name (`softmax.py`) is not resolved
                found.append(("file", span))
        elif m := _DOTTED.fullmatch(span):
            name = m.group(1)
            first = name.split(".", 1)[0]
            if first in first_parts and first not in NOT_FLASHTILE:
                found.append(("name", name))
    return found


def _cases():
    for doc in DOCUMENTS:
        for kind, text in citations(doc):
            yield pytest.param(kind, text, id=f"{doc.name}:{text}")


def test_documents_exist():
    assert (ROOT / "README.md").is_file() and len(DOCUMENTS) > 5


def test_rules_on_examples():
    assert dotted_name_exists("flashtile.utils.get_alibi_slopes")
    assert dotted_name_exists("settings.reload")  # flashtile._core.settings
    assert dotted_name_exists("kernels.softmax")  # a submodule, imported on demand
    assert not dotted_name_exists("softmax.merge_update")
    assert file_name_exists("scheduler/split_kv.py", "plan_kv_splits")
    assert not file_name_exists("scheduler/split_kv.py", "no_such_function")
    assert not file_name_exists("no/such/file.py", "x")
    kinds = {text: kind for kind, text in citations_in("`softmax.py` `kernels/softmax.py` `torch.float16` "
                                                       "`launch.direct_launch()` `x.py::f`")}
    assert kinds == {"kernels/softmax.py": "file", "launch.direct_launch": "name", "x.py::f": "file::name"}


@pytest.mark.parametrize("kind, text", list(_cases()))
def test_cited_name_exists(kind, text):
    if kind == "name":
        assert dotted_name_exists(text), f"`{text}`: no such flashtile module attribute"
    elif kind == "file::name":
        path, name = text.split("::")
        assert file_name_exists(path, name), f"`{text}`: file missing or name not defined at its top level"
    else:
        assert _find_file(text) is not None, f"`{text}`: no such file"
