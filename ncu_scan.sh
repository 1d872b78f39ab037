#!/usr/bin/env bash
# Nsight Compute on the lane-serial scan kernels at M1-3B, 8k tokens. Temporary.
set -uo pipefail
NCU=/usr/local/cuda/bin/ncu
$NCU --version | tail -1
args="python benchmarks/bench_selective_scan.py --tokens 8192 --variants cuda --no-plot --ref-max-tokens 0 --out /tmp/ncu_x"
$NCU --kernel-name-base demangled --kernel-name "regex:scan_ls_kernel.*bool\)1" --launch-skip 1 --launch-count 1 --section WarpStateStats --section SchedulerStats \
  --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis $args > $OUT/ncu_sections.txt 2>&1
grep -v "^==PROF==" $OUT/ncu_sections.txt | grep -i "scan_ls\|Issued\|Eligible\|Active Warps\|Stall\|Theoretical Occ\|Achieved Occ\|Pipe\|Shared\|Registers\|Block Limit\|Duration" | head -80
$NCU --kernel-name-base demangled --kernel-name "regex:scan_ls_kernel.*bool\)1" --launch-skip 1 --launch-count 1 --section SourceCounters --section WarpStateStats \
  --page source --print-source sass --csv $args > $OUT/ncu_bwd_source.csv 2>&1
wc -l $OUT/ncu_bwd_source.csv; head -c 1500 $OUT/ncu_bwd_source.csv
