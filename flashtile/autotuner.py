"""``flashinfer.autotuner``: FlashInfer's tactic autotuner, as a documented no-op.

FlashInfer profiles several implementations ("tactics") of some operations (GEMMs, MoE, cuDNN plans)
inside ``with autotune(True):`` and keeps the winners, optionally in a JSON file. flashtile has no
tactics to choose between: each kernel's launch configuration is picked per device from its
properties when the kernel is first launched. So :func:`autotune` tunes nothing and
:class:`AutoTuner` holds nothing; both exist because engines call them at start-up. vLLM's kernel
warm-up, for one, runs ``with autotune(tune_mode=True, cache=path, skip_ops=...)`` around a dummy
forward pass, reads the file back if it exists, and calls ``AutoTuner.get().load_configs(path)``.

The cache file flashtile writes is a JSON object holding only a ``"_metadata"`` entry (its writer);
it has no tactic entries, which is the shape FlashInfer's own loader accepts as an empty cache. A
cache file that holds another tuner's tactics (one FlashInfer wrote) is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Iterator, Optional, Set, Tuple, Union

from .jit.core import logger

__all__ = ["AutoTuner", "autotune"]

PathLike = Union[str, os.PathLike]
_METADATA_KEY = "_metadata"


def _metadata() -> dict:
    from . import __version__

    return {"writer": "flashtile", "flashtile_version": __version__,
            "note": "flashtile has no tactics to tune; this file records none"}


def _read_config_file(path: PathLike) -> dict:
    """The JSON object in ``path`` (ValueError if the file holds something else)."""
    with open(path, "r", encoding="utf-8") as f:
        configs = json.load(f)
    if not isinstance(configs, dict):
        raise ValueError(f"{os.fspath(path)}: expected a JSON object of autotuner configs, "
                         f"got {type(configs).__name__}")
    return configs


def _tactic_entries(configs: dict) -> dict:
    """Entries other than the file's own bookkeeping (keys starting with ``_``, like ``_metadata``)."""
    return {key: value for key, value in configs.items() if not key.startswith("_")}


class AutoTuner:
    """The process-wide autotuner (:meth:`get`). Holds no tactics: see the module docstring."""

    _instance: Optional["AutoTuner"] = None

    @classmethod
    def get(cls) -> "AutoTuner":
        """The singleton instance (created on first use)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def load_configs(self, path: PathLike) -> bool:
        """Read an autotuner config file; flashtile applies none of its entries.

        Args:
            path: a JSON file written by :meth:`save_configs` or by FlashInfer's autotuner.

        Returns:
            True when the file holds no tactic entries (as flashtile writes it: nothing to apply);
            False when the file does not exist or holds another tuner's tactics, which flashtile
            cannot use (FlashInfer also returns False for a cache it skips).

        Raises:
            ValueError: the file is not a JSON object (``json.JSONDecodeError`` is a ValueError).
        """
        try:
            configs = _read_config_file(path)
        except FileNotFoundError:
            logger.debug("autotuner config file %s does not exist; nothing to load", os.fspath(path))
            return False
        entries = _tactic_entries(configs)
        if entries:
            logger.info("autotuner config file %s holds %d tactic entries of another tuner; flashtile has no "
                        "tactics and ignores them", os.fspath(path), len(entries))
            return False
        return True

    def save_configs(self, path: PathLike) -> None:
        """Write an empty config file (metadata only) to ``path``, atomically.

        A file at ``path`` that holds tactic entries (FlashInfer's) is kept as it is, so that an
        environment switching between FlashInfer and flashtile does not lose FlashInfer's tuning.
        """
        target = pathlib.Path(path)
        try:
            if _tactic_entries(_read_config_file(target)):
                logger.info("autotuner config file %s holds another tuner's tactics; not overwritten", target)
                return
        except (FileNotFoundError, ValueError):
            pass  # absent or unreadable: flashtile's empty file replaces it
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({_METADATA_KEY: _metadata()}, f, indent=2)
            os.replace(tmp, target)  # readers never see a half-written file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def clear_cache(self) -> None:
        """Forget tuned and loaded configs (there are none)."""


@contextlib.contextmanager
def autotune(
    tune_mode: bool = True,
    cache: Optional[PathLike] = None,
    tuning_buckets: Optional[Tuple[int, ...]] = None,
    round_up: Optional[bool] = None,
    skip_ops: Optional[Union[str, Set[str]]] = None,
    cuda_graph_profile_replays: Optional[int] = None,
    **kwargs,
) -> Iterator[None]:
    """Context manager that tunes nothing (flashtile's launch configs are chosen per device).

    Arguments are FlashInfer 0.7.2's; keywords of later FlashInfer versions (``**kwargs``) are
    accepted and ignored, since there is nothing to tune.

    Args:
        tune_mode: in FlashInfer, profile shapes not yet in the cache. Here: with ``cache``, write the
            cache file on exit, as FlashInfer does.
        cache: path of a JSON config file. On entry it is read if it exists
            (:meth:`AutoTuner.load_configs`); on exit with ``tune_mode`` it is written
            (:meth:`AutoTuner.save_configs`: metadata only, and never over another tuner's tactics).
        tuning_buckets: measurement points; must not be empty when given (as upstream).
        round_up, skip_ops: accepted and ignored.
        cuda_graph_profile_replays: must be at least 1 when given (as upstream).

    Raises:
        ValueError: ``tuning_buckets`` is empty, or ``cuda_graph_profile_replays`` is below 1.
    """
    if tuning_buckets is not None and len(tuple(tuning_buckets)) == 0:
        raise ValueError("tuning_buckets: expected at least one bucket or None, got an empty sequence")
    if cuda_graph_profile_replays is not None and cuda_graph_profile_replays < 1:
        raise ValueError("cuda_graph_profile_replays: expected None or an integer >= 1, "
                         f"got {cuda_graph_profile_replays!r}")
    tuner = AutoTuner.get()
    if cache is not None and os.path.exists(cache):
        tuner.load_configs(cache)
    yield
    if tune_mode and cache is not None:
        tuner.save_configs(cache)
