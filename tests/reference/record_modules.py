"""Single modules of the PyTorch original in float32 and float64, for the per-module cases.

Runs in a venv with torch and the original's code (the set-up of
../shared/reference-tools/README.md: SMFNET_REF = an export of Abraham-Einstein/SMFNet;
KORNIA020 is not needed). It imports the original's modules and contains none of their code.

    SMFNET_REF=REF python record_modules.py INIT.pth IMAGES.npz Y X H W OUT.npz

IMAGES.npz holds `vi`, `ir` (1, 1, h, w) float32. The float32 encoder, graph branch and
detail fusion layer run once on them (eval mode); hooks take the inputs each module gets
there, and Y:Y+H, X:X+W of them is the "window" the small modules run on. Then every module
of `MODULES` runs alone, on the same float32 input values, once in float32 and once in
float64 (`module.double()`), and OUT.npz gets, NCHW:

    <module>/in/<input>     the inputs (float32)
    <module>/out32/<i>      outputs of the float32 run; out64/<i> of the float64 run
    <module>/grad32/<input> d(0.5 * sum of squares of the outputs)/d input; grad64/<input>
"""
import copy
import sys

import numpy as np

from reference_nets import load_reference_nets


def main() -> None:
    pth, images, y, x, h, w, out = sys.argv[1:8]
    y, x, h, w = int(y), int(x), int(h), int(w)
    import torch

    torch.set_num_threads(1)
    nets = {name: net.module.eval() for name, net in load_reference_nets(pth).items()}
    enc, graph, detail_fuse = nets["DIDF_Encoder"], nets["GraphModel"], nets["DetailFuseLayer"]
    reasoning = graph.graph.graph  # CGR_backbone.graph (CGR) .graph (GraphReasoning)

    # ---- the inputs each module gets inside the float32 model
    seen = {}

    def keep(name):
        def hook(module, args):
            seen.setdefault(name, tuple(a.detach().clone() for a in args))
        return hook

    hooks = [enc.detailFeature.register_forward_pre_hook(keep("cai")),
             enc.detailFeature.layer.register_forward_pre_hook(keep("detail_node")),
             detail_fuse.net[0].register_forward_pre_hook(keep("inv_block0")),
             detail_fuse.net[1].register_forward_pre_hook(keep("inv_block1")),
             reasoning.graph_rgb.register_forward_pre_hook(keep("graph_model"))]
    with np.load(images) as z:
        vi, ir = torch.tensor(z["vi"]), torch.tensor(z["ir"])
    with torch.no_grad():
        _, vd, _, v1 = enc(vi)
        _, idt, _, i1 = enc(ir)          # (the hooks keep the first call's, vi's, inputs)
        detail_fuse(vd + idt)
        graph(v1, i1, flag=True)
    for hk in hooks:
        hk.remove()

    def window(t):
        return t[..., y:y + h, x:x + w].numpy()

    cai_in = window(seen["cai"][0])
    n_iter = reasoning.n_iter

    def graph_rounds(m, nodes):
        for _ in range(n_iter):
            nodes = m(nodes)
        return [nodes]

    # name: (module, {input: float32 array}, call(module, *inputs) -> list of outputs, grad?)
    modules = {
        "grdb": (enc.GRDB_module, {"x": window(v1)}, lambda m, a: [m(a)], True),
        "bfe": (enc.baseFeature, {"x": window(v1)}, lambda m, a: [m(a)], False),  # (backward: slow to compile here)
        "cross_attention": (enc.detailFeature.TCA, {"guide": cai_in[:, 32:], "other": cai_in[:, :32]},
                            lambda m, g, o: [m(feat_guide=g, feat_op=o)], True),
        "detail_node": (enc.detailFeature.layer, {"z1": window(seen["detail_node"][0]),
                                                  "z2": window(seen["detail_node"][1])},
                        lambda m, a, b: list(m(a, b)), True),
        "cai": (enc.detailFeature, {"x": cai_in}, lambda m, a: [m(a)], True),
        "inv_block0": (detail_fuse.net[0], {"x1": window(seen["inv_block0"][0]),
                                            "x2": window(seen["inv_block0"][1])},
                       lambda m, a, b: list(m(a, b)), True),
        "inv_block1": (detail_fuse.net[1], {"x1": window(seen["inv_block1"][0]),
                                            "x2": window(seen["inv_block1"][1])},
                       lambda m, a, b: list(m(a, b)), True),
        "graph_model": (reasoning.graph_rgb, {"nodes": window(seen["graph_model"][0])}, graph_rounds, True),
        "ppm": (reasoning.ppm_rgb, {"x": i1.numpy()}, lambda m, a: list(m(a)), False),
        "gr": (graph, {"vi": v1.numpy(), "ir": i1.numpy()}, lambda m, a, b: list(m(a, b, flag=True)), True),
    }
    arrays = {}
    for name, (module, inputs, call, grad) in modules.items():
        for key, a in inputs.items():
            arrays[f"{name}/in/{key}"] = np.ascontiguousarray(a, np.float32)
        for label, dtype in (("32", torch.float32), ("64", torch.float64)):
            m = copy.deepcopy(module).to(dtype).eval()
            xs = [torch.tensor(a, dtype=dtype, requires_grad=grad) for a in inputs.values()]
            with torch.set_grad_enabled(grad):
                outs = call(m, *xs)
                for i, o in enumerate(outs):
                    arrays[f"{name}/out{label}/{i}"] = o.detach().numpy().copy()
                if grad:
                    loss = sum(0.5 * (o * o).sum() for o in outs)
                    for key, g in zip(inputs, torch.autograd.grad(loss, xs)):
                        arrays[f"{name}/grad{label}/{key}"] = g.numpy().copy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
