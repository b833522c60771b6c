"""The per-card decode tune table (flashtile/_core/decode_tune.py): device facts and their override, the card
lookup and its fallback rule, the H100 entry reproducing the configs the launchers chose before the table,
every entry fitting shared memory, and the batch decode kernel's page-id options against the oracle."""

import dataclasses
import itertools

import pytest
import torch

from attention_cases import make_paged_batch, workspace
from flashtile._core import decode_tune, tile_policy
from flashtile._core import device as device_mod
from flashtile._core.decode_tune import TUNE_TABLE, DecodeTile, batch_decode_tile, card_entry, split_targets
from flashtile._core.device import H100_FACTS, DeviceFacts, device_facts, normalize_device_name
from flashtile.decode import BatchDecodeWithPagedKVCacheWrapper
from flashtile.kernels import attention
from flashtile.kernels.smem import TileFeatures, estimate_shared_bytes, fit_config
from flashtile.scheduler import split_kv
from test_batch_decode import check_batch

H200_FACTS = DeviceFacts("H200", 132, 232448, (9, 0), 4800.0)

# What the launchers chose before the table (kernels/attention.py's _CONFIG_TABLE decode rows, H100-measured):
# (block_m, block_n, num_warps, num_stages) per padded head dim.
OLD_DECODE = {16: (16, 64, 8, 2), 32: (16, 64, 8, 2), 64: (16, 64, 8, 2), 128: (16, 64, 4, 2), 256: (16, 64, 8, 2)}
OLD_BATCH_DECODE = {16: (16, 32, 4, 3), 32: (16, 32, 4, 3), 64: (16, 32, 4, 3), 128: (16, 32, 4, 3),
                    256: (16, 32, 4, 2)}


@pytest.fixture
def gpu_tables(monkeypatch):
    """The launchers' GPU choices (CPU tests otherwise get the interpreter's single small config)."""
    monkeypatch.setattr(attention, "INTERPRET", False)
    monkeypatch.setattr(tile_policy, "small_tiles", lambda: False)


@pytest.fixture
def facts(monkeypatch):
    """Set the device facts every lookup sees (device.FACTS_OVERRIDE)."""
    def use(value):
        monkeypatch.setattr(device_mod, "FACTS_OVERRIDE", value)
    return use


@pytest.mark.parametrize("raw, name", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H100 NVL", "H100"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 4090", "GEFORCE RTX 4090"),
])
def test_normalize_device_name(raw, name):
    assert normalize_device_name(raw) == name


def test_device_facts_default_and_override(monkeypatch):
    assert device_facts(torch.device("cpu")) == H100_FACTS  # the compile-only tools' target
    monkeypatch.setattr(device_mod, "FACTS_OVERRIDE", H200_FACTS)
    assert device_facts(torch.device("cpu")) is H200_FACTS


@pytest.mark.parametrize("card, bandwidth, sms, key", [
    ("H100", None, 132, "H100"), ("H200", None, 132, "H200"),  # named entries whatever the bandwidth
    ("GH200", 4900.0, 132, "H200"),  # 1.46x the H100's bytes per SM: the H200's entry
    ("B200", 8000.0, 148, "H200"),
    ("A100", 2039.0, 108, "H100"),  # 0.74x
    ("L40S", 864.0, 142, "H100"),
    ("UNKNOWN", None, 100, "H100"),  # no bandwidth figure: the H100's entry
    ("H20", 4000.0, 78, "H200"),
])
def test_card_entry_and_fallback_rule(card, bandwidth, sms, key):
    got_key, entry = card_entry(DeviceFacts(card, sms, 232448, (9, 0), bandwidth))
    assert got_key == key and entry is TUNE_TABLE[key]


def test_h100_choices_are_the_pre_table_configs_but_d64s_prefetch(gpu_tables, facts):
    """The H100 entry gives the configs from before the table, except the page-id prefetch of the d64 batch
    tile (measured on the demo's case) for pages of 16-bit K/V longer than one token."""
    facts(H100_FACTS)
    for d, old in OLD_DECODE.items():
        assert dataclasses.astuple(attention.choose_config("decode", d)) == old
    for d, old in OLD_BATCH_DECODE.items():
        assert dataclasses.astuple(attention.choose_config("batch_decode", d)) == old
        for group, page_size, kv_bytes in itertools.product((1, 4, 8, 16, 32, 64), (1, 5, 16, 64), (1, 2)):
            cfg, tile = attention.batch_decode_tile(group, d, page_size, kv_bytes)
            block_m = attention.decode_block_m(group)
            warps = old[2] if block_m <= 16 else max(old[2], 8)
            assert dataclasses.astuple(cfg) == (block_m, old[1], warps, old[3])
            assert tile.prefetch_pages == (d == 64 and page_size > 1 and kv_bytes == 2)
            assert not tile.int32_offsets
    assert split_targets(H100_FACTS) == (split_kv.PROGRAMS_PER_SM, split_kv.BATCH_PROGRAMS_PER_SM) == (2, 4)
    assert TUNE_TABLE["H100"].status == "measured"


def test_h200_entry_is_predicted_and_differs_only_where_argued():
    h100, h200 = TUNE_TABLE["H100"], TUNE_TABLE["H200"]
    assert h200.status == "predicted" and "Little" in h200.notes + open(decode_tune.__file__).read()
    changed = {d for d in h100.batch_decode if h100.batch_decode[d] != h200.batch_decode[d]}
    changed |= {d for d in h100.single_decode if h100.single_decode[d] != h200.single_decode[d]}
    assert changed == {64, 128}
    assert (h200.programs_per_sm, h200.batch_programs_per_sm) == (h100.programs_per_sm, h100.batch_programs_per_sm)
    # page size 1 and fp8 keep the H100's tiles
    for d in (64, 128):
        assert batch_decode_tile(H200_FACTS, d, 1, 2) == batch_decode_tile(H100_FACTS, d, 1, 2)
        assert batch_decode_tile(H200_FACTS, d, 16, 1) == batch_decode_tile(H100_FACTS, d, 16, 1)
        assert batch_decode_tile(H200_FACTS, d, 16, 2).block_n * d * 2 * 2 == 32 * 1024  # 32 KB K+V tiles


def _need(cfg, features, capability):
    return estimate_shared_bytes(cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_warps, features, capability)


def _all_tiles(entry):
    yield from (("batch", d, t) for d, t in entry.batch_decode.items())
    yield from (("batch", key[0], t) for key, t in entry.batch_decode_special.items())
    yield from (("single", d, t) for d, t in entry.single_decode.items())


@pytest.mark.parametrize("card", sorted(TUNE_TABLE))
def test_every_table_tile_fits_shared_memory(card):
    """Each entry's tile runs as given with plain 16-bit or fp8 K/V (no step-down on a Hopper card), and with
    every feature (RoPE, custom mask, fp8, head_dim_vo < head_dim_qk) the fitted config fits."""
    limit, capability = 232448, (9, 0)
    entry = TUNE_TABLE[card]
    checked = 0
    for kind, d, tile in _all_tiles(entry):
        assert tile_policy.KV_CHUNK_ALIGN % tile.block_n == 0, (card, kind, d, tile)
        for group in ((1, 4, 8, 16, 32, 64) if kind == "batch" else (1, 4, 8)):
            block_m = attention.decode_block_m(group) if kind == "batch" else 16
            warps = tile.num_warps if block_m <= 16 else max(tile.num_warps, entry.wide_rows_warps)
            cfg = attention.LaunchConfig(block_m, tile.block_n, warps, tile.num_stages)
            for kv_bytes in (2, 1):
                plain = TileFeatures(d, d, 2, kv_bytes)
                assert _need(cfg, plain, capability) <= limit, (card, kind, d, group, tile)
                assert fit_config(cfg, plain, limit, capability, vary_block_m=False) == cfg
            for half_vo, fp8, rope, mask in itertools.product((False, True), repeat=4):
                f = TileFeatures(d, d // 2 if half_vo else d, 2, 1 if fp8 else 2, rope, mask)
                fitted = fit_config(cfg, f, limit, capability, vary_block_m=False)
                assert _need(fitted, f, capability) <= limit
                checked += 1
    assert checked > 0


def test_planners_take_the_cards_targets(monkeypatch):
    entry = TUNE_TABLE["H100"]
    monkeypatch.setitem(TUNE_TABLE, "H100", entry.__class__(**{**entry.__dict__, "batch_programs_per_sm": 8,
                                                                  "programs_per_sm": 6}))
    assert split_targets(H100_FACTS) == (6, 8)
    lens = [32768]
    default = split_kv.plan_batch_kv_splits(lens, 8, 132, 128)
    wider = split_kv.plan_batch_kv_splits(lens, 8, 132, 128, programs_per_sm=8)
    assert wider.num_items > default.num_items
    assert split_kv.batch_item_capacity(1, 8, 132, 8) == 8 * 132 // 8 + 1
    monkeypatch.setattr(decode_tune, "BATCH_PROGRAMS_PER_SM_OVERRIDE", 1)
    assert split_targets(H100_FACTS) == (6, 1)


@pytest.mark.parametrize("lens, page_size", [([1, 3, 40, 0, 70], 3), ([17, 90, 33], 16), ([2, 35], 1)])
@pytest.mark.parametrize("prefetch, int32_offsets", [(True, False), (False, True), (True, True)])
def test_batch_decode_page_id_options_match_oracle(device, monkeypatch, lens, page_size, prefetch, int32_offsets):
    """The kernel's page-id prefetch and 32-bit offsets (the H200 entry's and the tune grids' options), on
    split requests (fixed_split_size) so items start inside a request."""
    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    tile = DecodeTile(16 if device.type == "cpu" else 32, 4, 3, prefetch, int32_offsets)
    monkeypatch.setattr(decode_tune, "BATCH_DECODE_OVERRIDE", tile)
    if device.type == "cuda":  # long enough that 128-token chunks split them
        lens = [n * 40 for n in lens]
    cache, indptr, indices, last = make_paged_batch(lens, page_size, 2, 32, torch.bfloat16, device)
    q = torch.randn(len(lens), 8, 32, dtype=torch.bfloat16, device=device)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device), kv_layout="NHD")
    w.plan(indptr, indices, last, 8, 2, 32, page_size, q_data_type=torch.bfloat16,
           fixed_split_size=max(1, 32 // page_size))
    out, lse = w.run(q, cache, return_lse=True)
    check_batch(out, lse, q, cache, indptr, indices, last, "NHD")


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the keywords instead of running."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


@pytest.mark.parametrize("card", ["H100", "H200"])
@pytest.mark.parametrize("head_dim, page_size, kv_dtype", [
    (128, 16, torch.bfloat16), (64, 16, torch.bfloat16), (128, 1, torch.bfloat16), (256, 16, torch.bfloat16),
    (128, 16, getattr(torch, "float8_e4m3fn", torch.bfloat16)),
])
def test_batch_decode_launch_takes_the_cards_tile(gpu_tables, facts, monkeypatch, card, head_dim, page_size,
                                                  kv_dtype):
    """What batch_decode_forward passes the kernel on each card: the table's tile, prefetch only for pages
    of more than one token, and on an H100 the configs from before the table but d64's prefetch."""
    from flashtile._core.params import AttentionParams
    from flashtile.scheduler.worklist import decode_layout, pack_decode_worklist

    facts(H200_FACTS if card == "H200" else H100_FACTS)
    monkeypatch.setattr(device_mod, "TARGET_OVERRIDE", (232448, (9, 0)))
    recorder = _Recorder()
    monkeypatch.setattr(attention, "_batch_decode_kernel", recorder)
    lens = torch.tensor([64, 64])
    plan = split_kv.plan_batch_kv_splits(lens, 2, 132, 128)
    worklist = pack_decode_worklist(decode_layout(2, plan.num_items), plan.request_item_indptr, lens,
                                    plan.item_request, plan.item_kv_start, plan.item_kv_end)
    pages = 2 * 64 // page_size
    cache = torch.zeros(pages, 2, page_size, 2, head_dim, dtype=kv_dtype)
    attention.batch_decode_forward(
        torch.zeros(2, 8, head_dim, dtype=torch.bfloat16), cache[:, 0], cache[:, 1],
        torch.tensor([0, pages // 2, pages], dtype=torch.int32), torch.arange(pages, dtype=torch.int32), worklist,
        torch.empty(plan.num_items, 8, head_dim), torch.empty(plan.num_items, 8), torch.empty(2, 8, head_dim),
        torch.empty(2, 8), AttentionParams(0.1), batch_size=2, num_programs=plan.num_items, max_states=1,
        merge=False)
    (kw,) = recorder.calls
    kv_bytes = cache.element_size()
    tile = batch_decode_tile(H200_FACTS if card == "H200" else H100_FACTS, head_dim, page_size, kv_bytes)
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == (16, *tile[:3])
    assert kw["PREFETCH_PAGES"] == (tile.prefetch_pages and page_size > 1)
    assert kw["INT32_PAGE_OFFSETS"] is False
    if card == "H100":
        assert (kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == OLD_BATCH_DECODE[head_dim][1:]
        assert kw["PREFETCH_PAGES"] is (head_dim == 64 and page_size == 16 and kv_bytes == 2)
    elif page_size == 16 and kv_bytes == 2 and head_dim in (64, 128):
        assert kw["PREFETCH_PAGES"] is True and kw["BLOCK_N"] * head_dim == 64 * 128
