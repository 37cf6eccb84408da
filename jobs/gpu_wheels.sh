#!/usr/bin/env bash
# Wheels that let jobs/bench_gpu.sh run on an offline GPU machine whose Python 3.12 has torch but
# not Ray: Ray 2.60 without its Java jars and RLlib (79 MB -> 43 MB, under a 64 MiB transfer cap)
# plus the few packages Ray Train/Tune need there. Run from the repo root on a machine with PyPI.
set -euo pipefail
DEST=${DEST:-.whl}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
mkdir -p "$DEST" /tmp/ray-full
python3 -m pip download -q --no-deps "${PLAT[@]}" -d /tmp/ray-full ray==2.60.0
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" jsonschema jsonschema-specifications referencing \
  rpds-py tensorboardX 'pydantic==2.14.4' 'pydantic-core==2.50.5' annotated-types typing-inspection
python3 - "$DEST" <<'PY'
import sys, zipfile, glob, os
src = glob.glob("/tmp/ray-full/ray-2.60.0-*.whl")[0]
drop = lambda n: n.startswith(("ray/jars/", "ray/rllib/")) or n.endswith(".js.map")
with zipfile.ZipFile(src) as z, zipfile.ZipFile(os.path.join(sys.argv[1], os.path.basename(src)), "w",
                                                 zipfile.ZIP_DEFLATED) as out:
    for info in z.infolist():
        if drop(info.filename):
            continue
        data = z.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):  # keep RECORD true to the files shipped
            data = b"\n".join(l for l in data.split(b"\n") if not drop(l.split(b",")[0].decode()))
        out.writestr(info, data)
PY
du -sh "$DEST"
