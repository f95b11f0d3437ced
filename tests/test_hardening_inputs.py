"""Bad inputs to evaluation and training, each built here: metric values that are undefined
(an all-black fused image, a fused image equal to a source) are named, left out of the mean
with its count shown, and given their own exit status (infer.evaluate, infer.main
--evaluate); training H5 files with dangling external links, soft-link loops, patches of
another size than the config's, or a few kB declaring huge compressed patches are refused in
one line naming the file and the key, before any patch is read (train.data, train.main)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from smfnet_jax import metrics as M
from smfnet_jax.imageio import read_gray

SIDE = 48  # >= metrics.MIN_IMAGE_SIDE


# --------------------------------------------------------------------------- undefined metrics
def _noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)


def _triplets(root, fused_of: dict) -> dict:
    """ir/vi/fused folders; fused_of maps stem -> (ir, vi) -> fused image."""
    dirs = {k: root / k for k in ("ir", "vi", "fused")}
    for d in dirs.values():
        d.mkdir()
    for i, (stem, make) in enumerate(fused_of.items()):
        ir, vi = _noise(2 * i), _noise(2 * i + 1)
        for k, img in (("ir", ir), ("vi", vi), ("fused", make(ir, vi))):
            Image.fromarray(img).save(dirs[k] / f"{stem}.png")
    return dirs


def _mean_fused(ir, vi):
    return ((ir.astype(np.int32) + vi) // 2).astype(np.uint8)


def test_evaluate_names_undefined_values_and_means_over_the_defined(tmp_path, capsys):
    from infer import evaluate as ev
    dirs = _triplets(tmp_path, {"good": _mean_fused,
                                "black": lambda ir, vi: np.zeros_like(ir),
                                "same": lambda ir, vi: ir.copy()})
    out = tmp_path / "m.json"
    rc = ev.main(["--ir", str(dirs["ir"]), "--vi", str(dirs["vi"]), "--fused", str(dirs["fused"]),
                  "--json", str(out), "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == ev.EXIT_UNDEFINED == 3  # not 0 (all fine), 1 (skipped) nor 2 (usage)
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: black: CC undefined: zero variance: the fused image is constant, so a "
        "correlation is 0/0; left out of the mean",
        "warning: black: PSNR undefined: the fused image is all black: the peak max(F) is 0; "
        "left out of the mean",
        "warning: same: SCD undefined: zero variance: the fused image minus ir is constant, so "
        "a correlation is 0/0; left out of the mean",
    ]
    assert "3 value(s) undefined" in captured.err and "Traceback" not in captured.err

    # the means are over the images where each metric is defined, computed independently
    values = {stem: M.evaluate_pair(*(read_gray(dirs[k] / f"{stem}.png") for k in ("fused", "ir", "vi")))
              for stem in ("good", "black", "same")}
    assert math.isnan(values["black"]["CC"]) and values["black"]["PSNR"] == -math.inf
    assert math.isnan(values["same"]["SCD"])  # the library keeps the reference's numbers
    doc = json.loads(out.read_text())
    assert doc["black"]["CC"] is None and doc["black"]["PSNR"] is None and doc["same"]["SCD"] is None
    for name, stems in (("CC", ["good", "same"]), ("PSNR", ["good", "same"]),
                        ("SCD", ["good", "black"]), ("SSIM", ["good", "black", "same"])):
        assert doc["mean"][name] == pytest.approx(np.mean([values[s][name] for s in stems]), rel=1e-12)

    mean_row = captured.out.splitlines()[-1].split("  ")
    cells = [c.strip() for c in mean_row if c.strip()]
    assert cells[0] == "mean (3)"
    by_name = dict(zip(M.METRIC_NAMES, cells[1:]))
    assert by_name["CC"] == f"{doc['mean']['CC']:.4f} (2 of 3)"
    assert by_name["PSNR"] == f"{doc['mean']['PSNR']:.4f} (2 of 3)"
    assert by_name["SSIM"] == f"{doc['mean']['SSIM']:.4f}"  # defined everywhere: no count
    black_row = next(line for line in captured.out.splitlines() if line.startswith("black"))
    assert black_row.split()[1 + M.METRIC_NAMES.index("CC")] == "n/a"


def test_evaluate_exit_status_when_all_defined_or_some_skipped(tmp_path, capsys):
    from infer import evaluate as ev
    dirs = _triplets(tmp_path, {"good": _mean_fused})
    args = ["--ir", str(dirs["ir"]), "--vi", str(dirs["vi"]), "--fused", str(dirs["fused"])]
    assert ev.main(args) == 0
    assert "warning" not in capsys.readouterr().err
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(dirs["fused"] / "black.png")
    for k in ("ir", "vi"):
        Image.fromarray(_noise(7)).save(dirs[k] / "black.png")
    (dirs["fused"] / "lonely.png").write_bytes(b"")  # no partner: skipped
    assert ev.main(args) == 1  # a skipped image outranks an undefined value
    assert "warning: black: CC undefined" in capsys.readouterr().err


def test_undefined_reasons_for_identical_and_flat_images():
    img = _noise(3).astype(np.float64)
    same = M.evaluate_pair(img, img, img)
    assert same["PSNR"] == math.inf
    why = M.undefined_reasons(same, img, img, img)
    assert why["PSNR"] == "MSE is 0 (the fused image equals both sources): PSNR is infinite"
    assert why["SCD"].startswith("zero variance: the fused image minus source B and the fused "
                                 "image minus source A are constant")
    zeros = np.zeros((SIDE, SIDE))
    flat = M.evaluate_pair(zeros, zeros, zeros)
    why = M.undefined_reasons(flat, zeros, zeros, zeros, ("F", "A", "B"))
    assert set(why) == {k for k, v in flat.items() if not math.isfinite(v)} >= {"CC", "PSNR", "Qabf"}
    assert why["CC"].startswith("zero variance: F and A and B are constant")
    assert why["PSNR"] == "F is all black: the peak max(F) is 0 and so is the MSE (0/0)"
    assert why["Qabf"].startswith("no edges: A and B have zero Sobel gradient everywhere")
    other = _noise(4).astype(np.float64)
    mixed = np.round((img + other) / 2)
    assert M.undefined_reasons(M.evaluate_pair(mixed, img, other), mixed, img, other) == {}


def test_infer_main_evaluate_reports_undefined_values(tmp_path, monkeypatch, capsys):
    from infer import main as cli
    ir, vi, out = tmp_path / "ir", tmp_path / "vi", tmp_path / "out"
    ir.mkdir()
    vi.mkdir()
    for stem, seed in (("x", 1), ("y", 2)):
        a = _noise(seed)
        a.flat[0], a.flat[1] = 0, 255  # min-max normalisation leaves it unchanged
        Image.fromarray(a).save(ir / f"{stem}.png")
        Image.fromarray(_noise(seed + 10)).save(vi / f"{stem}.png")
    monkeypatch.setattr(cli, "load_fuser", lambda ckpt, **kw: lambda a, b: a)  # fused == ir
    monkeypatch.setattr(cli, "available_memory", lambda: None)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"unused")
    rc = cli.main(["--ckpt", str(ckpt), "--ir", str(ir), "--vi", str(vi), "--out", str(out),
                   "--json", str(tmp_path / "m.json")])
    captured = capsys.readouterr()
    assert rc == 3, captured.err
    assert [line for line in captured.err.splitlines() if line.startswith("warning:")] == [
        f"warning: {s}: SCD undefined: zero variance: the fused image minus ir is constant, so "
        "a correlation is 0/0; left out of the mean" for s in ("x", "y")]
    assert "n/a (0 of 2)" in captured.out.splitlines()[-1]
    assert json.loads((tmp_path / "m.json").read_text())["mean"]["SCD"] is None


# --------------------------------------------------------------------------- training H5 files
def _h5(path, n: int = 4, size: int = 8):
    from train.data import write_synthetic_h5
    return write_synthetic_h5(path, n=n, size=size, seed=1)


def _no_pixel_reads(monkeypatch):
    """Make any read of dataset values fail the test (metadata stays readable)."""
    import h5py

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"read {self.name} before refusing the file")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", refuse)


def _train(cfg_changes: dict, workdir, capsys, base: str = "smoke") -> tuple[int, list[str]]:
    """train.main.run in-process with a config from train/configs (no compile happens: the
    data is refused first); returns (exit status, stderr lines)."""
    import importlib
    from ml_collections import config_dict
    from train import main as train_main
    cfg = importlib.import_module(f"train.configs.{base}").get_config()
    cfg.progress, cfg.data.crop_size = False, 0
    for key, value in cfg_changes.items():
        section, name = key.split(".")
        cfg[section][name] = value
    rc = train_main.run(config_dict.FrozenConfigDict(cfg), str(workdir))
    return rc, capsys.readouterr().err.strip().splitlines()


def _break(f, how: str) -> str:
    """Replace a patch (or a group) of the open H5 `f` by a broken link; returns the key."""
    import h5py
    if how == "dangling soft link":
        del f["ir_patchs/2"]
        f["ir_patchs/2"] = h5py.SoftLink("/nowhere")
        return "ir_patchs/2"
    if how == "dangling external link":
        del f["vis_patchs/1"]
        f["vis_patchs/1"] = h5py.ExternalLink("missing_patches.h5", "/vis_patchs/1")
        return "vis_patchs/1"
    if how == "soft-link loop":
        for a, b in (("2", "3"), ("3", "2")):
            del f[f"ir_patchs/{a}"]
            f[f"ir_patchs/{a}"] = h5py.SoftLink(f"/ir_patchs/{b}")
        return "ir_patchs/2"
    if how == "group loop":
        del f["vis_patchs"]
        f["vis_patchs"] = h5py.SoftLink("/vis_patchs")
        return "vis_patchs"
    raise ValueError(how)


@pytest.mark.parametrize("how,reason", [
    ("dangling soft link", "is a soft link to '/nowhere', which does not exist (a dangling link)"),
    ("dangling external link", "is an external link to '/vis_patchs/1' in missing_patches.h5, "
                               "which cannot be followed ("),
    ("soft-link loop", "is a link to '/ir_patchs/3' in a loop of links that never reaches an object"),
    ("group loop", "is a link to '/vis_patchs' in a loop of links that never reaches an object"),
])
def test_broken_links_in_training_h5_are_one_line_exit_2(how, reason, tmp_path, capsys):
    import h5py
    path = _h5(tmp_path / "patches.h5")
    with h5py.File(path, "a") as f:
        key = _break(f, how)
    rc, err = _train({"data.h5": str(path)}, tmp_path / "w", capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}: '{key}' {reason}"), err


def test_link_broken_after_open_is_named_when_read(tmp_path):
    """Patches the open-time sample does not read are checked when training reads them."""
    import h5py
    from train.data import BadPatchError, H5PairSource
    path = _h5(tmp_path / "patches.h5", n=40)
    src = H5PairSource(path)
    src.close()
    key = "ir_patchs/17"  # not among the sampled patches
    with h5py.File(path, "a") as f:
        del f[key]
        f[key] = h5py.SoftLink("/gone")
    with pytest.raises(BadPatchError, match=f"'{key}' is a soft link to '/gone', which does not exist"):
        src[int(key.split("/")[1])]


def _declared_huge(path, side: int = 4096, n: int = 2):
    """n pairs of (1, side, side) float32 patches, chunked and gzip'ed, one chunk written:
    a few kB on disk declaring n * 2 * side^2 * 4 bytes."""
    import h5py
    with h5py.File(path, "w") as f:
        for group in ("ir_patchs", "vis_patchs"):
            g = f.create_group(group)
            for i in range(n):
                d = g.create_dataset(str(i), shape=(1, side, side), dtype=np.float32,
                                     chunks=(1, 512, 512), compression="gzip", fillvalue=0.5)
                d[0, 0, 0] = 0.25
    return path


def test_huge_declared_patches_refused_against_the_config_before_any_read(tmp_path, monkeypatch,
                                                                          capsys):
    path = _declared_huge(tmp_path / "bomb.h5")
    assert path.stat().st_size < 64 << 10  # the premise: tiny on disk, 4 x 64 MiB declared
    _no_pixel_reads(monkeypatch)
    rc, err = _train({"data.h5": str(path)}, tmp_path / "w", capsys, base="msrs")
    assert rc == 2 and err == [
        f"error: {path}: patch 'ir_patchs/0' is 4096x4096, not the 128x128 of the config "
        "(data.patch_size=128); set data.patch_size to the file's patch size (0: any size)"], err


def test_huge_declared_patches_refused_by_the_read_budget(tmp_path, monkeypatch, capsys):
    """With any patch size allowed (data.patch_size=0), the checkpoint readers' budget still
    refuses the file from its metadata: a deflate/fill-value bomb, or a record over the limit."""
    from train.data import BadPatchError, H5PairSource
    bomb = _declared_huge(tmp_path / "bomb.h5")
    _no_pixel_reads(monkeypatch)
    rc, err = _train({"data.h5": str(bomb)}, tmp_path / "w", capsys)  # smoke: patch_size 0
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {bomb}: refused: patch 'ir_patchs/0' (4096x4096 float32) "
                             "inflates ") and "a decompression bomb" in err[0], err
    ok = _h5(tmp_path / "ok.h5", n=2, size=16)  # 2 KiB a record, uncompressed
    monkeypatch.undo()
    assert len(H5PairSource(ok, max_bytes=2 * 16 * 16 * 4)) == 2
    with pytest.raises(BadPatchError, match=r"refused: one record \('ir_patchs/0' and its "
                                            r"'vis_patchs' partner, 16x16 float32 each\) needs "
                                            r"2.0 KiB.* training data file's memory"):
        H5PairSource(ok, max_bytes=2 * 16 * 16 * 4 - 1)
    monkeypatch.setenv("SMFNET_CKPT_MAX_BYTES", "1K")  # the readers' one knob, honoured here too
    rc, err = _train({"data.h5": str(ok)}, tmp_path / "w2", capsys)
    assert rc == 2 and "the limit is 1.0 KiB" in err[0], err
    monkeypatch.setenv("SMFNET_CKPT_MAX_BYTES", "lots")
    rc, err = _train({"data.h5": str(ok)}, tmp_path / "w3", capsys)
    assert rc == 2 and err == [f"error: {ok}: cannot set the read budget: $SMFNET_CKPT_MAX_BYTES="
                               "'lots' is not a byte count (e.g. 4294967296 or 4G)"], err


def test_patch_grown_after_open_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import h5py
    from train.data import BadPatchError, H5PairSource
    path = _h5(tmp_path / "patches.h5", n=4, size=8)
    src = H5PairSource(path)
    src.close()
    with h5py.File(path, "a") as f:
        del f["vis_patchs/3"]
        f["vis_patchs"].create_dataset("3", shape=(1, 4096, 4096), dtype=np.float32,
                                       chunks=(1, 512, 512), compression="gzip", fillvalue=0.5)
    _no_pixel_reads(monkeypatch)
    with pytest.raises(BadPatchError, match=r"patch 'vis_patchs/3' has shape \(1, 4096, 4096\), "
                                            r"expected \(1, 8, 8\)"):
        src[3]


def test_patch_size_config_rules_and_resume_of_an_older_workdir(tmp_path):
    from train.configs import msrs
    from train.configs.validate import config_problems
    from train.workdir import CONFIG_NAME, config_record, reconcile_config
    cfg = msrs.get_config()
    cfg.data.h5 = str(_h5(tmp_path / "p.h5"))
    cfg.data.patch_size, cfg.data.crop_size = 64, 96
    assert "data.crop_size=96: larger than the patches (data.patch_size=64)" in config_problems(cfg)
    cfg.data.patch_size = -1
    assert "data.patch_size=-1: must be an integer >= 0" in config_problems(cfg)
    # a workdir recorded before data.patch_size existed resumes without --allow_config_change
    cfg.data.patch_size, cfg.data.crop_size = 128, 0
    old = config_record(cfg)
    del old["data"]["patch_size"]
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / CONFIG_NAME).write_text(json.dumps(old))
    lines = reconcile_config(tmp_path / "w", cfg, restored_step=10, log=lambda msg: None)
    assert lines == ["data.patch_size: '(absent)' -> 128"]
