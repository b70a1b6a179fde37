"""Builds made before the ops became one fixed set (format 1: each build named a torch op of
its own, no "format" in the meta) are refused with a rebuild message, not a crash."""
import pytest
import torch

import sparseforge as sf
from sparseforge.runtime.build import FORMAT, load, save
from sparseforge.runtime.builddir import BuildIntegrityError, read_build, write_build


def test_a_build_before_the_fixed_ops_is_refused_with_a_rebuild_message(tmp_path):
    attn = sf.compile(sf.Blocks(2), sf.Problem(grid=(4, 4), heads=1, head_dim=16, dtype=torch.float16))
    path = save(attn, tmp_path / "b", targets=())
    assert read_build(path).meta["format"] == FORMAT == 3
    build = read_build(path)
    old_meta = {key: value for key, value in build.meta.items() if key != "format"}  # what a format-1 build wrote
    files = {rel: build.read_text(rel) for rel in ("kernels/fwd.py", "kernels/bwd_dq.py", "kernels/bwd_dkdv.py", "config.json", "schedule.txt")}
    old = write_build(tmp_path / "old", files, old_meta)
    with pytest.raises(BuildIntegrityError, match=r"made by an older sparseforge \(build format 1.*rebuild it with "
                                                  r"'sparseforge compile \.\.\. --out"):
        load(old)
    assert load(path).name == attn.name  # the current format loads
