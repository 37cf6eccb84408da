"""`finetune data shrink`: the small-photo copy of an ImageFolder dataset, as files.

The copy is what data.small_eval_side and `finetune evaluate --small-side` score without writing
it: every image through transforms.small_photo (longest side at most max_side, JPEG)."""

from __future__ import annotations

import posixpath

from pipeline import data, storage
from pipeline.transforms import SMALL_PHOTO_QUALITY, small_photo


def shrink_folder(src: str, dest: str, max_side: int = 224, quality: int = SMALL_PHOTO_QUALITY,
                  splits: tuple[str, ...] = ("test",)) -> dict[str, int]:
    """Write <dest>/<split>/<class>/<name>.jpg for every image of src's splits (local or s3://).
    Returns per split the images written; undecodable files are skipped and named."""
    index = data.scan_image_folder(src, splits=splits)
    fs, base = storage.resolve(src)
    written = {}
    for split in splits:
        n = 0
        for path, _ in index.files[split]:
            rel = path[len(base):].lstrip("/")  # <split>/<class>/.../<name>
            try:
                small = small_photo(data.read_file(fs, path), max_side, quality)
            except (OSError, ValueError) as e:
                print(f"skipped {path}: {type(e).__name__}: {e}", flush=True)
                continue
            storage.write_bytes(storage.join(dest, posixpath.splitext(rel)[0] + ".jpg"), small)
            n += 1
        written[split] = n
        print(f"{split}: {n} of {len(index.files[split])} images -> {storage.join(dest, split)} "
              f"(longest side <= {max_side} px, JPEG quality {quality})", flush=True)
    return written
