"""Filesystems for local paths and s3:// URIs, one resolver for data, runs and weights.

pyarrow ignores AWS_ENDPOINT_URL, so the endpoint is read here (the same variables
boto3 honours) and passed to pyarrow explicitly: both clients always agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.scratch import scratch_folder


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
    # No keys here, whatever this process's environment holds: the filesystem is pickled into Ray's
    # data tasks, train workers and Tune's experiment state (tuner.pkl in the run storage), and
    # pyarrow pickles explicit keys with it. Without them every process that unpickles it resolves
    # AWS's chain on its own node (environment, profile, instance role), as an IAM instance profile
    # expects, and nothing written anywhere carries a credential.
    # Fail fast on a dead endpoint instead of retrying for minutes.
    return pafs.S3FileSystem(connect_timeout=5, request_timeout=30,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), **kwargs)


KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@contextlib.contextmanager
def keys_held_in_a_private_file():
    """While inside, this process's AWS keys live in a private shared-credentials file, not in its
    environment; AWS clients here (pyarrow, boto3) keep resolving them through their usual chain.

    Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the session token from the driver's
    environment into every trial's runtime_env, which sends them to whichever node runs the trial
    and into its runtime-env agent log. Around `Tuner.fit` the keys are therefore out of the
    environment; every node resolves its own credentials (environment, profile or instance role)."""
    keys = {k: os.environ[k] for k in KEY_VARIABLES if k in os.environ}
    if "AWS_ACCESS_KEY_ID" not in keys or "AWS_SECRET_ACCESS_KEY" not in keys:
        yield
        return
    saved = {k: os.environ.get(k) for k in (*KEY_VARIABLES, "AWS_SHARED_CREDENTIALS_FILE")}
    with scratch_folder("ray-finetune-credentials-") as folder:  # mode 0700: this user only
        path = os.path.join(folder, "credentials")
        token = keys.get("AWS_SESSION_TOKEN") or keys.get("AWS_SECURITY_TOKEN")
        entry = [f"aws_access_key_id = {keys['AWS_ACCESS_KEY_ID']}",
                 f"aws_secret_access_key = {keys['AWS_SECRET_ACCESS_KEY']}"]
        entry += [f"aws_session_token = {token}"] if token else []
        # Keys in the environment win over any profile: the same keys under whichever profile is selected.
        lines = [line for name in dict.fromkeys(["default", os.environ.get("AWS_PROFILE") or "default"])
                 for line in (f"[{name}]", *entry)]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        for k in KEY_VARIABLES:
            os.environ.pop(k, None)
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = path
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """'s3://bucket/key' or a local path -> (filesystem, path inside it)."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if base.startswith("s3://") else os.path.join(base, *parts)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file or nothing: a reader never sees half of it. An S3 object appears only when
    its upload completes; a local file is written under a temporary name, then renamed."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    target = path if uri.startswith("s3://") else f"{path}.{os.getpid()}.part"
    with fs.open_output_stream(target) as out:
        out.write(data)
    if target != path:
        os.replace(target, path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete(uri: str) -> None:
    """Remove a file; one that is already gone is fine."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def read_json(uri: str):
    """A JSON file this project wrote; StorageError naming it when it is truncated or not JSON."""
    import json

    data = read_bytes(uri)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StorageError(f"{uri} is not valid JSON ({e}; {len(data)} bytes): the file is truncated or "
                           "was not written by ray-finetune") from None


class StorageError(RuntimeError):
    """Object storage that cannot be used as configured: one paragraph, endpoint and bucket named."""


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key.rstrip("/")


def s3_client(timeout: float = 10):
    """boto3 client on the same endpoint pyarrow uses, with short timeouts (fail fast, never hang)."""
    import boto3
    from botocore.config import Config

    # A session of its own: boto3's default session keeps the first credentials it resolved, and
    # this process's environment may have changed since (keys moved aside around a search).
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint() or None,
                                          config=Config(connect_timeout=3, read_timeout=timeout,
                                                        retries={"max_attempts": 2, "mode": "standard"}))


def preflight(uri: str, write: bool) -> None:
    """Check an s3:// location before any Ray work: reachable, credentials valid, bucket present,
    readable (and writable when write=True). Raises StorageError within seconds."""
    if not uri.startswith("s3://"):
        return
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    bucket, key = split_s3(uri)
    endpoint = s3_endpoint() or "AWS S3 (default endpoint)"
    where = f"{uri} (endpoint {endpoint}, bucket '{bucket}')"
    client = s3_client()
    try:
        # A GET, not HeadBucket: HEAD responses carry no error code, so a bad secret and a
        # missing permission would both read as a bare 403.
        client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        if write:
            probe = f"{key}/.ray-finetune-write-check" if key else ".ray-finetune-write-check"
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as e:
        raise StorageError(f"cannot reach {where}: {e}. Check the endpoint (--run.s3_endpoint, "
                           "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and that the server is up.") from None
    except NoCredentialsError:
        raise StorageError(f"no credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           "AWS_PROFILE, or run with an instance role.") from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"bucket '{bucket}' does not exist at {endpoint} ({uri}); create it first.") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            raise StorageError(f"credentials rejected by {where}: {code}. Check AWS_ACCESS_KEY_ID/"
                               "AWS_SECRET_ACCESS_KEY or the profile in use.") from None
        if code in ("403", "AccessDenied", "Forbidden") or status == 403:
            action = "write to" if write else "read"
            raise StorageError(f"no permission to {action} {where} ({e.operation_name}: {code}); "
                               "the credentials are valid but the policy does not allow it.") from None
        raise StorageError(f"{where}: {e.operation_name} failed: {code or e}") from None
    except BotoCoreError as e:
        raise StorageError(f"{where}: {e}") from None


def configure_endpoint(endpoint: str) -> None:
    """An explicit endpoint wins over the environment, for boto3 and pyarrow alike (via the variable both read here)."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_download(uri: str, sha256: str = "", cache_dir: str | None = None) -> str:
    """Fetch an s3:// object once into a local cache (verified against sha256 when given); return its path.
    The cache: cache_dir, else $XDG_CACHE_HOME/ray-finetune/objects (~/.cache when unset)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cache_dir = cache_dir or os.path.join(cache_home, "ray-finetune", "objects")
    bucket, key = split_s3(uri)
    local = os.path.join(cache_dir, hashlib.sha256(f"{s3_endpoint()}|{uri}".encode()).hexdigest()[:16],
                         posixpath.basename(key))

    if not os.path.exists(local) or (sha256 and sha256_file(local) != sha256):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.{os.getpid()}.part"
        s3_client(timeout=60).download_file(bucket, key, tmp)
        got = sha256_file(tmp)
        if sha256 and got != sha256:
            os.remove(tmp)
            raise StorageError(f"{uri}: sha256 {got} does not match the expected {sha256}; not cached")
        os.replace(tmp, local)  # atomic: concurrent fetchers on one node never see a partial file
    return local


def s3_uri(storage_root: str, path: str) -> str:
    """Ray reports paths inside the filesystem; give s3:// back to users of s3 storage."""
    if storage_root.startswith("s3://") and path and not path.startswith("s3://"):
        return "s3://" + path
    return path
