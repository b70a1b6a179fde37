"""Stage 4 — execute: the generated Triton kernels (launch, interpreter, ahead-of-time
compile), the CPU executor, and linear attention's own kernels and torch path."""
