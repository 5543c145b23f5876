"""Decoding and preprocessing: parity with the model's own processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from itrcli.ingest.images import DRAFT_TOLERANCE, DecodeError, Preprocess, decode_file, open_image


def photo(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)),
                     ((x + y) * 127 // max(w + h - 2, 1))], -1)
    arr = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def processor_pixels(proc, img):
    return np.asarray(proc(images=img, return_tensors="np")["pixel_values"][0])


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (225, 224), (300, 1000), (100, 80)])
def test_clip_preprocessing_equals_the_processor(clip_processor, size):
    img = photo(*size, seed=size[0])
    prep = Preprocess.from_config(clip_processor.to_dict())
    ours = prep(img)
    ref = processor_pixels(clip_processor, img)
    assert ours.shape == ref.shape == (3, 224, 224)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_siglip_preprocessing_equals_the_processor():
    from transformers import SiglipImageProcessorPil

    proc = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    prep = Preprocess.from_config(proc.to_dict())
    img = photo(200, 120, seed=3)
    np.testing.assert_allclose(prep(img), processor_pixels(proc, img), atol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK"])
def test_modes_convert_like_the_processor(clip_processor, mode):
    img = photo(120, 90, seed=7, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    decoded, meta = open_image(buf.getvalue())
    assert decoded.mode == "RGB" and (meta.width, meta.height) == (120, 90)
    prep = Preprocess.from_config(clip_processor.to_dict())
    ref = processor_pixels(clip_processor, Image.open(io.BytesIO(buf.getvalue())))
    np.testing.assert_allclose(prep(decoded), ref, atol=1e-5)


def test_exif_orientation_is_applied(tmp_path):
    img = photo(300, 200, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    exif[0x0110] = "TestCam 1"
    p = tmp_path / "r.jpg"
    img.save(p, exif=exif, quality=95)
    pixels, meta, _ = decode_file(str(p), None, draft=False)
    assert (meta.width, meta.height) == (200, 300)
    assert meta.camera == "TestCam 1"
    decoded, _ = open_image(p.read_bytes())
    assert decoded.size == (200, 300)
    # same pixels as the processor fed an already-rotated image
    from PIL import ImageOps
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    prep = Preprocess.from_config(proc.to_dict())
    ref = processor_pixels(proc, ImageOps.exif_transpose(Image.open(p)))
    np.testing.assert_allclose(prep(decoded), ref, atol=1e-5)


def test_exif_capture_time_and_gps(tmp_path):
    img = photo(64, 64)
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2021:06:01 12:30:00"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (48.0, 51.0, 29.0)
    gps[3], gps[4] = "W", (2.0, 17.0, 40.0)
    p = tmp_path / "g.jpg"
    img.save(p, exif=exif)
    _, meta = open_image(p.read_bytes())
    assert meta.taken_at == "2021-06-01T12:30:00"
    assert meta.lat == pytest.approx(48.858, abs=1e-3)
    assert meta.lon == pytest.approx(-2.2944, abs=1e-3)


def test_draft_mode_stays_within_documented_tolerance(tmp_path, clip_processor):
    img = photo(2400, 1800, seed=5)
    p = tmp_path / "big.jpg"
    img.save(p, quality=92)
    prep = Preprocess.from_config(clip_processor.to_dict())
    full, _, _ = decode_file(str(p), prep, draft=False)
    fast, meta, _ = decode_file(str(p), prep, draft=True)
    assert (meta.width, meta.height) == (2400, 1800)
    assert full.shape == fast.shape
    assert float(np.abs(full - fast).mean()) < DRAFT_TOLERANCE
    np.testing.assert_allclose(full, processor_pixels(clip_processor, Image.open(p)), atol=1e-5)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is not an image", "not an image"),
])
def test_bad_bytes_raise_one_line_reasons(data, reason):
    with pytest.raises(DecodeError, match=reason):
        open_image(data)


def test_truncated_jpeg_is_refused(tmp_path):
    buf = io.BytesIO()
    photo(300, 300).save(buf, format="JPEG")
    with pytest.raises(DecodeError):
        open_image(buf.getvalue()[:2000])


def test_decompression_bomb_refused_before_allocation():
    # a PNG header declaring 100,000 x 100,000 pixels, with almost no data
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    with pytest.raises(DecodeError, match="too large"):
        open_image(png)


def test_16bit_grey_is_scaled_not_clipped():
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img, _ = open_image(buf.getvalue())
    px = np.asarray(img)
    assert px.min() < 10 and px.max() > 245  # a ramp, not a white square


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` pixels, with almost no data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return png + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


PILLOW_DEFAULT_MAX = int(1024 * 1024 * 1024 // 4 // 3)  # PIL.Image.MAX_IMAGE_PIXELS as shipped


def test_importing_and_decoding_leave_pillows_settings_alone(tmp_path):
    """A program importing itr keeps its Pillow settings: no itr module lifts
    ``PIL.Image.MAX_IMAGE_PIXELS``, resets ``ImageFile.LOAD_TRUNCATED_IMAGES`` or silences
    Pillow's warnings, on import or while decoding (the itr command silences them for
    itself)."""
    import subprocess
    import sys

    photo(40, 30).save(tmp_path / "a.jpg")
    code = f"""
import importlib, pkgutil, warnings, PIL.Image, PIL.ImageFile, itrcli
PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True  # this program's choice
filters = list(warnings.filters)
before = PIL.Image.MAX_IMAGE_PIXELS
for m in pkgutil.walk_packages(itrcli.__path__, "itrcli."):
    if m.name == "itrcli.__main__":  # runs the command line
        continue
    try:
        importlib.import_module(m.name)
    except ImportError:  # an optional extra not installed here
        pass
from itrcli.ingest.images import decode_file
from itrcli.show.thumbs import ThumbnailCache
decode_file({str(tmp_path / 'a.jpg')!r}, None)
assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, "reset"
added = [f for f in warnings.filters if f not in filters]  # (numpy's and scipy's own: theirs)
assert not [f for f in added if f[3] is not None and "PIL" in f[3].pattern], added
print(before, PIL.Image.MAX_IMAGE_PIXELS)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(PILLOW_DEFAULT_MAX)] * 2


def test_itrs_own_bomb_guard_holds_whatever_pillows_is(monkeypatch):
    """itr refuses over MAX_PIXELS even in a program that lifted Pillow's guard, and an
    image over Pillow's guard (as the program set it) is refused with the same reason."""
    from itrcli.ingest.images import MAX_PIXELS

    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX  # this process imported itr
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(DecodeError, match=r"too large: 20000x20000 pixels \(limit 268,435,456\)"):
        open_image(_png_header(20000, 20000))
    assert 20000 * 20000 > MAX_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DecodeError, match=r"too large: 2,500 pixels \(limit 2,000\)"):
        open_image(_png_header(50, 50))


def test_the_cli_decodes_past_pillows_warning_step_without_a_warning(itr, tiny_clip, tmp_path):
    """Between Pillow's warning step and its refusal (89 to 179 MP by default: a 100 MP
    photo), `itr` prints no DecompressionBombWarning: the file decodes or gets one reason."""
    import warnings

    d = tmp_path / "photos"
    d.mkdir()
    (d / "big.png").write_bytes(_png_header(10000, 10000))  # 100 MP declared, no data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = itr("index", d, "--db", tmp_path / "lib", "-m", tiny_clip)
    assert r.code == 0 and "skipped" in r.err and "big.png" in r.err, r
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "DecompressionBomb" not in r.err


RECIPES = [
    {"image_processor_type": "CLIPImageProcessor"},  # the type alone: every default
    {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
     "crop_size": {"height": 336, "width": 336}, "image_mean": [0.5, 0.4, 0.3]},
    {"image_processor_type": "CLIPImageProcessorFast", "do_center_crop": False, "resample": 2},
    {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 256},
     "do_normalize": False, "rescale_factor": 0.5},
    {"image_processor_type": "SiglipImageProcessor"},
    {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384},
     "image_std": [0.2, 0.3, 0.4]},
    {"image_processor_type": "SiglipImageProcessorFast", "do_resize": True, "resample": 2},
]


@pytest.mark.parametrize("cfg", RECIPES)
def test_the_recipe_read_from_the_files_is_transformers(tmp_path, cfg):
    """itr reads CLIP's and SigLIP's preprocessor_config.json itself (transformers' image
    processing takes 1.7 s to import): the same recipe transformers makes of the file."""
    import json

    from transformers import AutoImageProcessor

    from itrcli.embed.encoder import guess_preprocess, recipe_of

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    theirs = Preprocess.from_config(AutoImageProcessor.from_pretrained(tmp_path).to_dict())
    assert recipe_of(cfg) == theirs
    assert guess_preprocess(str(tmp_path)) == theirs


def test_an_integer_size_or_another_processor_is_left_to_transformers():
    from itrcli.embed.encoder import recipe_of

    assert recipe_of({"image_processor_type": "SiglipImageProcessor", "size": 384}) is None
    assert recipe_of({"image_processor_type": "CLIPImageProcessor", "crop_size": 224}) is None
    assert recipe_of({"image_processor_type": "ViTImageProcessor"}) is None
    assert recipe_of({}) is None


def test_a_known_recipe_is_read_without_transformers_image_processing(tiny_clip, monkeypatch):
    import transformers

    from itrcli.embed.encoder import Encoder

    def refuse(*a, **k):
        raise AssertionError("AutoImageProcessor used for a recipe itr reads itself")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", refuse)
    e = Encoder(str(tiny_clip), device="cpu", precision="fp32", towers="image")
    assert e.prep.crop_height == 32
