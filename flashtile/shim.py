"""A ``flashinfer`` package that is flashtile: ``python -m flashtile install-shim`` / ``uninstall-shim``.

Serving engines write ``import flashinfer`` and check FlashInfer's package metadata. In an
environment without FlashInfer, :func:`install_shim` writes into site-packages (or another
directory):

- ``flashinfer/__init__.py``: calls :func:`activate`, which makes every ``flashinfer.X`` module the
  module object ``flashtile.X`` (``flashinfer.decode is flashtile.decode``, also for nested names such
  as ``flashinfer.jit.core``) and delegates the package's attributes to ``flashtile``
  (``flashinfer.BatchDecodeWithPagedKVCacheWrapper is flashtile.BatchDecodeWithPagedKVCacheWrapper``).
  ``flashinfer.__version__`` is the advertised FlashInfer version, not flashtile's: engines compare
  it with FlashInfer releases.
- ``flashinfer/_flashtile_shim.json``: the marker that says flashtile wrote the package (and lists
  what it wrote).
- ``flashinfer_python-<version>.dist-info/`` (METADATA, INSTALLER = ``flashtile``, RECORD): the
  distribution ``flashinfer-python`` at the advertised version, for ``importlib.metadata.version``
  (SGLang requires at least 0.6.11.post1) and so that ``pip uninstall flashinfer-python`` also
  removes the shim cleanly.

The advertised version defaults to :data:`ADVERTISED_FLASHINFER_VERSION`, the FlashInfer release
whose Python API flashtile's names and signatures follow. Both commands refuse to touch a
``flashinfer`` that flashtile did not write; :func:`uninstall_shim` removes exactly the files that
:func:`install_shim` listed in its RECORD (and the bytecode Python cached for them).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import sys
import sysconfig
from typing import Dict, List, Optional, Sequence, Set

__all__ = [
    "ADVERTISED_FLASHINFER_VERSION",
    "ShimError",
    "activate",
    "default_target",
    "is_flashtile_shim",
    "import_real_flashinfer",
    "install_shim",
    "uninstall_shim",
]

# FlashInfer 0.7.2.post1: the release whose Python sources flashtile's names and signatures are
# checked against. SGLang's check (`flashinfer_python >= 0.6.11.post1`) accepts it.
ADVERTISED_FLASHINFER_VERSION = "0.7.2.post1"

PACKAGE = "flashinfer"  # the import name the shim provides
TARGET_PACKAGE = "flashtile"  # what it resolves to
DISTRIBUTION = "flashinfer-python"  # the distribution name in METADATA
DIST_INFO_PREFIX = "flashinfer_python-"  # normalized name: <name>-<version>.dist-info
MARKER = "_flashtile_shim.json"
INSTALLER = "flashtile"


class ShimError(Exception):
    """install-shim or uninstall-shim refused: the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Run time: what the written flashinfer/__init__.py calls
# ---------------------------------------------------------------------------------------------


class _AliasLoader(importlib.abc.Loader):
    """Loads ``<alias>.X`` by importing ``flashtile.X`` and putting that module object in its place."""

    def __init__(self, target_name: str):
        self.target_name = target_name

    def create_module(self, spec):
        return None  # a placeholder module; exec_module replaces it in sys.modules

    def exec_module(self, module) -> None:
        # The import system returns whatever sys.modules holds under the name after exec_module, so
        # `import flashinfer.decode` yields flashtile.decode itself (one module object, one set of
        # classes), and flashtile's module keeps its own __name__ and __spec__.
        sys.modules[module.__name__] = importlib.import_module(self.target_name)


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Maps every module name under ``prefix`` (``"flashinfer."``) to the same name under ``flashtile.``.

    It must come before the path finders on ``sys.meta_path``: once ``flashinfer.jit`` is
    ``flashtile.jit``, the path finder would otherwise load ``flashtile/jit/core.py`` a second time,
    as a separate module named ``flashinfer.jit.core``.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix):
            return None
        target_name = f"{TARGET_PACKAGE}.{fullname[len(self.prefix):]}"
        try:
            found = importlib.util.find_spec(target_name)
        except ModuleNotFoundError:  # a parent of the target does not exist either
            return None
        if found is None:  # flashtile has no such module: `import flashinfer.X` fails as it should
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(target_name),
                                              is_package=found.submodule_search_locations is not None)


def activate(namespace: Dict[str, object], version: str) -> None:
    """Turn the module whose globals are ``namespace`` (the shim's ``flashinfer``) into flashtile.

    Attribute reads fall through to ``flashtile`` (module ``__getattr__``), submodule imports resolve
    to flashtile's modules (a meta-path finder, installed once per process), and ``__version__`` is
    ``version``.
    """
    import flashtile

    name = namespace["__name__"]

    def __getattr__(attr: str):
        try:
            return getattr(flashtile, attr)
        except AttributeError:
            raise AttributeError(f"module {name!r} (flashtile's FlashInfer shim) has no attribute {attr!r}") from None

    def __dir__():
        return sorted(set(namespace) | set(dir(flashtile)))

    namespace.update(__version__=version, __all__=list(flashtile.__all__), __getattr__=__getattr__, __dir__=__dir__)
    prefix = f"{name}."
    if not any(isinstance(f, _AliasFinder) and f.prefix == prefix for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(prefix))


# ---------------------------------------------------------------------------------------------
# Install and uninstall
# ---------------------------------------------------------------------------------------------

_INIT_TEMPLATE = '''\
"""FlashInfer's module names, served by flashtile.

Written by `python -m flashtile install-shim` (flashtile {flashtile_version}); remove it with
`python -m flashtile uninstall-shim`. `flashinfer.X` is the module `flashtile.X`;
`flashinfer.__version__` is the FlashInfer version advertised to version checks ({version}).
"""

from flashtile.shim import activate as _activate

_activate(globals(), {version!r})
del _activate
'''


def default_target() -> pathlib.Path:
    """The current environment's site-packages directory (sysconfig's ``purelib``)."""
    return pathlib.Path(sysconfig.get_paths()["purelib"])


def _flashtile_version() -> str:
    from . import __version__

    return __version__


def _dist_info_name(version: str) -> str:
    return f"{DIST_INFO_PREFIX}{version}.dist-info"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"sha256={digest}"


def _read_text(path: pathlib.Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _is_shim_package(package_dir: pathlib.Path) -> bool:
    """Whether ``package_dir`` is a ``flashinfer`` package that flashtile wrote (it has the marker)."""
    text = _read_text(package_dir / MARKER)
    if text is None:
        return False
    try:
        return json.loads(text).get("writer") == INSTALLER
    except (ValueError, AttributeError):
        return False


def is_flashtile_shim(module) -> bool:
    """Whether an imported ``flashinfer`` module is flashtile itself: the shim this module writes (its package
    has the marker) or flashtile imported under that name. Benchmarks and the demo check this before they call
    something FlashInfer: a shim on the path would make the baseline flashtile."""
    if getattr(module, "__name__", None) == TARGET_PACKAGE:
        return True
    file = getattr(module, "__file__", None)
    return file is not None and _is_shim_package(pathlib.Path(file).parent)


def import_real_flashinfer(*submodules: str):
    """``import flashinfer`` (and ``flashinfer.<name>`` for each of ``submodules``) for a comparison with
    FlashInfer. Raises ImportError when it is not importable, or when it is flashtile (:func:`is_flashtile_shim`):
    the comparison would be flashtile against itself."""
    import importlib

    module = importlib.import_module(PACKAGE)
    if is_flashtile_shim(module):
        raise ImportError("`import flashinfer` finds flashtile's shim (python -m flashtile install-shim), "
                          "not FlashInfer")
    for name in submodules:
        importlib.import_module(f"{PACKAGE}.{name}")
    return module


def _is_shim_dist_info(dist_info: pathlib.Path) -> bool:
    return (_read_text(dist_info / "INSTALLER") or "").strip() == INSTALLER


def _dist_infos(target: pathlib.Path) -> List[pathlib.Path]:
    """``flashinfer_python-*.dist-info`` directories in ``target``."""
    if not target.is_dir():
        return []
    return sorted(p for p in target.iterdir() if p.is_dir() and p.name.lower().startswith(DIST_INFO_PREFIX)
                  and p.name.endswith(".dist-info"))


def _foreign_flashinfer(target: pathlib.Path) -> Optional[str]:
    """A description of a FlashInfer that flashtile did not write and that this environment or
    ``target`` holds, or None."""
    package_dir = target / PACKAGE
    if package_dir.exists() and not _is_shim_package(package_dir):
        return f"a flashinfer package not written by flashtile is in {package_dir}"
    for dist_info in _dist_infos(target):
        if not _is_shim_dist_info(dist_info):
            return f"FlashInfer's package metadata {dist_info} was not written by flashtile"
    spec = importlib.util.find_spec(PACKAGE) if PACKAGE not in sys.modules else sys.modules[PACKAGE].__spec__
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        if not locations and spec.origin:
            locations = [os.path.dirname(spec.origin)]
        foreign = [loc for loc in locations if not _is_shim_package(pathlib.Path(loc))]
        if foreign or not locations:
            return ("`import flashinfer` finds a FlashInfer not written by flashtile "
                    f"({', '.join(foreign) or spec.origin})")
    for dist in importlib.metadata.distributions(name=DISTRIBUTION):
        if (dist.read_text("INSTALLER") or "").strip() != INSTALLER:
            return (f"the distribution {DISTRIBUTION} {dist.version} in {dist.locate_file('')} was not installed "
                    "by flashtile")
    return None


def _shim_files(target: pathlib.Path) -> List[pathlib.Path]:
    """Every file that install-shim wrote into ``target``: the RECORDs of its dist-infos and the
    marker's list (either alone suffices after an interrupted install or a manual deletion)."""
    files = set()
    for dist_info in _dist_infos(target):
        if not _is_shim_dist_info(dist_info):
            continue
        for line in (_read_text(dist_info / "RECORD") or "").splitlines():
            if line.strip():
                files.add(line.rsplit(",", 2)[0])
    marker = _read_text(target / PACKAGE / MARKER)
    if marker is not None:
        try:
            files.update(json.loads(marker).get("files", []))
        except (ValueError, AttributeError):
            pass
    root = target.resolve()
    paths = []
    for relative in sorted(files):
        path = (target / relative).resolve()
        if root not in path.parents:  # never follow a RECORD entry out of the target directory
            raise ShimError(f"refusing to remove {relative!r}: it is outside {target}")
        paths.append(target / relative)
    return paths


def _remove(target: pathlib.Path, paths: Sequence[pathlib.Path]) -> List[pathlib.Path]:
    """Delete ``paths`` (files in ``target``), the bytecode Python cached for the ``.py`` ones, and
    the directories under ``target`` that this leaves empty; returns the files deleted."""
    removed = []
    directories: Set[pathlib.Path] = set()
    for path in paths:
        candidates = [path]
        if path.suffix == ".py":
            candidates += sorted((path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"))
        for candidate in candidates:
            if candidate.is_file() or candidate.is_symlink():
                candidate.unlink()
                removed.append(candidate)
            directories.update(d for d in candidate.parents if target in d.parents)
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):  # deepest first
        try:
            directory.rmdir()  # only if empty: a file install-shim did not write keeps its directory
        except OSError:
            pass
    return removed


def install_shim(target: Optional[os.PathLike] = None,
                 version: str = ADVERTISED_FLASHINFER_VERSION) -> List[pathlib.Path]:
    """Write the ``flashinfer`` shim package and its metadata into ``target``; returns the files written.

    Args:
        target: a site-packages-like directory (default: :func:`default_target`). It must be on
            ``sys.path`` (e.g. through ``PYTHONPATH``) of the processes that import ``flashinfer``.
        version: the FlashInfer version to advertise (``flashinfer.__version__`` and the
            ``flashinfer-python`` metadata).

    Raises:
        ShimError: a FlashInfer that flashtile did not write is importable or present in ``target``.
        ValueError: ``version`` is empty or contains characters that cannot be in a file name.
    """
    if not version or any(c in version for c in "/\\-, \n") or not version[0].isdigit():
        raise ValueError(f"version: expected a FlashInfer release version such as {ADVERTISED_FLASHINFER_VERSION!r}, "
                         f"got {version!r}")
    target = pathlib.Path(target) if target is not None else default_target()
    foreign = _foreign_flashinfer(target)
    if foreign:
        raise ShimError(f"{foreign}. The shim is only for environments without FlashInfer; flashtile leaves a real "
                        "FlashInfer alone (use it directly, or `pip uninstall flashinfer-python` first).")
    _remove(target, _shim_files(target))  # an earlier shim (perhaps of another version) is replaced

    flashtile_version = _flashtile_version()
    dist_info = _dist_info_name(version)
    contents: Dict[str, bytes] = {
        f"{PACKAGE}/__init__.py": _INIT_TEMPLATE.format(flashtile_version=flashtile_version, version=version).encode(),
    }
    listed = [f"{PACKAGE}/__init__.py", f"{PACKAGE}/{MARKER}"] + [
        f"{dist_info}/{name}" for name in ("METADATA", "INSTALLER", "top_level.txt", "RECORD")]
    marker = {"writer": INSTALLER, "flashtile_version": flashtile_version, "flashinfer_version": version,
              "files": listed}
    contents[f"{PACKAGE}/{MARKER}"] = (json.dumps(marker, indent=2) + "\n").encode()
    contents[f"{dist_info}/METADATA"] = (
        "Metadata-Version: 2.1\n"
        f"Name: {DISTRIBUTION}\n"
        f"Version: {version}\n"
        f"Summary: flashtile {flashtile_version} standing in for FlashInfer (written by "
        "`python -m flashtile install-shim`)\n"
        f"Requires-Dist: flashtile\n"
    ).encode()
    contents[f"{dist_info}/INSTALLER"] = f"{INSTALLER}\n".encode()
    contents[f"{dist_info}/top_level.txt"] = f"{PACKAGE}\n".encode()
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in contents.items())
    contents[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()

    written = []
    for name in listed:  # the package first, its metadata last: a half-written shim is still ours
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[name])
        written.append(path)
    importlib.invalidate_caches()
    return written


def uninstall_shim(target: Optional[os.PathLike] = None) -> List[pathlib.Path]:
    """Remove what :func:`install_shim` wrote into ``target``; returns the files removed (empty when
    there was no shim).

    Raises:
        ShimError: ``target`` holds a FlashInfer that flashtile did not write (it is left alone).
    """
    target = pathlib.Path(target) if target is not None else default_target()
    package_dir = target / PACKAGE
    if package_dir.exists() and not _is_shim_package(package_dir):
        raise ShimError(f"{package_dir} was not written by flashtile (a real FlashInfer?); not touching it")
    removed = _remove(target, _shim_files(target))
    importlib.invalidate_caches()
    return removed
