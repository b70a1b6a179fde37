"""sf.load while another thread replaces the build at the same path (save): every load
returns one of the two builds, whole; none fails (issue 16, item 3)."""
import threading

import torch

import sparseforge as sf
from sparseforge.codegen.config import KernelConfig
from sparseforge.runtime.build import load, save

PATTERN = sf.Neighborhood(3)
PROBLEM = sf.Problem(grid=(8, 8), heads=1, head_dim=16, dtype=torch.float32)


def test_load_never_fails_while_the_build_is_replaced(tmp_path):
    attns = [sf.compile(PATTERN, PROBLEM, config=KernelConfig(q_tile=t, k_tile=t)) for t in ((4, 4), (8, 8))]
    out = tmp_path / "na"
    save(attns[0], out, targets=())
    stop, errors = threading.Event(), []

    def replace():
        try:
            for i in range(30):
                save(attns[(i + 1) % 2], out, targets=())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()
    writer = threading.Thread(target=replace)
    writer.start()
    loads, failures, seen = 0, [], set()
    while not stop.is_set() or loads < 5:
        try:
            attn = load(out)
            assert attn.config in (attns[0].config, attns[1].config)
            assert attn.build.read_text("kernels/fwd.py") == attn.source("fwd")
            seen.add(attn.config.q_tile)
        except Exception as e:  # noqa: BLE001 - counted and shown below
            failures.append(repr(e))
        loads += 1
    writer.join()
    assert errors == [] and failures == [], (loads, failures[:3])
    assert len(seen) == 2, (seen, loads)
