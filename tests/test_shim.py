"""``python -m flashtile install-shim`` / ``uninstall-shim`` end to end, in subprocesses: the shim
written into a temporary ``--target`` directory (put on PYTHONPATH) makes ``import flashinfer`` and
every ``flashinfer.X`` resolve to flashtile's objects with FlashInfer's package metadata; uninstall
removes exactly what install wrote; both refuse to touch a FlashInfer that flashtile did not write."""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from flashtile import cli, shim

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Installing refuses (by design) where a real FlashInfer is importable, e.g. a GPU machine that has one.
installs = pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None,
                              reason="a FlashInfer is importable here: install-shim refuses (tested below)")


def _env(*paths):
    """This environment with ``paths`` then the checkout on PYTHONPATH, writing bytecode (so that
    uninstall has cached bytecode to remove) and FLASHTILE_BACKEND unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLASHTILE_BACKEND", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (*paths, ROOT))
    return env


def run_cli(*args, paths=()):
    return subprocess.run([sys.executable, "-m", "flashtile", *args], cwd=ROOT, env=_env(*paths),
                          capture_output=True, text=True, timeout=300)


def run_python(code, *paths):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(*paths), capture_output=True, text=True,
                          timeout=300)


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _fake_flashinfer(directory):
    """A FlashInfer package flashtile did not write."""
    package = directory / "flashinfer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '0.7.2'\n")
    return package


IMPORTS = """
import importlib, importlib.metadata, sys
import flashinfer, flashtile
assert flashinfer.BatchDecodeWithPagedKVCacheWrapper is flashtile.BatchDecodeWithPagedKVCacheWrapper
assert flashinfer.__version__ == {version!r}, flashinfer.__version__
assert flashtile.__version__ == "0.1.0"
assert importlib.metadata.version("flashinfer_python") == {version!r}
assert importlib.metadata.version("flashinfer-python") == {version!r}
import flashinfer.decode, flashinfer.prefill, flashinfer.sampling, flashinfer.cascade
import flashinfer.jit.core, flashinfer.jit.env, flashinfer.autotuner, flashinfer.triton.cascade, flashinfer.utils
from flashinfer.decode import trtllm_batch_decode_with_kv_cache
from flashinfer.prefill import trtllm_batch_context_with_kv_cache
from flashinfer.utils import FP4Tensor
from flashinfer.jit.core import logger
from flashinfer.jit import env as jit_env
from flashinfer.autotuner import AutoTuner, autotune
for name in ("decode", "prefill", "sampling", "cascade", "jit", "jit.core", "jit.env", "autotuner", "triton",
             "triton.cascade", "utils", "norm", "rope", "page"):
    alias, real = importlib.import_module("flashinfer." + name), importlib.import_module("flashtile." + name)
    assert alias is real, name
    assert sys.modules["flashinfer." + name] is real, name
    assert real.__name__ == "flashtile." + name  # flashtile's modules keep their own identity
assert flashinfer.decode is flashtile.decode and flashinfer.sampling is flashtile.sampling
assert trtllm_batch_decode_with_kv_cache is flashtile.decode.trtllm_batch_decode_with_kv_cache
assert FP4Tensor is flashtile.utils.FP4Tensor and logger is flashtile.jit.core.logger
assert flashinfer.triton.cascade.merge_state is flashtile.merge_state
from flashtile.shim import is_flashtile_shim
assert is_flashtile_shim(flashinfer) and is_flashtile_shim(flashtile) and not is_flashtile_shim(importlib)
from benchmarks.harness import Unavailable, import_flashinfer
try:
    import_flashinfer()
    raise SystemExit("the benchmarks took the shim for FlashInfer")
except Unavailable as e:
    assert "shim" in str(e), e
from flashtile.shim import import_real_flashinfer
try:
    import_real_flashinfer("decode")
    raise SystemExit("import_real_flashinfer returned the shim")
except ImportError as e:
    assert "shim" in str(e), e
if hasattr(flashtile.decode, "fast_decode_plan"):
    assert flashinfer.decode.fast_decode_plan is flashtile.decode.fast_decode_plan
    assert flashinfer.fast_decode_plan is flashtile.decode.fast_decode_plan
from flashinfer import *  # noqa
assert BatchPrefillWithPagedKVCacheWrapper is flashtile.BatchPrefillWithPagedKVCacheWrapper
assert importlib.util.find_spec("flashinfer.comm") is None  # a module flashtile lacks stays absent
try:
    import flashinfer.fused_moe
    raise SystemExit("flashinfer.fused_moe imported")
except ModuleNotFoundError:
    pass
assert flashinfer.mla.BatchMLAPagedAttentionWrapper is flashtile.BatchMLAPagedAttentionWrapper
import flashinfer.sparse
assert flashinfer.sparse.VariableBlockSparseAttentionWrapper is flashtile.VariableBlockSparseAttentionWrapper
try:
    flashinfer.cutlass_fused_moe  # fused MoE (flashinfer.fused_moe) is not in flashtile
    raise SystemExit("missing attribute did not raise")
except AttributeError as e:
    assert "flashinfer" in str(e)
print("ok")
"""


@installs
def test_install_import_uninstall(tmp_path):
    target = tmp_path / "site"
    target.mkdir()
    r = run_cli("install-shim", "--target", str(target))
    assert r.returncode == 0, r.stdout + r.stderr
    version = shim.ADVERTISED_FLASHINFER_VERSION
    dist_info = f"flashinfer_python-{version}.dist-info"
    written = ["flashinfer/__init__.py", "flashinfer/_flashtile_shim.json", f"{dist_info}/INSTALLER",
               f"{dist_info}/METADATA", f"{dist_info}/RECORD", f"{dist_info}/top_level.txt"]
    assert _files(target) == sorted(written)
    assert (target / dist_info / "INSTALLER").read_text() == "flashtile\n"
    assert json.loads((target / "flashinfer" / "_flashtile_shim.json").read_text())["writer"] == "flashtile"
    record = (target / dist_info / "RECORD").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in record) == sorted(written)

    r = run_python(IMPORTS.format(version=version), target)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    assert "flashinfer/__pycache__" in " ".join(_files(target))  # Python cached the shim's bytecode

    r = run_cli("uninstall-shim", "--target", str(target))
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(target.iterdir()) == []  # everything it wrote, bytecode included, and nothing else
    r = run_python(AFTER_UNINSTALL, target)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


AFTER_UNINSTALL = """
import importlib.metadata
import importlib.util
try:
    import flashinfer
    raise SystemExit("flashinfer still imports")
except ModuleNotFoundError:
    pass
try:
    importlib.metadata.version("flashinfer_python")
    raise SystemExit("flashinfer_python metadata still found")
except importlib.metadata.PackageNotFoundError:
    pass
print("ok")
"""


def test_a_real_flashinfer_is_not_the_shim(tmp_path):
    """is_flashtile_shim: False for a flashinfer package without flashtile's marker."""
    package = _fake_flashinfer(tmp_path)
    r = run_python("import flashinfer\nfrom flashtile.shim import is_flashtile_shim\n"
                   "assert not is_flashtile_shim(flashinfer), flashinfer.__file__\nprint('ok')", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    assert package.is_dir()


def test_refuses_real_flashinfer_on_path(tmp_path):
    real = _fake_flashinfer(tmp_path / "elsewhere")
    target = tmp_path / "site"
    target.mkdir()
    r = run_cli("install-shim", "--target", str(target), paths=[real.parent])
    assert r.returncode == 1
    assert "not written by flashtile" in r.stderr and str(real) in r.stderr
    assert list(target.iterdir()) == []


# The cases below run the commands in this process: they never import the shim.


@installs
def test_reinstall_other_version_and_uninstall_twice(tmp_path, capsys):
    assert cli.main(["install-shim", "--target", str(tmp_path)]) == 0
    assert cli.main(["install-shim", "--target", str(tmp_path), "--flashinfer-version", "0.6.11.post1"]) == 0
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path)])  # the earlier version's metadata is gone
    assert dist.metadata["Name"] == "flashinfer-python" and dist.version == "0.6.11.post1"
    assert "_activate(globals(), '0.6.11.post1')" in (tmp_path / "flashinfer" / "__init__.py").read_text()
    assert cli.main(["uninstall-shim", "--target", str(tmp_path)]) == 0
    assert list(tmp_path.iterdir()) == []
    capsys.readouterr()
    assert cli.main(["uninstall-shim", "--target", str(tmp_path)]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_rejects_bad_version(tmp_path, capsys):
    assert cli.main(["install-shim", "--target", str(tmp_path), "--flashinfer-version", "bad-version"]) == 1
    assert "version: expected a FlashInfer release version" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_refuses_real_flashinfer_in_target(tmp_path, capsys):
    real = _fake_flashinfer(tmp_path)
    before = _files(tmp_path)
    assert cli.main(["install-shim", "--target", str(tmp_path)]) == 1
    assert "not written by flashtile" in capsys.readouterr().err
    assert cli.main(["uninstall-shim", "--target", str(tmp_path)]) == 1
    assert "not touching it" in capsys.readouterr().err
    assert _files(tmp_path) == before and (real / "__init__.py").read_text() == "__version__ = '0.7.2'\n"


def test_refuses_real_flashinfer_metadata(tmp_path, capsys):
    dist_info = tmp_path / "flashinfer_python-0.7.2.dist-info"
    dist_info.mkdir()
    (dist_info / "INSTALLER").write_text("pip\n")
    assert cli.main(["install-shim", "--target", str(tmp_path)]) == 1
    assert "was not written by flashtile" in capsys.readouterr().err
    assert _files(tmp_path) == ["flashinfer_python-0.7.2.dist-info/INSTALLER"]


@installs
def test_uninstall_leaves_foreign_files(tmp_path, capsys):
    assert shim.install_shim(tmp_path)
    extra = tmp_path / "flashinfer" / "user_notes.txt"
    extra.write_text("not the shim's")
    assert cli.main(["uninstall-shim", "--target", str(tmp_path)]) == 0
    assert "still exists" in capsys.readouterr().err
    assert _files(tmp_path) == ["flashinfer/user_notes.txt"]


@installs
def test_record_outside_target_is_refused(tmp_path):
    target = tmp_path / "site"
    assert shim.install_shim(target)
    record = next(target.glob("*.dist-info")) / "RECORD"
    record.write_text(record.read_text() + "../outside.txt,,\n")
    (tmp_path / "outside.txt").write_text("keep")
    with pytest.raises(shim.ShimError, match="outside"):
        shim.uninstall_shim(target)
    assert (tmp_path / "outside.txt").read_text() == "keep"
