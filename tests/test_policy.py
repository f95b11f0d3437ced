"""The compute policy lives on the model: two policies in one process never share a trace,
and every convolution and dot of the fusion and of both train steps, lowered for GPU and
TPU on this CPU-only machine, asks for the policy's precision (HIGHEST by default)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smfnet_jax.model import create_model
from smfnet_jax.policy import ComputePolicy, resolve, set_policy

SIZE = 16  # the smallest the losses take (SSIM's reflect padding of 5) with some room


def _inputs(batch: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.uniform(0, 1, (batch, SIZE, SIZE, 1)), jnp.float32) for _ in range(2))


def test_two_models_with_different_policies_keep_their_own_results():
    """One jitted function applied to a float32 model, a bfloat16 one, then the float32 one
    again: each gets its own trace (the policy is in the graphdef, so in the cache key), and
    the first result comes back bit for bit."""
    vi, ir = _inputs()
    f32 = create_model(0)
    bf16 = create_model(0, policy=resolve(dtype="bfloat16"))
    for m in (f32, bf16):
        m.eval()
    assert nnx.graphdef(f32) != nnx.graphdef(bf16)
    fuse = nnx.jit(lambda m, a, b: m.fuse(a, b))
    first = np.asarray(fuse(f32, vi, ir))
    cast = nnx.clone(bf16)  # parameters in the policy's dtype, as the Fuser casts them
    nnx.update(cast, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(cast, nnx.Param)))
    low = np.asarray(fuse(cast, vi.astype(jnp.bfloat16), ir.astype(jnp.bfloat16)), np.float32)
    again = np.asarray(fuse(f32, vi, ir))
    np.testing.assert_array_equal(again, first)
    assert 1e-4 < np.abs(low - first).max() < 0.1  # bfloat16 really ran, and still fuses
    # and the policies do not leak into each other's modules
    assert {m.policy.dtype for _, m in nnx.iter_graph(f32) if isinstance(m, nnx.Module) and hasattr(m, "policy")} == {"float32"}
    assert {m.policy.dtype for _, m in nnx.iter_graph(bf16) if isinstance(m, nnx.Module) and hasattr(m, "policy")} == {"bfloat16"}


def _op_precisions(mlir: str) -> dict[str, list[str]]:
    """For every stablehlo.convolution and stablehlo.dot_general: its precision names
    ('MISSING' when the op carries none, which means DEFAULT)."""
    found = {"convolution": [], "dot_general": []}
    for line in mlir.splitlines():
        for op in found:
            if f"stablehlo.{op}" in line:
                m = re.search(r"precision(?:_config)? = \[([^\]]*)\]", line)
                names = re.findall(r"HIGHEST|HIGH|DEFAULT", m.group(1)) if m else ["MISSING"]
                found[op].extend(names or ["MISSING"])
    return found


def _lowered_fusion(policy: ComputePolicy, platform: str) -> str:
    model = create_model(0, policy=policy)
    model.eval()
    graphdef, state = nnx.split(model)
    vi, ir = _inputs()
    traced = jax.jit(lambda s, a, b: nnx.merge(graphdef, s).fuse(a, b)).trace(state, vi, ir)
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.fixture(scope="module")
def lowered_train_steps():
    """Both train steps, traced once with the GPU/TPU default policy (XLA's routines,
    precision highest), lowered for cuda and for tpu."""
    from train.configs import msrs
    from train.optim import make_optimizer
    from train.step import init_train_state, make_train_step
    cfg = msrs.get_config()
    cfg.batch_size, cfg.microbatches = 2, 0
    policy = resolve(platform="tpu")
    assert policy == ComputePolicy("xla", "highest", "float32")
    graphdef, state = init_train_state(create_model(0), cfg, policy, tx=make_optimizer(cfg, 1, 1))
    vi, ir = _inputs(batch=2)
    out = {}
    for phase in (1, 2):
        tx = make_optimizer(cfg, 1, phase)
        traced = jax.jit(make_train_step(graphdef, phase, cfg, tx=tx)).trace(state, vi, ir)
        for platform in ("cuda", "tpu"):
            out[phase, platform] = traced.lower(lowering_platforms=(platform,)).as_text()
    return out


@pytest.mark.parametrize("phase", [1, 2])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_train_steps_lowered_for_accelerators_ask_for_highest(lowered_train_steps, phase, platform):
    ops = _op_precisions(lowered_train_steps[phase, platform])
    assert len(ops["convolution"]) > 50 and len(ops["dot_general"]) > 20, {k: len(v) for k, v in ops.items()}
    for op, names in ops.items():
        assert set(names) == {"HIGHEST"}, (op, sorted(set(names)))


@pytest.mark.parametrize("routines,precision,platform", [
    ("xla", "highest", "cuda"), ("xla", "highest", "tpu"),
    ("cpu", "highest", "cuda"),   # the XLA:CPU routines say so too, wherever they are lowered
    ("xla", "default", "tpu"), ("xla", "high", "cuda")])
def test_fusion_lowered_for_accelerators_asks_for_the_policy_precision(routines, precision, platform):
    ops = _op_precisions(_lowered_fusion(ComputePolicy(routines, precision), platform))
    expected = {"highest": "HIGHEST", "high": "HIGH", "default": "DEFAULT"}[precision]
    assert ops["convolution"] and ops["dot_general"]
    for op, names in ops.items():
        allowed = {expected, "MISSING"} if precision == "default" else {expected}
        assert set(names) <= allowed, (op, sorted(set(names)))


def test_matrix_unit_emulation_rounds_every_conv_and_dot():
    """The helper behind the TF32/bfloat16 figures of docs/benchmarks.md really rounds: a conv and a
    channel attention traced inside it move by about the format's precision (2**-11 for
    TF32, 2**-8 for bfloat16), and a function traced outside it does not."""
    from helpers import emulate_matrix_units
    from smfnet_jax.layers import Conv2d
    from smfnet_jax.model import MDTA
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 16)), jnp.float32)
    policy = ComputePolicy("xla")
    conv = Conv2d(16, 16, 3, padding=1, policy=policy, rngs=nnx.Rngs(0))
    attn = set_policy(MDTA(16, 4, rngs=nnx.Rngs(1)), policy)

    def run():  # a new function each time, traced where it is called
        return np.asarray(jax.jit(lambda a: attn(conv(a)))(x))

    exact = run()
    scale = np.abs(exact).max()
    errors = {}
    for kind in ("tf32", "bf16"):
        with emulate_matrix_units(kind):
            errors[kind] = np.abs(run() - exact).max() / scale
    assert np.array_equal(run(), exact)
    assert 2 ** -16 < errors["tf32"] < 2 ** -8, errors
    assert 4 * errors["tf32"] < errors["bf16"] < 2 ** -4, errors


@pytest.mark.parametrize("module,argv", [
    ("infer.main", ["--ckpt", "x.pth", "--ir", "a", "--vi", "b", "--out", "c"]),
    ("infer.bench", ["--ckpt", "x.pth"]),
    ("infer.device_check", ["--quick"]),
    ("train.bench", []),
    ("train.main", ["train.main", "--config", "smoke.py", "--workdir", "w"]),
    ("convert.main", ["--pth", "x.pth", "--out", "y.safetensors"]),
])
def test_every_cli_names_a_bad_routines_variable(module, argv, monkeypatch, capsys, tmp_path):
    """$SMFNET_JAX_IMPL=bogus: the variable's own one-line message and exit 2, before any
    work (not a traceback, not a checkpoint blamed for it)."""
    import importlib
    from smfnet_jax.policy import IMPL_ENV
    monkeypatch.setenv(IMPL_ENV, "bogus")
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {IMPL_ENV}='bogus': expected one of auto, cpu, xla"], err


def test_conv_sums_float64_for_cpu_training_float32_elsewhere():
    """Training's `conv_sums` "auto" is float64 with the CPU routines (the trajectory tests'
    fidelity rests on it, issue #19) and float32 with XLA's (GPU/TPU); inference defaults to
    float32; a bad value is named."""
    from train.configs import msrs
    from train.configs.validate import config_problems
    from train.step import train_policy
    assert resolve("cpu", conv_sums="auto").conv_sums == "float64"
    assert resolve("xla", conv_sums="auto").conv_sums == "float32"
    assert resolve(platform="tpu", conv_sums="auto") == ComputePolicy("xla", "highest", "float32", "float32")
    assert resolve("cpu").conv_sums == "float32"  # inference: speed unless asked
    assert "float64 conv sums" in resolve("cpu", conv_sums="float64").describe()
    cfg = msrs.get_config()
    assert train_policy(cfg).conv_sums == ("float64" if resolve().routines == "cpu" else "float32")
    with pytest.raises(ValueError, match="conv_sums='float16'"):
        resolve(conv_sums="float16")
    with pytest.raises(ValueError, match="conv_sums"):
        ComputePolicy("cpu", conv_sums="int8")
    cfg.conv_sums = "float16"
    assert any("conv_sums" in p for p in config_problems(cfg))
