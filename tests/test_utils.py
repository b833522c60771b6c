"""flashtile.utils: enums, helpers, option parsing, and capability queries (CUDA simulated on CPU)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from flashtile import cli, utils
from flashtile._core.checks import HALF_DTYPES, OUTPUT_DTYPES, InvalidDtypeError, parse_dtype
from flashtile.utils import (
    LogLevel,
    MaskMode,
    PosEncodingMode,
    TensorLayout,
    canonicalize_torch_dtype,
    ceil_div,
    check_shape_dtype_device,
    determine_attention_backend,
    determine_gemm_backend,
    determine_mla_backend,
    device_support_pdl,
    get_alibi_slopes,
    get_compute_capability,
    get_indptr,
    is_fa3_backend_supported,
    is_float8,
    is_sm90a_supported,
    is_sm100a_supported,
    is_sm110a_supported,
    is_sm120a_supported,
    is_sm121a_supported,
    log2e,
    next_positive_power_of_2,
    parse_kv_layout,
    parse_pos_encoding_mode,
    register_custom_op,
    register_fake_op,
    round_up,
    set_log_level,
)

SM_CHECKS = (is_sm90a_supported, is_sm100a_supported, is_sm110a_supported, is_sm120a_supported, is_sm121a_supported)


# ------------------------------------------------------------------------------------------- enums


def test_enum_values():
    assert {m.name: m.value for m in PosEncodingMode} == {"NONE": 0, "ROPE_LLAMA": 1, "ALIBI": 2}
    assert {m.name: m.value for m in MaskMode} == {"NON_CAUSAL": 0, "CAUSAL": 1, "CUSTOM": 2, "MULTIITEMSCORING": 3}
    assert {m.name: m.value for m in TensorLayout} == {"NHD": 0, "HND": 1}
    assert [m.name for m in LogLevel] == ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"]
    assert [m.value for m in LogLevel] == list(range(6))


def test_log2e():
    assert log2e == pytest.approx(1.0 / math.log(2.0), rel=1e-15)


def test_public_functions_have_docstrings():
    for name in utils.__all__:
        obj = getattr(utils, name)
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name


# ------------------------------------------------------------------------------------------- ALiBi


def _alibi_by_hand(n_heads: int) -> list:
    # Press et al.: closest power of two n <= n_heads; ratio 2^(-8/n), then odd powers of 2^(-4/n).
    n = 1
    while n * 2 <= n_heads:
        n *= 2
    slopes = [(2.0 ** (-8.0 / n)) ** k for k in range(1, n + 1)]
    slopes += [(2.0 ** (-4.0 / n)) ** k for k in range(1, 2 * (n_heads - n), 2)]
    return slopes


@pytest.mark.parametrize("n_heads", [1, 8, 12, 32])
def test_get_alibi_slopes(n_heads):
    slopes = get_alibi_slopes(n_heads)
    assert slopes.dtype == torch.float32 and tuple(slopes.shape) == (n_heads,)
    expected = torch.tensor(_alibi_by_hand(n_heads), dtype=torch.float64)
    torch.testing.assert_close(slopes.double(), expected, rtol=1e-6, atol=0)


def test_get_alibi_slopes_known_values():
    assert get_alibi_slopes(1).tolist() == [2.0**-8]
    assert get_alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]
    # 12 heads: 8 slopes 2^-1..2^-8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    torch.testing.assert_close(
        get_alibi_slopes(12)[8:].double(),
        torch.tensor([2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5], dtype=torch.float64),
    )


def test_get_alibi_slopes_device_kwarg():
    assert get_alibi_slopes(4, device="cpu").device.type == "cpu"
    assert get_alibi_slopes(4, device=torch.device("cpu")).device.type == "cpu"


@pytest.mark.parametrize("bad", [0, -3])
def test_get_alibi_slopes_bad(bad):
    with pytest.raises(ValueError, match="num_heads|n_heads"):
        get_alibi_slopes(bad)


# ---------------------------------------------------------------------------------- integer helpers


@pytest.mark.parametrize(
    "x, expected",
    [(-5, 1), (0, 1), (1, 1), (2, 2), (3, 4), (5, 8), (1023, 1024), (1024, 1024), (1025, 2048), (2**40 + 1, 2**41)],
)
def test_next_positive_power_of_2(x, expected):
    assert next_positive_power_of_2(x) == expected


def test_next_positive_power_of_2_huge():
    assert next_positive_power_of_2(2**63) == 2**63
    assert next_positive_power_of_2(2**63 + 1) == 2**64
    assert next_positive_power_of_2(2**70 + 1) == 2**71


@pytest.mark.parametrize("x, y, c, r", [(0, 8, 0, 0), (1, 8, 1, 8), (8, 8, 1, 8), (9, 8, 2, 16), (130, 64, 3, 192)])
def test_ceil_div_round_up(x, y, c, r):
    assert ceil_div(x, y) == c
    assert round_up(x, y) == r


def test_ceil_div_tensor():
    assert ceil_div(torch.tensor([0, 1, 8, 9]), 8).tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_get_indptr(dtype):
    lengths = torch.tensor([3, 0, 5, 1], dtype=dtype)
    indptr = get_indptr(lengths)
    assert indptr.dtype == torch.int64
    assert indptr.tolist() == [0, 3, 3, 8, 9]
    assert get_indptr(torch.zeros(0, dtype=dtype)).tolist() == [0]


def test_get_indptr_errors():
    with pytest.raises(ValueError, match="^x: .*1-D"):
        get_indptr(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="^x: "):
        get_indptr([1, 2, 3])


def test_is_float8():
    assert not is_float8(torch.zeros(2, dtype=torch.float16))
    assert not is_float8(torch.zeros(2, dtype=torch.bfloat16))
    assert is_float8(torch.zeros(2, dtype=torch.float8_e4m3fn))
    assert is_float8(torch.zeros(2, dtype=torch.float8_e5m2))


# --------------------------------------------------------------------------------- dtype and checks


@pytest.mark.parametrize(
    "x, expected",
    [
        (torch.float16, torch.float16),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("half", torch.float16),
        ("torch.float32", torch.float32),
        ("float8_e4m3fn", torch.float8_e4m3fn),
        ("int32", torch.int32),
    ],
)
def test_canonicalize_torch_dtype(x, expected):
    assert canonicalize_torch_dtype(x) is expected


@pytest.mark.parametrize("bad", [16, None, torch.zeros(1), float])
def test_canonicalize_torch_dtype_type_error(bad):
    with pytest.raises(TypeError, match="dtype"):
        canonicalize_torch_dtype(bad)


@pytest.mark.parametrize("bad", ["float17", "tensor", ""])
def test_canonicalize_torch_dtype_bad_name(bad):
    with pytest.raises(ValueError, match="dtype"):
        canonicalize_torch_dtype(bad)


@pytest.mark.parametrize("text, expected", [
    ("bf16", torch.bfloat16), ("BF16", torch.bfloat16), (" fp16 ", torch.float16), ("fp32", torch.float32),
    ("Float16", torch.float16), ("torch.bfloat16", torch.bfloat16),
])
def test_parse_dtype_names(text, expected):
    assert parse_dtype("x", text) is expected
    assert canonicalize_torch_dtype(text) is expected


@pytest.mark.parametrize("bad", ["float17", "tensor", "", 16, None])
def test_parse_dtype_one_error_everywhere(bad):
    """Every dtype parser (utils, the wrappers' plan(), the CLI) raises InvalidDtypeError, which is
    both a TypeError and a ValueError, naming the argument."""
    for name, call in (("dtype", lambda: canonicalize_torch_dtype(bad)), ("x", lambda: parse_dtype("x", bad)),
                       ("dtypes", lambda: cli.warmup_variants(["llama3-8b"], None, [bad]))):
        with pytest.raises(InvalidDtypeError, match=f"^{name}: expected"):
            call()


def test_parse_dtype_allowed():
    assert parse_dtype("o_dtype", "float32", OUTPUT_DTYPES) is torch.float32
    with pytest.raises(InvalidDtypeError, match="o_dtype: expected one of float16, bfloat16, float32, got str 'int32'"):
        parse_dtype("o_dtype", "int32", OUTPUT_DTYPES)
    with pytest.raises(InvalidDtypeError, match="expected one of float16, bfloat16"):
        parse_dtype("o_dtype", torch.float8_e4m3fn, HALF_DTYPES)


def test_wrapper_plan_names_the_dtype_argument():
    from flashtile import BatchDecodeWithPagedKVCacheWrapper

    w = BatchDecodeWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8))
    table = (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
             torch.tensor([1], dtype=torch.int32))
    for kwargs, name in ((dict(q_data_type="bf17"), "q_data_type"), (dict(kv_data_type="nonsense"), "kv_data_type"),
                         (dict(o_data_type="int8"), "o_data_type")):
        with pytest.raises(InvalidDtypeError, match=f"^{name}: expected"):
            w.plan(*table, 4, 2, 16, 4, **kwargs)


def test_check_shape_dtype_device_ok():
    x = torch.zeros(2, 3, dtype=torch.float16)
    check_shape_dtype_device(x, (2, 3), torch.float16, torch.device("cpu"), "q")
    check_shape_dtype_device(x, [2, 3], None, "cpu", "q")
    check_shape_dtype_device(x, None, None, None, "q")


def test_check_shape_dtype_device_errors():
    x = torch.zeros(2, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"Invalid shape of q: expected \[2, 4\], got \[2, 3\]"):
        check_shape_dtype_device(x, (2, 4), None, None, "q")
    with pytest.raises(ValueError, match=r"Invalid dtype of q: expected torch.bfloat16, got torch.float16"):
        check_shape_dtype_device(x, None, torch.bfloat16, None, "q")
    with pytest.raises(ValueError, match=r"Invalid device of q: expected meta, got cpu"):
        check_shape_dtype_device(x, None, None, torch.device("meta"), "q")
    with pytest.raises(TypeError, match="q"):
        check_shape_dtype_device([1, 2], (2,), None, None, "q")


# ------------------------------------------------------------------------------------ option strings


@pytest.mark.parametrize("name", ["NHD", "HND"])
def test_parse_kv_layout(name):
    assert parse_kv_layout(name) is TensorLayout[name]
    assert parse_kv_layout(TensorLayout[name]) is TensorLayout[name]


@pytest.mark.parametrize("name", ["NONE", "ROPE_LLAMA", "ALIBI"])
def test_parse_pos_encoding_mode(name):
    assert parse_pos_encoding_mode(name) is PosEncodingMode[name]
    assert parse_pos_encoding_mode(PosEncodingMode[name]) is PosEncodingMode[name]


@pytest.mark.parametrize("error_type", [KeyError, ValueError])
@pytest.mark.parametrize("bad", ["NDH", "nhd", "", None, 0])
def test_parse_kv_layout_bad(bad, error_type):
    with pytest.raises(error_type) as info:
        parse_kv_layout(bad)
    assert str(info.value) == f"Invalid kv_layout {bad!r}: expected one of 'NHD', 'HND'"


@pytest.mark.parametrize("error_type", [KeyError, ValueError])
@pytest.mark.parametrize("bad", ["ROPE", "none", None, 1])
def test_parse_pos_encoding_mode_bad(bad, error_type):
    with pytest.raises(error_type, match="pos_encoding_mode") as info:
        parse_pos_encoding_mode(bad)
    assert "'NONE', 'ROPE_LLAMA', 'ALIBI'" in str(info.value)


# ------------------------------------------------------------------------------- registration, logs


def test_register_custom_op_is_pass_through():
    def f(x):
        return x + 1

    assert register_custom_op("flashtile::f", f, mutates_args=()) is f
    assert register_custom_op("flashtile::f", mutates_args=())(f) is f
    assert register_fake_op("flashtile::f", f) is f
    assert register_fake_op("flashtile::f")(f) is f


@pytest.fixture
def restore_logger():
    logger = logging.getLogger("flashtile")
    level = logger.level
    yield logger
    logger.setLevel(level)


@pytest.mark.parametrize(
    "name, level",
    [
        ("trace", logging.DEBUG - 5),
        ("debug", logging.DEBUG),
        ("info", logging.INFO),
        ("warn", logging.WARNING),
        ("error", logging.ERROR),
        ("critical", logging.CRITICAL),
        ("INFO", logging.INFO),
        (LogLevel.ERROR, logging.ERROR),
    ],
)
def test_set_log_level(restore_logger, name, level):
    set_log_level(name)
    assert restore_logger.level == level


@pytest.mark.parametrize("error_type", [KeyError, ValueError])
@pytest.mark.parametrize("bad", ["verbose", "warning ", "", None, 3])
def test_set_log_level_bad(restore_logger, bad, error_type):
    before = restore_logger.level
    with pytest.raises(error_type, match="log level"):
        set_log_level(bad)
    assert restore_logger.level == before


# ------------------------------------------------------------------------------------ capabilities


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu", torch.device("meta")])
def test_capabilities_on_non_cuda_devices(device):
    for check in SM_CHECKS:
        assert check(device) is False
    assert determine_attention_backend(device, 0, False, False, torch.float16, torch.float16) == "fa2"
    assert determine_gemm_backend(device) == "sm80"
    assert determine_mla_backend(device) == "fa2"
    assert device_support_pdl(device) is False


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu"])
def test_get_compute_capability_not_cuda(device):
    with pytest.raises(ValueError, match="device"):
        get_compute_capability(device)


def test_get_compute_capability_bad_type():
    with pytest.raises(TypeError, match="device"):
        get_compute_capability(1.5)


def test_cuda_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for check in SM_CHECKS:
        assert check(torch.device("cuda")) is False
    assert determine_gemm_backend("cuda:0") == "sm80"
    assert device_support_pdl(torch.device("cuda", 0)) is False


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device with a chosen capability / CUDA version is present."""
    calls = []

    def install(capability, cuda_version="12.8"):
        utils._cuda_capability.cache_clear()

        def get_device_capability(index=None):
            calls.append(index)
            return capability

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
        monkeypatch.setattr(torch.version, "cuda", cuda_version)
        return calls

    yield install
    utils._cuda_capability.cache_clear()


def test_get_compute_capability_cached(fake_gpu):
    calls = fake_gpu((9, 0))
    assert get_compute_capability(torch.device("cuda", 0)) == (9, 0)
    assert get_compute_capability(torch.device("cuda")) == (9, 0)
    assert get_compute_capability("cuda:0") == (9, 0)
    assert calls == [0]


@pytest.mark.parametrize(
    "capability, cuda_version, supported",
    [
        ((8, 0), "12.8", set()),
        ((8, 9), "12.8", set()),
        ((9, 0), "12.3", {is_sm90a_supported}),
        ((9, 0), "12.10", {is_sm90a_supported}),
        ((9, 0), "12.2", set()),
        ((9, 0), None, set()),
        ((10, 0), "12.8", {is_sm100a_supported}),
        ((10, 0), "12.6", set()),
        ((11, 0), "13.0", {is_sm110a_supported}),
        ((11, 0), "12.9", set()),
        ((12, 0), "12.8", {is_sm120a_supported}),
        ((12, 1), "12.8", set()),
        ((12, 1), "12.9", {is_sm121a_supported}),
    ],
)
def test_sm_checks(fake_gpu, capability, cuda_version, supported):
    fake_gpu(capability, cuda_version)
    for check in SM_CHECKS:
        assert check(torch.device("cuda", 0)) is (check in supported), check.__name__


def test_backends_on_hopper(fake_gpu):
    fake_gpu((9, 0), "12.4")
    dev = torch.device("cuda", 0)
    fp16 = torch.float16
    assert determine_attention_backend(dev, PosEncodingMode.NONE.value, False, False, fp16, fp16) == "fa3"
    assert determine_attention_backend(dev, PosEncodingMode.ROPE_LLAMA.value, False, False, fp16, fp16) == "fa2"
    assert determine_attention_backend(dev, "NONE", False, True, fp16, fp16) == "fa2"
    assert determine_attention_backend(dev, 0, True, False, fp16, fp16) == "fa2"
    assert determine_gemm_backend(dev) == "sm90"
    assert determine_mla_backend(dev) == "fa3"
    assert device_support_pdl(dev) is True


@pytest.mark.parametrize("capability, pdl", [((8, 0), False), ((8, 9), False), ((10, 0), True), ((12, 0), True)])
def test_backends_off_hopper(fake_gpu, capability, pdl):
    fake_gpu(capability, "12.8")
    dev = torch.device("cuda", 0)
    assert determine_attention_backend(dev, 0, False, False, torch.bfloat16, torch.bfloat16) == "fa2"
    assert determine_gemm_backend(dev) == "sm80"
    assert determine_mla_backend(dev) == "fa2"
    assert device_support_pdl(dev) is pdl


@pytest.mark.parametrize(
    "args, expected",
    [
        ((0, False, False), True),
        ((PosEncodingMode.NONE, False, False), True),
        (("NONE", False, False), True),
        ((1, False, False), False),
        ((2, False, False), False),
        (("ALIBI", False, False), False),
        ((0, True, False), False),
        ((0, False, True), False),
    ],
)
def test_is_fa3_backend_supported(args, expected):
    assert is_fa3_backend_supported(*args, torch.float16, torch.float16) is expected


# ------------------------------------------------------------------------------------------ import


def test_import_does_not_load_triton():
    code = "import sys, flashtile.utils; assert 'triton' not in sys.modules, 'flashtile.utils imported triton'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_errors_in_callers_terms():
    """checks.in_callers_terms: standalone names renamed (not inside longer names), a context where none is left,
    the error's own type (subclasses included), or its nearest typed base where that type takes more arguments."""
    from flashtile._core.checks import CHECK_ERRORS, InvalidOptionError, in_callers_terms

    names = {"q": "q_p", "k": "k_p"}

    def renamed(error):
        try:
            raise error
        except CHECK_ERRORS as e:
            return in_callers_terms(e, names, "prefill half")

    got = renamed(ValueError("k: expected the head_dim of q, q_data_type unchanged"))
    assert type(got) is ValueError and str(got) == "k_p: expected the head_dim of q_p, q_data_type unchanged"
    got = renamed(TypeError("indices: bad"))
    assert type(got) is TypeError and str(got) == "prefill half: indices: bad"
    got = renamed(InvalidOptionError("Invalid k 'x'"))
    assert type(got) is InvalidOptionError and isinstance(got, KeyError) and str(got) == "Invalid k_p 'x'"

    class TwoArgumentError(ValueError):
        def __init__(self, what, why):
            super().__init__(f"{what}: {why}")

    got = renamed(TwoArgumentError("k", "bad"))
    assert type(got) is ValueError and str(got) == "k_p: bad"
