"""A few minutes on one CPU: both phases, checkpoints, logging, on synthetic pairs.

    python -m train.main --config smoke.py --workdir /tmp/w
    python -m train.main --config smoke.py --workdir /tmp/w --config.data.h5=/tmp/m.h5
"""
from pathlib import Path

from train.configs import msrs

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "TNO"


def get_config():
    c = msrs.get_config()
    c.data.synthetic_pairs = 32    # used when data.h5 is empty
    c.data.synthetic_size = 32
    c.data.crop_size = 32          # real 128x128 patches (data.h5) are cropped to this size
    c.data.patch_size = 0          # any patch size in data.h5 (>= crop_size): it is cropped
    c.batch_size = 2
    c.microbatches = 1             # whole batch: compiles faster, and 32x32 fits in cache anyway
    c.num_epochs = 4
    c.phase1_epochs = 2
    c.steps_per_epoch = 6
    c.lr = 1e-3                    # 10x the recipe so a few steps visibly lower the loss
    c.lr_step_epochs = 2
    c.checkpoint_every_steps = 6
    c.keep_checkpoints = 2
    c.log_every_steps = 1
    c.sample_every_epochs = 2
    c.eval.ir = str(SAMPLES / "ir")    # the sample pairs: a metric table and images in TensorBoard
    c.eval.vi = str(SAMPLES / "vi")
    c.eval_every_epochs = 4            # once, at the end (phase II)
    return c
