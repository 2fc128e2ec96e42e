"""Memory-mapped .pt checkpoints hand their pages back once a tensor is copied out, and only
pages that the file still holds (Linux; elsewhere nothing is dropped)."""

from __future__ import annotations

import os

import pytest
import torch


def _resident_bytes_of(path) -> int:
    """Rss of this process's mappings of ``path`` (/proc/self/smaps), in bytes."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_pt_reads_drop_their_pages_from_the_mapping_and_leave_heap_memory_alone(tmp_path):
    from fedmerge.io.checkpoint import Checkpoint
    from fedmerge.io.pages import drop_pages

    state = {"w": torch.randn(1024, 1024), "v": torch.randn(4096)}
    torch.save(state, tmp_path / "big.pt")
    ck = Checkpoint(tmp_path / "big.pt")
    assert ck._mapped is not None  # found in /proc/self/smaps, nothing written
    ck._state["w"].sum()  # touch every page, as a plain memory-mapped read would leave them
    assert _resident_bytes_of(tmp_path / "big.pt") >= 4 << 20
    w = ck["w"]
    assert torch.equal(w, state["w"]) and _resident_bytes_of(tmp_path / "big.pt") < 1 << 20
    assert torch.equal(ck._read("w"), state["w"])  # read again: faulted back in from the file, same values
    heap = state["v"].clone()
    drop_pages(heap, ck._mapped)  # not inside the mapping: must change nothing
    assert torch.equal(heap, state["v"])


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_pages_torch_wrote_at_load_are_never_dropped(tmp_path):
    # torch byte-swaps a big-endian file's tensors in place in its private mapping: those pages are the
    # only copy of the right values, so the checkpoint must keep them (dropping gave garbage on re-read)
    import zipfile

    from fedmerge.io.checkpoint import Checkpoint

    state = {"w": torch.arange(3000, dtype=torch.float32), "v": torch.arange(5, dtype=torch.float32) + 0.5}
    torch.save({k: torch.from_numpy(v.numpy().byteswap()) for k, v in state.items()}, tmp_path / "little.pt")
    with zipfile.ZipFile(tmp_path / "little.pt") as zin, zipfile.ZipFile(tmp_path / "big.pt", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, b"big" if info.filename.endswith("/byteorder") else zin.read(info.filename))
    ck = Checkpoint(tmp_path / "big.pt")
    assert ck._mapped is None  # not droppable: torch wrote into the mapping
    assert torch.equal(ck["w"], state["w"]) and torch.equal(ck["v"], state["v"])
    assert torch.equal(ck._read("w"), state["w"]) and torch.equal(ck._read("v"), state["v"])
