"""The time a compiled attention takes to meet a new grid (the code:
``sparseforge.bench.schedule_build``):

    python benchmarks/schedule_build.py [--repeat 3] [--out benchmarks/results/schedule_build_cpu.json]
"""
import sys

from sparseforge.bench.schedule_build import main

if __name__ == "__main__":
    sys.exit(main())
