"""Visited tiles of the scattered kernels per tile shape and window alignment (the code:
``sparseforge.bench.scattered_packing``):

    python benchmarks/scattered_packing.py [--voxels 131072] [--out FILE.json]
"""
import sys

from sparseforge.bench.scattered_packing import main

if __name__ == "__main__":
    sys.exit(main())
