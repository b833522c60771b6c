"""The benchmark harness runs end to end on CPU (--smoke) and writes well-formed outputs."""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import torch

from benchmarks import harness
from benchmarks.bench_attention import decode_cases, prefill_cases

ROOT = pathlib.Path(__file__).resolve().parent.parent

HAS_CUDA = torch.cuda.is_available()
# On a GPU, leave out flex_attention: compiling it for every smoke shape takes minutes.
PROVIDERS = ["flashtile", "torch_sdpa_flash", "torch_sdpa_cudnn"] + ([] if HAS_CUDA else ["flex_attention"])
RECORD_KEYS = {"suite", "case", "params", "provider", "status", "gpu", "torch", "triton", "timestamp"}
TIMED_KEYS = {"median_us", "p20_us", "p80_us", "tflops", "gbps", "first_call_s", "timing"}


def test_flops_and_bytes_from_lengths():
    case = prefill_cases(smoke=True)[0]  # causal, 64 tokens, 4 query / 2 kv heads, d64, bf16
    assert case.flops == 4 * 4 * 64 * (64 * 64 - 64 * 63 // 2)
    assert case.bytes == 2 * (2 * 64 * 4 * 64 + 2 * 64 * 2 * 64)
    case = decode_cases(smoke=True)[0]  # kv 64, 4 / 2 heads, d64, bf16: K + V + q + o
    assert case.bytes == 2 * (2 * 64 * 2 * 64 + 2 * 4 * 64)
    assert case.flops == 4 * 4 * 64 * 64


def test_smoke_suites(tmp_path):
    markdown = harness.run_suites(["single_decode", "single_prefill"], tmp_path, smoke=True, providers=PROVIDERS)
    for suite, cases in (("single_decode", decode_cases(True)), ("single_prefill", prefill_cases(True))):
        records = [json.loads(line) for line in (tmp_path / f"{suite}.jsonl").read_text().splitlines()]
        assert len(records) == len(cases) * len(PROVIDERS)
        for r in records:
            assert RECORD_KEYS <= r.keys() and r["suite"] == suite
            if r["status"] == "ok":
                assert TIMED_KEYS <= r.keys()
                assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"]
                assert r["gbps"] > 0 and r["tflops"] > 0
            else:
                assert r["reason"]
        by = {(r["case"], r["provider"]): r for r in records}
        for case in cases:
            assert by[case.name, "flashtile"]["status"] == "ok", by[case.name, "flashtile"]
            if not HAS_CUDA:
                assert by[case.name, "torch_sdpa_cudnn"]["status"] == "unavailable"
            assert by[case.name, "torch_sdpa_flash"]["status"] == "ok"
            for name in PROVIDERS[1:]:
                r = by[case.name, name]
                assert r["status"] != "error", r
                if r["status"] == "ok":  # same inputs, same answer
                    assert r["diff_ref"] == "flashtile" and r["max_abs_diff"] < 5e-2, r

        table = (tmp_path / f"{suite}.md").read_text()
        assert table in markdown
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        header = [c.strip() for c in rows[0].strip("|").split("|")]
        assert header == ["case", *PROVIDERS, "flashtile / best baseline"]
        assert len(rows) == 1 + len(cases)
        for row in rows[1:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert len(cells) == len(header)
            assert re.fullmatch(r"\d+\.\d\d× \(\w+\)", cells[-1]), row

        png = tmp_path / f"{suite}.png"
        if importlib.util.find_spec("matplotlib"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text() == markdown


def test_cli_filter_and_providers(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suite", "single_decode", "--smoke",
           "--out", str(tmp_path), "--filter", "d64 float16", "--providers", "flashtile,flashinfer"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "single_decode.jsonl").read_text().splitlines()]
    assert [(r["provider"], r["status"]) for r in records][0] == ("flashtile", "ok")
    assert {r["case"] for r in records} == {c.name for c in decode_cases(True) if "d64 float16" in c.name}
    assert [r["provider"] for r in records] == ["flashtile", "flashinfer"]


def test_unavailable_and_errors_are_recorded(tmp_path):
    def unavailable(case):
        raise harness.Unavailable("not on this machine")

    def broken(case):
        return lambda: 1 / 0

    suite = harness.Suite("fake", lambda smoke: [harness.Case("c", {}, flops=1.0, bytes=1.0)],
                          [harness.Provider("flashtile", lambda case: (lambda: torch.ones(3))),
                           harness.Provider("gone", unavailable), harness.Provider("broken", broken)])
    records = harness.run_suite(suite, smoke=True, log=lambda s: None)
    assert [r["status"] for r in records] == ["ok", "unavailable", "error"]
    assert records[1]["reason"] == "not on this machine" and "ZeroDivisionError" in records[2]["reason"]
    table = harness.write_outputs(suite, records, tmp_path)
    assert "| c | " in table and "| — |" in table  # no baseline ran: no speedup
    assert "gone (unavailable): not on this machine" in table


def test_overridden_sets_and_restores_knobs():
    import flashtile.kernels.merge as merge
    from flashtile.kernels import attention

    key = ("prefill", 128)
    tile, entry = merge.ROW_TILE_ELEMS, attention._CONFIG_TABLE[key]
    setting = {harness.Knob("flashtile.kernels.merge", "ROW_TILE_ELEMS"): tile * 2,
               harness.Knob("flashtile.kernels.attention", "_CONFIG_TABLE", key): "stand-in"}
    try:
        with harness.overridden(setting):
            assert merge.ROW_TILE_ELEMS == tile * 2 and attention._CONFIG_TABLE[key] == "stand-in"
            raise KeyboardInterrupt  # restored on any exit
    except KeyboardInterrupt:
        pass
    assert merge.ROW_TILE_ELEMS == tile and attention._CONFIG_TABLE[key] is entry
    assert harness.setting_label({}) == "default"
    assert harness.setting_label(setting) == f"ROW_TILE_ELEMS={tile * 2} _CONFIG_TABLE[{key}]='stand-in'"


def test_tune_mode(tmp_path):
    from benchmarks.bench_cascade import MERGE_GRID

    cmd = [sys.executable, "-m", "benchmarks.run", "--suite", "merge_state", "--smoke", "--tune",
           "--filter", "merge_state 16", "--out", str(tmp_path)]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    records = [json.loads(line) for line in (tmp_path / "merge_state.tune.jsonl").read_text().splitlines()]
    assert len(records) == 1 + len(MERGE_GRID) and all(rec["status"] == "ok" for rec in records)
    assert {rec["case"] for rec in records} == {"merge_state 16 x 4 heads x 64"}
    assert records[0]["median_us"] == min(rec["median_us"] for rec in records)  # fastest first
    assert "| merge_state 16 x 4 heads x 64 |" in r.stdout
    assert (tmp_path / "merge_state.tune.md").read_text() in r.stdout
    unknown = subprocess.run(cmd[:-4] + ["--tune", "nope", "--out", str(tmp_path)], capture_output=True, text=True,
                             cwd=ROOT)
    assert unknown.returncode != 0 and "no tuning grid ['nope']" in unknown.stderr


def test_decode_tile_option_sets_the_batch_decode_override(tmp_path, monkeypatch):
    from flashtile._core import decode_tune

    monkeypatch.setattr(decode_tune, "BATCH_DECODE_OVERRIDE", None)
    assert harness.main(["--suite", "batch_decode", "--list", "--decode-tile", "64,8,2,1"]) == 0
    assert decode_tune.BATCH_DECODE_OVERRIDE == decode_tune.DecodeTile(64, 8, 2, True)
    bad = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "batch_decode", "--list",
                          "--decode-tile", "64,8"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "--decode-tile: expected four integers" in bad.stderr


def test_case_filter_alternatives_and_name_ends():
    assert harness.case_selected("64 x 4096 h32/8 page1", None)
    assert harness.case_selected("64 x 4096 h32/8 page1", "4096")
    assert not harness.case_selected("64 x 4096 h32/8 page1", "64 x 4096 h32/8$")
    assert harness.case_selected("64 x 4096 h32/8", "1 x 32768$|64 x 4096 h32/8$")
    assert harness.case_selected("1x32768+63x512 h32/8", "1x32768+63x512")  # no regex: '+' is a character
    assert not harness.case_selected("16 x 4096 h32/8", "1 x 32768$|64 x 4096 h32/8$")


def test_decode_tile_specs_and_the_sweeps_winner(tmp_path):
    import pytest

    from benchmarks.tools import decode_tile
    from flashtile._core.decode_tune import DecodeTile

    assert decode_tile.parse("64,8,2,1") == DecodeTile(64, 8, 2, True)
    assert decode_tile.spec_of(DecodeTile(32, 4, 3, False)) == "32,4,3,0"
    with pytest.raises(ValueError, match="four integers"):
        decode_tile.parse("64,8,x,1")
    path = tmp_path / "batch_decode.tune.jsonl"

    def write(default_us):
        rows = [("default", default_us, "launch"),
                (f"BATCH_DECODE_OVERRIDE={DecodeTile(64, 4, 3, True)!r}", 100.0, "launch"),
                (f"BATCH_DECODE_OVERRIDE={DecodeTile(128, 8, 2)!r}", 120.0, "launch"),
                ("BATCH_PROGRAMS_PER_SM_OVERRIDE=2", 50.0, "splits")]  # another grid: not a tile
        path.write_text("".join(json.dumps(dict(case="c", setting=s, status="ok", median_us=t, grid=g)) + "\n"
                                for s, t, g in rows))

    write(110.0)
    assert decode_tile.best_spec(str(path), "c") == "64,4,3,1"
    write(90.0)  # the table's tile won: no override
    assert decode_tile.best_spec(str(path), "c") is None
    assert decode_tile.best_spec(str(path), "other case") is None
