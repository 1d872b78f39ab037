#!/usr/bin/env bash
# Nsight Compute profile of one lane-serial scan kernel at the M1-3B shape (bf16, 8192 packed tokens), on the GPU
# machine, from the repo root. Writes under $OUT (default /tmp/ncu_scan):
#   ncu_sections.txt   warp states, scheduler, occupancy of the kernel
#   ncu_source.csv     per-SASS-instruction stall samples (Source Counters), summarised by opcode on stdout
# Usage: bash benchmarks/ncu_scan.sh [fwd|bwd]      (the kernel: forward or backward; default bwd)
set -uo pipefail
case ${1:-bwd} in
  fwd) flag=0 ;;
  bwd) flag=1 ;;
  *) echo "usage: bash benchmarks/ncu_scan.sh [fwd|bwd]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/ncu_scan}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"
NCU=${NCU:-/usr/local/cuda/bin/ncu}
# The first matching launch is the benchmark's correctness check (small documents): profile the second.
pick=(--kernel-name-base demangled --kernel-name "regex:scan_ls_kernel.*bool\)$flag" --launch-skip 1 --launch-count 1)
bench=(python benchmarks/bench_selective_scan.py --tokens 8192 --variants cuda --no-plot --ref-max-tokens 0
  --out "$OUT/bench")
"$NCU" "${pick[@]}" --section WarpStateStats --section SchedulerStats --section Occupancy "${bench[@]}" \
  > "$OUT/ncu_sections.txt" 2>&1 || { tail -20 "$OUT/ncu_sections.txt"; exit 1; }
grep -v "^==PROF==" "$OUT/ncu_sections.txt" | grep -i "Issued\|Eligible\|Active Warps\|Cycles Per Issued\|Occupancy"
"$NCU" "${pick[@]}" --section SourceCounters --page source --print-source sass --csv "${bench[@]}" \
  > "$OUT/ncu_source.csv" 2>&1 || { tail -20 "$OUT/ncu_source.csv"; exit 1; }
python - "$OUT/ncu_source.csv" <<'PY'
"""Stall samples per SASS opcode: where the warps wait (a stall is charged to the instruction that waits)."""
import collections, csv, io, sys
raw = open(sys.argv[1]).read()
rows = list(csv.DictReader(io.StringIO(raw[raw.index('"Address","Source"'):])))
samples, count = collections.Counter(), collections.Counter()
for r in rows:
    words = (r["Source"] or "?").split()
    op = (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]
    samples[op] += int(r["Warp Stall Sampling (All Samples)"] or 0)
    count[op] += 1
total = sum(samples.values()) or 1
for op, n in samples.most_common(15):
    print(f"{op:10s} {100 * n / total:5.1f}% of stall samples, {count[op]} instructions")
PY
