"""train.plan: compile-only plans for TPU and GPU targets (#21).

The compiles need the [plan] extra (libtpu, the CUDA plugin); without it those tests skip
with one line. .ci/run-plan runs this file in a venv that has it. The rest (the fitting
search, the per-row figures, the missing-package message) run everywhere.
"""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

from train import plan as plan_lib
from train.plan import TARGETS, cheapest_split, largest_fitting

TPU, GPU = TARGETS["tpu:v5e:2x2"], TARGETS["gpu:h100"]


# --------------------------------------------------------------------------- the search
def _gpu(total, limit):
    """A GPU's probe: the memory analysis' total, judged against the usable HBM."""
    return lambda n: (total(n) <= limit, total(n))


def _tpu(account, available):
    """A TPU's probe: the compiler refuses above its HBM; its account (peak or the refusal's
    "Used") comes either way."""
    return lambda n: (account(n) <= available, account(n))


LIMIT = 16 * 2**30
CURVES = {
    "affine": _gpu(lambda n: 3e8 + 2.5e8 * n, LIMIT),
    "affine_start_too_big": _gpu(lambda n: 3e8 + 2.5e8 * n, LIMIT),
    "affine_with_bytes_at_zero": _gpu(lambda n: 3e8 + 2.5e8 * n, LIMIT),
    "quadratic": _gpu(lambda n: 1e8 + 1e7 * n + 4e6 * n * n, LIMIT),
    "nothing_fits": _gpu(lambda n: 1e12 + n, LIMIT),
    "everything_fits": _gpu(lambda n: float(n), LIMIT),
    # compile refused above 40, bytes unknown there
    "refused_above_40": lambda n: (False, None) if n >= 40 else (True, 1e8 + 1e7 * n),
    # TPU, libtpu-like: v5e phase II at 6/chip needs 15.79 of 15.75 GiB (a 2.6 GiB step)
    "tpu_account": _tpu(lambda n: 0.2 * 2**30 + 2.6 * 2**30 * n, 15.75 * 2**30),
    "tpu_account_with_bytes_at_zero": _tpu(lambda n: 0.2 * 2**30 + 2.6 * 2**30 * n, 15.75 * 2**30),
    # TPU with only the verdict: no bytes to draw a line through
    "tpu_verdict_only": lambda n: (n < 6, None),
}


@pytest.mark.parametrize("curve", list(CURVES))
def test_largest_fitting_equals_exhaustive_search_with_few_calls(curve):
    probe, cap = CURVES[curve], 4096
    limit = 15.75 * 2**30 if curve.startswith("tpu") else LIMIT
    start = 200 if curve == "affine_start_too_big" else 6
    # the bytes that do not grow with the batch (state, code), as train.plan passes them
    at_zero = {"affine_with_bytes_at_zero": 3e8, "tpu_account_with_bytes_at_zero": 0.2 * 2**30}.get(curve)
    calls = []
    got, seen = largest_fitting(lambda n: calls.append(n) or probe(n), limit, start, cap, at_zero)
    assert got == max((n for n in range(1, cap + 1) if probe(n)[0]), default=0)
    assert len(calls) == len(set(calls)) == len(seen)  # each size compiled once
    # memory is near affine: a line finds the boundary and its neighbour confirms it
    # (one compile fewer from a known point at zero)
    most = {"affine": 4, "affine_with_bytes_at_zero": 3, "tpu_account": 3, "tpu_account_with_bytes_at_zero": 2}
    assert len(calls) <= most.get(curve, 16), sorted(calls)


def test_cheapest_split_is_bisection_at_equal_prices_and_a_scan_when_refusals_are_free():
    for width in (2, 3, 7, 18, 40, 129):
        assert cheapest_split(width, 0.0) == width - 1  # a refusal costs nothing: step down
        j, rounds = cheapest_split(width, 1.0), math.ceil(math.log2(width))
        # at equal prices the worst case is bisection's: each side resolves in one round fewer
        assert 1 <= j < width
        assert max(math.ceil(math.log2(j)), math.ceil(math.log2(width - j))) <= rounds - 1
    # in between, the probe climbs as refusals get cheaper
    assert cheapest_split(18, 0.49) <= cheapest_split(18, 0.3) <= cheapest_split(18, 0.1) < 17


# v5p-8 phase II as libtpu accounted it on 2026-12-07 (GiB per chip; refusals: what it said was
# needed): 2.6 GiB a sample to 30 per chip, then nearly flat to 53, refused from 54.
V5P_PHASE2 = ((0, 0.6), (20, 63.36), (30, 89.25), (32, 89.49), (34, 90.21), (38, 90.23), (48, 92.32),
              (53, 94.72), (54, 98.57), (56, 104.05), (59, 120.82), (84, 198.51), (5000, 9000.0))


@pytest.mark.parametrize("start", [20, 60])
def test_where_refusals_are_cheap_the_search_spends_them_to_save_accepted_compiles(start):
    import numpy as np
    xs, ys = zip(*V5P_PHASE2)
    account = lambda n: float(np.interp(n, xs, ys)) * 2**30
    available = 95.74 * 2**30

    def search(priced):
        calls = []

        def probe(n):
            fits = account(n) <= available
            calls.append(fits)
            # libtpu refused these in ~30 s and took ~500 s to accept one
            return (fits, account(n), 500.0 if fits else 30.0) if priced else (fits, account(n))
        got, _ = largest_fitting(probe, available, start, 4096, 0.6 * 2**30)
        return got, sum(calls)

    (plain, plain_accepted), (priced, priced_accepted) = search(False), search(True)
    assert plain == priced == 53
    assert priced_accepted < plain_accepted
    if start == 60:  # from a refusal, one accepted compile below it, then a scan down to the answer
        assert priced_accepted <= 2


def test_refusal_bytes_reads_both_tpu_messages():
    assert plan_lib.refusal_bytes("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile "
                                  "permanent error. Ran out of memory in memory space hbm. Used "
                                  "15.79G of 15.75G hbm. Exceeded hbm capacity by 38.49M.") == (
        round(15.79 * 2**30), round(15.75 * 2**30))
    assert plan_lib.refusal_bytes("Ran out of memory on HBM, the total memory required for HLO "
                                  "temporaries (2.00T) exceeds available HBM (95.74G).") == (
        2 * 2**40, round(95.74 * 2**30))
    assert plan_lib.refusal_bytes("ValueError: bad shape") is None


# --------------------------------------------------------------------------- one row, on CPU
def test_row_reports_per_chip_bytes_flops_and_fit_from_the_compiler():
    """`row` on a CPU compile: the bytes are the memory analysis' (donation subtracted),
    flops the cost analysis' times the chips, and a failing lowering is a row, not a crash."""
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    lower = lambda: jax.jit(lambda a, b: (a @ b, a + 1), donate_argnums=(0,)).lower(x, x)
    chip = plan_lib.Chip("test chip", hbm_bytes=10**6, hbm_bandwidth=1e9, bf16_flops=6e9)
    policy = plan_lib_policy()
    r = plan_lib.row("matmul", lower, global_batch=8, chips=2, chip=chip, policy=policy)
    m = lower().compile().memory_analysis()
    b = r["bytes_per_chip"]
    assert r["compiled"] and r["error"] is None and r["per_chip_batch"] == 4
    assert b["arguments"] == m.argument_size_in_bytes == 2 * 64 * 64 * 4
    assert b["total"] == (b["arguments"] + b["outputs"] + b["temp"] + b["code"] - b["aliased"]) > 0
    assert r["fits"] == (b["total"] <= 10**6)
    cpu_flops = lower().compile().cost_analysis()["flops"]
    assert r["flops"] == pytest.approx(2 * cpu_flops) and cpu_flops >= 2 * 64**3
    assert r["roofline_s"] >= cpu_flops / (6e9 / 6)  # highest precision: 6 bf16 passes

    tpu = dataclasses.replace(chip, compiler_checks_hbm=True)  # compiled means it fits
    assert plan_lib.row("matmul", lower, 8, 2, tpu, policy)["fits"]
    assert not plan_lib.row("matmul", lower, 8, 2, dataclasses.replace(chip, hbm_bytes=1000), policy)["fits"]

    def broken():
        raise ValueError("no such shape\nsecond line")
    bad = plan_lib.row("broken", broken, 8, 2, chip, policy)
    assert not bad["compiled"] and bad["error"] == "ValueError: no such shape" and not bad["fits"]


def test_a_compile_refused_for_hbm_counts_as_not_fitting_and_others_do_not():
    refused = {"compiled": False, "error": "JaxRuntimeError: RESOURCE_EXHAUSTED: E1000: "
               "CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in memory "
               "space hbm. Used 15.79G of 15.75G hbm. Exceeded hbm capacity by 38.49M."}
    assert plan_lib.is_out_of_memory(refused)  # as libtpu 0.0.42 says it (v5e, phase II, 6/chip)
    assert not plan_lib.is_out_of_memory({"compiled": False, "error": "ValueError: bad shape"})
    assert not plan_lib.is_out_of_memory({"compiled": True, "error": None})


def plan_lib_policy():
    from smfnet_jax.policy import resolve
    return resolve("xla")


def test_missing_extra_is_one_line_naming_the_package(monkeypatch, capsys):
    import importlib.util
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("libtpu", "jax_plugins.xla_cuda12") else real(name, *a))
    assert plan_lib.main(["--target", "tpu:v5e:2x2", "--no-fit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "libtpu" in err[0] and "smfnet-jax[plan]" in err[0]
    assert "jax-cuda12-plugin" in plan_lib.missing_package(GPU)


def test_cli_rejects_bad_rows_and_sizes(capsys):
    for argv in (["--rows", "phase3"], ["--fuse-sizes", "480by640"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as e:
            plan_lib.main(["--target", "tpu:v5e:2x2", *argv])
        assert e.value.code == 2
    assert "phase3" in capsys.readouterr().err


def test_a_failed_search_is_one_line_and_the_json_keeps_what_compiled(monkeypatch, tmp_path, capsys):
    def plan(target, *, on_update, **kwargs):
        on_update({"target": target.name, "complete": False, "rows": [{"what": "phase1"}]})
        raise plan_lib.SearchFailed("phase1 at per-chip batch 12: ValueError: bad layout")
    monkeypatch.setattr(plan_lib, "missing_package", lambda target: None)
    monkeypatch.setattr(plan_lib, "plan", plan)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # main's cache switch: not for this test
    out = tmp_path / "p.json"
    assert plan_lib.main(["--target", "tpu:v5e:2x2", "--json", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the fitting search stopped: phase1 at per-chip batch 12: ValueError: bad layout"]
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["rows"] == [{"what": "phase1"}]


def test_microbatches_resolve_against_the_mesh_they_are_compiled_for():
    from train.step import resolve_microbatches
    assert resolve_microbatches(0, 16, "cpu", devices=4) == 4   # one sample per slice
    assert resolve_microbatches(2, 16, "cpu", devices=4) == 2
    with pytest.raises(ValueError, match="per-device batch 4"):
        resolve_microbatches(3, 16, "xla", devices=4)


# --------------------------------------------------------------------------- real compiles
def _needs(target):
    missing = plan_lib.missing_package(target)
    if missing:
        pytest.skip(missing)


@pytest.fixture
def no_compilation_cache():
    """Compile-only executables cannot be loaded back: no persistent cache (as main() does).
    JAX decides once per process whether the cache is used, so the decision is reset on the
    way in and out (without it, a session that compiled before kept reading the cache)."""
    from jax.experimental.compilation_cache import compilation_cache
    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", was)
    compilation_cache.reset_cache()


def _cpu_flops_of_phase2(batch, size, precision):
    """XLA:CPU's cost analysis of the same train step (same routines and precision), whole
    batch on one device."""
    from smfnet_jax.model import create_model
    from smfnet_jax.policy import resolve
    from train.configs import msrs
    from train.optim import make_optimizer
    from train.step import init_train_state, make_train_step
    cfg = msrs.get_config()
    cfg.precision = precision
    policy = resolve("xla", precision=precision)
    tx = make_optimizer(cfg, 1, 2)
    graphdef, state = init_train_state(create_model(0, policy), cfg, policy, tx=tx)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    img = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
    lowered = jax.jit(make_train_step(graphdef, 2, cfg, tx=tx)).lower(state, img, img)
    return lowered.compile().cost_analysis()["flops"]


def test_tpu_v5e_phase2_compiles_with_sane_plan(tmp_path, no_compilation_cache):
    """Phase II for a v5e 2x2 slice (4 chips), one 16x16 pair per chip, single-pass
    precision (the smallest TPU program; highest compiles 4x longer): compiled, bytes > 0,
    state replicated per chip and donated, whole-mesh FLOPs within 30% of XLA:CPU's count
    of the same step, StableHLO written, and --json's document."""
    _needs(TPU)
    out = tmp_path / "plan.json"
    rc = plan_lib.main(["--target", TPU.name, "--rows", "phase2", "--batch", "4", "--size", "16",
                        "--precision", "default", "--no-fit", "--json", str(out),
                        "--hlo-dir", str(tmp_path / "hlo")])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["target"] == TPU.name and doc["chips"] == 4 and doc["hosts"] == 1
    assert doc["executed"] is False and doc["complete"] is True
    # what libtpu lets one program have, as it says refusing 1 TiB: the fitting search's aim
    assert doc["hbm_available_per_chip"] == round(15.75 * 2**30)
    (r,) = doc["rows"]
    assert r["what"] == "phase2" and r["compiled"] and r["error"] is None
    assert r["global_batch"] == 4 and r["per_chip_batch"] == 1
    b = r["bytes_per_chip"]
    assert all(b[k] > 0 for k in ("arguments", "outputs", "temp", "total", "peak"))
    # Params + Adam's two moments of ~3.9M float32 values each, whole on every chip, donated.
    assert 40e6 < b["arguments"] < 60e6 and b["aliased"] > 0.95 * b["outputs"]
    assert r["hbm_per_chip"] == 16 * 2**30 and r["fits"] and r["roofline_s"] > 0
    cpu = _cpu_flops_of_phase2(4, 16, "default")
    assert r["flops"] == pytest.approx(cpu, rel=0.3), (r["flops"], cpu)
    text = (tmp_path / "hlo" / "phase2.mlir").read_text()
    assert "func.func public @main" in text and "tensor<4x16x16x1xf32>" in text


def test_gpu_h100_fusion_compiles_with_sane_plan(no_compilation_cache):
    """Fusion of one 32x32 pair per GPU on an 8-GPU H100 host: compiled for sm_90 with no
    GPU and no CUDA libraries; memory analysis only (XLA:GPU gives no cost analysis)."""
    _needs(GPU)
    updates = []  # what --json holds after each compile: an interrupted plan keeps its rows
    doc = plan_lib.plan(GPU, rows=("fuse",), fuse_sizes=((32, 32),), fit=False, log=lambda s: None,
                        on_update=lambda d: updates.append(json.loads(json.dumps(d))))
    assert [len(u["rows"]) for u in updates] == [1] and not updates[0]["complete"] and doc["complete"]
    assert doc["chips"] == 8 and doc["hosts"] == 1 and "H100" in doc["device_kind"]
    (r,) = doc["rows"]
    assert r["what"] == "fuse_32x32" and r["compiled"], r["error"]
    assert r["global_batch"] == 8 and r["per_chip_batch"] == 1
    b = r["bytes_per_chip"]
    # The weights fusion reads (~2.65M float32 values: jit drops the unused ones) whole on
    # every GPU, and one pair in, one image out.
    assert 8e6 < b["arguments"] < 16e6 and b["outputs"] == 32 * 32 * 4 and b["temp"] > 0
    assert r["flops"] is None and r["roofline_s"] is None and r["fits"]
    assert 0 < b["peak"] <= b["total"], b  # XLA:GPU reports a peak too; fits is judged by the total
    assert math.isclose(r["hbm_per_chip"], plan_lib.H100.hbm_bytes)
