"""Per-module parity with the PyTorch original: each module alone, on the inputs it gets in
the original, against the original's float64 run (tests/fixtures/modules, module_cases.py).

A failure here names the module (`test_module[cai/out/0]`), where test_parity.py, on the
whole model, can only name an output. Every array, outputs and the gradients of
0.5 * sum(output ** 2) with respect to the inputs, is held to

    err(ours) <= max(RATIO * err(torch float32), FLOOR)   and   err(ours) <= BOUND

with err = max |x - float64 reference| / max |float64 reference| (`module_cases.scaled_error`)
and RATIO by the model's routines (`RATIOS`):
a faithful float32 port rounds about as the original's float32 run does (see
tests/fixtures/modules/README.md for the measured errors).
"""
from __future__ import annotations

import numpy as np
import pytest

import module_cases as mc

# Measured (tests/fixtures/modules/README.md): torch float32's own error is 7.7e-8 to 5.1e-7;
# ours is 0.8 to 2.1 times that with the `cpu` routines, up to 2.6 with `xla`
# (SMFNET_JAX_IMPL=xla), the largest on the dense and dilated convs' outputs and gradients:
# XLA:CPU's convolution sums all 9 x C products of an output in one float32 chain (oneDNN,
# torch's, in shorter ones). A real fault is far outside: tanh-GELU for exact GELU alone is
# 1.5e-4 on the whole model.
RATIOS = {"cpu": 2.5, "xla": 3.0}
FLOOR = 2.0 ** -22   # 2.4e-7: a few float32 roundings, allowed even where torch's error is less
BOUND = 2e-6         # and never more than this, whatever torch's error


def _nhwc(x):
    return x.transpose(0, 2, 3, 1)


def _nchw(x):
    return x.transpose(0, 3, 1, 2)


def _nodes_in(x):   # (N, nodes, C, H, W) -> [NHWC per node]
    return [x[:, i].transpose(0, 2, 3, 1) for i in range(x.shape[1])]


def _nodes_out(nodes):
    import jax.numpy as jnp
    return jnp.stack([_nchw(n) for n in nodes], axis=1)


def _gr(mod, vi, ir):
    f_vi, f_ir = mod(_nhwc(vi), _nhwc(ir))
    return [_nchw(mod.merge(f_vi, f_ir)), _nchw(f_ir), _nchw(f_vi)]


# name: (our module from the model, its inputs in call order, call(module, *NCHW) -> [NCHW])
MODULES = {
    "grdb": (lambda m: m.encoder.grdb, ("x",), lambda mod, x: [_nchw(mod(_nhwc(x)))]),
    "bfe": (lambda m: m.encoder.bfe, ("x",), lambda mod, x: [_nchw(mod(_nhwc(x)))]),
    "cross_attention": (lambda m: m.encoder.cai.cross_attention, ("guide", "other"),
                        lambda mod, g, o: [_nchw(mod(_nhwc(g), _nhwc(o)))]),
    "detail_node": (lambda m: m.encoder.cai.node, ("z1", "z2"),
                    lambda mod, a, b: [_nchw(t) for t in mod(_nhwc(a), _nhwc(b))]),
    "cai": (lambda m: m.encoder.cai, ("x",), lambda mod, x: [_nchw(mod(_nhwc(x)))]),
    "inv_block0": (lambda m: m.detail_fuse.blocks[0], ("x1", "x2"),
                   lambda mod, a, b: [_nchw(t) for t in mod(_nhwc(a), _nhwc(b))]),
    "inv_block1": (lambda m: m.detail_fuse.blocks[1], ("x1", "x2"),
                   lambda mod, a, b: [_nchw(t) for t in mod(_nhwc(a), _nhwc(b))]),
    "graph_model": (lambda m: m.graph.reasoning.graph_ir, ("nodes",),
                    lambda mod, x: [_nodes_out(mod(_nodes_in(x)))]),
    "ppm": (lambda m: m.graph.reasoning.ppm_ir, ("x",), lambda mod, x: [_nchw(t) for t in mod(_nhwc(x))]),
    "gr": (lambda m: m.graph, ("vi", "ir"), _gr),
}


def _compared() -> list[tuple[str, str, str]]:
    """(case, module, 'out/<i>' | 'grad/<input>') for every array the cases hold."""
    import json
    out = []
    for case in mc.case_names():
        meta = json.loads((mc.FIXTURES / f"{case}.json").read_text())
        for module, entry in meta["modules"].items():
            out += [(case, module, f"out/{i}") for i in entry["outputs"]]
            out += [(case, module, f"grad/{x}") for x in entry["gradients"]]
    return out


@pytest.fixture(scope="session")
def module_runs():
    """case -> (json, arrays, run(module) -> {'out/<i>' | 'grad/<x>': ours}), each module
    jitted and run once (outputs and gradients from one value_and_grad)."""
    import jax
    from flax import nnx

    from smfnet_jax.model import abstract_model
    from smfnet_jax.torch_weights.mapping import load_reference_weights
    import trajectory_cases as tc

    runs = {}
    for case in mc.case_names():
        meta, arrays = mc.load_case(case)
        ckpt = tc.random_reference_checkpoint(meta["seed"])
        assert tc.checkpoint_digest(ckpt) == meta["checkpoint_sha256"], \
            f"{case}: the weights made from seed {meta['seed']} are not the ones the reference ran"
        model = abstract_model()  # every leaf is then loaded: no random init to spend time on
        load_reference_weights(model, ckpt, source=f"seed {meta['seed']}")
        model.eval()
        cache = {}

        def run(module, model=model, meta=meta, arrays=arrays, cache=cache):
            if module not in cache:
                get, names, call = MODULES[module]
                graphdef, state = nnx.split(get(model))
                xs = [arrays[f"{module}/in/{n}"] for n in names]
                grads = bool(meta["modules"][module]["gradients"])

                def outputs(state, *xs):
                    return call(nnx.merge(graphdef, state), *xs)

                def loss(xs, state):
                    outs = outputs(state, *xs)
                    return sum(0.5 * (o * o).sum() for o in outs), outs

                if grads:
                    (_, outs), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(xs, state)
                    result = {f"grad/{n}": np.asarray(gi) for n, gi in zip(names, g)}
                else:
                    outs, result = jax.jit(outputs)(state, *xs), {}
                result.update({f"out/{i}": np.asarray(o) for i, o in enumerate(outs)})
                cache[module] = result
            return cache[module]

        runs[case] = (meta, arrays, run)
    return runs


@pytest.mark.parametrize("case,module,item", _compared(),
                         ids=[f"{c}:{m}/{i}" for c, m, i in _compared()])
def test_module(case, module, item, module_runs):
    meta, arrays, run = module_runs[case]
    ref = arrays[f"{module}/{item}"]
    ours = run(module)[item]
    group, key = item.split("/")
    torch32 = meta["modules"][module]["outputs" if group == "out" else "gradients"][key]["torch_float32_error"]
    err = mc.scaled_error(ours, ref)
    from smfnet_jax.policy import resolve
    allowed = min(max(RATIOS[resolve().routines] * torch32, FLOOR), BOUND)
    print(f"{case} {module:16s} {item:11s} vs float64: ours {err:.2e}, torch float32 {torch32:.2e} "
          f"(ratio {err / torch32:.2f}; allowed {allowed:.2e})")
    assert err <= allowed, (f"{module} {item}: max |ours - float64| / max |float64| = {err:.3g} > "
                            f"{allowed:.3g} (torch float32's own error {torch32:.3g})")
