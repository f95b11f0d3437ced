"""smfnet_jax.imageio: decoding, the reference's cv2 colour conversions, atomic writes.

The expected numbers below come from opencv-python 5.0 (``cvtColor`` on float32 BGR, and
``imwrite`` of float images), run outside the project: they are independent of the code
under test. Pixels were chosen where a plain (non-fused) multiply-add, the uint8 fixed-point
formula, or round-half-up would give a different answer.
"""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from smfnet_jax import imageio as io

F32 = np.float32


def _rgb(*pixels):
    return np.array([pixels], np.uint8)  # 1 x N x 3


# --------------------------------------------------------------------- GRAY / YCrCb formulas

def test_gray_matches_opencv_float_path_and_rounds_half_to_even():
    pixels = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (10, 200, 30),
              (188, 2, 1),    # cv2 float gray 57.5 -> 58; a plain float sum gives 57.49.. -> 57
              (194, 118, 2),  # 127.49999 -> 127; a plain float sum rounds to 128
              (252, 252, 2),  # 223.49998 -> 223; a plain float sum rounds to 224
              (187, 1, 0),    # exactly 56.5 -> 56 (half to even); cv2's uint8 path gives 57
              (248, 4, 0),    # exactly 76.5 -> 76; cv2's uint8 path gives 77
              (57, 11, 0),    # exactly 23.5 -> 24
              (175, 2, 0)]    # 53.499 -> 53; cv2's uint8 path gives 54
    expected = [76, 150, 29, 255, 124, 58, 127, 223, 56, 76, 24, 53]
    got = io.rgb_to_gray(_rgb(*pixels))
    assert got.dtype == np.float32 and got.shape == (1, len(pixels))
    np.testing.assert_array_equal(got[0], np.array(expected, np.float32))


def test_ycrcb_matches_opencv_float_path():
    # (R, G, B) -> cv2 float32 (Y, Cr', Cb') where cv2 uses the chroma offset 0.5.
    table = {
        (3, 5, 0): ("0x1.ea7efap+1", "-0x1.7dd012p-4", "-0x1.a9478ep+0"),
        (88, 119, 73): ("0x1.a1f2b0p+6", "-0x1.682adap+3", "-0x1.142382p+4"),
        (143, 80, 145): ("0x1.a8fceep+6", "0x1.ab4738p+4", "0x1.65b502p+4"),
        (157, 64, 209): ("0x1.b15916p+6", "0x1.1992e2p+5", "0x1.ca3104p+5"),
        (255, 0, 0): ("0x1.30fae0p+6", "0x1.ffcf2cp+6", "-0x1.540476p+5"),
        (10, 200, 30): ("0x1.ef3d70p+6", "-0x1.42960cp+6", "-0x1.a3454ep+5"),
        (255, 255, 255): ("0x1.fe0000p+7", "0x1.000000p-1", "0x1.000000p-1"),
    }
    got = io.rgb_to_ycrcb(_rgb(*table))[0]
    assert got.dtype == np.float32
    for (rgb, (y, cr, cb)), out in zip(table.items(), got):
        assert out[0] == F32(float.fromhex(y)), rgb  # Y bit for bit
        # Cr/Cb use offset 128 here, 0.5 in cv2's float path: equal up to float32 rounding.
        assert abs(out[1] - (float.fromhex(cr) + 127.5)) <= 2 ** -15, rgb
        assert abs(out[2] - (float.fromhex(cb) + 127.5)) <= 2 ** -15, rgb
    assert got[-1, 1] == 128.0 and got[-1, 2] == 128.0


def test_ycrcb_to_rgb_float_matches_opencv():
    # cv2 inputs (Y, Cr', Cb') with offset 0.5, chosen so Cr'+127.5 is exact -> outputs (R, G, B).
    cases = [
        ((100.3, 30.25, -20.125), ("0x1.1c1418p+7", "0x1.589d30p+6", "0x1.fddae2p+5")),
        ((17.7, -60.5, 90.75), ("-0x1.0f8830p+6", "0x1.e353f6p+4", "0x1.636d30p+7")),
        ((240.01, 0.5, 0.5), ("0x1.e0051ep+7", "0x1.e0051ep+7", "0x1.e0051ep+7")),
        ((128.123, 99.0625, -101.375), ("0x1.0a67fcp+8", "0x1.732d70p+6", "-0x1.a402d0p+5")),
    ]
    ycrcb = np.array([[(y, cr + 127.5, cb + 127.5) for (y, cr, cb), _ in cases]], np.float32)
    got = io.ycrcb_to_rgb_float(ycrcb)[0]
    for out, (_, rgb) in zip(got, cases):
        np.testing.assert_array_equal(out, np.array([float.fromhex(v) for v in rgb], np.float32))
    # uint8 output: as cv2.imwrite stores these floats (rounded, saturated)
    np.testing.assert_array_equal(io.ycrcb_to_rgb(ycrcb)[0],
                                  [[142, 86, 64], [0, 30, 178], [240, 240, 240], [255, 93, 0]])


def test_float_to_uint8_like_cv2_imwrite():
    x = np.array([0.5, 1.5, 2.5, -3, 300, 254.5, 253.5, np.nan, 3.4999, 100.50001], np.float32)
    # read back from cv2.imwrite of the same float32 array
    np.testing.assert_array_equal(io.float_to_uint8(x), [0, 2, 2, 0, 255, 254, 254, 0, 3, 101])


def test_colour_round_trip_is_close():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    back = io.ycrcb_to_rgb(io.rgb_to_ycrcb(rgb))
    assert np.abs(back.astype(int) - rgb).max() <= 1  # the 0.713/1.403 pair is not exact


def test_grey_input_is_identity_for_gray():
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(io.rgb_to_gray(g), g.astype(np.float32))
    np.testing.assert_array_equal(io.rgb_to_gray(np.repeat(g[..., None], 3, -1)), g)
    assert np.abs(io.rgb_to_ycrcb(g)[..., 0] - g).max() < 1e-4


def test_to_rgb8_keeps_high_byte_of_16_bit():
    x = np.array([[0, 255, 256, 0x1234, 0xFFFF]], np.uint16)
    np.testing.assert_array_equal(io.to_rgb8(x)[..., 0], [[0, 0, 1, 0x12, 255]])
    assert io.to_rgb8(x).shape == (1, 5, 3)


def test_is_grey():
    a = np.zeros((4, 5), np.uint8)
    assert io.is_grey(a) and io.is_grey(np.stack([a, a, a], -1))
    b = np.stack([a, a, a], -1)
    b[2, 3, 1] = 1
    assert not io.is_grey(b)


# --------------------------------------------------------------------- decoding files

@pytest.fixture
def pixels():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "tiff", "PNG"])
def test_lossless_rgb_and_grey(tmp_path, pixels, ext):
    p = tmp_path / f"c.{ext}"
    Image.fromarray(pixels).save(p)
    got = io.read_image(p)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, pixels)
    q = tmp_path / f"g.{ext}"
    Image.fromarray(pixels[..., 0]).save(q)
    np.testing.assert_array_equal(io.read_image(q), pixels[..., 0])


def test_alpha_dropped_not_premultiplied(tmp_path, pixels):
    alpha = np.full(pixels.shape[:2], 7, np.uint8)
    Image.fromarray(np.dstack([pixels, alpha])).save(tmp_path / "a.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.png"), pixels)
    Image.fromarray(np.dstack([pixels[..., 0], alpha])).save(tmp_path / "la.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "la.png"), pixels[..., 0])


def test_palette_and_bilevel(tmp_path, pixels):
    pal = Image.fromarray(pixels).quantize(colors=16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    bits = pixels[..., 0] > 127
    Image.fromarray(bits).save(tmp_path / "b.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "b.png"), bits.astype(np.uint8) * 255)


def test_16_bit_grey_png_and_tiff(tmp_path):
    x = np.random.default_rng(2).integers(0, 65536, (7, 11)).astype(np.uint16)
    for name in ("g16.png", "g16.tif"):
        Image.fromarray(x).save(tmp_path / name)
        got = io.read_image(tmp_path / name)
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, x)
        np.testing.assert_array_equal(io.read_gray(tmp_path / name), (x >> 8).astype(np.float32))


def _png_rgb16(path, arr16):
    """Minimal 16-bit RGB PNG writer (pillow cannot write one)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_colour_png_keeps_high_byte(tmp_path):
    x = np.random.default_rng(3).integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    _png_rgb16(tmp_path / "c16.png", x)
    got = io.read_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(got, (x >> 8).astype(np.uint8))  # what cv2.imread gives


def test_jpeg_grey_and_colour_and_exif_orientation(tmp_path, pixels):
    Image.fromarray(pixels[..., 0]).save(tmp_path / "g.jpg", quality=95)
    g = io.read_image(tmp_path / "g.jpg")
    assert g.shape == pixels.shape[:2] and g.dtype == np.uint8
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed (cv2.imread applies it)
    img.save(tmp_path / "r.JPEG", exif=exif, quality=95)
    assert io.read_image(tmp_path / "r.JPEG").shape == (13, 9, 3)


def test_read_gray_and_ycrcb_of_files(tmp_path, pixels):
    Image.fromarray(pixels).save(tmp_path / "c.png")
    np.testing.assert_array_equal(io.read_gray(tmp_path / "c.png"), io.rgb_to_gray(pixels))
    np.testing.assert_array_equal(io.read_ycrcb(tmp_path / "c.png"), io.rgb_to_ycrcb(pixels))


# --------------------------------------------------------------------- errors

def _valid_png_bytes(tmp_path, pixels):
    Image.fromarray(np.tile(pixels, (8, 8, 1))).save(tmp_path / "ok.png")
    return (tmp_path / "ok.png").read_bytes()


def test_errors_name_the_file(tmp_path, pixels):
    good = _valid_png_bytes(tmp_path, pixels)
    cases = {
        "missing.png": None,
        "empty.png": b"",
        "garbage.jpg": b"this is not an image at all" * 10,
        "truncated.png": good[: len(good) // 2],
    }
    corrupt = bytearray(good)
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 20: idat + 60] = b"\xff" * 40
    cases["corrupt.png"] = bytes(corrupt)
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(io.ImageReadError) as e:
            io.read_image(tmp_path / name)
        assert name in str(e.value) and e.value.reason
        assert isinstance(e.value, ValueError)
    with pytest.raises(io.ImageReadError, match="not a regular file"):
        io.read_image(tmp_path)


def test_truncated_jpeg_is_an_error(tmp_path, pixels):
    Image.fromarray(np.tile(pixels, (10, 10, 1))).save(tmp_path / "a.jpg", quality=95)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(io.ImageReadError, match="t.jpg"):
        io.read_image(tmp_path / "t.jpg")


def test_unsupported_float_tiff(tmp_path):
    Image.fromarray(np.zeros((3, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(io.ImageReadError, match="unsupported"):
        io.read_image(tmp_path / "f.tif")


# --------------------------------------------------------------------- writing

def test_write_png_and_npy(tmp_path, pixels):
    io.write_png(tmp_path / "c.png", pixels)
    io.write_png(tmp_path / "g.png", pixels[..., 1])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c.png")), pixels)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), pixels[..., 1])
    arr = np.random.default_rng(4).random((3, 5), dtype=np.float32)
    io.write_npy(tmp_path / "x.npy", arr)
    got = np.load(tmp_path / "x.npy")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "g.png", "x.npy"]
    (tmp_path / "plain").write_bytes(b"")  # outputs get the permissions of any new file
    assert (tmp_path / "c.png").stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("shape", [(1, 1), (1, 5, 3), (3, 7), (300, 5, 3), (17, 1), (2, 1, 3), (70, 41)])
def test_png_encoder_round_trips_through_pillow(tmp_path, shape, monkeypatch):
    """Our streaming encoder (all five filter types, several IDAT chunks, blocks of one row)
    decodes to exactly the pixels, grey and RGB, with any width."""
    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(0, 256, shape, dtype=np.uint8)
    y, x = np.mgrid[:shape[0], :shape[1]]
    smooth = ((x * 3 + y * 5) % 256).astype(np.uint8)
    smooth = smooth if len(shape) == 2 else np.stack([smooth, smooth[::-1], 255 - smooth], -1)
    monkeypatch.setattr(io, "BLOCK_PIXELS", 7)  # several blocks even for small images
    monkeypatch.setattr(io, "_IDAT_BYTES", 64)
    for name, pixels in (("noise", noise), ("smooth", smooth)):
        io.write_png(tmp_path / f"{name}.png", pixels)
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.mode == ("L" if len(shape) == 2 else "RGB")
            np.testing.assert_array_equal(np.asarray(im), pixels)


def test_png_filters_each_row_by_the_least_signed_sum():
    """A row that is a ramp picks Sub (1), a row equal to the one above picks Up (2)."""
    ramp = np.arange(0, 64, 2, dtype=np.uint8)[None]
    block = np.concatenate([ramp, ramp])
    raw = np.frombuffer(io._filter_rows(block, np.zeros(32, np.uint8), 1), np.uint8).reshape(2, 33)
    assert list(raw[:, 0]) == [1, 2]
    assert list(raw[0, 1:4]) == [0, 2, 2] and not raw[1, 1:].any()


def test_write_png_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError):
        io.write_png(tmp_path / "a.png", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError):
        io.write_png(tmp_path / "a.png", np.zeros((3, 4, 2), np.uint8))
    with pytest.raises(ValueError):
        io.write_png(tmp_path / "a.png", np.zeros((0, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, pixels, monkeypatch):
    target = tmp_path / "c.png"
    io.write_png(target, pixels)
    before = target.read_bytes()

    def broken_deflate(level):  # fails once the signature and IHDR are written
        raise OSError("disk full")

    monkeypatch.setattr(io.zlib, "compressobj", broken_deflate)
    with pytest.raises(OSError, match="disk full"):
        io.write_png(target, pixels[::-1])
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]


# --------------------------------------------------------------------- real data

def test_reference_fixture_inputs_are_reproduced(shared_dir):
    """reference.npz holds the reference's own ir (cv2 GRAY) and vi (cv2 Y) inputs / 255:
    centre 40x56 crops of TNO pairs 01 and 02."""
    ref = np.load(shared_dir / "fixtures" / "parity" / "reference.npz")
    for i, name in enumerate(["01", "02"]):
        ir = io.read_gray(shared_dir / "data" / "TNO" / "ir" / f"{name}.png") / F32(255.0)
        vi = io.read_ycrcb(shared_dir / "data" / "TNO" / "vi" / f"{name}.png")[..., 0] / F32(255.0)
        h, w = ref["ir"].shape[2:]
        top, left = (ir.shape[0] - h) // 2, (ir.shape[1] - w) // 2
        np.testing.assert_array_equal(ir[top:top + h, left:left + w], ref["ir"][i, 0])
        np.testing.assert_array_equal(vi[top:top + h, left:left + w], ref["vi"][i, 0])


def test_real_files(shared_dir):
    data = shared_dir / "data"
    tno = io.read_image(data / "TNO" / "vi" / "01.png")
    assert tno.ndim == 3 and io.is_grey(tno)  # grey stored as RGB
    rs_ir = io.read_image(data / "RoadScene" / "ir" / "FLIR_00977.jpg")
    rs_vi = io.read_image(data / "RoadScene" / "vi" / "FLIR_00977.jpg")
    assert rs_ir.ndim == 2 and rs_vi.ndim == 3 and rs_ir.shape == rs_vi.shape[:2]
    pet = io.read_image(data / "MRI_PET" / "PET" / "11.png")
    assert pet.shape == (256, 256, 3) and not io.is_grey(pet)
    with pytest.raises(io.ImageReadError, match="00085D.png"):  # corrupt in the shared sample
        io.read_image(data / "MSRS_sample" / "ir" / "00085D.png")


def test_match_by_stem_one_rule_for_every_command(tmp_path):
    """Fusion, evaluation and preparation pair their folders with this one function."""
    dirs = {role: tmp_path / role for role in ("ir", "vi", "fused")}
    for d in dirs.values():
        d.mkdir()
    for stem in ("10", "2", "x"):
        for d in dirs.values():
            (d / f"{stem}.png").write_bytes(b"")
    (dirs["vi"] / "x.png").rename(dirs["vi"] / "x.JPG")      # any extension case, any format
    (dirs["ir"] / "dup.png").write_bytes(b"")
    (dirs["ir"] / "dup.bmp").write_bytes(b"")
    (dirs["vi"] / "dup.png").write_bytes(b"")
    (dirs["fused"] / "dup.png").write_bytes(b"")
    (dirs["ir"] / "lonely.tif").write_bytes(b"")
    (dirs["ir"] / ".hidden.png").write_bytes(b"")
    (dirs["ir"] / "notes.txt").write_bytes(b"")
    (dirs["ir"] / "sub.png").mkdir()                           # a folder is not an image
    matches, problems = io.match_by_stem(dirs)
    assert [stem for stem, _ in matches] == ["2", "10", "x"]  # natural order
    assert matches[2][1] == {"ir": dirs["ir"] / "x.png", "vi": dirs["vi"] / "x.JPG",
                             "fused": dirs["fused"] / "x.png"}
    assert problems == [
        ("dup", f"several files share this name in {dirs['ir']}: dup.bmp, dup.png"),
        ("lonely", f"no file in the vi folder {dirs['vi']} and the fused folder {dirs['fused']} "
                   f"(found {dirs['ir'] / 'lonely.tif'})"),
    ]


# --------------------------------------------------------------------- 16-bit scaling, headers

def test_16_bit_high_byte_warns_once_per_file_and_range_scales(tmp_path):
    twelve_bit = np.linspace(0, 4095, 20 * 30).reshape(20, 30).astype(np.uint16)
    p = tmp_path / "thermal.png"
    Image.fromarray(twelve_bit).save(p)
    with Image.open(p) as im:  # a 16-bit file (pillow 10.0 opens it as 32-bit "I")
        assert im.mode in ("I;16", "I") and np.asarray(im).max() == 4095
    with pytest.warns(io.HighByteWarning, match=r"thermal\.png.*0\.\.4095.*only 16 grey levels"):
        high = io.read_gray(p)
    np.testing.assert_array_equal(high, (twelve_bit >> 8).astype(np.float32))  # OpenCV's result
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # a second read of the same file: no warning,
        io.read_gray(p)
        assert io.read_image(p).dtype == np.uint16  # nor for the raw samples
        ranged = io.read_image(p, scale16="range")
    assert ranged.dtype == np.uint8 and ranged.min() == 0 and ranged.max() == 255
    np.testing.assert_array_equal(ranged, np.rint(twelve_bit.astype(np.float64) * 255 / 4095))
    full = np.random.default_rng(0).integers(0, 65536, (64, 64)).astype(np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # a full-range 16-bit image keeps enough levels
        io.reduce16(full, "high", "full.png")
    np.testing.assert_array_equal(io.reduce16(np.full((3, 3), 0x1234, np.uint16), "range"), 0x12)
    with pytest.raises(ValueError, match="scale16"):
        io.reduce16(full, "low")


def test_image_size_reads_the_header_only(tmp_path):
    p = tmp_path / "s.png"
    Image.fromarray(np.zeros((7, 13), np.uint8)).save(p)
    assert io.image_size(p) == (13, 7)
    rotated = Image.fromarray(np.zeros((7, 13, 3), np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display: read_image returns 13x7 -> 7x13
    rotated.save(tmp_path / "r.jpg", exif=exif)
    assert io.image_size(tmp_path / "r.jpg") == tuple(io.read_image(tmp_path / "r.jpg").shape[1::-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(io.ImageReadError, match="bad.png"):
        io.image_size(tmp_path / "bad.png")
    with pytest.raises(io.ImageReadError, match="no such file"):
        io.image_size(tmp_path / "missing.png")


def test_block_by_block_conversions_equal_whole_image_ones(tmp_path, monkeypatch):
    """gray_levels, rgb_to_y, is_grey and decoding (L, RGB, RGBA) work in row blocks on a
    huge image; the result must not depend on the block size."""
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    monkeypatch.setattr(io, "BLOCK_PIXELS", 5 * 23)
    np.testing.assert_array_equal(io.gray_levels(rgb), io.rgb_to_gray(rgb).astype(np.uint8))
    np.testing.assert_array_equal(io.rgb_to_y(rgb), io.rgb_to_ycrcb(rgb)[..., 0])
    grey3 = np.repeat(rgb[..., :1], 3, axis=-1)
    assert io.is_grey(grey3) and not io.is_grey(rgb)
    grey3[-1, -1, 2] ^= 1  # one differing value in the last block
    assert not io.is_grey(grey3)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 23, 1), dtype=np.uint8)], axis=-1)
    for name, pixels, expect in (("l.png", rgb[..., 0], rgb[..., 0]), ("rgb.png", rgb, rgb),
                                 ("rgba.png", rgba, rgb)):
        Image.fromarray(pixels).save(tmp_path / name)
        np.testing.assert_array_equal(io.read_image(tmp_path / name), expect)
