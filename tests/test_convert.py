"""The key map and the .pth <-> orbax converter."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from flax import nnx

from smfnet_jax.torch_weights.keymap import KEY_MAP, SUBMODEL_KEYS
from smfnet_jax.torch_weights.mapping import KeyMapError, export_reference_weights, load_reference_weights
from smfnet_jax.torch_weights.pth_io import UnsafeCheckpointError, load_pth
from smfnet_jax.model import create_model


@pytest.fixture(scope="session")
def reference_ckpt(fixture_ckpt):
    return fixture_ckpt


def test_key_map_covers_checkpoint_in_order(reference_ckpt):
    for sub in SUBMODEL_KEYS:
        rows = [r.full_key for r in KEY_MAP if r.submodel == sub]
        assert rows == list(reference_ckpt[sub]), f"{sub}: key map order differs from the reference"


def test_key_map_covers_every_model_variable():
    model = create_model(0)
    paths = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model))}
    mapped = [(SUBMODEL_KEYS[r.submodel],) + r.path for r in KEY_MAP if r.path is not None]
    assert len(mapped) == len(set(mapped)), "two checkpoint keys load into one model path"
    assert set(mapped) == paths, f"unmapped model paths: {sorted(paths - set(mapped))[:5]}"


def test_unused_keys_are_listed_explicitly():
    unused = {r.full_key for r in KEY_MAP if r.path is None}
    # the weights the reference builds and never calls in its forward pass
    assert "module.baseFeature.reduce_channel.weight" in unused
    assert "module.baseFeature.norm.weight" in unused
    assert "module.graph.graph.C_ca.0.1.weight" in unused
    assert "module.graph.C_cat.5.1.running_var" in unused
    assert "module.graph.C_cls.weight" in unused
    assert "module.C_cls.weight" not in unused
    assert len(unused) == 40


def test_load_then_export_is_bit_exact(reference_ckpt):
    model = create_model(1)
    extras = load_reference_weights(model, reference_ckpt)
    back = export_reference_weights(model, extras)
    for sub, sd in reference_ckpt.items():
        assert list(back[sub]) == list(sd)
        for key, arr in sd.items():
            out = back[sub][key]
            assert out.dtype == arr.dtype and out.shape == arr.shape, key
            assert out.tobytes() == arr.tobytes(), key


@pytest.mark.parametrize("mutation", ["unknown", "missing", "shape", "top"])
def test_bad_layout_fails_naming_the_key(reference_ckpt, mutation):
    ckpt = copy.copy(reference_ckpt)
    sd = dict(ckpt["DIDF_Decoder"])
    if mutation == "unknown":
        sd["module.extra.weight"] = np.zeros(3, np.float32)
        name = "module.extra.weight"
    elif mutation == "missing":
        del sd["module.output.2.weight"]
        name = "module.output.2.weight"
    elif mutation == "shape":
        sd["module.output.4.weight"] = np.zeros((1, 16, 5, 5), np.float32)
        name = "module.output.4.weight"
    else:
        ckpt["Discriminator"] = {}
        name = "Discriminator"
    ckpt["DIDF_Decoder"] = sd
    with pytest.raises(KeyMapError, match=name.replace(".", r"\.")):
        load_reference_weights(create_model(0), ckpt, source="bad.pth")


def test_cli_round_trip_pth_orbax_pth(fixture_pth, reference_ckpt, tmp_path):
    from convert.main import main
    out_dir, out_pth = tmp_path / "ckpt", tmp_path / "back.pth"
    assert main(["--pth", str(fixture_pth), "--out", str(out_dir)]) == 0
    assert main(["--ckpt", str(out_dir), "--to-pth", str(out_pth)]) == 0
    back = load_pth(out_pth)
    for sub, sd in reference_ckpt.items():
        assert list(back[sub]) == list(sd)
        for key, arr in sd.items():
            assert back[sub][key].dtype == arr.dtype and back[sub][key].tobytes() == arr.tobytes(), key
    # refusing to clobber an existing output
    with pytest.raises(SystemExit):
        main(["--ckpt", str(out_dir), "--to-pth", str(out_pth)])


def test_cli_refuses_unsafe_pickle(tmp_path, capsys):
    import pickle
    import zipfile
    from convert.main import main
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').close()",))

    bad = tmp_path / "evil.pth"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"DIDF_Encoder": Evil()}, protocol=2))
    assert main(["--pth", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "refused" in err and "eval" in err
    with pytest.raises(UnsafeCheckpointError):
        load_pth(bad)
