"""`finetune data check`: what is in an ImageFolder dataset, and what would make training wrong."""

from __future__ import annotations

import collections
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from pipeline import storage
from pipeline.data import SPLITS, DatasetError, read_file, scan_image_folder
from pipeline.transforms import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, check_image_size


@dataclass
class FileReport:
    path: str
    split: str
    label: int
    sha256: str = ""
    size: tuple[int, int] | None = None
    mode: str = ""
    error: str = ""


@dataclass
class CheckReport:
    root: str
    classes: list[str]
    files: list[FileReport]
    problems: list[str] = field(default_factory=list)  # make training wrong: exit non-zero
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _inspect(fs, item: FileReport, max_pixels: int, max_aspect: float) -> FileReport:
    data = read_file(fs, item.path)  # a read that fails is a storage error, not a finding
    item.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            item.size, item.mode = img.size, img.mode
            check_image_size(*img.size, max_pixels, max_aspect)  # as training would refuse it
            img.draft("RGB", (256, 256))  # a full decode, at reduced scale where JPEG allows
            img.load()
    except Exception as e:  # noqa: BLE001 - every decoder failure is a finding, not a crash
        item.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return item


def check_dataset(root: str, allow_overlap: bool = False, imbalance_ratio: float = 3.0, threads: int = 8,
                  max_pixels: int = MAX_IMAGE_PIXELS, max_aspect: float = MAX_ASPECT_RATIO) -> CheckReport:
    index = scan_image_folder(root)  # DatasetError for a missing split or unknown classes
    fs, _ = storage.resolve(root)
    items = [FileReport(p, split, y) for split in SPLITS for p, y in index.files[split]]
    with ThreadPoolExecutor(threads) as pool:  # PIL decodes and S3 reads release the GIL
        files = list(pool.map(lambda it: _inspect(fs, it, max_pixels, max_aspect), items))
    report = CheckReport(root, index.classes, files)

    for split in SPLITS:
        counts = collections.Counter(f.label for f in files if f.split == split and not f.error)
        for i, name in enumerate(index.classes):
            if counts[i] == 0:
                report.problems.append(f"class {name!r} has no usable images in {split}/"
                                       + (" (it exists only in the other split)" if split == "test" else ""))
        nonzero = [c for c in counts.values() if c]
        if nonzero and max(nonzero) > imbalance_ratio * min(nonzero):
            report.warnings.append(f"{split}/ classes are imbalanced: {max(nonzero)} vs {min(nonzero)} images")
    report.warnings += [f"{n} {what} skipped (not followed, not read)" for what, n in index.skipped.items()]
    bad = [f for f in files if f.error]
    if bad:
        report.warnings.append(f"{len(bad)} undecodable file(s) will be skipped in training")
    by_hash: dict[str, list[FileReport]] = collections.defaultdict(list)
    for f in files:
        if f.sha256:
            by_hash[f.sha256].append(f)
    dupes = [group for group in by_hash.values() if len(group) > 1]
    cross = [g for g in dupes if len({f.split for f in g}) > 1]
    within = [g for g in dupes if len({f.split for f in g}) == 1]
    if within:
        report.warnings.append(f"{len(within)} group(s) of identical files within a split")
    if cross:
        msg = f"{len(cross)} image(s) appear in both train/ and test/ (test accuracy would be inflated)"
        (report.warnings if allow_overlap else report.problems).append(msg)
    return report


def format_report(r: CheckReport) -> str:
    lines = [f"dataset {r.root}: {len(r.files)} images, {len(r.classes)} classes", ""]
    header = f"{'class':<24}" + "".join(f"{s:>10}" for s in SPLITS)
    lines.append(header)
    lines.append("-" * len(header))
    for i, name in enumerate(r.classes):
        row = [sum(1 for f in r.files if f.split == s and f.label == i and not f.error) for s in SPLITS]
        lines.append(f"{name:<24}" + "".join(f"{n:>10}" for n in row))
    lines.append("")
    modes = collections.Counter(f.mode for f in r.files if f.mode)
    sizes = [f.size for f in r.files if f.size]
    lines.append("modes: " + ", ".join(f"{m} {n}" for m, n in modes.most_common()))
    if sizes:
        short = sorted(min(s) for s in sizes)
        lines.append(f"sizes: shorter side min {short[0]}, median {short[len(short) // 2]}, max {short[-1]}; "
                     f"largest {max(sizes, key=lambda s: s[0] * s[1])}")
    hashes = collections.defaultdict(set)
    for f in r.files:
        if f.sha256:
            hashes[f.sha256].add(f.split)
    lines.append(f"duplicates: {sum(1 for s in hashes.values() if len(s) > 1)} across splits")
    bad = [f for f in r.files if f.error]
    lines.append(f"undecodable: {len(bad)}")
    lines += [f"  {f.path}: {f.error}" for f in bad[:20]]
    lines += [f"warning: {w}" for w in r.warnings]
    lines += [f"PROBLEM: {p}" for p in r.problems]
    lines.append("ok" if r.ok else f"{len(r.problems)} problem(s): training on this dataset would be wrong")
    return "\n".join(lines)


__all__ = ["CheckReport", "DatasetError", "check_dataset", "format_report"]
