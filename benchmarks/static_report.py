"""Static report (no GPU): our kernels vs FlexAttention's own Triton templates, compiled
ahead of time for sm_90 on the CPU; issue slots per allowed pair, forward and backward, on
the suite's static problems (the code: ``sparseforge.bench.static_report``):

    python benchmarks/static_report.py [--only P1,P3] [--out benchmarks/results/static_report_sm90.json]
"""
from sparseforge.bench.static_report import main

if __name__ == "__main__":
    main()
