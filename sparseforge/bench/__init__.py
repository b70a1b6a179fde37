"""The benchmarks: the suite of the issue's problems against their peers, and the memory,
packing and tile-efficiency reports. ``sparseforge bench --suite`` runs the suite;
``benchmarks/*.py`` are thin scripts over these modules and ``benchmarks/results/`` holds
what they wrote.

- ``cases``: the problems (``Shape``, ``Case``, ``CASES``, ``select``), their random inputs
- ``efficiency``: exact allowed pairs and visited tiles, ours vs 1-D 128x128 tiles
- ``peers``: the peers' implementations and names (FlexAttention, SDPA, NATTEN, HaloNet,
  MaxViT, BiFormer gather, padded windows, scattered linear), the synthetic voxels
- ``timing``: wall-clock helpers, schedule-build and ``sf.compile`` measurements, speedups
- ``content``: the harnesses of the content-dependent cases (P7 routed, P8/P9 voxels)
- ``runner``: one case on CPU or CUDA, the whole suite, its metadata
- ``report``: the text table and the plot of a suite result
- ``suite``: the suite's public names in one place, and its command line (``plot``)
- ``messages``: progress lines on stderr and one-line failure reasons
- ``run_info``: device name, versions and time recorded in every result
- ``memory``: peak memory of routed attention, ours vs the gather implementation
- ``scattered_packing``: visited tiles of the scattered kernels per tile shape and alignment
- ``tile_efficiency``: tile efficiency of N-D tiles vs 1-D tiles for fixed problems
- ``schedule_build``: the time a compiled attention takes to meet a new grid
- ``static_report``: ours vs FlexAttention's templates compiled ahead of time for sm_90 (SASS per
  tile loop, issue slots per allowed pair; no GPU)

Nothing outside ``sparseforge.bench`` and ``sparseforge.cli`` imports this package.
"""
