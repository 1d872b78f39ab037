#!/usr/bin/env bash
# Fetch the mamba-ssm and causal-conv1d source distributions (the GPU benchmarks' CUDA baselines) into
# the ignored folder .gpu_baselines/, to carry to the GPU machine (no network there); build them there
# with benchmarks/build_cuda_baselines.py. Same versions as the CPU oracles in scripts/setup_env.sh.
set -euo pipefail
dest=${1:-.gpu_baselines}
mkdir -p "$dest"
python3 - "$dest" <<'PY'
import json, sys, urllib.request
dest = sys.argv[1]
for name, version in [("mamba-ssm", "2.3.2.post1"), ("causal-conv1d", "1.7.0")]:
    req = urllib.request.Request(f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.load(urllib.request.urlopen(req))["files"]
    sdist = next(f for f in files if f["filename"].endswith(f"-{version}.tar.gz"))
    urllib.request.urlretrieve(sdist["url"], f"{dest}/{sdist['filename']}")
    print(f"{dest}/{sdist['filename']}")
PY
