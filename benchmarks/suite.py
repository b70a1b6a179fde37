"""The benchmark suite's command line (the code: ``sparseforge.bench``; the suite itself runs
with ``sparseforge bench --suite``):

    python benchmarks/suite.py plot RESULTS.json OUT.png
"""
import sys

from sparseforge.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
