"""Every entry point imports on its own, in a fresh interpreter: an import cycle between packages
shows only in some import orders (a test session has imported everything in its own order first;
`fedmerge merge` imports fedmerge.offline, and so the models, before the data stack)."""

from __future__ import annotations

import subprocess
import sys

ENTRY_POINTS = ["fedmerge", "fedmerge.offline", "fedmerge.recipe", "fedmerge.models", "fedmerge.data",
                "fedmerge.train", "fedmerge.merging", "strategies.one_shot", "clients.work", "simulations.cli",
                "simulations.sweep"]


def test_every_entry_point_imports_first_in_a_fresh_interpreter():
    runs = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True) for name in ENTRY_POINTS}
    failed = {}
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        if run.returncode:
            failed[name] = stderr.strip().splitlines()[-1]
    assert not failed, failed
