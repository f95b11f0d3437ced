"""Per-chip figures (vendors' published numbers), the one table that train.plan (memory
plans, rooflines) and the trainer (MFU) read.

Kept in train/ rather than the library: only training tools need peaks, and the library
never imports train.
"""
from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: memory, bandwidth and dense (not sparse) peak FLOP/s."""
    kind: str
    hbm_bytes: int          # per chip, as the runtime reports it
    hbm_bandwidth: float    # bytes/s
    bf16_flops: float       # dense peak, per chip
    usable: float = 1.0     # share of hbm_bytes a program may take (GPU: JAX's preallocation)
    # TPU compilers refuse a program that does not fit (their own account of HBM, which is not
    # the memory analysis' sum: phase II at 5 per v5e chip compiles with 16.2 GiB of
    # "temporaries"), so there the verdict is the compiler's; XLA:GPU compiles anything.
    compiler_checks_hbm: bool = False
    # GPUs only: float32 matmuls run on the CUDA cores ("highest") or as TF32 on the tensor
    # cores ("high", "default"). TPUs (None) run float32 as bfloat16 passes (`peak_flops`).
    f32_flops: float | None = None
    tf32_flops: float | None = None
    # What jax's `device.device_kind` says for this chip, where it differs from `kind`.
    device_kinds: tuple[str, ...] = ()


V5E = Chip("TPU v5e", 16 * GiB, 819e9, 197e12, compiler_checks_hbm=True, device_kinds=("TPU v5 lite",))
V4 = Chip("TPU v4", 32 * GiB, 1228e9, 275e12, compiler_checks_hbm=True)
V5P = Chip("TPU v5p", 95 * GiB, 2765e9, 459e12, compiler_checks_hbm=True, device_kinds=("TPU v5",))
V6E = Chip("TPU v6e", 32 * GiB, 1640e9, 918e12, compiler_checks_hbm=True, device_kinds=("TPU v6 lite",))
H100 = Chip("NVIDIA H100 80GB HBM3", 84_942_979_072, 3.35e12, 989e12, usable=0.75,
            f32_flops=67e12, tf32_flops=494.5e12)
H200 = Chip("NVIDIA H200", 150_754_820_096, 4.8e12, 989e12, usable=0.75,
            f32_flops=67e12, tf32_flops=494.5e12)
A100 = Chip("NVIDIA A100-SXM4-80GB", 85_089_140_736, 2.039e12, 312e12, usable=0.75,
            f32_flops=19.5e12, tf32_flops=156e12,
            device_kinds=("NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB"))

CHIPS = (V4, V5E, V5P, V6E, H100, H200, A100)


def chip_for(device_kind: str) -> Chip | None:
    """The table's chip for a jax `device_kind`, or None (CPUs, chips not in the table)."""
    for chip in CHIPS:
        if device_kind == chip.kind or device_kind in chip.device_kinds:
            return chip
    return None


def peak_flops(chip: Chip, policy) -> float:
    """The chip's dense peak for this policy's matmuls and convolutions: bfloat16 compute is
    the bfloat16 peak; float32 on a GPU is TF32 ("high", "default") or CUDA-core float32
    ("highest"); on a TPU it is 1 (default), 3 (high) or 6 (highest) bfloat16 passes."""
    if policy.dtype == "bfloat16":
        return chip.bf16_flops
    if chip.f32_flops is not None:
        return chip.f32_flops if policy.precision == "highest" else chip.tf32_flops
    return chip.bf16_flops / {"default": 1, "high": 3, "highest": 6}[policy.precision]


def describe_peak(chip: Chip | None, policy, device_kind: str) -> str:
    """How a run's MFU is computed, or why it is left out (the run's first line says it)."""
    if chip is None:
        return (f"mfu: null (no published peak for {device_kind!r} in train/chips.py; "
                "CPUs' peaks depend on the model, clocks and vector units)")
    return (f"mfu peak {peak_flops(chip, policy) / 1e12:g} TFLOP/s per chip ({chip.kind}, "
            f"{policy.dtype}, precision {policy.precision})")
