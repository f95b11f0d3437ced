"""The exported model (`infer.export`, `.jaxexport`): it reproduces the PyTorch reference and
our own fusion at two sizes from one file, runs through infer.main (tiles included), and a
file it cannot use (other platform, corrupt, truncated) is one line, exit status 2."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_close

# Constants folded at export round differently from the jitted Fuser (measured 1.2e-7).
EXPORT_TOL = 1e-5


@pytest.fixture(scope="session")
def exported(fixture_pth, tmp_path_factory):
    """The parity fixture (the released .pth layout) exported for the CPU, via the CLI."""
    from infer import export

    out = tmp_path_factory.mktemp("export") / "smfnet.jaxexport"
    assert export.main(["--ckpt", str(fixture_pth), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def exported_fuser(exported):
    from smfnet_jax.api import load_fuser

    return load_fuser(exported)


def test_exported_file_reproduces_the_reference_and_our_fusion_at_two_sizes(
        exported_fuser, fixture_pth, reference_arrays, shared_dir):
    from infer.main import Pair, load_pair
    from smfnet_jax.api import load_fuser

    ir, vi = reference_arrays["ir"][:, 0], reference_arrays["vi"][:, 0]  # 2 pairs, 40x56
    assert exported_fuser.exported.platforms == ("cpu",)
    assert_close("exported vs PyTorch fused", exported_fuser(ir, vi), reference_arrays["fused"][:, 0],
                 rtol=EXPORT_TOL)
    msrs = shared_dir / "data" / "MSRS_sample"
    loaded = load_pair(Pair("00004N", msrs / "ir" / "00004N.png", msrs / "vi" / "00004N.png"))
    assert loaded.shape == (480, 640)
    ir, vi = loaded.inputs()
    ours, theirs = load_fuser(fixture_pth)(ir, vi), exported_fuser(ir, vi)
    assert_close("exported vs Fuser at 480x640", theirs, ours, rtol=EXPORT_TOL)
    fused = exported_fuser(reference_arrays["ir"][:, 0], reference_arrays["vi"][:, 0])
    print(f"max abs: vs PyTorch (40x56) {np.abs(fused - reference_arrays['fused'][:, 0]).max():.2e}, "
          f"vs Fuser (480x640) {np.abs(theirs - ours).max():.2e}")


@pytest.fixture(scope="session")
def onnx_file(fixture_pth, tmp_path_factory):
    """The parity fixture as ONNX (needs the [onnx] extra; skipped in one line without it)."""
    pytest.importorskip("jax2onnx", reason="the [onnx] extra (jax2onnx) is not installed")
    pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnxruntime) is not installed")
    from infer import export

    out = tmp_path_factory.mktemp("onnx") / "smfnet.onnx"
    assert export.main(["--ckpt", str(fixture_pth), "--out", str(out)]) == 0
    return out


def test_onnx_file_reproduces_the_reference_and_our_fusion_at_two_sizes(
        onnx_file, fixture_pth, reference_arrays, shared_dir):
    import onnx

    from infer.main import Pair, load_pair
    from smfnet_jax.api import load_fuser

    model = onnx.load(str(onnx_file))
    assert [(o.domain or "ai.onnx", o.version) for o in model.opset_import][0] == ("ai.onnx", 23)
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input] == [["B", "H", "W"]] * 2
    fuser = load_fuser(onnx_file)
    fused = fuser(reference_arrays["ir"][:, 0], reference_arrays["vi"][:, 0])  # 2 pairs, 40x56
    assert_close("ONNX vs PyTorch fused", fused, reference_arrays["fused"][:, 0], rtol=EXPORT_TOL)
    msrs = shared_dir / "data" / "MSRS_sample"
    ir, vi = load_pair(Pair("00004N", msrs / "ir" / "00004N.png", msrs / "vi" / "00004N.png")).inputs()
    ours, theirs = load_fuser(fixture_pth)(ir, vi), fuser(ir, vi)
    assert_close("ONNX vs Fuser at 480x640", theirs, ours, rtol=EXPORT_TOL)
    print(f"max abs: vs PyTorch (40x56) {np.abs(fused - reference_arrays['fused'][:, 0]).max():.2e}, "
          f"vs Fuser (480x640) {np.abs(theirs - ours).max():.2e}")


@pytest.fixture(scope="session")
def fusion_folders(reference_arrays, tmp_path_factory):
    """A one-pair ir/vi folder (the fixture's first pair, 40x56, as 8-bit PNGs)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pair")
    for sub in ("ir", "vi"):
        (root / sub).mkdir()
        Image.fromarray(np.round(reference_arrays[sub][0, 0] * 255).astype(np.uint8)).save(root / sub / "p.png")
    return root


def _raw_outputs(ckpt, root, out_root):
    """infer.main --save-npy with `ckpt`, whole and in 32-pixel tiles: {tile: raw output}."""
    from infer import main as cli

    outputs = {}
    for tile in ("0", "32"):
        out = out_root / f"{ckpt.suffix[1:]}_{tile}"
        argv = ["--ckpt", str(ckpt), "--ir", str(root / "ir"), "--vi", str(root / "vi"),
                "--out", str(out), "--save-npy", "--tile", tile, "--overlap", "8"]
        assert cli.main(argv) == 0
        outputs[tile] = np.load(out / "p.npy")
    return outputs


@pytest.fixture(scope="session")
def checkpoint_outputs(fixture_pth, fusion_folders, tmp_path_factory):
    return _raw_outputs(fixture_pth, fusion_folders, tmp_path_factory.mktemp("pth_out"))


@pytest.mark.parametrize("exported_file", ["exported", "onnx_file"])
def test_infer_main_fuses_with_the_exported_file_as_with_the_checkpoint(
        request, exported_file, fusion_folders, checkpoint_outputs, tmp_path):
    """Whole and tiled (32-pixel tiles over 40x56), the raw outputs (--save-npy) agree."""
    outputs = _raw_outputs(request.getfixturevalue(exported_file), fusion_folders, tmp_path)
    for tile in ("0", "32"):
        assert_close(f"infer.main {exported_file} vs .pth, tile {tile}", outputs[tile],
                     checkpoint_outputs[tile], rtol=EXPORT_TOL)
    assert np.abs(checkpoint_outputs["0"] - checkpoint_outputs["32"]).max() > 1e-4  # tiles did happen


def test_onnx_without_the_extra_is_one_line(fixture_pth, tmp_path, monkeypatch, capsys):
    """Where the [onnx] extra is missing, exporting or running .onnx says so in one line."""
    import importlib.util
    import sys

    from infer import export
    from smfnet_jax.export import ExportError, OnnxFuser

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax2onnx"
                        else real_find_spec(name, *a))
    assert export.main(["--ckpt", str(fixture_pth), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the ONNX format needs the [onnx] extra: pip install 'smfnet-jax[onnx]'"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ExportError, match=r"needs the \[onnx\] extra"):
        OnnxFuser(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_onnx_file_is_one_line_exit_2(onnx_file, tmp_path, capsys, damage):
    from infer import main as cli

    data = onnx_file.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[:len(data) // 3] if damage == "truncated" else b"\x00\x01 not a protobuf" * 10)
    rc, err = _fuse_with(cli, bad, tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and "corrupt or truncated ONNX model" in err[0], err


def test_multi_platform_export_runs_here_and_a_cuda_only_one_is_refused(fixture_pth, tmp_path,
                                                                         reference_arrays, capsys):
    """One file for cpu, cuda and tpu (lowered here; nothing runs on a GPU/TPU) fuses on the
    CPU; a file for cuda alone is refused by infer.main in one line naming the platforms."""
    from infer import export
    from infer import main as cli
    from smfnet_jax.api import load_fuser

    multi, cuda = tmp_path / "multi.jaxexport", tmp_path / "cuda.jaxexport"
    assert export.main(["--ckpt", str(fixture_pth), "--out", str(multi), "--platforms", "cpu,cuda,tpu"]) == 0
    assert export.main(["--ckpt", str(fixture_pth), "--out", str(cuda), "--platforms", "cuda"]) == 0
    fuser = load_fuser(multi)
    assert fuser.exported.platforms == ("cpu", "cuda", "tpu") and fuser.policy.routines == "xla"
    ir, vi = reference_arrays["ir"][:, 0], reference_arrays["vi"][:, 0]
    assert_close("cpu,cuda,tpu export vs PyTorch", fuser(ir, vi), reference_arrays["fused"][:, 0],
                 rtol=EXPORT_TOL)
    capsys.readouterr()
    rc, err = _fuse_with(cli, cuda, tmp_path, capsys)
    assert rc == 2 and err == [f"error: cannot load checkpoint {cuda}: {cuda} was exported for cuda "
                               "only; this process runs on cpu (export again with --platforms cpu,...)"]


def _fuse_with(cli, ckpt, tmp_path, capsys):
    """infer.main on a one-pair folder with `ckpt`: (exit status, stderr lines but warnings)."""
    from PIL import Image

    for sub in ("ir", "vi"):
        (tmp_path / sub).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / sub / "p.png")
    rc = cli.main(["--ckpt", str(ckpt), "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"),
                   "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Warning" not in line]
    return rc, err


@pytest.mark.parametrize("damage", ["truncated", "flipped", "header", "foreign", "empty"])
def test_a_damaged_exported_file_is_one_line_exit_2(exported, tmp_path, capsys, damage):
    from infer import main as cli

    data = exported.read_bytes()
    bad = tmp_path / "bad.jaxexport"
    if damage == "truncated":
        bad.write_bytes(data[:len(data) // 2])
    elif damage == "flipped":  # one bit inside the payload
        i = len(data) - 1000
        bad.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])
    elif damage == "header":
        first = data.index(b"\n") + 1
        bad.write_bytes(data[:first] + b"{garbage\n" + data[data.index(b"\n", first) + 1:])
    elif damage == "foreign":
        bad.write_bytes(b"PK\x03\x04 a zip, not an export" + data[:100])
    else:
        bad.write_bytes(b"")
    rc, err = _fuse_with(cli, bad, tmp_path, capsys)
    expected = {"truncated": "truncated or corrupt exported model", "flipped": "SHA-256 of the payload",
                "header": "unreadable header", "foreign": "not an exported SMFNet model",
                "empty": "not an exported SMFNet model"}[damage]
    assert rc == 2 and len(err) == 1 and expected in err[0] and str(bad) in err[0], err


def test_export_cli_refuses_bad_arguments_before_work(fixture_pth, tmp_path, capsys):
    from infer import export

    (tmp_path / "folder.jaxexport").mkdir()
    cases = [(["--out", str(tmp_path / "m.tflite")], "the extension chooses the format"),
             (["--out", str(tmp_path / "m.jaxexport"), "--platforms", "cpu,metal"], "expected some of"),
             (["--out", str(tmp_path / "folder.jaxexport")], "is a folder")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            export.main(["--ckpt", str(fixture_pth), *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "old.jaxexport").write_bytes(b"keep")
    with pytest.raises(SystemExit):
        export.main(["--ckpt", str(fixture_pth), "--out", str(tmp_path / "old.jaxexport")])
    assert (tmp_path / "old.jaxexport").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.jaxexport", "old.jaxexport"]


def test_an_exported_model_keeps_its_policy(exported):
    from smfnet_jax.api import load_fuser

    with pytest.raises(ValueError, match="policy is fixed"):
        load_fuser(exported, dtype="bfloat16")
