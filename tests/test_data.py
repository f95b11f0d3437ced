"""train.data: H5/synthetic sources, order contract, sharding, iterator state.

The expected order is computed here from the contract in train/data.py's docstring
(epoch e uses np.random.default_rng([seed, e]).permutation(N); global batch s is
perm[s*B:(s+1)*B]; shard p takes rows [p*B/P, (p+1)*B/P)), not from the module's code.
"""
import pickle

import h5py
import numpy as np
import pytest

from train import data as D


class IndexSource:
    """Records whose pixels are their own index, so batches reveal the order."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"vi": np.full((2, 3, 1), i, np.float32), "ir": np.full((2, 3, 1), -i, np.float32)}


def _ids(batch):
    vi, ir = batch["vi"], batch["ir"]
    assert vi.shape[1:] == (2, 3, 1) and vi.dtype == np.float32
    ids = vi[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(ir[:, 0, 0, 0], -ids)  # vi and ir of one record stay together
    return ids.tolist()


def _expected_global(n, b, seed, steps):
    spe = n // b
    out = []
    for t in range(steps):
        perm = np.random.default_rng([seed, t // spe]).permutation(n)
        s = t % spe
        out.append(perm[s * b:(s + 1) * b].tolist())
    return out


def _iter(source, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return D.make_train_iterator(source, **kw)


@pytest.fixture(scope="session")
def synth_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synth.h5"
    D.write_synthetic_h5(path, n=12, size=8, seed=5)
    return path


def test_order_contract_epochs_and_batching():
    n, b, seed = 23, 4, 7                    # 5 steps per epoch, 3 records dropped per epoch
    assert D.steps_per_epoch(n, b) == 5 == D.steps_per_epoch(IndexSource(n), b)
    got = [_ids(x) for x in _iter(IndexSource(n), global_batch_size=b, seed=seed, num_epochs=2)]
    assert got == _expected_global(n, b, seed, 10)
    for epoch in (got[:5], got[5:]):         # no record twice within an epoch
        flat = sum(epoch, [])
        assert len(set(flat)) == len(flat) == 20
    assert got[:5] != got[5:]                # reshuffled each epoch


def test_same_seed_same_order_different_seed_differs():
    def first(seed):
        it = _iter(IndexSource(50), global_batch_size=5, seed=seed)  # infinite
        return [_ids(next(it)) for _ in range(12)]
    assert first(1) == first(1)
    assert first(1) != first(2)


def test_shards_disjoint_and_concatenate_to_global_batch():
    n, b, seed, steps = 30, 6, 3, 12         # crosses an epoch boundary (5 steps per epoch)
    one = _iter(IndexSource(n), global_batch_size=b, seed=seed)
    shards = [_iter(IndexSource(n), global_batch_size=b, seed=seed, shard_index=p, shard_count=2)
              for p in range(2)]
    for t, want in enumerate(_expected_global(n, b, seed, steps)):
        g = _ids(next(one))
        local = [_ids(next(it)) for it in shards]
        assert all(len(x) == b // 2 for x in local)
        assert not set(local[0]) & set(local[1])
        assert local[0] + local[1] == g == want, t


def test_default_shard_is_jax_process():
    import jax
    a = D.make_train_iterator(IndexSource(10), global_batch_size=2, seed=0)
    b = _iter(IndexSource(10), global_batch_size=2, seed=0,
              shard_index=jax.process_index(), shard_count=jax.process_count())
    assert [_ids(next(a)) for _ in range(6)] == [_ids(next(b)) for _ in range(6)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the number of shards"):
        _iter(IndexSource(10), global_batch_size=3, seed=0, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _iter(IndexSource(3), global_batch_size=4, seed=0)


def test_state_restore_resumes_exactly():
    kw = dict(global_batch_size=4, seed=11, num_epochs=3)
    full = [_ids(x) for x in _iter(IndexSource(17), **kw)]
    it = _iter(IndexSource(17), **kw)
    for _ in range(6):
        next(it)
    state = it.get_state()
    resumed = _iter(IndexSource(17), **kw)
    resumed.set_state(state)
    assert [_ids(x) for x in resumed] == full[6:]
    skipped = _iter(IndexSource(17), start_step=6, **kw)
    assert [_ids(x) for x in skipped] == full[6:]


def test_orbax_checkpoint_manager_round_trip(tmp_path, synth_h5):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    kw = dict(global_batch_size=4, seed=2)
    it = _iter(synth_h5, **kw)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.arange(3.0)}),
            data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    want = [next(it) for _ in range(4)]
    fresh = _iter(synth_h5, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"w": np.zeros(3)}),
            data=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored["data"] is fresh
    for a in want:
        b = next(fresh)
        np.testing.assert_array_equal(a["vi"], b["vi"])
        np.testing.assert_array_equal(a["ir"], b["ir"])


def test_h5_source_reads_prepared_format(synth_h5):
    syn = D.SyntheticPairs(12, 8, seed=5)
    src = D.H5PairSource(synth_h5)
    assert len(src) == 12 and src.patch_shape == (8, 8)
    with h5py.File(synth_h5, "r") as f:
        assert sorted(f["ir_patchs"].keys(), key=int) == [str(i) for i in range(12)]
        assert f["vis_patchs"]["11"].shape == (1, 8, 8) and f["vis_patchs"]["11"].dtype == np.float32
    for i in (0, 2, 10, 11):                  # natural key order: record 10 is key "10"
        assert src.key(i) == str(i)
        for k in ("vi", "ir"):
            assert src[i][k].shape == (8, 8, 1) and src[i][k].dtype == np.float32
            np.testing.assert_array_equal(src[i][k], syn[i][k])
    src[0]                                    # opens the file in this process
    clone = pickle.loads(pickle.dumps(src))   # the handle is not pickled; reopened lazily
    np.testing.assert_array_equal(clone[3]["ir"], syn[3]["ir"])
    batch = next(_iter(synth_h5, global_batch_size=4, seed=0))
    assert batch["vi"].shape == batch["ir"].shape == (4, 8, 8, 1)


def _sampled_at_open(n):
    return set(np.linspace(0, n - 1, min(n, D.VALUE_SAMPLE)).round().astype(int).tolist())


def test_non_finite_patch_error_names_key(tmp_path):
    path = tmp_path / "bad.h5"
    D.write_synthetic_h5(path, n=40, size=4, seed=0)
    assert 6 not in _sampled_at_open(40)  # found when read, not at open
    with h5py.File(path, "r+") as f:
        f["ir_patchs"]["6"][0, 1, 2] = np.nan
    src = D.H5PairSource(path)
    with pytest.raises(D.BadPatchError, match="'ir_patchs/6'.*non-finite"):
        src[6]
    with pytest.raises(D.BadPatchError, match="ir_patchs/6"):
        for _ in _iter(path, global_batch_size=8, seed=0, num_epochs=1):
            pass


def _crafted_h5(path, n=20, size=4, edit=None):
    """A prepared-format file of n constant patches (value 0.5) after `edit(ir, vi)` on the
    {key: array} dicts, so any patch can be given another shape, dtype or values."""
    ir = {str(i): np.full((1, size, size), 0.5, np.float32) for i in range(n)}
    vi = {str(i): np.full((1, size, size), 0.5, np.float32) for i in range(n)}
    if edit:
        edit(ir, vi)
    with h5py.File(path, "w") as f:
        for name, patches in (("ir_patchs", ir), ("vis_patchs", vi)):
            g = f.create_group(name)
            for k, v in patches.items():
                g.create_dataset(k, data=v)
    return path


def _set(group, key, value):
    return lambda ir, vi: (ir if group == "ir_patchs" else vi).__setitem__(key, value)


BAD_FILES = [  # (edit, where, what): found at open, before any step
    (_set("vis_patchs", "17", np.zeros((1, 4, 5), np.float32)), "vis_patchs/17", r"\(1, 4, 5\) float32"),
    (_set("ir_patchs", "11", np.zeros((1, 4, 4), np.float64)), "ir_patchs/11", r"\(1, 4, 4\) float64"),
    (_set("ir_patchs", "4", np.zeros((1, 4, 4), np.uint8)), "ir_patchs/4", "uint8"),
    (_set("ir_patchs", "0", np.zeros((1, 4, 4), np.uint8)), "ir_patchs/0", "dtype uint8, expected float32"),
    (_set("ir_patchs", "0", np.zeros((4, 4), np.float32)), "ir_patchs/0", r"shape \(4, 4\), expected \(1, H, W\)"),
    (_set("vis_patchs", "0", np.full((1, 4, 4), 200.0, np.float32)), "vis_patchs/0",
     r"values in \[200, 200\], expected \[0, 1\] \(0-255 values"),
    (_set("ir_patchs", "19", np.full((1, 4, 4), -0.5, np.float32)), "ir_patchs/19", r"values in \[-0.5, -0.5\]"),
]


@pytest.mark.parametrize("edit,where,what", BAD_FILES, ids=[w for _, w, _ in BAD_FILES])
def test_bad_h5_refused_at_open_naming_file_and_patch(tmp_path, edit, where, what):
    path = _crafted_h5(tmp_path / "crafted.h5", edit=edit)
    assert {0, 19} <= _sampled_at_open(20)
    with pytest.raises(D.BadPatchError, match=f"crafted.h5: .*'?{where}'?.*{what}"):
        D.H5PairSource(path)


def test_values_just_outside_unit_range_accepted_far_outside_refused_when_read(tmp_path):
    eps = np.float32(1 + 1e-6)  # float rounding of the luminance sum
    path = _crafted_h5(tmp_path / "ok.h5", edit=_set("ir_patchs", "0", np.full((1, 4, 4), eps)))
    assert D.H5PairSource(path)[0]["ir"].max() == eps
    assert 6 not in _sampled_at_open(40)
    path = _crafted_h5(tmp_path / "far.h5", n=40,
                       edit=_set("ir_patchs", "6", np.full((1, 4, 4), 1.5, np.float32)))
    src = D.H5PairSource(path)  # not among the sampled patches...
    with pytest.raises(D.BadPatchError, match=r"far.h5: patch 'ir_patchs/6' has values in \[1.5, 1.5\]"):
        src[6]  # ...but refused when read


def test_missing_h5_says_how_to_get_msrs(tmp_path):
    with pytest.raises(D.MissingDatasetError) as e:
        _iter(tmp_path / "msrs_train.h5", global_batch_size=2, seed=0)
    msg = str(e.value)
    assert "Linfeng-Tang/MSRS" in msg and "python -m train.prepare --src MSRS/train" in msg


def test_mismatched_groups_rejected(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_group("ir_patchs").create_dataset("0", data=np.zeros((1, 4, 4), np.float32))
        f.create_group("vis_patchs").create_dataset("1", data=np.zeros((1, 4, 4), np.float32))
    with pytest.raises(D.BadPatchError, match="different keys"):
        D.H5PairSource(path)


def test_synthetic_pairs_deterministic_and_plausible():
    a, b, c = D.SyntheticPairs(4, 32, seed=0), D.SyntheticPairs(4, 32, seed=0), D.SyntheticPairs(4, 32, seed=1)
    for i in range(4):
        for k in ("vi", "ir"):
            x = a[i][k]
            assert x.shape == (32, 32, 1) and x.dtype == np.float32
            assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.02
            np.testing.assert_array_equal(x, b[i][k])
        assert not np.array_equal(a[i]["ir"], c[i]["ir"])
        assert not np.array_equal(a[i]["vi"], a[i]["ir"])
        ir = a[i]["ir"]
        assert ir.max() - np.median(ir) > 0.3  # bright warm objects over a dim background
    with pytest.raises(IndexError):
        a[4]


def test_worker_processes_give_same_stream(synth_h5):
    # One worker process (each costs ~2.5 s to spawn here): the H5 source is pickled into it
    # without its h5py handle and reopens the file there.
    kw = dict(global_batch_size=4, seed=9, num_epochs=2)
    want = [x for x in _iter(synth_h5, **kw)]
    it = _iter(synth_h5, worker_count=1, **kw)
    try:
        got = list(it)
    finally:
        it.close()
    assert len(got) == len(want) == 6
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a["vi"], b["vi"])
        np.testing.assert_array_equal(a["ir"], b["ir"])


def test_cropped_pairs_are_aligned_seeded_crops():
    src = D.SyntheticPairs(4, size=20, seed=3)
    crops = D.CroppedPairs(src, 8, seed=5)
    assert len(crops) == 4
    offsets = set()
    for i in range(4):
        full, rec = src[i], crops[i]
        assert rec["vi"].shape == rec["ir"].shape == (8, 8, 1)
        # the crop is a window of the record, at the same place in both modalities
        hits = [(y, x) for y in range(13) for x in range(13)
                if np.array_equal(full["vi"][y:y + 8, x:x + 8], rec["vi"])
                and np.array_equal(full["ir"][y:y + 8, x:x + 8], rec["ir"])]
        assert hits, f"record {i}: crop is not an aligned window"
        offsets.add(hits[0])
        np.testing.assert_array_equal(D.CroppedPairs(src, 8, seed=5)[i]["vi"], rec["vi"])
    assert len(offsets) > 1  # offsets vary with the record
    assert D.CroppedPairs(src, 20)[1]["vi"].shape == (20, 20, 1)
    with pytest.raises(ValueError, match="larger than record"):
        D.CroppedPairs(src, 21)[0]
