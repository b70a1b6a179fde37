#!/usr/bin/env bash
# Regenerate the pattern pictures in docs/patterns/ with sparseforge's own `show --png`.
# Run from anywhere: bash docs/make_pictures.sh   (needs the 'pictures' extra: matplotlib)
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/patterns
mkdir -p "$out"

picture() {  # picture NAME PATTERN [show options...]
    local name=$1 pattern=$2
    shift 2
    sparseforge show "$pattern" "$@" --png "$out/$name.png" --json > /dev/null
    printf '%-27s %6s bytes  %s %s\n' "$name.png" "$(wc -c < "$out/$name.png")" "$pattern" "$*"
}

picture neighborhood_2d        "Neighborhood(5, dilation=2)" --grid 28x28 --query 2,13
picture neighborhood_2d_border "Neighborhood(7)" --grid 28x28 --query 1,1
picture neighborhood_1d        "Neighborhood(7, dilation=2)" --seq 48 --query 2
picture neighborhood_3d        "Neighborhood((3, 5, 5))" --grid 6x24x24 --query 0,12,12
picture sliding_window         "SlidingWindow(6, 3)" --seq 48 --query 24
picture causal_llm             "Causal() & (SlidingWindow(12) | Sink(3))" --seq 48 --query 30
picture documents              "Documents([12, 8, 16, 12])" --seq 48 --query 25
picture global_tokens          "SlidingWindow(4, 4) | GlobalTokens([0, 24])" --seq 48 --query 12
picture halo                   "Halo(8, 3)" --grid 32x32 --query 12,13
picture blocks                 "Blocks(7)" --grid 28x28 --query 10,16
picture grid                   "Grid(7)" --grid 28x28 --query 10,16
picture maxvit_heads           examples/patterns.py:maxvit_heads --grid 28x28 --heads 8 --query 10,16
picture strided_shards         "StridedShards(4, 2, 4)" --seq 64 --heads 4 --query 40
picture routed                 "Routed(7, 3)" --grid 28x28 --query 10,16
picture scattered              "Scattered(8, shift=4)" --grid 32x32 --query 10,16
