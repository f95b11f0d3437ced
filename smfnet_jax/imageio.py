"""Image reading and writing that reproduces the reference's OpenCV pipeline without OpenCV.

The reference test script reads images with ``cv2.imread(path)`` (``IMREAD_COLOR``: every
file becomes 8-bit, 3-channel BGR, alpha dropped, EXIF orientation applied), converts the
result to ``float32`` and only then calls ``cv2.cvtColor``. So the colour conversions it
relies on are OpenCV's *float* conversions, not its fixed-point uint8 ones:

* GRAY  (infrared / MRI):  ``round(gray)`` with, per pixel,
  ``gray = fma(R, 0.299, fma(B, 0.114, G * 0.587))`` in float32, rounded half to even.
* YCrCb (visible / PET / SPECT): ``Y = fma(B, 0.114, fma(G, 0.587, R * 0.299))`` (not
  rounded), ``Cr = (R - Y) * 0.713 + 128`` and ``Cb = (B - Y) * 0.564 + 128``.

``fma`` is a fused multiply-add (one rounding): that is what OpenCV's SIMD code computes,
and the operation order above was checked bit for bit against opencv-python (5.0, x86-64)
on all 2**24 8-bit colours. OpenCV finishes each row's last ``W mod 8`` pixels with scalar
code that orders the operations differently; there Y may differ by one float32 ulp
(about 1.5e-5 at 255). That never changed a rounded GRAY value on the shared test images. A fused multiply-add on float32 operands is emulated exactly by computing in
float64 and rounding once to float32 (the float64 sum of an 8-bit integer times a float32
constant plus a float32 below 256 is exact).

One deliberate difference: OpenCV's float YCrCb uses a chroma offset of 0.5 (it assumes
float images live in [0, 1]), so the reference's Cr/Cb sit around 0.5 for 0..255 inputs.
The offset cancels in the reference's round trip (it converts back with the same
convention), so here Cr/Cb use the usual offset 128 and :func:`ycrcb_to_rgb` removes 128.

16-bit files: OpenCV (and so the reference) keeps only the high byte of each sample. That is
the default here too, so outputs match the reference; a 16-bit image whose high byte leaves
fewer than :data:`FEW_LEVELS` grey levels (a 12-bit thermal camera's range falls to 16)
raises a :class:`HighByteWarning` once per file, and ``scale16="range"`` scales such an
image by its own min..max to 0..255 instead.

Writing follows ``cv2.imwrite`` of a float image: values are rounded half to even,
saturated to 0..255 and NaN becomes 0 (see :func:`float_to_uint8`).
"""
from __future__ import annotations

import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from smfnet_jax.fileio import atomic_write

__all__ = [
    "ImageReadError",
    "HighByteWarning",
    "SCALE16_MODES",
    "read_image",
    "image_size",
    "reduce16",
    "to_rgb8",
    "is_grey",
    "rgb_to_gray",
    "gray_levels",
    "rgb_to_y",
    "rgb_to_ycrcb",
    "row_blocks",
    "read_gray",
    "read_ycrcb",
    "ycrcb_to_rgb",
    "ycrcb_to_rgb_float",
    "float_to_uint8",
    "write_png",
    "write_npy",
    "IMAGE_EXTENSIONS",
    "image_files",
    "list_images",
    "match_by_stem",
    "natural_key",
]

# Extensions of the image files that fusion, evaluation and preparation look for (any case).
# The reference's dataprocessing.py list, less .npy (its image reader cannot open it).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".dib", ".tif", ".tiff", ".pbm", ".pgm", ".ppm")

# OpenCV's float32 colour-conversion coefficients (colour.hpp / color_yuv.simd.hpp).
_R2Y, _G2Y, _B2Y = np.float32(0.299), np.float32(0.587), np.float32(0.114)
_R2CR, _B2CB = np.float32(0.713), np.float32(0.564)
_CR2R, _CR2G, _CB2G, _CB2B = (np.float32(1.403), np.float32(-0.714),
                              np.float32(-0.344), np.float32(1.773))
_CHROMA_OFFSET = np.float32(128.0)


class ImageReadError(ValueError):
    """An image file is missing, unreadable, corrupt or in an unsupported format."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


# How 16-bit samples become 8-bit: "high" keeps the high byte (OpenCV), "range" stretches the
# image's own min..max to 0..255.
SCALE16_MODES = ("high", "range")
# Fewer grey levels than this in a 16-bit image's high byte earns a HighByteWarning.
FEW_LEVELS = 64


class HighByteWarning(UserWarning):
    """A 16-bit image keeps few grey levels in its high byte (consider scale16="range")."""


_warned_16bit: set[str] = set()  # files already warned about (once per file per process)


# ----------------------------------------------------------------------------- reading

def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file as :func:`read_image` would return it (EXIF
    orientation applied), read from its header without decoding the pixels: a huge image
    can be refused before it takes any memory. Raises :class:`ImageReadError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        with Image.open(path) as im:  # lazy: reads the header only
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(path, f"not a readable image ({type(e).__name__}: {e})") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8 transpose the image


def reduce16(image: np.ndarray, scale16: str = "high", path=None) -> np.ndarray:
    """A uint16 image as uint8; other images are returned unchanged.

    scale16="high": the high byte (``>> 8``), as OpenCV; warns (:class:`HighByteWarning`,
    once per `path`) when that leaves fewer than :data:`FEW_LEVELS` grey levels.
    scale16="range": ``round((x - min) / (max - min) * 255)``; a constant image keeps its
    high byte (there is no range to stretch).
    """
    if scale16 not in SCALE16_MODES:
        raise ValueError(f"scale16 must be one of {SCALE16_MODES}, got {scale16!r}")
    image = np.asarray(image)
    if image.dtype != np.uint16:
        return image
    high = (image >> 8).astype(np.uint8)
    if scale16 == "range":
        lo, hi = int(image.min()), int(image.max())
        if hi > lo:
            scaled = (image.astype(np.float32) - lo) * np.float32(255.0 / (hi - lo))
            return np.rint(scaled).astype(np.uint8)
        return high
    levels = int(np.count_nonzero(np.bincount(high.ravel(), minlength=256)))
    key = str(path)
    if levels < FEW_LEVELS and key not in _warned_16bit:
        _warned_16bit.add(key)
        lo, hi = int(image.min()), int(image.max())
        warnings.warn(HighByteWarning(
            f"{path}: 16-bit image with values {lo}..{hi}; its high byte (what OpenCV keeps, "
            f"the default) leaves only {levels} grey levels; scale by its own range instead "
            "with --scale16 range (imageio: scale16='range')"), stacklevel=2)
    return high


def read_image(path, scale16: str | None = None) -> np.ndarray:
    """Decode an image file into its pixels.

    Returns HxW (grey) or HxWx3 (RGB order) with dtype uint8, or uint16 for 16-bit grey
    files. Alpha is dropped (not composited, as ``cv2.IMREAD_COLOR`` does), palettes are
    expanded and the EXIF orientation is applied (as ``cv2.imread`` does by default).
    16-bit colour files arrive as uint8 holding the high byte of each sample: that is how
    pillow decodes them, and how OpenCV reads 16-bit colour PNGs. Only the first frame of
    a multi-frame file is read. Any failure raises :class:`ImageReadError` naming the file.
    scale16: None returns 16-bit grey as uint16; "high" or "range" returns uint8 made by
    :func:`reduce16` (which warns when "high" leaves few grey levels).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    try:
        with Image.open(path) as im:
            im.load()  # force a full decode so truncated/corrupt data fails here
            if im.getexif().get(0x0112, 1) != 1:  # exif_transpose copies even when upright
                im = ImageOps.exif_transpose(im)
            arr = _pil_to_array(im, path)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL.UnidentifiedImageError is an OSError; truncated files raise OSError on load().
        raise ImageReadError(path, f"not a readable image ({type(e).__name__}: {e})") from e
    return arr if scale16 is None else reduce16(arr, scale16, path)


def _pil_to_array(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "RGB", "RGBA", "RGBX"):
        arr = _blockwise_array(im, 3 if mode != "L" else None)  # alpha dropped, not premultiplied
    elif mode == "1":
        arr = np.asarray(im.convert("L"))  # 0/255, as libpng expands 1-bit grey
    elif mode == "LA":
        arr = np.asarray(im.getchannel("L"))  # drop alpha without premultiplying
    elif mode in ("P", "PA"):
        base = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        arr = np.asarray(base)[..., :3]
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(im.convert("RGB"))
    elif mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.dtype != np.uint16:
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise ImageReadError(path, f"32-bit integer pixels outside 0..65535 (mode {mode})")
            arr = arr.astype(np.uint16)
        else:
            arr = arr.astype(np.uint16, copy=False)  # native byte order
    else:
        raise ImageReadError(path, f"unsupported pixel format (PIL mode {mode!r})")
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(path, f"unexpected image shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _blockwise_array(im: Image.Image, channels: int | None) -> np.ndarray:
    """The pixels of an 8-bit L/RGB/RGBA image as a numpy array (the first `channels`
    bands), copied a block of rows (row_blocks) at a time: np.asarray(im) would go through
    im.tobytes(), two more image-sized buffers beside pillow's own 4 bytes per pixel."""
    w, h = im.size
    arr = np.empty((h, w) if channels is None else (h, w, channels), np.uint8)
    for rows in row_blocks(h, w):
        block = np.asarray(im.crop((0, rows.start, w, rows.stop)))
        arr[rows] = block if channels is None else block[..., :channels]
    return arr


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """As ``cv2.imread(IMREAD_COLOR)`` sees it: 8-bit, 3 channels (RGB order here).

    16-bit samples keep their high byte (``>> 8``, what OpenCV does for 16-bit PNGs and
    grey TIFFs); grey is repeated into three channels.
    """
    image = np.asarray(image)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected HxW or HxWx3, got shape {image.shape}")
    return image


def is_grey(image: np.ndarray) -> bool:
    """True for a 1-channel image or a 3-channel one whose channels are all equal."""
    image = np.asarray(image)
    if image.ndim == 2:
        return True
    for rows in row_blocks(*image.shape[:2]):  # block by block: no image-sized temporaries
        block = image[rows]
        if not (np.array_equal(block[..., 0], block[..., 1])
                and np.array_equal(block[..., 0], block[..., 2])):
            return False
    return True


# Colour conversions, decoding and rendering of a large image work on blocks of rows of about
# this many pixels, so that their temporaries (~45 bytes per pixel of the block for the float
# colour conversions) grow with the block, not the image (a 12000x12000 pair).
BLOCK_PIXELS = 1 << 18


def row_blocks(height: int, width: int) -> list[slice]:
    """Consecutive row slices covering `height` rows of `width` pixels, ~BLOCK_PIXELS each."""
    rows = max(1, BLOCK_PIXELS // max(width, 1))
    return [slice(y, min(y + rows, height)) for y in range(0, height, rows)]


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add, emulated with one float64 rounding step."""
    return (np.asarray(a, np.float64) * np.float64(b) + np.asarray(c, np.float64)).astype(np.float32)


def _channels_f32(image: np.ndarray):
    rgb = to_rgb8(image).astype(np.float32)
    return rgb[..., 0], rgb[..., 1], rgb[..., 2]


def rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """Grey levels 0..255 (float32, integer-valued), as the reference's cv2 GRAY read.

    ``round(cvtColor(float32(BGR), BGR2GRAY))``, rounding half to even like ``np.round``.
    """
    r, g, b = _channels_f32(image)
    gray = _fma(r, _R2Y, _fma(b, _B2Y, g * _G2Y))
    return np.round(gray).astype(np.float32)


def gray_levels(image: np.ndarray) -> np.ndarray:
    """:func:`rgb_to_gray` as uint8 (its values are whole numbers in 0..255), computed block
    by block: 1 byte per pixel where rgb_to_gray's float temporaries take ~40."""
    image = np.asarray(image)
    out = np.empty(image.shape[:2], np.uint8)
    for rows in row_blocks(*image.shape[:2]):
        out[rows] = rgb_to_gray(image[rows]).astype(np.uint8)
    return out


def _luma(r, g, b) -> np.ndarray:
    return _fma(b, _B2Y, _fma(g, _G2Y, r * _R2Y))


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """HxW float32 Y of :func:`rgb_to_ycrcb` (the same value), without Cr and Cb."""
    return _luma(*_channels_f32(image))


def rgb_to_ycrcb(image: np.ndarray) -> np.ndarray:
    """HxWx3 float32 (Y, Cr, Cb), OpenCV's float conversion with chroma offset 128.

    Y is not rounded (the reference feeds the unrounded Y to the network).
    """
    r, g, b = _channels_f32(image)
    y = _luma(r, g, b)
    cr = _fma(r - y, _R2CR, np.full_like(y, _CHROMA_OFFSET))
    cb = _fma(b - y, _B2CB, np.full_like(y, _CHROMA_OFFSET))
    return np.stack([y, cr, cb], axis=-1)


def read_gray(path, scale16: str = "high") -> np.ndarray:
    """Read a file as the reference's ``image_read_cv2(path, 'GRAY')``: float32 HxW, 0..255.
    scale16: how 16-bit samples become 8-bit (:func:`reduce16`)."""
    return rgb_to_gray(read_image(path, scale16))


def read_ycrcb(path, scale16: str = "high") -> np.ndarray:
    """Read a file as float32 HxWx3 (Y, Cr, Cb) in 0..255 (see :func:`rgb_to_ycrcb`).
    scale16: how 16-bit samples become 8-bit (:func:`reduce16`)."""
    return rgb_to_ycrcb(read_image(path, scale16))


def ycrcb_to_rgb(ycrcb: np.ndarray) -> np.ndarray:
    """(Y, Cr, Cb) float -> uint8 RGB, as the reference's ``cvtColor(YCrCb2BGR)`` + ``imwrite``."""
    return float_to_uint8(ycrcb_to_rgb_float(ycrcb))


def ycrcb_to_rgb_float(ycrcb: np.ndarray) -> np.ndarray:
    """(Y, Cr, Cb) float -> float32 RGB, OpenCV's float formula (same fused multiply-adds)."""
    ycrcb = np.asarray(ycrcb, np.float32)
    if ycrcb.ndim != 3 or ycrcb.shape[-1] != 3:
        raise ValueError(f"expected HxWx3 (Y, Cr, Cb), got shape {ycrcb.shape}")
    y = ycrcb[..., 0]
    cr = ycrcb[..., 1] - _CHROMA_OFFSET
    cb = ycrcb[..., 2] - _CHROMA_OFFSET
    r = _fma(cr, _CR2R, y)
    g = _fma(cr, _CR2G, _fma(cb, _CB2G, y))
    b = _fma(cb, _CB2B, y)
    return np.stack([r, g, b], axis=-1)


def float_to_uint8(x: np.ndarray) -> np.ndarray:
    """As ``cv2.imwrite`` stores a float image: round half to even, saturate, NaN -> 0."""
    x = np.nan_to_num(np.asarray(x, np.float32), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writing

def write_png(path, image: np.ndarray) -> Path:
    """Atomically write an HxW (grey) or HxWx3 (RGB) uint8 array as an 8-bit PNG.

    Encoded here, block of rows by block of rows (zlib level 6, each row's filter chosen
    by the PNG specification's minimum-sum-of-absolute-differences heuristic, as libpng and
    pillow do): the encoder holds a few blocks, never a copy of the image (pillow's holds
    4 bytes per pixel for RGB). Any PNG reader decodes exactly `image`."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"write_png expects uint8 pixels, got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)) or 0 in image.shape:
        raise ValueError(f"write_png expects a non-empty HxW or HxWx3, got shape {image.shape}")
    return atomic_write(path, lambda f: _encode_png(f, image))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IDAT_BYTES = 1 << 20  # compressed bytes per IDAT chunk


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _encode_png(f, image: np.ndarray) -> None:
    h, w = image.shape[:2]
    bpp = 1 if image.ndim == 2 else 3  # bytes per pixel
    f.write(_PNG_SIGNATURE)
    # IHDR: width, height, bit depth 8, colour type 0 (grey) or 2 (RGB), deflate, filter 0, no interlace
    f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if bpp == 1 else 2, 0, 0, 0)))
    deflate = zlib.compressobj(6)
    pending = bytearray()
    above = np.zeros(w * bpp, np.uint8)  # the row before the first is zero (PNG spec)
    for rows in row_blocks(h, w):
        block = np.ascontiguousarray(image[rows]).reshape(-1, w * bpp)
        pending += deflate.compress(_filter_rows(block, above, bpp))
        above = block[-1]
        while len(pending) >= _IDAT_BYTES:
            f.write(_png_chunk(b"IDAT", bytes(pending[:_IDAT_BYTES])))
            del pending[:_IDAT_BYTES]
    pending += deflate.flush()
    f.write(_png_chunk(b"IDAT", bytes(pending)))
    f.write(_png_chunk(b"IEND", b""))


def _filter_rows(block: np.ndarray, above: np.ndarray, bpp: int) -> bytes:
    """Scanlines of `block` (rows x bytes, uint8), each prefixed by the PNG filter type that
    minimises the sum of its bytes read as signed; `above` is the row before the block."""
    x = block.astype(np.int16)
    b = np.concatenate([above[None].astype(np.int16), x[:-1]])  # the byte above
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]  # the byte one pixel to the left
    c = np.zeros_like(x)
    c[:, bpp:] = b[:, :-bpp]  # above and to the left
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    candidates = np.stack([x, x - a, x - b, x - ((a + b) >> 1), x - paeth]) & 0xFF
    cost = np.minimum(candidates, 256 - candidates).sum(axis=2, dtype=np.int64)  # |byte as int8|
    best = np.argmin(cost, axis=0)  # ties: the lower filter type, as libpng
    rows = np.arange(x.shape[0])
    out = np.empty((x.shape[0], x.shape[1] + 1), np.uint8)
    out[:, 0] = best
    out[:, 1:] = candidates[best, rows]
    return out.tobytes()


def write_npy(path, array: np.ndarray) -> Path:
    """Atomically write an array as a .npy file."""
    array = np.asarray(array)
    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


# --------------------------------------------------------------------------- folders of pairs
def natural_key(stem: str):
    """Sort '2' before '10' (TNO and RoadScene names are numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", stem) if t]


def image_files(folder) -> list[Path]:
    """The image files at the top level of `folder`, sorted: IMAGE_EXTENSIONS, any case;
    hidden files and sub-folders skipped; a broken link is kept, so that reading it reports
    the problem. What the CLIs read, and so what no output may replace."""
    return [p for p in sorted(Path(folder).iterdir())
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]


def list_images(folder) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """{stem: path} of the `image_files` of `folder`, and (stem, reason) for every stem that
    several files share."""
    folder = Path(folder)
    by_stem: dict[str, list[Path]] = {}
    for p in image_files(folder):
        by_stem.setdefault(p.stem, []).append(p)
    images, problems = {}, []
    for stem, paths in by_stem.items():
        if len(paths) == 1:
            images[stem] = paths[0]
        else:
            problems.append((stem, f"several files share this name in {folder}: "
                                   f"{', '.join(p.name for p in paths)}"))
    return images, problems


def match_by_stem(folders: dict[str, Path]) -> tuple[list[tuple[str, dict[str, Path]]],
                                                     list[tuple[str, str]]]:
    """Match image files across folders by file stem (`01.png` with `01.jpg`).

    `folders` maps a role ("ir", "vi", "fused", ...) to a folder. Returns `matches`, a list
    of (stem, {role: path}) for every stem found exactly once in every folder, and
    `problems`, (stem, reason) for every other stem: several files with that stem in one
    folder, or no file in another (the reason names the folders and the files found). Both
    lists are in natural order of the stems (2 before 10). Fusion, evaluation and patch
    preparation all pair their inputs with this.
    """
    found, problems = {}, []
    for role, folder in folders.items():
        found[role], duplicates = list_images(folder)
        problems += duplicates
    ambiguous = {stem for stem, _ in problems}
    matches = []
    for stem in set().union(*found.values()) - ambiguous:
        missing = [role for role in folders if stem not in found[role]]
        if missing:
            have = ", ".join(str(found[r][stem]) for r in folders if r not in missing)
            where = " and ".join(f"the {r} folder {folders[r]}" for r in missing)
            problems.append((stem, f"no file in {where} (found {have})"))
        else:
            matches.append((stem, {role: found[role][stem] for role in folders}))
    matches.sort(key=lambda m: natural_key(m[0]))
    problems.sort(key=lambda p: natural_key(p[0]))
    return matches, problems
