"""Tile efficiency of sparseforge's N-D tiles vs 1-D 128x128 tiles (the code:
``sparseforge.bench.tile_efficiency``):

    python benchmarks/tile_efficiency.py [--out benchmarks/results/tile_efficiency_cpu.json]
"""
from sparseforge.bench.tile_efficiency import main

if __name__ == "__main__":
    main()
