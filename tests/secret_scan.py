"""The credential scan: every object of the given buckets and every file under the given folders,
searched for the S3 keys this process holds. A hit is a secret at rest."""

import os

import boto3

from pipeline.devs3 import IDENTITIES_FILE

KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def held_secrets() -> dict[str, bytes]:
    """The environment's S3 credentials, by variable name."""
    return {k: os.environ[k].encode() for k in KEY_VARIABLES if os.environ.get(k)}


def credential_hits(wanted: dict[str, bytes], *, buckets=(), folders=(), skip=()) -> tuple[list[str], int]:
    """('where: which key' for every hit, how many objects and files were read). Folders under skip,
    and any SeaweedFS server's own folder (its identities file, and its logs that print them), are
    not read: a server holds its keys."""
    hits, scanned = [], 0
    client = boto3.client("s3")
    for bucket in buckets:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                scanned += 1
                hits += [f"s3://{bucket}/{obj['Key']}: {k}" for k, v in wanted.items() if v in body]
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip
                       and not os.path.exists(os.path.join(root, d, IDENTITIES_FILE))]
            for name in files:
                try:
                    with open(os.path.join(root, name), "rb") as fh:
                        body = fh.read()
                except OSError:  # sockets, files gone while walking
                    continue
                scanned += 1
                hits += [f"{root}/{name}: {k}" for k, v in wanted.items() if v in body]
    return hits, scanned
