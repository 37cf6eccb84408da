"""`finetune bench`'s scaling section: one epoch on 2k, 20k and 100k generated 256 px JPEGs, with the
decoded copy kept (cache) and streamed, each a `finetune train` subprocess as a user runs it:
seconds per 1k images, peak PSS of the whole process tree, object store, spilled bytes."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time

from pipeline.procmem import MEMORY_SAMPLE_S, run_command
from pipeline.synthetic import generate_images

PY = sys.executable

# The scaling runs measure how the cost grows with the data, so the model is small (ResNet-18 at 64 px,
# about a twelfth of its work per image at 224): the data path's share shows, and 100k images take
# tens of minutes rather than hours. What auto chooses at 224 px is computed, not run.
SCALING_RUN = ["--arch", "resnet18", "--weights", "none", "--data.image_size", "64", "--data.resize_size", "72",
               "--epochs", "1", "--data.preview_images", "0"]
SCALING_TEST_PER_CLASS = 50


def scaling(work: str, sizes: list[int], storage: str, batch: int) -> dict:
    """Per dataset size: one epoch decoded once (cache) and streamed, and what data.cache_decoded auto
    would choose for these images at the default 224 px preset on this machine's local Ray."""
    from pipeline import data
    from pipeline.config import Config
    from pipeline.transforms import ImagePreset

    preset = ImagePreset.from_data_config(Config().to_dict()["data"])
    store = local_object_store_bytes()
    out: dict = {"object_store_bytes": store}
    for n in sizes:
        root = generate_images(os.path.join(work, f"gen-{n}"), n // 2, 256, test_per_class=SCALING_TEST_PER_CLASS)
        need = data.decoded_bytes(n, preset, False) + data.decoded_bytes(2 * SCALING_TEST_PER_CLASS, preset, True)
        out[str(n)] = {"auto_224px": "cache" if data.keeps_decoded_copy("auto", need, store) else "stream",
                       **{mode: scaling_run(root, mode, storage, batch) for mode in ("cache", "stream")}}
    return out


def local_object_store_bytes() -> float:
    """The object store a local Ray gets on this machine (what `finetune train` starts)."""
    code = "import ray; ray.init(); print('STORE', ray.cluster_resources()['object_store_memory'])"
    r = run_command([PY, "-c", code], marker="STORE")
    return float(r["output"].rsplit("STORE ", 1)[1].split()[0])


def scaling_run(root: str, mode: str, storage: str, batch: int) -> dict:
    """One epoch of `finetune train` with the decoded copy kept (cache) or not (stream), in a Ray
    temp folder of its own, whose spill folder is watched."""
    name = f"bench-scale-{mode}-{int(time.time())}"
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        r = run_command([PY, "-m", "pipeline.cli", "train", "--data", root, "--storage", storage, "--name", name,
                         "--batch-size", str(batch), *SCALING_RUN,
                         "--data.cache_decoded", {"cache": "always", "stream": "never"}[mode]],
                        sample_every=MEMORY_SAMPLE_S, env={**os.environ, "RAY_TMPDIR": ray_tmp}, spill_dir=ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    with open(os.path.join(storage, name, "metrics.json")) as fh:
        first = json.load(fh)[0]
    decoded = re.search(r"decoded in ([\d.]+) s", r["output"])
    decode_s = float(decoded[1]) if decoded else 0.0
    train_s = first["train_images"] / first["examples_per_sec"]
    return {"images": first["train_images"], "decode_s": decode_s, "train_s": train_s,
            "s_per_1k_images": 1000 * (decode_s + train_s) / first["train_images"], "wall_s": r["wall_s"],
            "peak_pss_mb": r["peak_pss_mb"], "peak_object_store_mb": r["peak_shm_mb"],
            "peak_spilled_mb": r["peak_spilled_mb"]}


def scaling_rows(scale: dict | None) -> list[tuple[str, str, str]]:
    if not scale:
        return []
    rows = []
    sizes = sorted((k for k in scale if k.isdigit()), key=int)
    for n in sizes:
        c, s = scale[n]["cache"], scale[n]["stream"]
        rows.append((f"scaling, {int(n):,} images, cache / stream: s per 1k images",
                     f"{c['s_per_1k_images']:.1f} / {s['s_per_1k_images']:.1f} s",
                     f"peak PSS {c['peak_pss_mb']:.0f} / {s['peak_pss_mb']:.0f} MB, object store "
                     f"{c['peak_object_store_mb']:.0f} / {s['peak_object_store_mb']:.0f} MB, spilled "
                     f"{c['peak_spilled_mb']:.0f} / {s['peak_spilled_mb']:.0f} MB; "
                     f"auto at 224 px: {scale[n]['auto_224px']}"))
    if len(sizes) > 1:
        for mode in ("cache", "stream"):
            per_1k = [scale[n][mode]["s_per_1k_images"] for n in sizes]
            spread = (max(per_1k) / min(per_1k) - 1) * 100
            a, z = scale[sizes[-2]][mode]["peak_pss_mb"], scale[sizes[-1]][mode]["peak_pss_mb"]
            rows.append((f"scaling, {mode}: s per 1k images, max vs min / peak PSS, {int(sizes[-1]):,} vs "
                         f"{int(sizes[-2]):,}", f"{spread:+.1f} / {(z / a - 1) * 100:+.1f} %", "targets within 15 %"))
    return rows
