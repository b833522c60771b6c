"""Single-request split planning sits in the op layer (_core/ops.py, over scheduler/split_kv.py); the launcher
launches the plan it is given: any valid plan gives the oracle's result, and the API's calls pass the planner's."""

import pytest
import torch

from attention_cases import assert_matches_oracle, make_qkv
from flashtile._core.attention_args import normalize_single_attention
from flashtile.scheduler.split_kv import SingleKVSplits, plan_single_kv_splits


def _normalized(q, k, v, causal=False):
    return normalize_single_attention(
        q, k, v, kv_layout="NHD", pos_encoding_mode="NONE", causal=causal, custom_mask=None, packed_custom_mask=None,
        q_scale=None, k_scale=None, v_scale=None, window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None,
        rope_theta=None, out_dtype=None, backend="triton")


@pytest.mark.parametrize("kind, qo_len, causal", [("decode", 1, False), ("prefill", 5, True)])
@pytest.mark.parametrize("chunks", [0, 1, 2, 3])
def test_launcher_runs_the_plan_it_is_given(device, monkeypatch, kind, qo_len, causal, chunks):
    """Plans of 1, 2 and 3 splits (chunks of ``chunks`` x the launch's granularity; 0: unsplit)."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    from flashtile.kernels.attention import single_attention_forward, single_launch_shape

    probe = make_qkv(qo_len, 1, 4, 2, 64, torch.float16, device)
    align = single_launch_shape(*probe, _normalized(*probe).params, packed_mask=None, kind=kind).align
    kv_len = 2 * align + 13
    q, k, v = make_qkv(qo_len, kv_len, 4, 2, 64, torch.float16, device)
    args = _normalized(q, k, v, causal)
    out = torch.full((qo_len, 4, 64), float("nan"), dtype=torch.float16, device=device)
    lse = torch.full((qo_len, 4), float("nan"), device=device)
    chunk = chunks * align if chunks else kv_len
    splits = SingleKVSplits(kv_len, -(-kv_len // chunk), chunk)
    assert splits.ranges()[-1][1] == kv_len and splits.num_splits == (1, 3, 2, 1)[chunks]
    single_attention_forward(args.q, args.k, args.v, out, lse, args.params, packed_mask=None, kind=kind,
                             splits=splits)
    assert_matches_oracle(out, lse, q, k, v, causal=causal)


def test_api_calls_pass_the_planners_plan(device, monkeypatch):
    """single_decode_with_kv_cache on the kernel path: the op layer plans with scheduler/split_kv.py over the
    launcher's launch shape and the launcher receives that plan (one that splits)."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    from flashtile._core import single
    from flashtile.kernels import attention as kernels

    monkeypatch.setattr(single, "_REPLAYS", {})  # no replay of an earlier test's call: the first call plans
    seen = []
    launch = kernels.single_attention_forward

    def spy(*args, splits=None, **kwargs):
        seen.append(splits)
        return launch(*args, splits=splits, **kwargs)

    monkeypatch.setattr(kernels, "single_attention_forward", spy)
    import flashtile

    kv_len = 300 if torch.device(device).type == "cpu" else 8192  # split on 4 interpreter "SMs" / a GPU
    q, k, v = make_qkv(1, kv_len, 4, 2, 64, torch.float16, device)
    out = flashtile.single_decode_with_kv_cache(q[0], k, v, window_left=kv_len - 1)
    args = _normalized(q, k, v)
    want = plan_single_kv_splits(kv_len, kernels.single_launch_shape(args.q, args.k, args.v, args.params,
                                                                      packed_mask=None, kind="decode"))
    assert seen == [want] and want.partial
    assert_matches_oracle(out[None], None, q, k, v, window_left=kv_len - 1)
