"""`finetune data stage SRC s3://bucket/prefix`: upload an ImageFolder tree, idempotently, with a manifest."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from pipeline import storage

MANIFEST = "MANIFEST.json"


@dataclass
class StageResult:
    uploaded: int
    skipped: int
    total_bytes: int
    manifest_uri: str


def _local_files(src: str) -> list[tuple[str, str]]:
    """(relative key, local path) of every non-hidden file under src, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                path = os.path.join(dirpath, name)
                out.append((os.path.relpath(path, src).replace(os.sep, "/"), path))
    return out


def stage(src: str, dest: str, threads: int = 16, log=print) -> StageResult:
    """Upload src to dest (s3://bucket/prefix). Objects already there with the same size and sha256
    (kept in the object's metadata) are skipped; multipart for big files; verified against the manifest."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    if not dest.startswith("s3://"):
        raise storage.StorageError(f"{dest}: the destination must be s3://bucket/prefix")
    if not os.path.isdir(src):
        raise storage.StorageError(f"{src}: no such folder")
    storage.preflight(dest, write=True)
    bucket, prefix = storage.split_s3(dest)
    client = storage.s3_client(timeout=120)
    transfer = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
    files = _local_files(src)
    key_of = {rel: f"{prefix}/{rel}" if prefix else rel for rel, _ in files}

    def one(item: tuple[str, str]) -> tuple[dict, bool]:
        rel, path = item
        entry = {"key": rel, "size": os.path.getsize(path), "sha256": storage.sha256_file(path)}
        try:
            head = client.head_object(Bucket=bucket, Key=key_of[rel])
            if head["ContentLength"] == entry["size"] and head.get("Metadata", {}).get("sha256") == entry["sha256"]:
                return entry, False
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise
        client.upload_file(path, bucket, key_of[rel], ExtraArgs={"Metadata": {"sha256": entry["sha256"]}},
                           Config=transfer)
        return entry, True

    entries, uploaded = [], 0
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(files), desc="staging", unit="file",
                                                   disable=not sys.stderr.isatty()) as bar:
        for entry, was_uploaded in pool.map(one, files):
            entries.append(entry)
            uploaded += was_uploaded
            bar.update()
    manifest_key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    client.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps({"files": entries}, indent=1).encode())
    verify(dest, entries)
    total = sum(e["size"] for e in entries)
    log(f"staged {src} -> {dest}: {len(entries)} files ({total / 1e6:.1f} MB), {uploaded} uploaded, "
        f"{len(entries) - uploaded} already present; manifest s3://{bucket}/{manifest_key}; verified")
    return StageResult(uploaded, len(entries) - uploaded, total, f"s3://{bucket}/{manifest_key}")


def verify(dest: str, entries: list[dict]) -> None:
    """List the prefix and compare keys and sizes with the manifest."""
    bucket, prefix = storage.split_s3(dest)
    client = storage.s3_client()
    listed = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for obj in page.get("Contents", []):
            listed[obj["Key"][len(prefix) + 1 if prefix else 0:]] = obj["Size"]
    missing = [e["key"] for e in entries if e["key"] not in listed]
    wrong = [e["key"] for e in entries if e["key"] in listed and listed[e["key"]] != e["size"]]
    if missing or wrong:
        raise storage.StorageError(f"{dest}: verification failed: {len(missing)} missing, {len(wrong)} with a "
                                   f"wrong size (first: {(missing + wrong)[:3]})")
