"""Ten training steps of the PyTorch original, recorded for a trajectory case.

Runs in a venv with torch and the original's code (the set-up of
../shared/reference-tools/README.md: SMFNET_REF = an export of Abraham-Einstein/SMFNet,
KORNIA020 = kornia 0.2.0). It imports the original's modules and contains none of their
code. The loop is the original train.py's arithmetic (five Adams, clip_grad_norm_ at 0.01
per sub-model, StepLR per epoch floored at 1e-6, the fusion layers' schedule in phase II
only) on an H5 small enough to be one batch per epoch, like the shared train_traj.py; it
also records what that script does not:

    {"step", "phase", "loss", "grad_norm": {sub-model: norm before clipping}}   one line a step

and, with --step1 FILE, every trained parameter after the first optimiser step (npz,
'SubModel/module.key' -> array, float64 in a float64 run). --dump-params DIR writes those
after every step (for pinning a drift to a step and a layer; too big to commit); --grads FILE
step 1's gradients before clipping (to compare float32 rounding per tensor with ours).
--input-scale S runs on the images times S (float32): with S = 1 + k 2**-23 the same
problem in another rounding, to see how far float32 rounding alone moves step 1.

    KORNIA020=K SMFNET_REF=REF python record_trajectory.py INIT.pth DATA.h5 \\
        --epochs 10 --phase1-epochs 5 --lr 1e-3 --step-epochs 2 [--float64] [--step1 F.npz]
"""
import argparse
import json
import os
import sys

import h5py
import numpy as np

from reference_nets import SUBMODELS, load_reference_nets
PHASE1 = ("DIDF_Encoder", "DIDF_Decoder", "GraphModel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("init")
    ap.add_argument("h5")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--phase1-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--step-epochs", type=int, default=2)
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--input-scale", type=float, default=1.0,
                    help="multiply the images by this in float32 (1 + k 2**-23: new rounding, same problem)")
    ap.add_argument("--step1", help="write the parameters after step 1 here (.npz)")
    ap.add_argument("--dump-params", help="write the parameters after every step into this folder")
    ap.add_argument("--grads", help="write step 1's gradients (before clipping) here (.npz)")
    args = ap.parse_args()

    sys.path.insert(0, os.environ["KORNIA020"])
    sys.path.insert(0, os.environ["SMFNET_REF"])
    import torch
    import torch.nn as nn
    import kornia
    from loss import Fusion_loss_stage1, Fusionloss, Seg_loss, cc, gram_matrix

    torch.set_num_threads(2)
    dtype = torch.float64 if args.float64 else torch.float32
    torch.set_default_dtype(dtype)
    nets = load_reference_nets(args.init, dtype)
    opts = {n: torch.optim.Adam(nets[n].parameters(), lr=args.lr, weight_decay=0) for n in SUBMODELS}
    scheds = {n: torch.optim.lr_scheduler.StepLR(opts[n], step_size=args.step_epochs, gamma=0.5)
              for n in SUBMODELS}
    with h5py.File(args.h5, "r") as f:
        keys = list(f["ir_patchs"].keys())
        scale = np.float32(args.input_scale)
        vis = torch.tensor(np.stack([f["vis_patchs"][k][()] * scale for k in keys]), dtype=dtype)
        irs = torch.tensor(np.stack([f["ir_patchs"][k][()] * scale for k in keys]), dtype=dtype)
    def seg_loss(image, label):
        # The original's Lovasz code builds a float32 tensor (lovasz_grad), so in a float64
        # run it fails once the label has a pixel of exactly 0. Its value is a constant of
        # the network output (a softmax over one channel is 1) with zero gradient, so the
        # float32 computation gives the float64 run the same term.
        if dtype == torch.float32:
            return Seg_loss(image, label)
        value = Seg_loss(image.float(), label.float())
        return value.to(dtype) if torch.is_tensor(value) else value  # 0 when no label is 0

    stage1, fusion = Fusion_loss_stage1().to(dtype), Fusionloss().to(dtype)
    mse, l1 = nn.MSELoss(), nn.L1Loss()
    ssim = kornia.losses.SSIM(11, reduction="mean")
    grad = kornia.filters.SpatialGradient()
    enc, dec, graph = nets["DIDF_Encoder"], nets["DIDF_Decoder"], nets["GraphModel"]
    base, detail = nets["BaseFuseLayer"], nets["DetailFuseLayer"]

    def params_of(names):
        return {f"{n}/{k}": p.detach().cpu().numpy().copy()
                for n in names for k, p in nets[n].named_parameters()}

    for epoch in range(args.epochs):
        phase = 1 if epoch < args.phase1_epochs else 2
        for net in nets.values():
            net.train()
            net.zero_grad()
        for opt in opts.values():
            opt.zero_grad()
        vb, vd, _, v1 = enc(vis)
        ib, idt, _, i1 = enc(irs)
        if phase == 1:
            g_ir, g_vi = graph(v1, i1, flag=False)
            vi_hat, _ = dec(vis, vd + vb + g_vi)
            ir_hat, _ = dec(irs, idt + ib + g_ir)
            cc_b, cc_d = cc(vb, ib), cc(vd, idt)
            loss_v = 8 * ssim(vis, vi_hat) + seg_loss(vi_hat, vis) + 10 * stage1(vis, vi_hat)
            loss_i = 8 * ssim(irs, ir_hat) + mse(gram_matrix(irs), gram_matrix(ir_hat)) + 10 * stage1(irs, ir_hat)
            loss = loss_v + loss_i + 2.0 * (cc_d ** 2 / (1.01 + cc_b)) + 5.0 * l1(grad(vis), grad(vi_hat))
            updated = PHASE1
        else:
            g_fused, _, _ = graph(v1, i1, flag=True)
            fused, _ = dec(vis, detail(idt + vd) + base(ib + vb) + g_fused)
            cc_b, cc_d = cc(vb, ib), cc(vd, idt)
            loss = fusion(vis, irs, fused)[0] + 2.0 * ((cc_d ** 2 + cc_d ** 2) / (1.01 + cc_b))
            updated = SUBMODELS
        loss.backward()
        if epoch == 0 and args.grads:
            np.savez(args.grads, **{f"{n}/{k}": p.grad.detach().cpu().numpy().copy()
                                    for n in updated for k, p in nets[n].named_parameters()
                                    if p.grad is not None})
        norms = {n: float(nn.utils.clip_grad_norm_(nets[n].parameters(), max_norm=0.01, norm_type=2))
                 for n in updated}
        for n in updated:
            opts[n].step()
        print(json.dumps({"step": epoch + 1, "phase": phase, "loss": loss.item(), "grad_norm": norms}),
              flush=True)
        if epoch == 0 and args.step1:
            np.savez(args.step1, **params_of(updated))
        if args.dump_params:
            os.makedirs(args.dump_params, exist_ok=True)
            np.savez(os.path.join(args.dump_params, f"step{epoch + 1}.npz"), **params_of(SUBMODELS))
        for n in PHASE1:
            scheds[n].step()
        if phase == 2:
            for n in ("BaseFuseLayer", "DetailFuseLayer"):
                scheds[n].step()
        for opt in opts.values():
            if opt.param_groups[0]["lr"] <= 1e-6:
                opt.param_groups[0]["lr"] = 1e-6


if __name__ == "__main__":
    main()
