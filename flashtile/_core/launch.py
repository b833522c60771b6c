"""Kernel launches that skip Triton's per-call binding once a specialization is compiled.

Why: a ``kernel[grid](...)`` call spends 20-35 us of host time in Triton's ``JITFunction.run``
before the driver launch (binding the arguments, specializing each one, hashing the key, reading
knobs, building launch metadata), which is more than the GPU time of a norm or an activation at
decode batch sizes. ``direct_launch`` keeps, per kernel, a dict from a cheap key of the call to the
compiled kernel that Triton returned for that call, and later calls with the same key go straight
to the compiled kernel's launcher, with the same arguments Triton would pass it.

Why the cached kernel is the one Triton would pick: Triton specializes a call on the device, the
options and constexprs, and per runtime argument on its type plus a few properties: for tensors the
dtype and whether the pointer is 16-byte aligned, for ints whether the value is 1 (compiled in as a
constant), divisible by 16, and its width (i32 / i64 / u64); floats, bools and None carry no value; a
tuple (an attention variant's extra arguments) is specialized element by element, and so keyed.
The key records each of these or something finer: positional ints are keyed by their value (free
to compute; sizes and strides take few values per call site), except parameters Triton does not
specialize (``do_not_specialize``: seeds, offsets), which get the four properties. Two calls with one
key therefore get the same compiled kernel from Triton too. A kernel keeps at most
``MAX_CACHED_CALLS`` keys (it starts over when full), so ints that change with every call (seeds,
offsets) must be ``do_not_specialize`` parameters, as they should be for Triton anyway.
``FLASHTILE_CHECK_LAUNCH=1`` asks Triton
for its kernel on every cached launch and raises if it differs (the GPU tests run with it).

Arguments of any other type (or unhashable constexprs) take Triton's own path, as do the
interpreter (``TRITON_INTERPRET=1``) and machines without CUDA. ``FLASHTILE_DIRECT_LAUNCH=0`` turns the
cache off.

This module drives Triton's private launch interface (the compiled kernel's ``run``, its
``packed_metadata`` and ``launch_metadata``, the launch hooks) and mirrors Triton's specialization
rules, neither of which is a stable API. So it is used only with the Triton releases it was tested
with, ``TESTED_TRITON_VERSIONS`` (major.minor); with any other Triton every launch silently takes
Triton's public path (``kernel[grid](...)``, i.e. ``JITFunction.run``), as with
``FLASHTILE_DIRECT_LAUNCH=0``. tests/test_launch.py checks the key against Triton's own
specialization code on CPU.

``LaunchMemo`` goes one step further for the launch-bound small ops (norms, activations, RoPE),
whose launchers spend as long computing configs, grids and stride lists as the direct launch
itself: a launcher keys the whole launch on its tensors' shapes, strides, dtypes and pointer
alignment (plus its own options), and a known key replays the recorded launch, passing only the
tensors and floats of this call. The launcher's key must fix every other argument; check mode
recomputes every launch through the launcher and raises if it differs from the recorded one.
``FLASHTILE_LAUNCH_MEMO=0`` turns the memos off (direct launches stay on). A launcher may be handed
its key by its caller (``launch_key``: the API layer's key of the same tensors, _core/memo.py), which
then must fix the launch just as the launcher's own key does. A caller that keeps a per-key entry anyway
(the API memos) can hold a ``ReplayCell`` of the key instead, and skip the memo's own lookup.

The FLASHTILE_* knobs are read once (_core/settings.py; ``reset_launch_settings`` re-reads them).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from . import settings
from .memo import tensor_key

__all__ = ["direct_launch", "DirectLaunch", "LaunchMemo", "tensor_key", "argument_key", "clear_launch_memos",
           "on_clear_launch_memos",
           "reset_launch_settings", "TESTED_TRITON_VERSIONS", "triton_version_tested", "recording_launches",
           "make_replay", "Recording", "ReplayCell"]

# Triton releases (major.minor) whose private launch interface and specialization rules this module
# was tested against: 3.6 on the GPU machine, 3.9 on the CPU one (tests/test_launch.py).
TESTED_TRITON_VERSIONS = ("3.6", "3.9")
MAX_CACHED_CALLS = 4096  # keys per kernel; the cache starts over when full
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _int_key(value: int) -> tuple:
    """Equal to 1, divisible by 16, fits int32, fits int64: what Triton looks at in an int."""
    return (value == 1, value % 16 == 0, _INT32_MIN <= value <= _INT32_MAX, _INT64_MIN <= value <= _INT64_MAX)


class _Uncacheable(Exception):
    pass


def argument_key(value: Any) -> Any:
    """What Triton's specialization can depend on for one runtime argument (see the module doc)."""
    kind = type(value)
    if kind is int:
        return _int_key(value)
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if kind is float:
        return float
    if kind is bool:
        return bool
    if value is None:
        return None
    if kind is tuple:  # a variant's extra arguments: Triton specializes each element as it would alone
        return (tuple, *(argument_key(v) for v in value))
    if hasattr(value, "block_shape") and hasattr(value, "base"):  # a (Gluon) tensor descriptor
        return _descriptor_key(value)
    raise _Uncacheable(kind.__name__)


def _descriptor_key(desc) -> Any:
    """Triton's own specialization of a tensor descriptor (its type string: dtype, block shape, shared
    layout), from the function Triton's binder calls; ~1.5 us, still far cheaper than the binder."""
    specialize = _state.get("specialize")
    if specialize is None:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        def specialize(value):
            return native_specialize_impl(BaseBackend, value, False, True, True)

        _state["specialize"] = specialize
    return specialize(desc)




def triton_version_tested(version: Optional[str] = None) -> bool:
    """Whether ``version`` (default: the installed Triton's) is one of TESTED_TRITON_VERSIONS."""
    if version is None:
        import triton

        version = triton.__version__
    return ".".join(version.split(".")[:2]) in TESTED_TRITON_VERSIONS


def _hooks():
    """Triton's launch hooks, or None when none is installed (an empty chain calls nothing)."""
    runtime = _cached("knobs_runtime", _knobs_runtime)
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if not _has_calls(enter) and not _has_calls(leave):
        return None
    return enter, leave


def _has_calls(hook) -> bool:
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)  # triton >= 3.5: a HookChain (never None)
    return bool(calls) if calls is not None else True


class DirectLaunch:
    """Wraps a ``@triton.jit`` kernel; ``wrapper[grid](*args, **kwargs)`` launches like the kernel.

    Attribute access falls through to the wrapped kernel (``.fn``), so tools that inspect
    ``arg_names``/``params`` keep working.
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict = {}
        self._keyers: dict = {}
        self._layout = None  # (names, constexpr flags, defaults, runtime names), built on first use

    def __getattr__(self, name):
        if name == "fn":  # not set yet (copy/unpickle): no recursion through self.fn
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    # -- internals --------------------------------------------------------------------------

    def _parameters(self):
        if self._layout is None:
            params = self.fn.params
            signature = inspect.signature(self.fn.fn)
            defaults = [p.default for p in signature.parameters.values()]
            runtime_names = frozenset(p.name for p in params if not p.is_constexpr)
            self._layout = ([p.name for p in params], [p.is_constexpr for p in params], defaults, runtime_names)
        return self._layout

    def _positional_keyer(self, count: int):
        """A function of the first ``count`` arguments returning their key parts, generated once per
        count with each argument's rule inlined (no call per int or plain tensor: host time is the
        point of this module)."""
        keyer = self._keyers.get(count)
        if keyer is None:
            names, constexpr, _, _ = self._parameters()
            # Triton does not specialize these on their value (seeds, offsets): key them like Triton does.
            no_value_key = {p.name for p in self.fn.params if getattr(p, "do_not_specialize", False)}
            if count > len(names):
                raise _Uncacheable("too many positional arguments")
            variables = [f"v{i}" for i in range(count)]
            parts = []
            for i, v in enumerate(variables):
                if constexpr[i]:
                    parts.append(v)  # constexprs are keyed by value
                elif names[i] in no_value_key:
                    parts.append(f"argument_key({v})")
                else:
                    # ints by value (finer than Triton's key and free to compute; sizes and strides
                    # take few values per call site), plain tensors inline, the rest by argument_key
                    parts.append(f"({v} if type({v}) is int else ({v}.dtype, {v}.data_ptr() % 16 == 0) "
                                 f"if type({v}) is Tensor else argument_key({v}))")
            source = f"def keyer({', '.join(variables)}):\n    return ({''.join(p + ', ' for p in parts)})\n"
            namespace = {"argument_key": argument_key, "Tensor": torch.Tensor}
            exec(source, namespace)
            keyer = self._keyers[count] = namespace["keyer"]
        return keyer

    def _key(self, device: int, args: tuple, kwargs: dict):
        runtime_names = self._parameters()[3]
        if runtime_names.isdisjoint(kwargs):  # constexprs and launch options only: keyed by value
            extra = tuple(kwargs.items())
        else:
            extra = tuple((k, argument_key(v) if k in runtime_names else v) for k, v in kwargs.items())
        return (device, self._positional_keyer(len(args))(*args), extra)

    def _tail(self, args: tuple, kwargs: dict) -> list:
        """The parameters after the positional ones, in signature order (constexprs and defaults
        included), as Triton's launcher takes them."""
        names, _, defaults, _ = self._parameters()
        tail = []
        for name, default in zip(names[len(args):], defaults[len(args):]):
            if name in kwargs:
                tail.append(kwargs[name])
            elif default is not inspect.Parameter.empty:
                tail.append(default)
            else:
                raise _Uncacheable(f"missing argument {name}")
        return tail

    def _launch(self, grid, args: tuple, kwargs: dict):
        recording = _state.get("recording")
        if not _direct_enabled() or callable(grid):
            if recording is not None:
                recording.complete = False
            return self.fn[grid](*args, **kwargs)
        try:
            device = _current_device()
            key = self._key(device, args, kwargs)
            entry = self._compiled.get(key)  # TypeError: an unhashable constexpr
        except (_Uncacheable, TypeError):
            if recording is not None:
                recording.complete = False
            return self.fn[grid](*args, **kwargs)
        if recording is not None:
            recording.note(self, grid, args, kwargs)
        if entry is None:
            kernel = _first_launch(self.fn, grid, args, kwargs)  # compiles (first time) and launches
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            if kernel is not None and hasattr(kernel, "packed_metadata"):
                if len(self._compiled) >= MAX_CACHED_CALLS:
                    self._compiled.clear()  # bounded memory; keys still in use come back on their next call
                try:
                    # With no runtime argument passed by keyword the tail is fixed by the key.
                    tail = self._tail(args, kwargs) if self._parameters()[3].isdisjoint(kwargs) else None
                    self._compiled[key] = (kernel, tail)
                except _Uncacheable:
                    pass
            return kernel
        kernel, tail = entry
        if tail is None:
            tail = self._tail(args, kwargs)
        if _check_enabled():
            self._check(kernel, grid, args, kwargs)
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = _driver().get_current_stream(device)
        hooks = _hooks()
        if hooks is None:
            kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
        else:
            metadata = kernel.launch_metadata(tuple(grid), stream, *args, *tail)
            kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, metadata, hooks[0], hooks[1],
                       *args, *tail)
        return kernel

    def _check(self, kernel, grid, args, kwargs) -> None:
        expected = self.fn.run(*args, grid=grid, warmup=True, **kwargs)
        if hasattr(expected, "result"):
            expected = expected.result()
        if expected is not kernel:
            raise RuntimeError(
                f"direct launch of {self.fn.__name__}: the cached kernel is not the one Triton selects for these "
                "arguments (the specialization key in flashtile/_core/launch.py misses a property); "
                "set FLASHTILE_DIRECT_LAUNCH=0 and report this"
            )


class Recording:
    """The direct launches made while :func:`recording_launches` is active, in order, each as
    ``(compiled kernel, (g0, g1, g2), positional args, tail)``; ``complete`` is False when some launch
    took Triton's own path (it cannot be replayed)."""

    def __init__(self) -> None:
        self.launches: list = []
        self.complete = True

    def note(self, launcher: "DirectLaunch", grid, args: tuple, kwargs: dict) -> None:
        self.launches.append((launcher, tuple(grid) + (1,) * (3 - len(grid)), args, kwargs))


class recording_launches:
    """Context manager: records the direct launches of the code it wraps (for :func:`make_replay`).
    Not re-entrant; hooks or check mode make the recording incomplete."""

    def __enter__(self) -> Recording:
        self.recording = Recording()
        if _state.get("recording") is not None or not _direct_enabled() or _check_enabled() or \
                _hooks() is not None:
            self.recording.complete = False
            self.previous = _state.get("recording")
            return self.recording
        self.previous = None
        _state["recording"] = self.recording
        return self.recording

    def __exit__(self, *exc) -> None:
        if _state.get("recording") is self.recording:
            _state["recording"] = self.previous


def _rebase(template, base):
    """A copy of tensor descriptor ``template`` over ``base`` (same shape, strides and block: the caller's
    key fixed them; the constructor's checks ran on the template)."""
    desc = object.__new__(type(template))
    desc.__dict__.update(template.__dict__)
    desc.base = base
    return desc


def make_replay(recording: Recording, dynamic: tuple, owned_storage: frozenset):
    """A function of ``len(dynamic)`` arguments that repeats the recorded launches with those in place of
    ``dynamic`` (tensors, or a variant's extra-argument tuple, matched by identity; a tensor also as the base
    of a tensor descriptor), or None when the recording cannot be replayed: incomplete, a launch took a
    tuple that is not one of ``dynamic``, or a launch took a tensor that is neither one of
    ``dynamic`` nor a view of a storage in ``owned_storage`` (data pointers of storages the caller keeps
    alive and unchanged while the replay is in use, e.g. a plan's work list).

    Everything else a launch took (ints, floats, constexprs, the grid, the compiled kernel) is baked in:
    the caller keys the replay on whatever fixes them (the tensors' shapes, strides, dtypes, 16-byte
    alignment, and its own options)."""
    if not recording.complete or not recording.launches:
        return None
    namespace: dict = {}
    lines = []
    for n, (launcher, grid, args, kwargs) in enumerate(recording.launches):
        entry = launcher._compiled.get(launcher._key(_driver().get_current_device(), args, kwargs))
        if entry is None:
            return None
        compiled, tail = entry
        if tail is None:
            tail = launcher._tail(args, kwargs)
        values: list[tuple] = []
        for a in tuple(args) + tuple(tail):
            position = next((j for j, d in enumerate(dynamic) if a is d), None)
            if position is not None:
                values.append(("value", f"d{position}", a))
                continue
            if type(a) is tuple:  # a variant's extra arguments not given as dynamic: one call's values, never baked
                return None
            base = getattr(a, "base", None) if hasattr(a, "block_shape") else None
            if base is not None:
                position = next((j for j, d in enumerate(dynamic) if base is d), None)
                if position is not None:
                    values.append(("descriptor", a, f"d{position}"))
                    continue
                a_tensor = base
            else:
                a_tensor = a
            if isinstance(a_tensor, torch.Tensor) and a_tensor.untyped_storage().data_ptr() not in owned_storage:
                return None
            values.append(("constant", a))
        lines.append(_launch_source(n, compiled, grid, values, namespace))
    params = ", ".join(f"d{j}" for j in range(len(dynamic)))
    return _compile_replay(params, lines, namespace)


# The checks of a guarded replay (ReplayCell), generated into it so that a call reads the current device once
# (for the checks and the stream) through one Python frame: what LaunchMemo.get checks before handing out a
# replay (the settings flags, Triton's launch hooks; a missing setting means "not read yet"), plus the device
# and the memo generation the replay was recorded under. On any of them it returns False without launching.
_GUARD_SOURCE = """\
    try:
        device = state["current_device"]()
        if device != recorded_device or memo.generation != recorded_generation or not state["enabled"] or \\
                not state["memo"] or state["check"]:
            return False
        runtime = state["knobs_runtime"]
    except KeyError:
        return False
    try:  # installed hooks (see _has_calls): HookChains with calls; read directly, getattr costs twice as much
        if runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls:
            return False
    except AttributeError:  # a hook that is None or a plain function (older Triton, or assigned one)
        if runtime.launch_enter_hook is not None or runtime.launch_exit_hook is not None:
            return False
    stream = current_stream(device)
"""


def _compile_replay(params: str, lines: list, namespace: dict, guard: Optional[tuple] = None):
    """``def replay(<params>)``: the current stream, then the launch lines. With ``guard``, ``(memo, device)``
    of the recording, the replay checks first (_GUARD_SOURCE) and returns whether it launched."""
    namespace.update(current_stream=_driver().get_current_stream, current_device=_current_device_function())
    if guard is None:
        head, tail = "    stream = current_stream(current_device())\n", ""
    else:
        namespace.update(state=_state, memo=guard[0], recorded_generation=guard[0].generation,
                         recorded_device=guard[1])
        head, tail = _GUARD_SOURCE, "    return True\n"
    source = f"def replay({params}):\n{head}" + "\n".join(lines) + "\n" + tail
    exec(source, namespace)
    return namespace["replay"]


# -- the launch line of a replay ---------------------------------------------------------------------
#
# With the Triton releases in C_LAUNCH_VERSIONS a replay calls the C launch function of the compiled
# kernel's launcher itself, skipping the launcher's Python ``__call__`` (scratch allocation closures per
# call) and its tensor-descriptor wrapper, which encodes every TMA descriptor again on every launch
# (``cuTensorMapEncodeTiled`` plus Python list building, per descriptor). Instead:
# - a descriptor over a dynamic tensor is encoded once per data pointer (a bounded cache per launch
#   site): the encoding is a function of the pointer and of shape, strides, block and layout, which
#   the replay's key fixes;
# - tensors are passed as integer addresses, which the C launcher takes as they are, without asking the
#   driver about each pointer (``cuPointerGetAttribute``): a baked tensor (a plan's work list, a
#   placeholder) as its address, computed once (the replay keeps the tensor referenced, so the address
#   stays valid), a given tensor as ``t.data_ptr()``; the replay's key fixed each given tensor's device.
# Kernels that need a global or profile scratch allocation, and other Triton releases, go through the
# compiled kernel's ``run`` as Triton's own launch does.

C_LAUNCH_VERSIONS = ("3.6",)
DESCRIPTOR_CACHE_SIZE = 64  # encoded descriptors kept per launch site (data pointers seen recently)


def _c_launch(compiled):
    """``(C launch function, cooperative flag, PDL flag, {argument position: descriptor metadata})``
    of a compiled kernel whose launcher this module knows how to bypass, else None."""
    if not _cached("c_launch", lambda: triton_version_tested() and _triton_minor() in C_LAUNCH_VERSIONS):
        return None
    run = compiled.run  # a property that loads the module on first access
    if type(run).__name__ != "CudaLauncher":
        return None
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    launch, descriptors = run.launch, {}
    code = getattr(launch, "__code__", None)
    if code is not None:  # the tensor-descriptor wrapper (wrap_handle_tensordesc) around the C function
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in launch.__closure__ or ())))
        try:
            launch, indices, metas = cells["launcher"], cells["tensordesc_indices"], cells["tensordesc_meta"]
        except KeyError:
            return None
        descriptors = {i: metas[n] for n, i in enumerate(sorted(indices))}
    return launch, run.launch_cooperative_grid, run.launch_pdl, descriptors


def _triton_minor() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def _expand_descriptor(desc, meta) -> list:
    """The launcher arguments of one tensor descriptor, as Triton's descriptor wrapper makes them."""
    from triton.backends.nvidia.driver import make_tensordesc_arg

    return make_tensordesc_arg(desc, meta)


def _descriptor_site(template, meta):
    """A function of a tensor that returns the launcher arguments of ``template`` rebased over it; with
    TMA metadata the encoding is kept per data pointer (see above)."""
    if meta is None:  # passed as pointer, shape and strides: nothing to encode
        return lambda base: _expand_descriptor(_rebase(template, base), None)
    encoded: dict = {}

    def expand(base):
        pointer = base.data_ptr()
        arguments = encoded.get(pointer)
        if arguments is None:
            if len(encoded) >= DESCRIPTOR_CACHE_SIZE:
                encoded.clear()
            arguments = encoded[pointer] = tuple(_expand_descriptor(_rebase(template, base), meta))
        return arguments

    return expand


def _launch_source(n: int, compiled, grid, values: list, namespace: dict) -> str:
    """The source line of launch ``n`` of a replay, its objects put in ``namespace``. ``values``: per
    kernel argument (positional ones, then the tail), ``("value", expression, recorded value)`` for a
    value the replay is given, ``("descriptor", template, expression)`` for a descriptor rebased over a
    given tensor, or ``("constant", object)``."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    c_launch = _c_launch(compiled)
    descriptors = c_launch[3] if c_launch is not None else {}
    parts = []
    for i, value in enumerate(values):
        name = f"a{n}_{i}"
        if value[0] == "value":
            # given tensors by address on the C launch (see above); given floats and anything else as they are
            by_address = c_launch is not None and len(value) > 2 and isinstance(value[2], torch.Tensor)
            parts.append(f"{value[1]}.data_ptr()" if by_address else value[1])
        elif value[0] == "descriptor":
            if c_launch is None:
                namespace[name] = value[1]
                parts.append(f"rebase({name}, {value[2]})")
            else:
                namespace[name] = _descriptor_site(value[1], descriptors[i])
                parts.append(f"*{name}({value[2]})")
        elif c_launch is not None and i in descriptors:
            namespace[name] = tuple(_expand_descriptor(value[1], descriptors[i]))
            parts.append(f"*{name}")
        elif c_launch is not None and isinstance(value[1], torch.Tensor):
            namespace[name] = value[1].data_ptr()
            namespace[name + "_kept"] = value[1]
            parts.append(name)
        else:
            namespace[name] = value[1]
            parts.append(name)
    namespace.update({f"function{n}": compiled.function, f"metadata{n}": compiled.packed_metadata, "rebase": _rebase})
    if c_launch is None:
        namespace[f"run{n}"] = compiled.run
        return (f"    run{n}({g[0]}, {g[1]}, {g[2]}, stream, function{n}, metadata{n}, None, None, None, "
                f"{', '.join(parts)})")
    namespace.update({f"launch{n}": c_launch[0], f"cooperative{n}": c_launch[1], f"pdl{n}": c_launch[2]})
    return (f"    launch{n}({g[0]}, {g[1]}, {g[2]}, stream, function{n}, cooperative{n}, pdl{n}, None, None, "
            f"metadata{n}, None, None, None, {', '.join(parts)})")


def _first_launch(fn, grid, args: tuple, kwargs: dict):
    """Triton's own launch of a call whose key is not cached yet; returns the compiled kernel.
    (A module-level function so that benchmarks/tools/host_time.py --dry can stand in a launcher-less kernel.)"""
    return fn[grid](*args, **kwargs)


_ALL_MEMOS: list = []
_CLEAR_LISTENERS: list = []


def on_clear_launch_memos(listener) -> None:
    """Call ``listener()`` from :func:`clear_launch_memos`: for other holders of recorded launches (the
    single-request replays, _core/single.py), which must be forgotten with them."""
    _CLEAR_LISTENERS.append(listener)


def clear_launch_memos() -> None:
    """Forget every recorded launch: for tools that change a kernel module's launch constants
    (the benchmarks' tuning grids: benchmarks.harness.overridden), which launcher keys do not cover."""
    for memo in _ALL_MEMOS:
        memo.clear()
    for listener in _CLEAR_LISTENERS:
        listener()


settings.on_reload(clear_launch_memos)  # launcher keys may cover settings implicitly (kernel choice knobs)


class LaunchMemo:
    """Whole launches of one launcher, remembered per launcher key (module doc).

    ``dynamic``: positions (in the kernel's positional arguments) of the values that change from
    call to call under one key: tensors (their dtype and 16-byte alignment belong in the key) and
    floats. The kernel, the grid, every other positional argument and the keyword arguments must
    be functions of the key. Usage in a launcher::

        replay = MEMO.get(key)
        if replay is not None:
            return replay(x, w, y, eps)                # the dynamic values, in position order
        ...choose kernel, grid, args, kwargs...
        MEMO.launch(key, kernel, grid, args, kwargs)   # launches, and records the launch under key
    """

    def __init__(self, dynamic):
        self.dynamic = tuple(dynamic)
        self._replays: dict = {}
        self._guarded: dict = {}  # the same launches as _replays, guarded (ReplayCell)
        self._recorded: dict = {}
        self.generation = 0  # counts clear()s: a ReplayCell holding an older replay looks it up again
        _ALL_MEMOS.append(self)

    def clear(self) -> None:
        self._replays.clear()
        self._guarded.clear()
        self._recorded.clear()
        self.generation += 1

    def cell(self, key) -> "ReplayCell":
        """A :class:`ReplayCell` of ``key``, for a caller that keeps it per key (an API memo entry)."""
        return ReplayCell(self, key)

    def get(self, key):
        """The replay for ``key`` on the current device, or None (unknown key, check mode, hooks
        installed, direct launches off). Written out in one function: it runs on every call of the
        small ops."""
        state = _state
        try:
            if not state["enabled"] or not state["memo"] or state["check"]:
                return None
            replay = self._replays.get((state["current_device"](), key))
            runtime = state["knobs_runtime"]
        except KeyError:  # a setting not read yet
            _read_replay_settings()
            return self.get(key)
        if replay is None:
            return None
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook  # installed hooks: see _has_calls
        if (enter is not None and getattr(enter, "calls", True)) or (
                leave is not None and getattr(leave, "calls", True)):
            return None
        return replay

    def launch(self, key, kernel, grid, args: tuple, kwargs: dict):
        """Launch ``kernel[grid](*args, **kwargs)`` and record it under ``key``."""
        compiled = kernel[grid](*args, **kwargs)
        if not _direct_enabled() or not _memo_enabled() or callable(grid) or not isinstance(kernel, DirectLaunch):
            return compiled
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return compiled
        full_key = (_current_device(), key)
        static = tuple(None if i in self.dynamic else a for i, a in enumerate(args))
        record = (kernel, tuple(grid), static, tuple(sorted(kwargs.items())), compiled)
        known = self._recorded.get(full_key)
        if known is not None:  # check mode (otherwise get() would have replayed it): compare
            if known[:4] != record[:4] or known[4] is not compiled:
                raise RuntimeError(
                    f"launch memo of {kernel.fn.__name__}: the key {key!r} does not fix the launch "
                    f"(recorded {known[1:4]}, now {record[1:4]}); set FLASHTILE_DIRECT_LAUNCH=0 and report this")
            return compiled
        if len(self._replays) >= MAX_CACHED_CALLS:
            self.clear()  # bounded memory; keys still in use come back on their next call
        try:
            tail = kernel._tail(args, kwargs)
        except _Uncacheable:
            return compiled
        self._recorded[full_key] = record
        self._replays[full_key], self._guarded[full_key] = self._make_replays(full_key[0], compiled, grid, args, tail)
        return compiled

    def guarded(self, key):
        """The guarded replay (ReplayCell) of ``key`` on the current device where :meth:`get` gives a replay,
        else None."""
        if self.get(key) is None:
            return None
        return self._guarded.get((_current_device(), key))

    def _make_replays(self, device: int, compiled, grid, args: tuple, tail: list) -> tuple:
        """Two functions of the dynamic values that launch the compiled kernel with the recorded grid and
        arguments (generated once per key: no per-argument work per call): the replay :meth:`get` gives, and
        the guarded one a ReplayCell holds."""
        values = [("value", f"a{i}", a) if i in self.dynamic else ("constant", a) for i, a in enumerate(args)]
        values += [("constant", a) for a in tail]
        params = ", ".join(f"a{i}" for i in self.dynamic)
        replays = []
        for guard in (None, (self, device)):
            namespace: dict = {}
            line = _launch_source(0, compiled, grid, values, namespace)
            replays.append(_compile_replay(params, [line], namespace, guard))
        return tuple(replays)


def _not_recorded(*values) -> bool:
    """A ReplayCell's replay while it has none: launches nothing."""
    return False


class ReplayCell:
    """One key's replay of a :class:`LaunchMemo`, held by a caller that already looked the key up in its
    own memo (the API layer's per-key entry, _core/memo.py), so that a call costs one key lookup, not two.

    ``cell.replay(*dynamic_values)`` launches and returns True where LaunchMemo.get would hand out a replay for
    the key, else returns False without launching: nothing recorded, another current device or a cleared memo
    (the replay is the guarded one recorded with the memo's, which checks per call what can change without
    clearing the memos: the current device, the settings flags, which tests set directly, and Triton's launch
    hooks, which a profiler may install at any time). After False the caller launches through its launcher,
    then calls :meth:`refresh`."""

    __slots__ = ("memo", "key", "replay")

    def __init__(self, memo: LaunchMemo, key) -> None:
        self.memo = memo
        self.key = key
        self.replay = _not_recorded

    def refresh(self) -> None:
        """Take the memo's guarded replay of the key for the current device (after a launch that may have
        recorded it)."""
        replay = self.memo.guarded(self.key)
        self.replay = _not_recorded if replay is None else replay


_state: dict = {}


def _cached(name: str, compute) -> Any:
    """``compute()`` once, kept in ``_state`` (environment settings: see reset_launch_settings)."""
    value = _state.get(name)
    if value is None:
        value = _state[name] = compute()
    return value


def _knobs_runtime():
    from triton import knobs

    return knobs.runtime


def _active_driver():
    from triton.runtime import driver

    return driver.active


def _read_direct_enabled() -> bool:
    return (settings.flag("FLASHTILE_DIRECT_LAUNCH") and not settings.interpreting()
            and torch.cuda.is_available() and triton_version_tested())


def _read_memo_enabled() -> bool:
    return settings.flag("FLASHTILE_LAUNCH_MEMO")


def _read_check_enabled() -> bool:
    return settings.flag("FLASHTILE_CHECK_LAUNCH")


def _driver():
    return _cached("driver", _active_driver)


def _current_device_function():
    """The driver's ``get_current_device``; torch's private getter when the driver uses
    ``torch.cuda.current_device`` (which adds a lazy-init check per call to the same answer)."""
    get = _driver().get_current_device
    if get is getattr(torch.cuda, "current_device", None) and hasattr(torch._C, "_cuda_getDevice"):
        return torch._C._cuda_getDevice
    return get


def _current_device() -> int:
    """The current device index (``_state["current_device"]`` is derived from ``_state["driver"]``:
    whoever replaces the driver replaces both)."""
    return _cached("current_device", _current_device_function)()


def _direct_enabled() -> bool:
    return _cached("enabled", _read_direct_enabled)


def _memo_enabled() -> bool:
    return _cached("memo", _read_memo_enabled)


def _check_enabled() -> bool:
    return _cached("check", _read_check_enabled)


def _read_replay_settings() -> None:
    """Fill the ``_state`` entries LaunchMemo.get reads (those already there, e.g. set by a test, stay);
    the device getter and Triton's knobs only when replays are on (no driver without a GPU)."""
    if _direct_enabled() and _memo_enabled() and not _check_enabled():
        _current_device()
        _cached("knobs_runtime", _knobs_runtime)


def _forget_settings() -> None:
    for name in ("enabled", "check", "memo"):
        _state.pop(name, None)


settings.on_reload(_forget_settings)


def reset_launch_settings() -> None:
    """Re-read the environment settings (tests and tools that change FLASHTILE_DIRECT_LAUNCH,
    _CHECK_LAUNCH, _LAUNCH_MEMO at run time): settings.reload()."""
    settings.reload()


def direct_launch(fn):
    """Decorator for ``@triton.jit`` kernels that are launched from Python (not for helpers called
    from other kernels). Under the interpreter it returns the kernel unchanged."""
    from triton.runtime.jit import JITFunction

    return DirectLaunch(fn) if isinstance(fn, JITFunction) else fn
