"""Fusion quality while training: the literature metrics on held-out pairs.

Phase II fuses each pair exactly as `infer.main` does (its pairing by stem, memory plan and
tiles, min-max normalisation, 8-bit rendering) and scores the result with the metrics of
`infer.evaluate` (the same functions on the same grey levels), so `eval/EN` ... are the
means `infer.evaluate` prints for those outputs. Phase I, which has no fused output yet,
scores each modality's reconstruction against its input (PSNR, SSIM on 0..255 levels).

The model is the train state's own arrays on this process's first device (no second copy);
it runs in eval mode (BatchNorm running statistics). One `Fuser` serves every evaluation:
its weights are replaced, so each image size compiles once per run.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

# How many pairs get an infrared | visible | fused (or reconstruction) image in TensorBoard.
IMAGES = 3


class Evaluator:
    def __init__(self, ir_dir: str, vi_dir: str, max_pairs: int, report=None):
        from infer.main import find_pairs
        self.report = report or (lambda line: print(line, file=sys.stderr))
        pairs, failures = find_pairs(Path(ir_dir), Path(vi_dir))
        for failure in failures:
            self.report(f"eval: skipping {failure.name}: {failure.reason}")
        self.pairs = pairs[:max_pairs] if max_pairs > 0 else pairs
        self.fuser = None
        self._reconstruct = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, dtype: str):
        """The pairs as infer.main loads them (8-bit pixels, a tile size where one is needed);
        read at each evaluation so that only a pair's pixels are held at a time."""
        from infer.main import PairError, available_memory, load_pair, memory_plan
        plan = memory_plan(available_memory(), 0, dtype, lambda line: None)
        for pair in self.pairs:
            try:
                yield load_pair(pair, plan=plan)
            except PairError as e:
                self.report(f"eval: skipping {pair.name}: {e}")

    def _fuser(self, model):
        from smfnet_jax.api import Fuser
        if self.fuser is None:
            self.fuser = Fuser(model)
        else:
            self.fuser.replace_model(model)
        return self.fuser

    def phase2(self, model) -> tuple[dict, list]:
        """({"eval/EN": mean, ...}, [(name, infrared | visible | fused uint8)])."""
        from infer.evaluate import mean_metrics
        from infer.main import fuse_batch, grid_image, render
        from smfnet_jax.imageio import read_gray, rgb_to_gray
        from smfnet_jax.metrics import evaluate_pair
        fuser = self._fuser(model)
        results, images = {}, []
        for loaded in self._load(fuser.policy.dtype):
            fused = fuse_batch(fuser, [loaded])[0]
            if isinstance(fused, Exception):
                self.report(f"eval: skipping {loaded.pair.name}: {fused}")
                continue
            output = render(loaded, fused, normalize=True)
            # infer.evaluate reads the sources and the written PNG as cv2 GRAY
            results[loaded.pair.name] = evaluate_pair(rgb_to_gray(output), read_gray(loaded.pair.ir),
                                                      read_gray(loaded.pair.vi))
            if len(images) < IMAGES:
                images.append((loaded.pair.name, grid_image(loaded, output)))
        if not results:
            return {}, images
        # an undefined mean (a metric undefined on every pair) is null, as in infer.evaluate's JSON
        return {f"eval/{k}": (v if math.isfinite(v) else None)
                for k, v in mean_metrics(results).items()}, images

    def phase1(self, model) -> tuple[dict, list]:
        """PSNR and SSIM of each modality's reconstruction against its input (the network's
        inputs and outputs as 0..255 grey levels), and infrared | visible | their
        reconstructions for the first pairs."""
        from smfnet_jax.imageio import float_to_uint8
        from smfnet_jax.inference import fuse_tiled_by
        from smfnet_jax.metrics import psnr, ssim
        both = self._reconstructor(model)
        sums, n, images = {"eval/psnr_vi": 0.0, "eval/psnr_ir": 0.0, "eval/ssim_vi": 0.0,
                           "eval/ssim_ir": 0.0}, 0, []
        for loaded in self._load(model.policy.dtype):
            if loaded.tile:  # tiled as fusion is, one modality per pass
                outs = {which: fuse_tiled_by(lambda ir, vi, i=i: both(ir, vi)[i], loaded.inputs,
                                             loaded.shape, loaded.tile)
                        for i, which in enumerate(("vi", "ir"))}
            else:
                outs = dict(zip(("vi", "ir"), both(*loaded.inputs())))
            ir_in, vi_in = loaded.inputs()
            for which, source in (("vi", vi_in), ("ir", ir_in)):
                a = np.round(source * np.float32(255.0))
                b = float_to_uint8(outs[which] * np.float32(255.0)).astype(np.float32)
                # the metrics score F against A and B: A == B scores one pair (SSIM summed twice)
                sums[f"eval/psnr_{which}"] += psnr(b, a, a)
                sums[f"eval/ssim_{which}"] += ssim(b, a, a) / 2.0
            n += 1
            if len(images) < IMAGES:
                images.append((loaded.pair.name, np.concatenate(
                    [float_to_uint8(x * np.float32(255.0)) for x in (ir_in, vi_in, outs["ir"], outs["vi"])],
                    axis=1)))
        return ({k: v / n for k, v in sums.items()} if n else {}), images

    def _reconstructor(self, model):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        graphdef, state = nnx.split(model)
        if self._reconstruct is None:
            def reconstruct(state, ir, vi):
                m = nnx.merge(graphdef, state)
                out = m.phase1(vi[None, ..., None].astype(jnp.float32), ir[None, ..., None].astype(jnp.float32))
                return out["vi_hat"][0, ..., 0], out["ir_hat"][0, ..., 0]
            self._reconstruct = jax.jit(reconstruct)

        def both(ir, vi):
            vi_hat, ir_hat = self._reconstruct(state, np.asarray(ir, np.float32), np.asarray(vi, np.float32))
            return np.asarray(vi_hat, np.float32), np.asarray(ir_hat, np.float32)
        return both
