"""flashtile's environment settings: one registry of every environment variable the package reads.

Each variable is declared once in :data:`SETTINGS` (name, kind, default, how its text is parsed, one
line of documentation), and every read in the package goes through :func:`get` (the parsed value;
:func:`flag` and :func:`choice` give it typed) or :func:`env` (the text as set). ``python -m flashtile
info`` lists the registry and the README's table of environment variables is generated from it
(:func:`markdown_table`, written by ``python -m flashtile info --readme README.md``);
tests/test_settings.py checks both, and that no other module reads ``os.environ``.

Kinds (:data:`KINDS`): user features, kill-switches (turn a fast path off when it misbehaves),
test-only switches, developer diagnostics, and external variables (defined by other software;
flashtile reads them).

Why values are cached: an eager call of a launch-bound op (a norm, RoPE, a merge, a sampler) has a
host budget of a few microseconds, and one ``os.environ.get`` costs about one (it encodes the name
and decodes the value). So cached settings are read once, on first use, and kept; :func:`reload`
forgets them and everything derived from them (the launch memos, the checked-call memos, the
dispatch choices, which key on the settings implicitly; modules register with :func:`on_reload`),
so that the next call reads the environment again. Tools and tests that change these variables at
run time call :func:`reload` afterwards (tests/conftest.py does it for every
``monkeypatch.setenv``/``delenv``). Changing them in the environment of a running process has no
effect otherwise; set them before the first call.

Uncached settings are read at every use: ``TRITON_INTERPRET`` (:func:`interpreting`,
:func:`select_interpreter`), which Triton reads itself when ``@triton.jit`` decorates a kernel, so
flashtile must read it at the same times Triton does; and Triton's cache location, read rarely.
"""

from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Final, List, Optional, Tuple, overload

__all__ = [
    "Setting", "SETTINGS", "KINDS", "get", "flag", "choice", "env", "reload", "on_reload", "interpreting",
    "select_interpreter", "select_interpreter_for_backend", "markdown_table", "with_current_table",
    "README_TABLE_BEGIN", "README_TABLE_END", "INTERPRET_VARIABLE",
]

USER_FEATURE = "user feature"
KILL_SWITCH = "kill-switch"
TEST_ONLY = "test-only"
DIAGNOSTIC = "developer diagnostic"
EXTERNAL = "external"
KINDS: Dict[str, str] = {
    USER_FEATURE: "a choice offered to users",
    KILL_SWITCH: "on by default; `0` turns a fast path off should it misbehave, which is worth a report",
    TEST_ONLY: "for flashtile's own tests; slow",
    DIAGNOSTIC: "for comparing implementations while developing flashtile",
    EXTERNAL: "defined by other software; flashtile reads it",
}

_OFF_WORDS = ("", "0", "false", "off", "no")


@dataclass(frozen=True)
class Setting:
    """One environment variable. ``type``: "flag" (unset gives ``default``; "", "0", "false", "off",
    "no" in any case are off, anything else on), "choice" (one of ``choices``, case and surrounding
    space ignored; "" is the default) or "text" (the text as set, ``default`` when unset).
    ``cached``: read once until :func:`reload` (module doc)."""

    name: str
    kind: str
    type: str
    default: object
    doc: str
    choices: Tuple[str, ...] = ()
    cached: bool = True

    def parse(self, text: Optional[str]) -> object:
        """The value of this setting when its variable holds ``text`` (None: unset)."""
        if text is None:
            return self.default
        if self.type == "flag":
            return text.strip().lower() not in _OFF_WORDS
        if self.type == "choice":
            from .checks import check_option

            return check_option(self.name, text.strip().lower() or self.default, self.choices)
        return text


INTERPRET_VARIABLE = "TRITON_INTERPRET"

SETTINGS: Dict[str, Setting] = {s.name: s for s in (
    Setting("FLASHTILE_BACKEND", USER_FEATURE, "choice", "auto",
            "`auto`: kernels for CUDA tensors, the PyTorch reference for CPU tensors; `triton`: the kernels "
            "everywhere (Triton's interpreter for CPU tensors); `reference`: the PyTorch reference everywhere",
            choices=("auto", "triton", "reference")),
    Setting("FLASHTILE_DEBUG", USER_FEATURE, "flag", False,
            "fill new outputs with NaN before a kernel writes them, and copy device page tables and index "
            "arrays to the host to validate them"),
    Setting("FLASHTILE_DIRECT_LAUNCH", KILL_SWITCH, "flag", True,
            "`0`: launch every kernel through Triton's `JITFunction.run` (no cached launches)"),
    Setting("FLASHTILE_LAUNCH_MEMO", KILL_SWITCH, "flag", True,
            "`0`: no replayed launches for the small ops (norm, activation, RoPE)"),
    Setting("FLASHTILE_HOPPER_PREFILL", KILL_SWITCH, "flag", True,
            "`0`: batch prefill on an H100 runs the Triton kernel instead of the warp-specialized Gluon kernel"),
    Setting("FLASHTILE_HOPPER_FP8", KILL_SWITCH, "flag", True,
            "`0`: ragged FP8 prefill batches on an H100/H200 run the Triton kernel instead of the warp-specialized "
            "Gluon kernel (kernels/batch_prefill_hopper.py)"),
    Setting("FLASHTILE_HOPPER_MLA", KILL_SWITCH, "flag", True,
            "`0`: MLA batches with 64-row tiles (64 or more heads, or appends) on an H100/H200 run the Triton kernel "
            "instead of the warp-specialized Gluon kernel (kernels/mla_hopper.py)"),
    Setting("FLASHTILE_SINGLE_PREFILL_AS_BATCH", DIAGNOSTIC, "flag", False,
            "`1`: single prefill calls that the warp-specialized Hopper batch prefill kernel serves run as a ragged "
            "batch of one through it (off until the single_prefill benchmark shows it never slower)"),
    Setting("FLASHTILE_SAMPLING_SPLIT", KILL_SWITCH, "flag", True,
            "`0`: one program per row for every batch (no row split over programs at small batches)"),
    Setting("FLASHTILE_CHECK_LAUNCH", TEST_ONLY, "flag", False,
            "check every cached or replayed launch against Triton's own choice"),
    Setting(INTERPRET_VARIABLE, EXTERNAL, "text", None,
            "Triton: `1` runs kernels in Triton's interpreter (CPU); must be set before the kernels load",
            cached=False),
    Setting("TRITON_CACHE_DIR", EXTERNAL, "text", None,
            "Triton: where compiled kernels are kept (default `$TRITON_HOME/.triton/cache`)", cached=False),
    Setting("TRITON_HOME", EXTERNAL, "text", None,
            "Triton: the directory holding `.triton/` (default: the home directory)", cached=False),
    Setting("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", EXTERNAL, "text", None,
            "CUDA MPS: the share of the GPU's SMs this process may use (sizes the samplers' grids)"),
    Setting("WORLD_SIZE", EXTERNAL, "text", None,
            "torchrun: the number of processes (the example engine's `demo --tp N` checks it)", cached=False),
    Setting("LOCAL_RANK", EXTERNAL, "text", None,
            "torchrun: this process's GPU on its node (the example engine's tensor-parallel ranks)", cached=False),
    Setting("OMP_NUM_THREADS", EXTERNAL, "text", None,
            "OpenMP threads per process; when unset, spawned tensor-parallel ranks split the CPU cores",
            cached=False),
)}

_texts: Dict[str, Optional[str]] = {}
_values: Dict[str, object] = {}
_listeners: List[Callable[[], None]] = []


class _Unread(enum.Enum):
    """What the caches hold for a name not read yet (an enum member, so that ``is`` narrows its type)."""

    UNREAD = enum.auto()


_UNSET: Final = _Unread.UNREAD


def _setting(name: str) -> Setting:
    setting = SETTINGS.get(name)
    if setting is None:
        raise KeyError(f"{name} is not a registered setting: declare it in flashtile/_core/settings.py")
    return setting


@overload
def env(name: str) -> Optional[str]: ...
@overload
def env(name: str, default: str) -> str: ...
@overload
def env(name: str, default: Optional[str]) -> Optional[str]: ...


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    """The text of registered variable ``name`` as set, or ``default`` when unset (cached settings
    are read once: module doc)."""
    value = _texts.get(name, _UNSET)
    if value is _UNSET:
        value = os.environ.get(name)
        if _setting(name).cached:
            _texts[name] = value
    return default if value is None else value


def get(name: str) -> object:
    """The parsed value of registered setting ``name`` (:meth:`Setting.parse`)."""
    value = _values.get(name, _UNSET)
    if value is _UNSET:
        setting = _setting(name)
        value = setting.parse(env(name))
        if setting.cached:
            _values[name] = value
    return value


def flag(name: str) -> bool:
    """:func:`get` for a setting of type "flag": on or off."""
    return bool(get(name))


def choice(name: str) -> str:
    """:func:`get` for a setting of type "choice": one of its ``choices``."""
    return str(get(name))


def on_reload(listener: Callable[[], None]) -> None:
    """Call ``listener()`` at every :func:`reload` (modules that keep state derived from settings)."""
    _listeners.append(listener)


def reload() -> None:
    """Forget every setting read so far and everything derived from them (module doc)."""
    _texts.clear()
    _values.clear()
    for listener in _listeners:
        listener()


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), as Triton sees it
    now (read at every call: :func:`select_interpreter` may set it)."""
    return env(INTERPRET_VARIABLE) == "1"


def select_interpreter(*, unless_set: bool = False) -> None:
    """Choose Triton's interpreter for kernels decorated from now on (``TRITON_INTERPRET=1``).

    ``unless_set``: leave a value the user set alone, and do nothing on a machine with CUDA or once
    triton is imported (it must be chosen before triton is imported to cover triton's own library):
    the rule for ``FLASHTILE_BACKEND=triton`` at import time and in the CLI."""
    if unless_set:
        if env(INTERPRET_VARIABLE) is not None or "triton" in sys.modules:
            return
        import torch

        if torch.cuda.is_available():
            return
    os.environ[INTERPRET_VARIABLE] = "1"


def select_interpreter_for_backend() -> None:
    """``FLASHTILE_BACKEND=triton`` on a machine without CUDA means "run the kernels in Triton's
    interpreter", which has to be chosen before triton is imported (at import and in the CLI; a bad
    value is left for the first call to report)."""
    if (env("FLASHTILE_BACKEND") or "").strip().lower() == "triton":
        select_interpreter(unless_set=True)


def _default_text(setting: Setting) -> str:
    if setting.default is None:
        return "unset"
    if setting.type == "flag":
        return "`1`" if setting.default else "`0`"
    return f"`{setting.default}`"


README_TABLE_BEGIN = "<!-- generated from flashtile/_core/settings.py: python -m flashtile info --readme README.md -->"
README_TABLE_END = "<!-- end of the generated table -->"


def markdown_table() -> str:
    """The README's table of environment variables, one row per setting, after the list of kinds."""
    kinds = ", ".join(f"*{kind}* ({meaning})" for kind, meaning in KINDS.items())
    lines = [f"Kinds: {kinds}.", "", "| variable | kind | default | effect |", "| --- | --- | --- | --- |"]
    for s in SETTINGS.values():
        lines.append(f"| `{s.name}` | {s.kind} | {_default_text(s)} | {s.doc} |")
    return "\n".join(lines) + "\n"


def with_current_table(readme: str) -> str:
    """``readme`` with the text between its table markers replaced by :func:`markdown_table`
    (tests/test_settings.py checks the README is unchanged by it)."""
    head, begin, rest = readme.partition(README_TABLE_BEGIN + "\n")
    _, end, tail = rest.partition(README_TABLE_END)
    if not begin or not end:
        raise ValueError(f"the README has no {README_TABLE_BEGIN!r} ... {README_TABLE_END!r} section")
    return head + begin + markdown_table() + end + tail

