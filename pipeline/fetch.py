"""Download and unpack dataset archives: resumable, sha1-verified, zip-slip safe, cached."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class Archive:
    url: str
    sha1: str
    root: str  # folder inside the archive holding train/ and test/


# d2l's "hot dog / not hot dog" set: 1000+1000 train and 400+400 test images.
KNOWN = {
    "hotdog": Archive("http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip",
                      "fba480ffa8aa7e0febbb511d181409f899b9baa5", "hotdog"),
}
DEFAULT_DEST = "data"
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download or extraction that must not be used."""


def sha1_of(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, path: str, timeout: float = 60) -> int:
    """Download url to path, resuming from path + '.part' with an HTTP Range request.

    Returns the number of bytes transferred by this call (0 when already complete)."""
    if os.path.exists(path):
        return 0
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already whole
            os.replace(part, path)
            return 0
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise FetchError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None
    with resp:
        resumed = have and resp.status == 206
        if have and not resumed:
            have = 0  # the server ignored Range: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        moved = 0
        # A bar on a terminal; nothing in logs and CI.
        with open(part, "ab" if resumed else "wb") as out, tqdm(
                total=total, initial=have, desc=os.path.basename(path), unit="B", unit_scale=True,
                disable=not sys.stderr.isatty()) as bar:
            for block in iter(lambda: resp.read(CHUNK), b""):
                out.write(block)
                moved += len(block)
                bar.update(len(block))
    if total is not None and os.path.getsize(part) != total:
        raise FetchError(f"{url}: connection closed at {os.path.getsize(part)} of {total} bytes; "
                         "run again to resume")
    os.replace(part, path)
    return moved


def safe_extract(zip_path: str, dest: str) -> None:
    """Unzip, refusing any member that would land outside dest (zip-slip) or is a link."""
    dest_real = os.path.realpath(dest)
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            target = os.path.realpath(os.path.join(dest_real, info.filename))
            if os.path.isabs(info.filename) or os.path.commonpath([dest_real, target]) != dest_real:
                raise FetchError(f"{zip_path}: refusing to extract {info.filename!r}: it escapes {dest}")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise FetchError(f"{zip_path}: refusing to extract symlink {info.filename!r}")
        zf.extractall(dest_real)


def fetch(name_or_url: str, dest: str = DEFAULT_DEST, sha1: str | None = None, root: str | None = None,
          log=print) -> str:
    """Fetch a known dataset ('hotdog') or an archive URL into dest; return the dataset folder.

    The archive is verified against its sha1 on every call; a mismatch deletes it. A second call
    downloads nothing and re-extracts nothing."""
    if name_or_url in KNOWN:
        archive = KNOWN[name_or_url]
    elif "://" in name_or_url:
        if not sha1:
            raise FetchError(f"{name_or_url}: --sha1 is required for an archive URL")
        stem = os.path.basename(name_or_url.split("?")[0]).rsplit(".", 1)[0]
        archive = Archive(name_or_url, sha1, root or stem)
    else:
        raise FetchError(f"unknown dataset {name_or_url!r}; known: {', '.join(KNOWN)}, or an archive URL")
    os.makedirs(dest, exist_ok=True)
    zip_path = os.path.join(dest, os.path.basename(archive.url.split("?")[0]))
    folder = os.path.join(dest, archive.root)
    moved = download(archive.url, zip_path)
    digest = sha1_of(zip_path)
    if digest != archive.sha1:
        os.remove(zip_path)
        raise FetchError(f"{zip_path}: sha1 {digest} does not match the expected {archive.sha1}; "
                         "the file was deleted, run again to download it anew")
    marker = os.path.join(folder, ".extracted-" + archive.sha1)
    if not os.path.exists(marker):
        safe_extract(zip_path, dest)
        if not os.path.isdir(folder):
            raise FetchError(f"{zip_path}: expected a top-level folder {archive.root!r} in the archive")
        open(marker, "w").close()
    log(f"{archive.url}: {'downloaded ' + format(moved / 1e6, '.1f') + ' MB' if moved else 'cached'}, "
        f"sha1 verified -> {folder}")
    return folder
