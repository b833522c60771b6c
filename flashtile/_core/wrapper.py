"""The plan/run machinery shared by the batch wrappers (DESIGN.md §plan / run): workspace buffers,
CUDA-graph buffers, dtype and scalar resolution, and the checks run() makes against the plan.

plan() runs on the host: it validates the page table (when it is on the host), asks the scheduler
for a work list and copies it, in one transfer, into memory the wrapper owns (the int workspace), so
several wrappers can share one float workspace. run() only checks shapes against the plan and
launches: it never synchronizes and never allocates except the output when none is given.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Optional, Protocol

import torch

from ..variants import bind_variant
from . import tile_policy
from .attention_args import POS_ENCODING_MODES, check_head_dim, check_window_and_cap, resolve_attention_params
from .buffers import discarded_output, new_output
from .checks import FP8_DTYPES, HALF_DTYPES, OUTPUT_DTYPES, check_option, check_tensor, describe, parse_dtype
from .dispatch import implementation, normalize_backend
from .fp8_attention import check_fp8_qkv_dtypes, fp8_output_dtype
from .launch import argument_key, make_replay, recording_launches
from .memo import tensor_key
from .params import AttentionParams
from .variant_args import variant_from_jit_args, with_sinks

__all__ = ["PlanRunWrapper", "PlanBase", "check_common_options", "reject_kv_cache_sf",
           "INT_WORKSPACE_BYTES", "run_key", "variant_replay_args", "ReplayingPlan", "as_given"]

MAX_REPLAYS = 64  # remembered run() shapes per plan (one per layer shape is typical)
MAX_WORKSPACE_VIEWS = 64  # remembered workspace layouts per buffer (plans of recurring sizes)


_SCALAR_TYPES = frozenset((float, int, bool, str, type(None)))


def run_key(tensors: tuple, options: tuple, variant=None) -> Optional[tuple]:
    """A run() memo key: each of ``tensors`` (a tensor, a (k, v) pair of tensors, or None) by its launch
    metadata (_core/memo.py's tensor_key), ``options``, plain scalars, by value and type, and a bound
    attention variant (flashtile/variants.py's BoundVariant, or None) by identity and its extra arguments by
    what Triton specializes on (the replay passes this call's values: variant_replay_args). None when some
    part has no such key (a scale given as a tensor is read per call, so it is not memoised)."""
    types = tuple(map(type, options))
    if not _SCALAR_TYPES.issuperset(types):
        return None
    key: list = [options, types]
    if variant is not None:
        key.append((id(variant.variant), argument_key(variant.args)))
    for t in tensors:
        kind = type(t)
        if kind is torch.Tensor:
            key.append(tensor_key(t))
        elif t is None:
            key.append(None)
        elif (kind is tuple or kind is list) and len(t) == 2 and type(t[0]) is torch.Tensor \
                and type(t[1]) is torch.Tensor:
            key.append((tensor_key(t[0]), tensor_key(t[1])))
        else:
            return None
    return tuple(key)


def variant_replay_args(variant) -> tuple:
    """The dynamic launch arguments a bound variant adds to a run()'s replay: its extra-argument tuple, the
    object the kernels receive (kernels/attention.py variant_kwargs), or nothing."""
    return (variant.args,) if variant is not None and variant.args else ()


def as_given(inputs):
    """run()'s inputs as the kernels take them (a replay's ``derive_inputs`` when there are no views to make)."""
    return inputs


class ReplayingPlan(Protocol):
    """What run()'s replays need of a plan: its memo, and the storages its launches may bake in."""

    replays: dict
    owned_storage: frozenset


@dataclasses.dataclass
class PlanBase:
    """What every plan holds: the resolved dtypes and attention parameters (before run()'s scales), the
    plan() arguments (the deprecated forward() re-plans with them), and run()'s memo of replays."""

    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    o_dtype: torch.dtype
    params: AttentionParams
    plan_args: dict
    replays: dict = dataclasses.field(default_factory=dict)
    owned_storage: frozenset = frozenset()  # storages run()'s launches may bake in (work list, workspaces)
    batch_size: int = 0
    num_qo_heads: int = 0
    num_kv_heads: int = 0

    @property
    def causal(self) -> bool:
        return self.params.causal

    @property
    def pos_encoding_mode(self) -> str:
        return self.params.pos_encoding_mode

    @property
    def window_left(self) -> int:
        return self.params.window_left

    @property
    def logits_soft_cap(self) -> float:
        return self.params.logits_soft_cap

    @property
    def sm_scale(self) -> float:
        return self.params.sm_scale

    @property
    def rope_scale(self) -> float:
        return self.params.rope_scale

    @property
    def rope_theta(self) -> float:
        return self.params.rope_theta

INT_WORKSPACE_BYTES = 8 * 1024 * 1024  # like upstream's internal int workspace


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def check_heads(num_qo_heads, num_kv_heads) -> None:
    check_positive_int("num_qo_heads", num_qo_heads)
    check_positive_int("num_kv_heads", num_kv_heads)
    if num_qo_heads % num_kv_heads != 0:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def check_common_options(pos_encoding_mode: str, window_left, logits_soft_cap) -> float:
    """Checks shared by every plan(); returns the soft cap as a float (0 disables)."""
    check_option("pos_encoding_mode", pos_encoding_mode, POS_ENCODING_MODES)
    return check_window_and_cap(window_left, logits_soft_cap)


def reject_kv_cache_sf(kv_cache_sf) -> None:
    """run()'s ``kv_cache_sf`` (upstream >= 0.6): scale factors of an NVFP4 KV cache, which flashtile's
    kernels do not read. None (what engines pass for fp16/bf16/fp8 caches) is accepted."""
    if kv_cache_sf is not None:
        raise NotImplementedError("kv_cache_sf: NVFP4 KV caches (per-block scale factors) are not supported by "
                                  "flashtile; use a float16/bfloat16 or fp8 (e4m3fn/e5m2) cache with k_scale/v_scale")


class PlanRunWrapper:
    """Base of the batch wrappers: owns the workspaces and the CUDA-graph flag.

    Subclasses implement ``plan`` and ``run``; this class keeps what every wrapper shares.
    """

    plan: Callable[..., None]  # each subclass's own signature; _forward() calls it
    _fixed_batch_size: int  # set by the subclasses' constructors in CUDA-graph mode

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str, use_cuda_graph: bool, backend: str,
                 jit_args) -> None:
        check_tensor("float_workspace_buffer", float_workspace_buffer)
        check_option("kv_layout", kv_layout, ("NHD", "HND"))
        self._jit_variant = variant_from_jit_args(jit_args)
        self._backend = normalize_backend(backend)
        self._kv_layout = kv_layout
        self._use_cuda_graph = bool(use_cuda_graph)
        self.device = float_workspace_buffer.device
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer = torch.empty(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._flat_workspaces: dict = {}  # name -> (buffer, its flat uint8 view, {(dtype, shapes): views})
        self._plan: Optional[PlanBase] = None

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor] = None) -> None:
        """Swap the workspaces (re-plan afterwards). ``int_workspace_buffer`` holds the plan's work list."""
        check_tensor("float_workspace_buffer", float_workspace_buffer, device=self.device)
        self._float_workspace_buffer = float_workspace_buffer
        if int_workspace_buffer is not None:
            check_tensor("int_workspace_buffer", int_workspace_buffer, device=self.device)
            self._int_workspace_buffer = int_workspace_buffer
        self._plan = None

    def end_forward(self) -> None:
        """Deprecated upstream alias; nothing to release."""

    # Attributes serving engines read (upstream's names), from the plan.
    @property
    def _causal(self) -> bool:
        return self._plan.causal if self._plan is not None else False

    @property
    def _window_left(self) -> int:
        return self._plan.window_left if self._plan is not None else -1

    @property
    def _logits_soft_cap(self) -> float:
        return self._plan.logits_soft_cap if self._plan is not None else 0.0

    @property
    def _sm_scale(self) -> Optional[float]:
        return self._plan.sm_scale if self._plan is not None else None

    @property
    def _pos_encoding_mode(self) -> str:
        return self._plan.pos_encoding_mode if self._plan is not None else "NONE"

    # -- plan() steps shared by the wrappers --------------------------------------------------------

    def _compiled(self) -> bool:
        """Whether this wrapper's calls run the kernels (planning then uses their tiles), not the reference."""
        return not implementation("attention", self.device, self._backend).__name__.startswith("flashtile.reference")

    def _planning_facts(self) -> tuple:
        """``(KV-chunk granularity, SMs)`` the scheduler plans with (_core/tile_policy.py)."""
        return tile_policy.planning_facts(self.device, tile_policy.plans_small_tiles(self._compiled()))

    def _split_options(self, fixed_split_size, disable_split_kv) -> tuple:
        """``(fixed_split_size or None, disable_split_kv)``; -1 and None both turn the fixed size off. A
        ``jit_args`` variant whose rows cannot be merged (variants.py ``whole_rows``) never splits."""
        if self._jit_variant is not None and self._jit_variant.whole_rows:
            return None, True
        if fixed_split_size is not None and fixed_split_size != -1:
            check_positive_int("fixed_split_size", fixed_split_size)
        else:
            fixed_split_size = None
        return fixed_split_size, bool(disable_split_kv)

    def _check_graph_batch(self, batch: int) -> None:
        if self._use_cuda_graph and batch != self._fixed_batch_size:
            raise ValueError(f"The batch size should be fixed in cudagraph mode, the runtime batch size {batch} "
                             f"mismatches the batch size set during initialization {self._fixed_batch_size}")

    def _plan_dtypes(self, q_data_type, kv_data_type, o_data_type, allow_fp8_q: bool = False) -> tuple:
        """``(q, kv, o)`` dtypes of a plan (defaults: float16 q as upstream, kv and o like q), checked.
        ``allow_fp8_q``: the wrapper runs FP8 attention (fp8 q, k and v of one dtype; o_data_type required)."""
        q_dtype = torch.float16 if q_data_type is None else parse_dtype("q_data_type", q_data_type)
        kv_dtype = q_dtype if kv_data_type is None else parse_dtype("kv_data_type", kv_data_type)
        if allow_fp8_q and q_dtype in FP8_DTYPES:
            check_fp8_qkv_dtypes(q_dtype, kv_dtype, kv_dtype, names=("q_data_type", "kv_data_type", "kv_data_type"))
            return q_dtype, kv_dtype, fp8_output_dtype("o_data_type", o_data_type)
        self._check_q_kv_dtypes(q_dtype, kv_dtype)  # q is float16 or bfloat16 from here on
        o_dtype = q_dtype if o_data_type is None else parse_dtype("o_data_type", o_data_type, OUTPUT_DTYPES)
        return q_dtype, kv_dtype, o_dtype

    def _upload_worklist(self, host: torch.Tensor, non_blocking: bool) -> torch.Tensor:
        """Copy a packed host work list into the int workspace (one transfer); returns the device view."""
        (worklist,) = self._workspace_tensors(self._int_workspace_buffer, "int_workspace_buffer", torch.int32,
                                              (host.numel(),))
        worklist.copy_(host, non_blocking=non_blocking)
        return worklist

    def _owned_storage(self, *tensors) -> frozenset:
        """Data pointers of the storages a plan owns (what run()'s replays may keep using)."""
        return frozenset(t.untyped_storage().data_ptr() for t in tensors if t is not None)

    # -- run() steps shared by the wrappers ---------------------------------------------------------

    def _bound_variant(self, args, sinks, sizes: Callable[[], dict]):
        """The call's bound variant: the wrapper's ``jit_args`` variant with run()'s extra arguments, or the
        built-in sink variant for ``sinks=``, checked against the plan's sizes (``sizes()``, called only
        when there is a variant: run() without one builds nothing); or None."""
        variant = None
        if self._jit_variant is not None:
            variant = (self._jit_variant, args)
        elif args:
            raise ValueError(f"run(): got {len(args)} extra positional arguments, which feed an attention variant "
                             "(jit_args=); this wrapper has none")
        variant = with_sinks(variant, sinks)
        if variant is not None:
            variant = bind_variant(variant[0], variant[1], self.device, sizes())
        return variant

    def _run_memo_key(self, plan: PlanBase, tensors: tuple, options: tuple, args, sinks, window_left) -> tuple:
        """``(key, variant)``: run()'s memo key (None: not memoised, as while torch.compile traces) and, when
        the call has extra arguments or ``sinks``, its bound variant, checked here (binding costs a few
        microseconds, against the tens the checked path costs), else None."""
        if torch.compiler.is_compiling():
            return None, None
        variant = None
        if args or sinks is not None:
            variant = self._check_run_options(plan, args, sinks, window_left, None)
        return run_key(tensors, options, variant), variant

    def _check_run_options(self, plan: PlanBase, args, sinks, window_left, kv_cache_sf):
        """Checks run()'s options; returns the call's bound variant (the wrapper's ``jit_args`` variant with
        run()'s extra positional arguments, or the built-in sink variant for ``sinks=``), or None."""
        reject_kv_cache_sf(kv_cache_sf)
        variant = self._bound_variant(args, sinks, lambda: dict(
            num_qo_heads=plan.num_qo_heads, num_kv_heads=plan.num_kv_heads, batch_size=plan.batch_size,
            head_dim=getattr(plan, "head_dim", getattr(plan, "head_dim_qk", None))))
        if window_left is not None and window_left != plan.window_left:
            raise ValueError(f"window_left: run() got {window_left}, plan() was given {plan.window_left}; "
                             "re-plan to change it")
        return variant

    @staticmethod
    def _run_params(plan: PlanBase, q_scale, k_scale, v_scale) -> AttentionParams:
        """The plan's parameters with run()'s calibration scales folded in."""
        if q_scale is None and k_scale is None and v_scale is None:
            return plan.params
        return resolve_attention_params(plan.params, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)

    def _outputs(self, shape: tuple, o_dtype: torch.dtype, out, lse) -> tuple:
        """run()'s ``out`` / ``lse``: the given ones, checked, or new ones."""
        self._check_out("out", out, shape, o_dtype, self.device)
        self._check_out("lse", lse, shape[:2], torch.float32, self.device)
        if out is None:
            out = new_output(shape, o_dtype, self.device)
        if lse is None:
            lse = new_output(shape[:2], torch.float32, self.device)
        return out, lse

    def _launch_recorded(self, plan: "ReplayingPlan", key, dynamic: tuple, launch: Callable[[], None]):
        """Run ``launch()`` and, with a memo ``key``, record its kernel launches into a replay over the
        ``dynamic`` arguments (the inputs and outputs, then variant_replay_args; the plan's own tensors are
        baked in). Returns the replay or None."""
        if key is None or torch.compiler.is_compiling():
            launch()
            return None
        with recording_launches() as recording:
            launch()
        replay = make_replay(recording, dynamic, plan.owned_storage)
        if replay is not None:
            if len(plan.replays) >= MAX_REPLAYS:
                plan.replays.clear()
        return replay

    @staticmethod
    def _replay_runner(replay, derive_inputs: Callable, shape: tuple, o_dtype: torch.dtype, device: torch.device):
        """run() for inputs with the key of a recorded run, as ``runner(inputs, out, lse, return_lse, variant)``:
        the kernels' input tensors of run()'s ``inputs`` tuple (``derive_inputs``: e.g. q and the K/V views of
        the cache), the outputs (the given ones or new ones; an lse nobody reads: the scratch view), the
        replay (with the call's bound variant's arguments, when the key has one)."""
        lse_shape = shape[:2]
        discarded_lse = discarded_output(lse_shape, torch.float32, device)

        def runner(inputs, out, lse, return_lse, variant=None):
            if out is None:
                out = new_output(shape, o_dtype, device)
            if lse is None:
                lse = new_output(lse_shape, torch.float32, device) if return_lse else discarded_lse
            replay(*derive_inputs(inputs), out, lse, *variant_replay_args(variant))
            return (out, lse) if return_lse else out

        return runner

    def _forward(self, **overrides) -> None:
        """The deprecated forward()'s parameters replace the planned ones (upstream semantics): re-plan
        with the stored plan() arguments when one differs (None: the default)."""
        plan = self._require_plan()
        wanted = resolve_attention_params(None, head_dim=plan.plan_args["_head_dim"], **overrides)
        if plan.params.causal != wanted.causal and plan.plan_args.get("_mask_replaces_causal"):
            wanted = dataclasses.replace(wanted, causal=plan.params.causal)  # a mask replaces causal
        if wanted != plan.params:
            args = {k: v for k, v in plan.plan_args.items() if not k.startswith("_")}
            args.update({k: v for k, v in overrides.items() if k in args})
            self.plan(**args)

    # -- helpers for subclasses ---------------------------------------------------------------------

    def _workspace_tensors(self, buffer: torch.Tensor, name: str, dtype: torch.dtype, *shapes: tuple) -> tuple:
        """The start of a workspace as consecutive tensors of ``dtype`` and these shapes (views, no copy).

        The buffer's flat byte view is made (and its layout checked) once per buffer, and the views once
        per (dtype, shapes): a plan with the sizes of an earlier one gets the same view objects (the same
        bytes that fresh views would cover; callers write through them, never reshape them), without the
        torch slicing and viewing that cost microseconds per tensor."""
        entry = self._flat_workspaces.get(name)
        if entry is None or entry[0] is not buffer:
            if not buffer.is_contiguous():
                raise ValueError(f"{name}: must be contiguous")
            entry = self._flat_workspaces[name] = (buffer, buffer.reshape(-1).view(torch.uint8), {})
        flat: torch.Tensor = entry[1]
        views: dict = entry[2]
        key = (dtype, shapes)
        tensors = views.get(key)
        if tensors is None:
            sizes = [math.prod(shape) for shape in shapes]
            num_bytes = sum(sizes) * dtype.itemsize
            if flat.numel() < num_bytes:
                raise ValueError(
                    f"{name}: this plan needs {num_bytes} bytes of workspace, the buffer has {flat.numel()}; allocate "
                    "a larger one (128 MiB is recommended) and pass it to the constructor or reset_workspace_buffer"
                )
            typed = flat[:num_bytes].view(dtype)
            starts = itertools.accumulate(sizes, initial=0)
            tensors = tuple(typed[start: start + size].view(shape) for start, size, shape in zip(starts, sizes, shapes))
            if len(views) >= MAX_WORKSPACE_VIEWS:
                views.clear()
            views[key] = tensors
        return tensors

    def _require_plan(self):
        if self._plan is None:
            raise RuntimeError("run() called before plan(): call plan() with the batch's page table first")
        return self._plan

    @staticmethod
    def _check_head_dim(head_dim, name: str = "head_dim") -> int:
        """``head_dim`` checked; ``name``: the plan() argument it came from (errors name it)."""
        check_positive_int(name, head_dim)
        check_head_dim(name, head_dim)
        return head_dim

    @staticmethod
    def _check_q_kv_dtypes(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        if q_dtype in FP8_DTYPES:
            raise NotImplementedError("q_data_type: fp8 queries are not supported; use float16 or bfloat16 q")
        if q_dtype not in HALF_DTYPES:
            raise TypeError(f"q_data_type: expected float16 or bfloat16, got {q_dtype}")
        if kv_dtype not in HALF_DTYPES + FP8_DTYPES:
            raise TypeError(f"kv_data_type: expected float16, bfloat16 or float8 (e4m3fn, e5m2), got {kv_dtype}")
        if kv_dtype in HALF_DTYPES and kv_dtype != q_dtype:
            raise TypeError(f"kv_data_type: {kv_dtype} with q_data_type {q_dtype}: a half-precision cache must "
                            "have q's dtype (or be fp8)")

    @staticmethod
    def _check_out(name: str, x: Optional[torch.Tensor], shape, dtype: torch.dtype, device) -> None:
        if x is None:
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"Invalid shape of {name}: expected {list(shape)}, got {list(x.shape)}")
        if x.dtype != dtype:
            raise ValueError(f"Invalid dtype of {name}: expected {dtype}, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"Invalid device of {name}: expected {device}, got {x.device}")
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must have stride 1, got strides {tuple(x.stride())}")
