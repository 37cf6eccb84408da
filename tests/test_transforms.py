import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from pipeline.cli import main
from pipeline.normalize import Normalizer
from pipeline.synthetic import make_image_folder
from pipeline.transforms import TA_WIDE_BINS, TA_WIDE_OPS, ImagePreset, apply_op, small_photo

PRESET = ImagePreset(image_size=56, resize_size=64)


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=120, h=80) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)
    y = np.linspace(0, 255, h, dtype=np.float32)
    return np.stack([np.tile(x, (h, 1)), np.tile(y[:, None], (1, w)), np.full((h, w), 128.0)], -1).astype(np.uint8)


@pytest.mark.parametrize("make", [
    lambda a: Image.fromarray(a).convert("L"),
    lambda a: Image.fromarray(a).convert("RGBA"),
    lambda a: Image.fromarray(a).convert("P"),
    lambda a: Image.fromarray(a).convert("CMYK"),
    lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257),
    lambda a: Image.fromarray(a).convert("LA"),
], ids=["L", "RGBA", "P", "CMYK", "I16", "LA"])
def test_every_mode_decodes_to_rgb_with_shorter_side_resized(make):
    fmt = "JPEG" if make(gradient()).mode == "CMYK" else "PNG"
    out = PRESET.decode(encode(make(gradient()), fmt))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert min(out.shape[:2]) == 64 and out.shape[1] == 96  # 120x80 -> 96x64


def test_sixteen_bit_is_scaled_not_clipped():
    a = np.full((70, 70), 32768, np.uint16)
    out = PRESET.decode(encode(Image.fromarray(a)))
    assert 120 <= out.mean() <= 135


def test_exif_orientation_applied():
    img = Image.fromarray(gradient(120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = PRESET.decode(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.shape[:2] == (96, 64)  # portrait after applying the orientation


def test_eval_center_crop_matches_torchvision():
    img = Image.fromarray(gradient(120, 80))
    ours = PRESET.eval(PRESET.decode(encode(img)))
    ref = T.Compose([T.Resize(64), T.CenterCrop(56)])(img)
    diff = np.abs(ours.astype(int) - np.asarray(ref).astype(int))
    assert ours.shape == (56, 56, 3) and diff.mean() < 2.0


def test_train_crop_shape_and_randomness():
    img = PRESET.decode(encode(Image.fromarray(gradient())))
    rng = np.random.default_rng(0)
    crops = [PRESET.train(img, rng) for _ in range(8)]
    assert all(c.shape == (56, 56, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) == 8
    # Same generator state, same crop: reproducible when seeded.
    assert np.array_equal(PRESET.train(img, np.random.default_rng(1)), PRESET.train(img, np.random.default_rng(1)))


def test_train_crop_matches_torchvision_resized_crop():
    """Same box, same flip: our one-pass PIL crop+resize is torchvision's RandomResizedCrop output."""
    from torchvision.transforms.v2 import functional as F

    img = PRESET.decode(encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 130, 3), np.uint8))))
    for seed in range(6):
        rng = np.random.default_rng(seed)
        top, left, ch, cw = PRESET.crop_box(*img.shape[:2], rng)
        flip = rng.random() < 0.5
        ref = F.resized_crop(Image.fromarray(img), top, left, ch, cw, [56, 56])
        ref = np.asarray(F.horizontal_flip(ref) if flip else ref).astype(int)
        ours = PRESET.train(img, np.random.default_rng(seed)).astype(int)
        # resize(box=) may read pixels just outside the box for the filter; crop-then-resize cannot.
        assert np.abs(ours - ref).mean() < 1.5, seed  # a wrong box or flip differs by ~25


def test_crop_box_within_bounds_including_degenerate_sizes():
    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (64, 900), (900, 64), (1, 1)]:
        for _ in range(50):
            top, left, ch, cw = PRESET.crop_box(h, w, rng)
            assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w and ch >= 1 and cw >= 1


def test_undecodable_raises():
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        PRESET.decode(b"not an image")


def test_normalizer_matches_torchvision_and_is_channels_last():
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = Normalizer(mean, std)(x)
    ref = T.Normalize(mean, std)(x.permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_crop_min_scale_bounds_the_crop_area():
    rng = np.random.default_rng(0)
    mild = ImagePreset(image_size=56, resize_size=64, scale=(0.5, 1.0))
    areas = [ch * cw / (64 * 96) for _, _, ch, cw in (mild.crop_box(64, 96, rng) for _ in range(200))]
    assert min(areas) >= 0.49  # rounding of the box sides only
    seed = [ch * cw / (64 * 96) for _, _, ch, cw in (PRESET.crop_box(64, 96, rng) for _ in range(200))]
    assert min(seed) < 0.3


def test_eval_crop_size_widens_the_center_crop():
    img = np.arange(64 * 96 * 3, dtype=np.uint32).reshape(64, 96, 3).astype(np.uint8)
    wide = ImagePreset(image_size=56, resize_size=64, eval_crop=64)
    assert wide.eval(img).shape == (64, 64, 3) and PRESET.eval(img).shape == (56, 56, 3)
    assert np.array_equal(wide.eval(img), img[:, 16:80])
    assert np.array_equal(PRESET.eval(img), img[4:60, 20:76])


def test_preset_from_a_configs_data_section():
    from pipeline.config import Config

    cfg = Config()
    cfg.data.crop_min_scale, cfg.data.eval_crop_size = 0.25, 256
    preset = ImagePreset.from_data_config(cfg.to_dict()["data"])
    assert preset == ImagePreset(224, 256, scale=(0.25, 1.0), eval_crop=256, low_res_prob=0.5)
    cfg.data.auto_augment = "ta_wide"
    assert ImagePreset.from_data_config(cfg.to_dict()["data"]).auto_augment == "ta_wide"


def _torchvision_op(img: Image.Image, op: str, m: float) -> Image.Image:
    """torchvision's TrivialAugmentWide operation (transforms.autoaugment._apply_op, through the
    public functional API) on a PIL image, magnitude m."""
    import math

    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    near, fill = InterpolationMode.NEAREST, [0.0, 0.0, 0.0]
    geometric = {
        "shear_x": lambda: F.affine(img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(m)), 0.0], near, fill, [0, 0]),
        "shear_y": lambda: F.affine(img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(m))], near, fill, [0, 0]),
        "translate_x": lambda: F.affine(img, 0.0, [int(m), 0], 1.0, [0.0, 0.0], near, fill),
        "translate_y": lambda: F.affine(img, 0.0, [0, int(m)], 1.0, [0.0, 0.0], near, fill),
        "rotate": lambda: F.rotate(img, m, near, fill=fill)}
    if op in geometric:
        return geometric[op]()
    return {"identity": lambda: img, "brightness": lambda: F.adjust_brightness(img, 1.0 + m),
            "color": lambda: F.adjust_saturation(img, 1.0 + m), "contrast": lambda: F.adjust_contrast(img, 1.0 + m),
            "sharpness": lambda: F.adjust_sharpness(img, 1.0 + m), "posterize": lambda: F.posterize(img, 8 - round(m)),
            "solarize": lambda: F.solarize(img, 255.0 - m), "autocontrast": lambda: F.autocontrast(img),
            "equalize": lambda: F.equalize(img)}[op]()


@pytest.mark.parametrize("op", list(TA_WIDE_OPS))
def test_ta_wide_operations_match_torchvision(op):
    """Each operation at a low, a middle and the top bin, both signs where it has one, is
    torchvision's to the pixel (same PIL calls underneath, no torch in the augmentation tasks)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    top, signed = TA_WIDE_OPS[op]
    for b in (3, 15, TA_WIDE_BINS - 1):
        for m in ((top * b / (TA_WIDE_BINS - 1),) + ((-top * b / (TA_WIDE_BINS - 1),) if signed else ())):
            assert np.array_equal(np.asarray(apply_op(img, op, m)), np.asarray(_torchvision_op(img, op, m))), (op, m)


def test_ta_wide_is_seeded_and_varies_the_crops():
    img = PRESET.decode(encode(Image.fromarray(gradient())))
    ta = ImagePreset(image_size=56, resize_size=64, auto_augment="ta_wide")
    out = [ta.train(img, np.random.default_rng(s)) for s in range(16)]
    assert all(o.shape == (56, 56, 3) and o.dtype == np.uint8 for o in out)
    assert np.array_equal(out[3], ta.train(img, np.random.default_rng(3)))
    # The crop and flip draw first, so the same seed gives the plain crop the operation starts from.
    changed = [not np.array_equal(o, PRESET.train(img, np.random.default_rng(s))) for s, o in enumerate(out)]
    assert 8 <= sum(changed) < 16  # identity (and a magnitude-0 bin) leave some crops as they were
    with pytest.raises(ValueError, match="'randaugment'.*none, ta_wide"):
        ImagePreset(auto_augment="randaugment")
    with pytest.raises(ValueError, match="'cutout'.*identity, shear_x"):
        apply_op(Image.fromarray(img), "cutout", 1.0)


def test_small_photo_is_a_shrunk_jpeg_never_enlarged_and_what_small_side_decodes():
    big = encode(Image.fromarray(gradient(400, 300)))
    small = small_photo(big, 224)
    img = Image.open(io.BytesIO(small))
    assert img.format == "JPEG" and img.size == (224, 168)
    assert Image.open(io.BytesIO(small_photo(encode(Image.fromarray(gradient(100, 80))), 224))).size == (100, 80)
    # Upright before it shrinks: an EXIF-rotated landscape file is a portrait photo.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    rotated = Image.open(io.BytesIO(small_photo(encode(Image.fromarray(gradient(400, 300)), "JPEG", exif=exif), 224)))
    assert rotated.size == (168, 224)
    # The preset's small_side decodes exactly the small copy: the files `finetune data shrink` writes.
    assert np.array_equal(dataclasses.replace(PRESET, small_side=224).decode(big), PRESET.decode(small))


def roughness(images) -> float:
    """Mean absolute difference between horizontal neighbours: lower is blurrier."""
    return float(np.mean([np.abs(np.diff(im.astype(np.int16), axis=1)).mean() for im in images]))


def test_low_res_view_is_seeded_and_blurs_the_training_crops():
    noise = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    img = PRESET.decode(encode(Image.fromarray(noise)))
    whole = dataclasses.replace(PRESET, scale=(1.0, 1.0))
    low = dataclasses.replace(whole, low_res_prob=1.0)
    crops = [low.train(img, np.random.default_rng(s)) for s in range(8)]
    assert all(c.shape == (56, 56, 3) for c in crops)
    assert np.array_equal(crops[0], low.train(img, np.random.default_rng(0)))
    plain = [whole.train(img, np.random.default_rng(s)) for s in range(8)]
    # shrunk to a longest side of 28..56 px and then cropped back up to 56: visibly blurrier
    assert roughness(crops) < 0.7 * roughness(plain)


def test_data_shrink_writes_the_small_photo_copy(tmp_path):
    root = make_image_folder(str(tmp_path / "ds"), 2, 3, size=96)
    assert main(["data", "shrink", root, str(tmp_path / "small"), "--max-side", "40", "--splits", "train,test"]) == 0
    for split, n in (("train", 4), ("test", 6)):
        files = sorted((tmp_path / "small" / split).rglob("*.jpg"))
        assert len(files) == n and {f.parent.name for f in files} == {"hotdog", "not-hotdog"}
        assert all(Image.open(f).size == (40, 40) for f in files)
    original = tmp_path / "ds" / "test" / "hotdog" / "00000.jpg"
    assert (tmp_path / "small" / "test" / "hotdog" / "00000.jpg").read_bytes() == small_photo(original.read_bytes(), 40)
