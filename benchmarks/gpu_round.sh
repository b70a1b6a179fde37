#!/usr/bin/env bash
# One GPU round, for a session that is lent an H100/H200 (the `device` tool's `run`):
# the GPU tests, the benchmark suite and the routed memory report, with every result
# written under $OUT (copy them into benchmarks/results/ and commit them).
#
# NOT RUN YET: no GPU has been lent to this project's sessions so far. Expect to fix
# something on the first try, and size ONLY (problem ids) to the device time left: the
# whole suite at full size does not fit one 10-minute call.
#
# The device image has torch and triton of its own (2.11 / 3.6 when last read, older than
# pyproject's pins) and no platformdirs: carry a platformdirs wheel in .whl/ (ignored):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl platformdirs
# and call: run(command="bash benchmarks/gpu_round.sh", carry=[".whl"], timeout_s=590)
# Triton 3.6 (the image's) is checked on the CPU by .ci/run (tests/codegen); a kernel that
# spills there is listed in tests/codegen/_spills.py, so numbers from it may understate 3.9.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_round}
ONLY=${ONLY:-P1,P3,P4,P7,P8,P10,P11}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
# 1. correctness first: every @pytest.mark.gpu test (real Triton kernels vs the float64 reference)
#    (tests/codegen/test_gpu_kernels.py: every kind of schedule, fp16/bf16, with and without
#    score modifiers, the dK/dV kernel on its own tiles; a failure does not stop the round)
timeout 220 python3 -m pytest tests -m gpu -q --maxfail=10 -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
# 2. the suite at full size (forward and forward+backward, peers side by side)
timeout 200 python3 -m sparseforge bench --suite --only "$ONLY" --out "$OUT/suite_gpu.json" \
    --plot "$OUT/suite_gpu.png" 2>&1 | tee "$OUT/suite.log"
# 3. one decode step (Sink + 4096 window; 8k, 128k, 1M caches): the decode kernel, contiguous and
#    paged, against SDPA over the allowed keys and over the whole cache
timeout 60 python3 benchmarks/decode.py --caches 8192,131072,1048576 --out "$OUT/decode_gpu.json" 2>&1 | tee "$OUT/decode.log"
# 4. routed (BiFormer) peak memory, ours vs the gather implementation
timeout 90 python3 benchmarks/memory.py --device cuda --grids 64,128 --p7 --out "$OUT/routed_memory_gpu.json" \
    2>&1 | tee "$OUT/memory.log"
