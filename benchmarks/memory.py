"""Peak memory of routed (BiFormer) attention, ours vs the gather implementation (the code:
``sparseforge.bench.memory``):

    python benchmarks/memory.py [--grids 64,128] [--batch 1] [--heads 8] [--head-dim 32]
                                [--topk 4] [--region 8] [--p7] [--out benchmarks/results/routed_memory_cpu.json]
"""
import sys

from sparseforge.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
