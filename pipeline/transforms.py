"""The image preset shared by training, evaluation, prediction and the benchmark peer.

Images are decoded ONCE per run into a uint8 copy whose shorter side is
``resize_size``; per-epoch work is then only crop + flip on uint8 (cheap), and
float conversion + normalization happen in the training loop (normalize.Normalizer), on
the GPU when there is one.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFile, ImageOps

# No torch here: Ray Data's decode and augmentation tasks import this module, and importing torch
# costs seconds of start-up in every new worker process.

# PIL's own bomb guard stays as the outer limit; the preset's pixel and aspect budgets below are
# the ones that apply (a 10000x10000 photo is legitimate, a 177-byte 100000x1 PNG is not).
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000
MAX_IMAGE_PIXELS = 100_000_000
MAX_ASPECT_RATIO = 20.0
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a bad image, counted and skipped

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
AUTO_AUGMENTS = ("none", "ta_wide")  # the names of torchvision references' --auto-augment
# Small photos as users send them: the longest side at most a few hundred pixels, saved as JPEG at
# a web quality. The small-photo copies of eval splits and the low-res training view both use it.
SMALL_PHOTO_QUALITY = 75


class ImageRejected(ValueError):
    """An image refused before it is decoded: over the pixel budget or the aspect ratio."""


def check_image_size(width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_aspect: float = MAX_ASPECT_RATIO) -> None:
    """Refuse, from the header alone, an image whose decode or shorter-side resize would take far
    more memory than its file: too many pixels, or so thin that resizing its short side to
    resize_size makes the long side enormous."""
    if width * height > max_pixels:
        raise ImageRejected(f"{width}x{height} = {width * height / 1e6:.0f} M pixels, over the budget of "
                            f"{max_pixels / 1e6:g} M (data.max_image_pixels)")
    if max(width, height) > max_aspect * max(1, min(width, height)):
        raise ImageRejected(f"{width}x{height}: aspect ratio {max(width, height) / max(1, min(width, height)):.0f}:1, "
                            f"over {max_aspect:g}:1 (data.max_aspect_ratio)")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale, palette, RGBA/LA (on white), CMYK, 16-bit."""
    if img.mode.startswith("I;16"):
        # 16-bit grayscale to 8 bits by integer division (floor(x * 255 / 65535)), instead of
        # convert()'s clip at 255: no copy larger than the 16-bit image itself.
        img = Image.fromarray((np.asarray(img).astype(np.uint16, copy=False) // 257).astype(np.uint8))
    elif img.mode == "I":  # 32-bit integers: scaled by their peak, in float32
        arr = np.asarray(img)
        scale = np.float32(255.0 / max(int(arr.max()), 1))
        img = Image.fromarray(np.clip(arr.astype(np.float32) * scale, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def jpeg_bytes(img: Image.Image, quality: int = SMALL_PHOTO_QUALITY) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def jpeg_round_trip(img: Image.Image, quality: int = SMALL_PHOTO_QUALITY) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes(img, quality))).convert("RGB")


def shrunk(img: Image.Image, max_side: int) -> Image.Image:
    """img with its longest side at most max_side (never enlarged), antialiased."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    s = max_side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)


def small_photo(data: bytes, max_side: int, quality: int = SMALL_PHOTO_QUALITY,
                max_pixels: int = MAX_IMAGE_PIXELS, max_aspect: float = MAX_ASPECT_RATIO) -> bytes:
    """The small-photo copy of an encoded image: EXIF orientation applied, longest side at most
    max_side, saved as JPEG at quality. `finetune data shrink` writes these files, and
    data.small_eval_side scores on the same bytes without writing them."""
    img = Image.open(io.BytesIO(data))
    check_image_size(*img.size, max_pixels, max_aspect)
    img.draft("RGB", (max_side, max_side))
    return jpeg_bytes(shrunk(_to_rgb(ImageOps.exif_transpose(img)), max_side), quality)


@dataclass(frozen=True)
class ImagePreset:
    """d2l's recipe: train RandomResizedCrop(224)+flip, eval Resize(256)+CenterCrop(224)."""

    image_size: int = 224
    resize_size: int = 256
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    eval_crop: int = 0  # CenterCrop size for evaluation; 0 = image_size (the recipe)
    auto_augment: str = "none"  # after crop + flip: "ta_wide" = TrivialAugmentWide
    max_pixels: int = MAX_IMAGE_PIXELS  # larger images are refused before decoding
    max_aspect: float = MAX_ASPECT_RATIO  # so are thinner ones (long side / short side)
    # Training: the share of images first shrunk to a random longest side in [image_size / 2,
    # image_size] and saved as JPEG, then cropped: the network also sees upsampled small photos.
    low_res_prob: float = 0.0
    small_side: int = 0  # decode() first makes the small-photo copy (small_photo); 0: the file as it is

    def __post_init__(self):
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ValueError(f"auto_augment {self.auto_augment!r}: valid: {', '.join(AUTO_AUGMENTS)}")

    @classmethod
    def from_data_config(cls, data: dict) -> ImagePreset:
        """The preset of a config's data section, as a dict: a Config's to_dict() or the one saved
        in a checkpoint."""
        return cls(data["image_size"], data["resize_size"], scale=(data["crop_min_scale"], 1.0),
                   eval_crop=data["eval_crop_size"], auto_augment=data["auto_augment"],
                   max_pixels=data["max_image_pixels"], max_aspect=data["max_aspect_ratio"],
                   low_res_prob=data.get("low_res_prob", 0.0))

    @property
    def eval_size(self) -> int:
        return self.eval_crop or self.image_size

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> RGB uint8 HWC, EXIF orientation applied, shorter side = resize_size.

        Raises on anything that is not a decodable image (the caller counts it), and ImageRejected,
        from the header alone, for one over the pixel or aspect budget."""
        if self.small_side:
            data = small_photo(data, self.small_side, max_pixels=self.max_pixels, max_aspect=self.max_aspect)
        img = Image.open(io.BytesIO(data))
        check_image_size(*img.size, self.max_pixels, self.max_aspect)
        # JPEG draft decodes at 1/2, 1/4 or 1/8 scale directly: large photos cost a
        # fraction of the time and memory, and we only keep resize_size anyway.
        img.draft("RGB", (self.resize_size, self.resize_size))
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        w, h = img.size
        if min(w, h) != self.resize_size:
            s = self.resize_size / min(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR,
                             reducing_gap=None if s > 0.5 else 3.0)
        return np.asarray(img, dtype=np.uint8)

    def eval(self, img: np.ndarray) -> np.ndarray:
        """Decoded (shorter side resize_size) -> CenterCrop(eval_size)."""
        h, w, size = *img.shape[:2], self.eval_size
        top, left = (h - size) // 2, (w - size) // 2
        return np.ascontiguousarray(img[top:top + size, left:left + size])

    def crop_box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawn from a numpy Generator."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        in_ratio = w / h  # fallback: the central crop, as torchvision does
        if in_ratio < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            ch, cw = h, round(h * self.ratio[1])
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def train(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """RandomResizedCrop(image_size) + RandomHorizontalFlip (+ auto_augment) on uint8 HWC.

        PIL's resize with a source box crops and resizes in one pass, as torchvision's
        RandomResizedCrop does for PIL images. Not torch: the augmentation tasks would each
        import it (seconds of CPU per worker process, on the path to the first training step)."""
        source = Image.fromarray(img)
        # Drawn only when asked for, so that runs without it keep their seeds' crops.
        if self.low_res_prob and rng.random() < self.low_res_prob:
            side = int(rng.integers(self.image_size // 2, self.image_size + 1))
            source = jpeg_round_trip(shrunk(source, side))
        top, left, ch, cw = self.crop_box(source.height, source.width, rng)
        out = source.resize((self.image_size, self.image_size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.auto_augment == "ta_wide":
            out = trivial_augment_wide(out, rng)
        return np.asarray(out)


# TrivialAugmentWide (Muller & Hutter 2021) as torchvision has it: one operation drawn uniformly,
# at one of 31 magnitudes drawn uniformly, negated half the time where the op has a sign; fill 0,
# nearest-neighbour geometry. Written on PIL for the same reason as the crop: no torch in the
# augmentation tasks. op -> (magnitude at the top bin, signed)
TA_WIDE_BINS = 31
TA_WIDE_OPS = {"identity": (0.0, False), "shear_x": (0.99, True), "shear_y": (0.99, True),
               "translate_x": (32.0, True), "translate_y": (32.0, True), "rotate": (135.0, True),
               "brightness": (0.99, True), "color": (0.99, True), "contrast": (0.99, True),
               "sharpness": (0.99, True), "posterize": (6.0, False), "solarize": (255.0, False),
               "autocontrast": (0.0, False), "equalize": (0.0, False)}
_TA_WIDE_NAMES = tuple(TA_WIDE_OPS)
_ENHANCERS = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
              "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}


def apply_op(img: Image.Image, op: str, magnitude: float) -> Image.Image:
    """One TrivialAugmentWide operation at a magnitude (signed where the op has a sign)."""
    if op in ("shear_x", "shear_y", "translate_x", "translate_y"):
        # PIL's affine maps output pixels to input pixels (hence the translation's minus); shear about
        # the top-left corner and translation by whole pixels, as torchvision's.
        shift = -int(magnitude)
        matrix = {"shear_x": (1, magnitude, 0, 0, 1, 0), "shear_y": (1, 0, 0, magnitude, 1, 0),
                  "translate_x": (1, 0, shift, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, shift)}[op]
        return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.NEAREST, fillcolor=0)
    if op == "rotate":
        return img.rotate(magnitude, Image.NEAREST, fillcolor=0)
    if op in _ENHANCERS:
        return _ENHANCERS[op](img).enhance(1.0 + magnitude)
    if op == "posterize":  # magnitude = bits removed: 8 bits kept at bin 0, 2 at the top
        return ImageOps.posterize(img, 8 - int(round(magnitude)))
    if op == "solarize":  # magnitude = how far the threshold came down from 255
        return ImageOps.solarize(img, 255 - magnitude)
    if op == "autocontrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    if op == "identity":
        return img
    raise ValueError(f"TrivialAugmentWide operation {op!r}: valid: {', '.join(TA_WIDE_OPS)}")


def trivial_augment_wide(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    op = _TA_WIDE_NAMES[rng.integers(len(_TA_WIDE_NAMES))]
    top, signed = TA_WIDE_OPS[op]
    magnitude = top * rng.integers(TA_WIDE_BINS) / (TA_WIDE_BINS - 1)
    if signed and rng.integers(2):
        magnitude = -magnitude
    return apply_op(img, op, magnitude)
