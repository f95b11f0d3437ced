"""The original's five sub-models built and loaded from a checkpoint in the released layout,
for the torch-side recorders (record_trajectory.py, record_modules.py). Imports the
original's modules from $SMFNET_REF; contains none of their code."""
import os
import sys

SUBMODELS = ("DIDF_Encoder", "DIDF_Decoder", "BaseFuseLayer", "DetailFuseLayer", "GraphModel")


def load_reference_nets(pth: str, dtype=None) -> dict:
    """Sub-model name -> its nn.DataParallel wrapper (as train.py holds them), weights loaded
    from `pth` (the checkpoint's keys carry DataParallel's `module.`), cast to `dtype`."""
    sys.path.insert(0, os.environ["SMFNET_REF"])
    import torch
    import torch.nn as nn
    from net_final import (BaseFeatureExtraction, CGR_backbone, DetailFeatureExtraction,
                           Restormer_Decoder, Restormer_Encoder)

    ckpt = torch.load(pth, map_location="cpu")
    build = {"DIDF_Encoder": Restormer_Encoder, "DIDF_Decoder": Restormer_Decoder,
             "BaseFuseLayer": lambda: BaseFeatureExtraction(dim=64, num_heads=8),
             "DetailFuseLayer": DetailFeatureExtraction, "GraphModel": CGR_backbone}
    nets = {}
    for name in SUBMODELS:
        net = nn.DataParallel(build[name]())
        net.load_state_dict(ckpt[name])
        nets[name] = net if dtype is None else net.to(dtype)
    return nets
