"""The reference's training recipe on MSRS patches (train.py of the original).

    python -m train.main --config msrs.py --workdir runs/msrs --config.data.h5=data/msrs_train.h5

Fusion quality while training (eval/EN ... eval/SSIM in metrics.jsonl and TensorBoard, the
numbers infer.evaluate prints): point eval.ir and eval.vi at test pairs, e.g. TNO's,
    --config.eval.ir=data/TNO/ir --config.eval.vi=data/TNO/vi --config.eval_every_epochs=5
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 2025

    c.data = ml_collections.ConfigDict()
    c.data.h5 = ""                 # prepared patches (python -m train.prepare); required here
    c.data.patch_size = 128        # the H5's patches must be this size (train.prepare --patch,
                                   # checked before any read); 0: whatever size the file holds
    c.data.synthetic_pairs = 0     # >0: train on that many synthetic pairs instead of an H5
    c.data.synthetic_size = 128
    c.data.worker_count = 0        # grain worker processes (0: read in the main process)
    c.data.crop_size = 0           # >0: train on seeded square crops of this size (smoke runs)

    c.batch_size = 6               # global batch, split over all devices of all processes
    c.microbatches = 0             # exact gradient over this many slices of each device's batch
                                   # (less memory, +20% compute); 0: auto, one sample per slice
                                   # on CPU, whole batch on GPU/TPU (train/step.py)
    c.num_epochs = 120
    c.phase1_epochs = 40           # epochs of phase I (encoder, decoder, graph only)
    c.steps_per_epoch = -1         # -1: len(data) // batch_size; >0 caps an epoch (smoke runs)
    c.max_steps = -1               # -1: run all epochs

    c.optimizer = "torch_adam"     # one per sub-model: torch.optim.Adam as the reference
                                   # (train/optim.py), or an optax optimiser by name ("adamw",
                                   # "lion", "contrib.muon"); only torch_adam reproduces it
    c.optimizer_kwargs = ml_collections.ConfigDict()  # its arguments besides the rate
                                   # (--config.optimizer_kwargs.weight_decay=0.05); empty: its
                                   # defaults (torch_adam's are the reference's b1, b2, eps)
    c.lr = 1e-4                    # learning rate (the peak of cosine)
    c.schedule = "step"            # per sub-model: "step" (StepLR per epoch, the reference),
                                   # "cosine" (warm-up, then cosine to lr_min), "constant"
    c.lr_step_epochs = 20          # step: StepLR step size
    c.lr_gamma = 0.5               # step: the decay
    c.lr_min = 1e-6                # step: the floor; cosine: the last rate
    c.warmup_epochs = 0.0          # cosine: linear warm-up from 0 (may be a fraction)
    c.clip_norm = 0.01             # global-norm clipping per sub-model (torch clip_grad_norm_)

    c.decomp_grad = False          # True: correlation (decomposition) terms carry gradients,
                                   # as the paper describes; False reproduces train.py (.item())
    c.compute_dtype = "float32"    # "bfloat16": bf16 activations, f32 params/optimizer (GPU/TPU)
    c.precision = "highest"        # every conv/dot: "highest" (full f32), "high"/"default" (TF32 on
                                   # GPUs, bf16 passes on TPUs); smfnet_jax.policy
    c.conv_sums = "auto"           # 3x3 convs' sums: "float64" (exactly rounded; ~18% slower
                                   # steps on CPU), "float32", "auto" (float64 with the CPU routines)

    c.init_from = ""               # .pth or orbax dir to start from (fine-tuning)
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.log_every_steps = 50
    c.sample_every_epochs = 5      # fused sample image into WORKDIR/samples
    c.progress = True
    c.eval_every_epochs = 5        # fusion metrics on eval.ir/eval.vi every this many epochs
                                   # (0: never; nothing without eval.ir and eval.vi)
    c.eval = ml_collections.ConfigDict()
    c.eval.ir = ""                 # folders of test pairs, paired by stem as infer.main pairs
    c.eval.vi = ""                 # them; TNO's: --config.eval.ir=TNO/ir --config.eval.vi=TNO/vi
    c.eval.max_pairs = 16          # the first this many pairs (natural order); 0: all
    c.profile_steps = ""           # "A:B": a jax.profiler trace of steps A..B (as numbered in
                                   # metrics.jsonl) into WORKDIR/profile; "": none
    c.profile_all_processes = False  # False: process 0 only traces

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "10.0.0.1:1234"; "auto": found by JAX (TPU VMs,
                                            # SLURM, Open MPI); empty: single process
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.cpu_collectives = "gloo"  # CPU multi-process collectives
    return c
