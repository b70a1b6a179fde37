"""``python -m sparseforge ...``: the command line where the ``sparseforge`` entry point is not
installed (a checkout on ``PYTHONPATH``, e.g. on a lent GPU machine)."""
from .cli import main

main(prog_name="sparseforge")
