"""What crossing nodes costs: the same 2-worker run on one node and on two, on this machine.

    python -m tests.bench_multinode [--epochs 3] [--images-per-class 160]

Both clusters have a head without CPUs and 4 worker CPUs in all: one node of 4, or two nodes of 2.
Workers ask for 1.5 CPUs, so the two share a node in the first and cannot in the second. Every node
runs on this one machine, so this is Ray's overhead of crossing nodes (object transfers between
object stores, DDP over TCP instead of within a host, a raylet more), not a speed-up: the cores are
the same two.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

from pipeline.devs3 import Identity, LocalS3
from pipeline.synthetic import make_image_folder
from tests.test_multinode import TWO_NODE_RUN, LocalCluster, read_object


def timed_run(cluster: LocalCluster, data: str, name: str, epochs: int) -> dict:
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *TWO_NODE_RUN, "--data", data,
                          "--storage", "s3://runs/bench", "--name", name, "--epochs", str(epochs)],
                         env=cluster.driver_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    history = json.loads(read_object(cluster.s3, "runs", f"bench/{name}/metrics.json"))
    steady = history[1:] or history
    return {"nodes": len(set(history[0]["worker_nodes"])), "wall_s": wall,
            "img_per_s": sum(h["train_images"] for h in steady) / sum(h["epoch_time_s"] for h in steady),
            "epoch_s": sum(h["epoch_time_s"] for h in steady) / len(steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images-per-class", type=int, default=160)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bmn-", dir="/tmp")
    admin = ["Admin", "Read", "Write", "List", "Tagging"]
    s3 = LocalS3(f"{work}/s3", {n: Identity(f"{n}-{secrets.token_hex(4)}", secrets.token_hex(16), admin)
                                for n in ("admin", "driver", "node")}).start()
    results = {}
    try:
        for bucket in ("runs", "datasets"):
            s3.create_bucket(bucket)
        local = make_image_folder(f"{work}/data", args.images_per_class, 20, 64)
        for layout, nodes in (("1 node x 4 CPUs", [4]), ("2 nodes x 2 CPUs", [2, 2])):
            cluster = LocalCluster(s3, tempfile.mkdtemp(prefix="c", dir=work), worker_cpus=nodes)
            try:
                if not results:
                    subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "stage", local, "s3://datasets/b"],
                                   env=cluster.driver_env(), check=True, capture_output=True)
                results[layout] = timed_run(cluster, "s3://datasets/b", f"n{len(nodes)}", args.epochs)
            finally:
                cluster.shutdown()
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    one, two = results.values()
    print(f"{'layout':<18} {'rank nodes':>10} {'img/s (epochs 2+)':>18} {'epoch s':>8} {'command wall s':>15}")
    for layout, r in results.items():
        print(f"{layout:<18} {r['nodes']:>10} {r['img_per_s']:>18.1f} {r['epoch_s']:>8.1f} {r['wall_s']:>15.1f}")
    print(f"crossing nodes: {two['img_per_s'] / one['img_per_s']:.2f}x the one-node throughput, "
          f"{two['wall_s'] - one['wall_s']:+.1f} s of command wall time (Ray's overhead, same two cores)")


if __name__ == "__main__":
    main()
