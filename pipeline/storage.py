"""Filesystems for local paths and s3:// URIs, one resolver for data, runs and weights.

pyarrow ignores AWS_ENDPOINT_URL, so the endpoint is read here (the same variables
boto3 honours) and passed to pyarrow explicitly: both clients always agree.
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs


def s3_endpoint() -> str:
    """The S3 endpoint boto3 would use: AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, else AWS's default."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    endpoint = s3_endpoint() if endpoint is None else endpoint
    kwargs = {}
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # Fail fast on a dead endpoint instead of retrying for minutes.
    return pafs.S3FileSystem(connect_timeout=5, request_timeout=30,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), **kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """'s3://bucket/key' or a local path -> (filesystem, path inside it)."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if base.startswith("s3://") else os.path.join(base, *parts)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
