"""Per-chip memory plans for TPU and GPU targets, compiled here without the device.

  python -m train.plan --target tpu:v5e:4x4 --json plan.json     # (console script smfnet-plan)
  python -m train.plan --target gpu:h200 --hlo-dir hlo/
  python -m train.plan --target tpu:v5e:2x2 --rows phase2 --size 32 --no-fit

For the target's whole mesh (every chip of every host, from `jax.experimental.topologies`:
compile-only devices), the real compiler of that machine (libtpu; XLA:GPU through the CUDA
plugin) compiles, and nothing runs:
- `phase1`, `phase2`: the jitted train step (train.step, the trainer's shardings: state
  replicated, batch split over the chips, state donated) at the global batch (default: the
  recipe's batch, 6, per chip);
- `fuse_480x640`, `fuse_1024x1024`: fusion of one pair per chip (`Fuser.lower` on the mesh).
Per row: per-chip bytes from the compiler's memory analysis (arguments, outputs, temporaries,
program code, less what donation aliases), FLOPs from its cost analysis (TPU only; XLA:GPU
gives none) for the whole mesh, and a roofline time from the chip's peak and HBM bandwidth.
Then, per train phase, the largest per-chip batch that fits, by a bracketed search over
compiles (`largest_fitting`; it spends libtpu's quick refusals to save its slow acceptances,
so on a TPU start it above the answer with --batch). Fits: on TPUs, the compiler accepted
it (it refuses a program that exceeds HBM, by its own account); on GPUs, total <= 75% of the
memory (JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION=0.75 of it unless told otherwise;
XLA:GPU compiles anything).

Needs the [plan] extra (libtpu and the CUDA plugin matching jaxlib): install it in its own
venv, since with it every JAX start tries those backends and prints their failures.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from train.chips import GiB, H100, H200, V4, V5E, V5P, V6E, Chip, peak_flops  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Target:
    name: str               # as --target takes it
    platform: str           # "tpu" | "gpu"
    topology: str           # TPU: "v5e:4x4"; GPU: "1x<hosts>x<gpus per host>"
    chip: Chip
    chip_config: str | None = None  # TPU: "megacore" (v4: one device per chip, as on a VM)
    description: str = ""


TARGETS = {t.name: t for t in (
    Target("tpu:v5e:2x2", "tpu", "v5e:2x2", V5E, description="v5litepod-4, 1 host"),
    Target("tpu:v5e:4x4", "tpu", "v5e:4x4", V5E, description="v5litepod-16, 4 hosts"),
    Target("tpu:v4:2x2x1", "tpu", "v4:2x2x1", V4, "megacore", "v4-8, 1 host"),
    Target("tpu:v5p:2x2x1", "tpu", "v5p:2x2x1", V5P, "megacore", "v5p-8, 1 host"),
    Target("tpu:v6e:2x2", "tpu", "v6e:2x2", V6E, description="v6e-4, 1 host"),
    Target("gpu:h100", "gpu", "1x1x8", H100, description="8 GPUs, 1 host (HGX)"),
    Target("gpu:h200", "gpu", "1x1x8", H200, description="8 GPUs, 1 host (HGX)"),
)}

# The XLA:GPU target description (a GpuTargetConfigProto) of each GPU: what the compiler
# plans with in place of a device it could query. Hopper: 132 SMs at 1.98 GHz, 50 MiB L2.
_GPU_SPEC = {
    H100.kind: {"memory_bandwidth": 3_352_320_000_000, "device_memory_size": H100.hbm_bytes},
    H200.kind: {"memory_bandwidth": 4_800_000_000_000, "device_memory_size": H200.hbm_bytes},
}


def gpu_target_config(chip: Chip) -> str:
    spec = _GPU_SPEC[chip.kind]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec["memory_bandwidth"]}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {spec["device_memory_size"]}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{chip.kind}"
"""


# --------------------------------------------------------------------------- the extra
PLAN_EXTRA_HINT = "pip install 'smfnet-jax[plan]' (in its own venv; see README, GPUs and TPUs)"


def missing_package(target: Target) -> str | None:
    """The one-line reason this target cannot be compiled here, or None."""
    import importlib.util
    module, package = (("libtpu", "libtpu") if target.platform == "tpu"
                       else ("jax_plugins.xla_cuda12", "jax-cuda12-plugin"))
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else (f"--target {target.name} needs {package}, which is not installed: "
                               f"{PLAN_EXTRA_HINT}")


def target_devices(target: Target) -> list:
    """The compile-only devices of the target's whole topology (all hosts)."""
    from jax.experimental import topologies
    if target.platform == "tpu":
        kwargs = {"chip_config_name": target.chip_config} if target.chip_config else {}
        return list(topologies.get_topology_desc(target.topology, "tpu", **kwargs).devices)
    return list(topologies.get_topology_desc(
        platform="cuda", topology_name="cuda", topology=target.topology,
        target_config=gpu_target_config(target.chip)).devices)


# --------------------------------------------------------------------------- one row
def measure(compiled, chips: int) -> dict:
    """Per-chip bytes and whole-mesh FLOPs of a compiled program (the compiler's analyses)."""
    m = compiled.memory_analysis()
    parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
             "temp": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes,
             "aliased": m.alias_size_in_bytes}
    parts["total"] = parts["arguments"] + parts["outputs"] + parts["temp"] + parts["code"] - parts["aliased"]
    cost = compiled.cost_analysis() or {}
    flops = cost.get("flops")
    accessed = cost.get("bytes accessed")
    bytes_per_chip = {k: int(v) for k, v in parts.items()}
    # The compiler's own peak of live buffers (libtpu fills it; 0 where a compiler gives none).
    bytes_per_chip["peak"] = int(getattr(m, "peak_memory_in_bytes", 0)) or None
    return {"bytes_per_chip": bytes_per_chip,
            # The compiled program is one chip's (SPMD): the mesh does `chips` of them.
            "flops": None if flops is None else float(flops) * chips,
            "bytes_accessed_per_chip": None if accessed is None else float(accessed)}


def row(what: str, lower: Callable, global_batch: int, chips: int, chip: Chip, policy,
        hlo_dir: Path | None = None) -> dict:
    """Lower and compile one function (`lower()` -> jax Lowered); a failed compile is a row
    with `compiled: false` and the compiler's first line as `error`."""
    out = {"what": what, "global_batch": global_batch, "per_chip_batch": global_batch // chips,
           "compiled": False, "error": None, "flops": None,
           "bytes_per_chip": None, "hbm_per_chip": chip.hbm_bytes, "fits": False,
           "roofline_s": None, "compile_s": None}
    t0 = time.perf_counter()
    try:
        lowered = lower()
        if hlo_dir is not None:
            from smfnet_jax.fileio import atomic_write
            text = lowered.as_text()
            atomic_write(hlo_dir / f"{what}.mlir", lambda f: f.write(text.encode()))
        compiled = lowered.compile()
    except Exception as e:  # the compiler's verdict is the result (e.g. out of HBM)
        from smfnet_jax.checkpoint import error_head
        out["error"] = f"{type(e).__name__}: {error_head(e, limit=1000)}"
        refused = refusal_bytes(str(e))
        if refused:  # the TPU compiler's own count of what the program needed
            out["needed_per_chip"] = refused[0]
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        return out
    got = measure(compiled, chips)
    out.update(compiled=True, compile_s=round(time.perf_counter() - t0, 1), flops=got["flops"],
               bytes_per_chip=got["bytes_per_chip"],
               fits=chip.compiler_checks_hbm or got["bytes_per_chip"]["total"] <= fit_limit(chip))
    if got["flops"] is not None:
        compute = got["flops"] / chips / peak_flops(chip, policy)
        memory = (got["bytes_accessed_per_chip"] or 0.0) / chip.hbm_bandwidth
        out["roofline_s"] = max(compute, memory)
    return out


def fit_limit(chip: Chip) -> float:
    """Per-chip bytes a program may total: the usable HBM; unbounded where the compiler
    itself refuses what does not fit (TPUs: compiled means it fits)."""
    return math.inf if chip.compiler_checks_hbm else chip.usable * chip.hbm_bytes


def is_out_of_memory(r: dict) -> bool:
    """A row whose compile failed because the program does not fit (TPU compilers refuse)."""
    err = (r.get("error") or "").lower()
    return not r["compiled"] and any(w in err for w in ("resource_exhausted", "out of memory",
                                                        "exceeds", "hbm"))


# libtpu's refusals, e.g. "Used 15.79G of 15.75G hbm." (a program) and "the total memory required
# for HLO temporaries (2.00T) exceeds available HBM (15.75G)." (buffers alone); G is GiB.
_REFUSAL = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"
                      r"|required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def refusal_bytes(error: str | None) -> tuple[int, int] | None:
    """(needed, available) bytes per chip from a TPU compiler's out-of-HBM message, or None."""
    m = _REFUSAL.search(error or "")
    if not m:
        return None
    v = [g for g in m.groups() if g is not None]
    unit = lambda number, suffix: round(float(number) * 1024 ** "KMGT".index(suffix) * 1024)
    return unit(v[0], v[1]), unit(v[2], v[3])


def compiler_hbm(devices: list) -> int | None:
    """The HBM a TPU compiler lets one program have per chip (a v5e's 16 GiB: 15.75), as it
    says when refusing a 1 TiB array (a compile of a few seconds); None where it says nothing."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    one = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices[:1]), ("chip",)),
                                     jax.sharding.PartitionSpec())
    huge = jax.ShapeDtypeStruct((2**28, 1024), jnp.float32)
    try:
        jax.jit(lambda a: a * 2, in_shardings=one, out_shardings=one).lower(huge).compile()
    except Exception as e:  # the refusal is the answer
        got = refusal_bytes(str(e))
        return got and got[1]
    return None


def cheapest_split(width: int, refusal_price: float) -> int:
    """Where to probe inside a bracket [lo fits, lo + width does not]: the offset j (1..width-1)
    that makes the worst case of the rest of the search cheapest, when an accepted compile costs
    1 and a refused one `refusal_price` (cost(v) = min_j max(1 + cost(v - j), price + cost(j))).
    At price 1 this is bisection; as refusals get cheap it moves to the top of the bracket, down
    to a scan from hi - 1 whose first accepted size is the answer (one accepted compile)."""
    cost, best = [0.0, 0.0], [0, 0]
    for v in range(2, width + 1):
        # ties go to the higher probe: a refusal there is the cheaper way to learn the same
        c, j = min((max(1 + cost[v - j], refusal_price + cost[j]), -j) for j in range(1, v))
        cost.append(c)
        best.append(-j)
    return best[width]


def largest_fitting(probe: Callable[[int], tuple], limit: float, start: int,
                    cap: int = 4096, at_zero: float | None = None
                    ) -> tuple[int, dict[int, tuple[bool, float | None]]]:
    """The largest n in 1..cap that fits, for a program whose memory grows with n; 0 when
    n=1 does not fit. `probe(n)` compiles at n and returns (fits, bytes[, seconds]): the
    verdict, the per-chip bytes it was judged by (GPU: the memory analysis' total against
    `limit`; TPU: the compiler's own account, its peak or what its refusal says was needed),
    None where unknown, and optionally what the compile took.

    Each probe is a compile, so it asks few: the straight line through the last two sizes
    with bytes (memory is close to affine in the batch; with one size, through it and
    `at_zero`, the bytes that do not grow with the batch: state and code) predicts where
    bytes reach `limit`, and a prediction at the largest size known to fit checks the one
    above it. Where there is no line, where the bracket [fits, does not fit] disproves it,
    or where a step did not halve the bracket: doubling from `start`, else bisection.
    Where refusals have cost less than half of what accepted compiles cost (libtpu refuses
    most oversized programs in seconds, before code generation, and takes minutes to an
    hour to accept one), a closed bracket is searched for the cheapest worst case instead
    (`cheapest_split`), which spends refusals to save accepted compiles.
    Returns (n, {n: (fits, bytes)}).
    """
    seen: dict[int, tuple[bool, float | None]] = {}
    took: dict[bool, list[float]] = {True: [], False: []}  # compile seconds, by verdict

    def fits(n: int) -> bool:
        if n not in seen:
            got = tuple(probe(n))
            seen[n] = got[:2]
            if len(got) > 2 and got[2] is not None:
                took[bool(got[0])].append(float(got[2]))
        return seen[n][0]

    def refusal_price() -> float | None:
        """A refused compile's mean time over an accepted one's; None until both are seen."""
        if not (took[True] and took[False]) or sum(took[True]) <= 0:
            return None
        return (sum(took[False]) / len(took[False])) / (sum(took[True]) / len(took[True]))

    def line_prediction() -> int | None:
        points = [(n, seen[n][1]) for n in seen if seen[n][1] is not None][-2:]  # the secant's
        if len(points) == 1 and at_zero is not None:
            points.insert(0, (0, at_zero))
        if len(points) < 2 or not math.isfinite(limit):
            return None
        (n0, b0), (n1, b1) = sorted(points)
        if b1 <= b0:
            return None
        return n0 + math.floor((limit - b0) * (n1 - n0) / (b1 - b0))

    lo, hi = 0, cap + 1  # n <= lo fits (0: none known yet), n >= hi does not
    guess, width = max(1, min(start, cap)), cap + 1
    while True:
        if fits(guess):
            lo = guess
        else:
            hi = guess
        if hi - lo <= 1:
            return lo, seen
        halved, width = hi - lo <= width / 2, hi - lo
        price = refusal_price()
        if price is not None and price < 0.5 and hi <= cap and hi - lo <= 1024:
            guess = lo + cheapest_split(hi - lo, price)
            continue
        p = line_prediction()
        if p is None or p >= hi or p < lo or not (halved or hi > cap or lo == 0):
            # no line, a line that the bracket disproves, or slow progress
            guess = min(cap, 2 * lo) if hi > cap and lo else (lo + hi) // 2
        else:
            guess = max(p, lo + 1)  # a prediction at lo: check the size above it


# --------------------------------------------------------------------------- the plan
TRAIN_ROWS = ("phase1", "phase2")


class SearchFailed(RuntimeError):
    """A compile of the fitting search failed for another reason than memory."""


def plan(target: Target, *, batch: int | None = None, size: int = 128, precision: str = "highest",
         dtype: str = "float32", rows: tuple[str, ...] = ("phase1", "phase2", "fuse"),
         fuse_sizes: tuple[tuple[int, int], ...] = ((480, 640), (1024, 1024)),
         fit: bool = True, hlo_dir: Path | None = None, log: Callable[[str], None] = print,
         on_update: Callable[[dict], None] = lambda doc: None) -> dict:
    """Compile the target's rows (module doc); returns the JSON document, which
    `on_update(doc)` also gets after each compile (`"complete": false` until the last), so an
    interrupted plan keeps what it compiled."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from smfnet_jax.api import Fuser
    from smfnet_jax.model import create_model
    from smfnet_jax.policy import resolve
    from train.configs import msrs
    from train.optim import make_optimizer
    from train.step import init_train_state, jit_train_step

    devices = target_devices(target)
    chips = len(devices)
    hosts = len({d.process_index for d in devices})
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    policy = resolve(None, precision=precision, dtype=dtype,
                     platform="tpu" if target.platform == "tpu" else "cuda")
    cfg = msrs.get_config()
    cfg.precision, cfg.compute_dtype = precision, dtype
    global_batch = batch or cfg.batch_size * chips
    if global_batch % chips:
        raise ValueError(f"--batch {global_batch} must be a multiple of the {chips} chips of {target.name}")
    doc = {"target": target.name, "description": target.description, "device_kind": str(devices[0].device_kind),
           "chips": chips, "hosts": hosts, "policy": policy.describe(), "train_size": size,
           "executed": False, "complete": False, "rows": [], "largest_fitting": {}}
    log(f"train.plan: {target.name} ({target.description}; {doc['device_kind']}, {chips} chips, "
        f"{hosts} host(s), {target.chip.hbm_bytes / GiB:.1f} GiB per chip); {policy.describe()}. "
        "Compiled only: nothing is executed.")
    model = create_model(0, policy)
    # What the fitting search aims the bytes at: the usable HBM (GPU), or what the TPU
    # compiler lets a program have (below the chip's HBM: 15.75 of a v5e's 16 GiB).
    limit = fit_limit(target.chip)
    if target.chip.compiler_checks_hbm:
        limit = compiler_hbm(devices) or target.chip.hbm_bytes
        doc["hbm_available_per_chip"] = limit
        log(f"  the compiler lets one program have {limit / GiB:.2f} GiB per chip")

    def judged_bytes(r):
        """The bytes a row's fit is judged by: the memory analysis' total (GPU), the TPU
        compiler's own account (its peak; for a refusal, what it said was needed)."""
        if not target.chip.compiler_checks_hbm:
            return r["bytes_per_chip"]["total"] if r["compiled"] else None
        if r["compiled"]:
            return r["bytes_per_chip"]["peak"]
        return r.get("needed_per_chip")

    def compiled_row(what, lower, gb, write_hlo=True):
        log(f"  compiling {what} at global batch {gb} ...")
        r = row(what, lower, gb, chips, target.chip, policy, hlo_dir if write_hlo else None)
        peak = r["bytes_per_chip"] and r["bytes_per_chip"]["peak"]
        log(f"  {what}: " + (f"{r['bytes_per_chip']['total'] / GiB:.3f} GiB per chip"
                            + (f" (peak {peak / GiB:.3f})" if peak else "")
                            + f", {'fits' if r['fits'] else 'does not fit'} ({r['compile_s']} s)"
                            if r["compiled"] else f"not compiled: {r['error']}"))
        return r

    # the epoch's length only moves the schedule's steps: any gives the same program's size
    optimizers = {phase: make_optimizer(cfg, 1, phase) for phase in (1, 2)}
    graphdef, state = init_train_state(model, cfg, policy, tx=optimizers[1])
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))  # whole on each chip
    for what in TRAIN_ROWS:
        if what not in rows:
            continue
        phase = int(what[-1])
        step = jit_train_step(graphdef, phase, cfg, mesh, tx=optimizers[phase])

        def lower(gb, step=step):
            img = jax.ShapeDtypeStruct((gb, size, size, 1), jnp.float32)
            return lambda: step.lower(state, img, img)

        first = compiled_row(what, lower(global_batch), global_batch)
        doc["rows"].append(first)
        on_update(doc)
        if fit and (first["compiled"] or is_out_of_memory(first)):
            probes = []  # every compile of the search, as it happens
            doc["largest_fitting"][what] = {"probes": probes}

            def probe(per_chip, lower=lower, what=what, probes=probes):
                if per_chip == first["per_chip_batch"]:
                    r = first
                else:
                    # the search's compiles leave --hlo-dir's file the requested batch's
                    r = compiled_row(what, lower(per_chip * chips), per_chip * chips, write_hlo=False)
                if not (r["compiled"] or is_out_of_memory(r)):
                    raise SearchFailed(f"{what} at per-chip batch {per_chip}: {r['error']}")
                judged = judged_bytes(r)
                probes.append({"per_chip_batch": per_chip, "fits": r["fits"], "bytes": judged,
                               "total": r["bytes_per_chip"] and r["bytes_per_chip"]["total"],
                               "compile_s": r["compile_s"]})
                on_update(doc)
                return r["fits"], judged, r["compile_s"]
            # what does not grow with the batch: the (donated) state and the program; for a
            # refused first compile, the state alone
            b = first["bytes_per_chip"]
            fixed = b["arguments"] + b["code"] if b else state_bytes
            n, seen = largest_fitting(probe, limit, first["per_chip_batch"], at_zero=fixed)
            doc["largest_fitting"][what].update(
                per_chip_batch=n, global_batch=n * chips, bytes_per_chip=seen[n][1] if n in seen else None,
                compiles=len(seen))
            on_update(doc)
    if "fuse" in rows:
        fuser = Fuser(model, policy=policy)
        for h, w in fuse_sizes:
            doc["rows"].append(compiled_row(f"fuse_{h}x{w}", lambda h=h, w=w: fuser.lower(h, w, chips, mesh=mesh),
                                            chips))
            on_update(doc)
    doc["complete"] = True
    return doc


def format_plan(doc: dict) -> str:
    parts = ("arguments", "outputs", "temp", "code", "total", "peak")
    lines = [f"{doc['target']}: {doc['chips']} x {doc['device_kind']}, {doc['hosts']} host(s); "
             f"{doc['policy']}; compiled, not run",
             f"{'what':<16}{'global':>7}{'/chip':>6}" + "".join(
                 f"{h + ' MiB':>11}" for h in ("args", "out", "temp", "code", "total", "peak"))
             + f"{'HBM GiB':>9}{'fits':>5}{'GFLOP':>10}{'roofline':>10}"]
    for r in doc["rows"]:
        b = r["bytes_per_chip"]
        sizes = "".join(f"{b[k] / 2**20:11.1f}" if b and b.get(k) else f"{'-':>11}" for k in parts)
        flops = f"{r['flops'] / 1e9:10.1f}" if r["flops"] is not None else f"{'-':>10}"
        roof = f"{r['roofline_s'] * 1e3:8.2f}ms" if r["roofline_s"] is not None else f"{'-':>10}"
        lines.append(f"{r['what']:<16}{r['global_batch']:>7}{r['per_chip_batch']:>6}{sizes}"
                     f"{r['hbm_per_chip'] / GiB:9.1f}{('yes' if r['fits'] else 'no'):>5}{flops}{roof}"
                     + ("" if r["compiled"] else f"  NOT COMPILED: {r['error']}"))
    for what, f in doc["largest_fitting"].items():
        lines.append(f"largest per-chip batch that fits, {what}: {f['per_chip_batch']} "
                     f"(global {f['global_batch']}; {f['compiles']} compiles)")
    lines.append("Nothing was executed: these are the compiler's figures for the target.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this machine computes nothing; targets are compile-only
    # Compiling needs no TPU, so no exclusive hold on one: two plans may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from smfnet_jax.cli import parse_sizes, program_name
    from smfnet_jax.policy import DTYPES, PRECISION_HELP, PRECISIONS
    p = argparse.ArgumentParser(prog=program_name("train.plan"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, choices=sorted(TARGETS), metavar="T",
                   help="one of: " + ", ".join(f"{k} ({t.description})" for k, t in TARGETS.items()))
    p.add_argument("--batch", type=int,
                   help="global train batch (default: 6 per chip, the recipe's); the fitting search "
                        "starts from it (on a TPU, above the answer is cheapest: libtpu refuses in seconds)")
    p.add_argument("--size", type=int, default=128, help="train patch size (default 128, the recipe's)")
    p.add_argument("--precision", choices=PRECISIONS, default="highest", help=PRECISION_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype (bfloat16: float32 master weights, bf16 compute)")
    p.add_argument("--rows", default="phase1,phase2,fuse",
                   help="what to compile, comma-separated of phase1, phase2, fuse (default all)")
    p.add_argument("--fuse-sizes", type=parse_sizes, default=parse_sizes("480x640,1024x1024"),
                   help="fusion rows' pair sizes, HxW, comma-separated (default 480x640,1024x1024)")
    p.add_argument("--no-fit", action="store_true",
                   help="skip the search for the largest per-chip batch that fits (several compiles per phase)")
    p.add_argument("--json", help="write the plan to this file")
    p.add_argument("--hlo-dir", help="write each compiled function's StableHLO as DIR/<what>.mlir")
    args = p.parse_args(argv)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad = [r for r in rows if r not in (*TRAIN_ROWS, "fuse")]
    if bad or not rows:
        p.error(f"--rows {args.rows!r}: expected some of phase1, phase2, fuse")
    if args.batch is not None and args.batch < 1 or args.size < 8:
        p.error("--batch must be >= 1 and --size >= 8")
    target = TARGETS[args.target]
    missing = missing_package(target)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    import jax
    # Compile-only executables cannot be loaded back: keep them out of a persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
    hlo_dir = Path(args.hlo_dir) if args.hlo_dir else None
    if hlo_dir:
        hlo_dir.mkdir(parents=True, exist_ok=True)
    from smfnet_jax.fileio import atomic_write_json
    write = (lambda doc: atomic_write_json(args.json, doc, indent=1)) if args.json else (lambda doc: None)
    try:
        doc = plan(target, batch=args.batch, size=args.size, precision=args.precision, dtype=args.dtype,
                   rows=rows, fuse_sizes=tuple(args.fuse_sizes), fit=not args.no_fit, hlo_dir=hlo_dir,
                   log=lambda s: print(s, file=sys.stderr, flush=True), on_update=write)
    except ValueError as e:
        p.error(str(e))
    except SearchFailed as e:  # --json keeps what compiled before it
        print(f"error: the fitting search stopped: {e}", file=sys.stderr)
        return 1
    print(format_plan(doc))
    write(doc)
    return 0 if all(r["compiled"] or is_out_of_memory(r) for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
