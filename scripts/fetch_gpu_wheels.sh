#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels that the GPU machines (Python 3.12, x86-64,
# no internet) lack, into <repo>/.whl (git-ignored). They travel with `carry: [".whl"]` and
# scripts/gpu_check.sh installs them with --no-index --no-deps. Everything else the suite needs
# (torch, triton, numpy, scipy, scikit-learn, matplotlib, tqdm, tensorboard, pytest, ...) is in
# the GPU image already (see the device notes' package list).
#
# usage: scripts/fetch_gpu_wheels.sh [DEST]      (default: <repo>/.whl)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
# Same pins as requirements-dev.txt, so the GPU run tests against what CI tests against.
BINARY=(pytorch-metric-learning==2.9.0 geomloss==0.3.1 pot==0.9.7.post1)   # wheels on the index
SDIST_ONLY=(nflows==0.14 normflows==1.7.3)                                  # built here (pure Python)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl   # one version of each: two stop the whole install there
for spec in "${BINARY[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
for spec in "${SDIST_ONLY[@]}"; do
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$spec"
done

# POT's wheel ships its extension modules with debug info (33 MB, 175 MB unpacked). Strip it and
# rewrite RECORD (sha256 and size of each changed file), so the wheel stays valid and small.
"$PY" - "$DEST" <<'PYEOF'
import base64, glob, hashlib, os, subprocess, sys, tempfile, zipfile

for path in glob.glob(os.path.join(sys.argv[1], "*.whl")):
    with zipfile.ZipFile(path) as zin:
        infos = zin.infolist()
        if not any(i.filename.endswith(".so") or ".so." in i.filename for i in infos):
            continue
        data = {i.filename: zin.read(i) for i in infos}
    with tempfile.TemporaryDirectory() as tmp:
        for name in data:
            if name.endswith(".so") or ".so." in name:
                f = os.path.join(tmp, "lib.so")
                with open(f, "wb") as fh:
                    fh.write(data[name])
                subprocess.run(["strip", "--strip-debug", f], check=True)
                with open(f, "rb") as fh:
                    data[name] = fh.read()
    record = next(n for n in data if n.endswith(".dist-info/RECORD"))
    lines = []
    for line in data[record].decode().splitlines():
        name = line.rsplit(",", 2)[0]
        if name in data and name != record:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data[name]).digest()).rstrip(b"=").decode()
            line = f"{name},sha256={digest},{len(data[name])}"
        lines.append(line)
    data[record] = ("\n".join(lines) + "\n").encode()
    before = os.path.getsize(path)
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
        for i in infos:
            zout.writestr(i, data[i.filename], compress_type=zipfile.ZIP_DEFLATED)
    os.replace(path + ".tmp", path)
    print(f"stripped {os.path.basename(path)}: {before / 2**20:.1f} MiB -> {os.path.getsize(path) / 2**20:.1f} MiB")
PYEOF

ls -l "$DEST"
du -sh "$DEST"
