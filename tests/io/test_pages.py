"""Memory-mapped .pt checkpoints hand their pages back once a tensor is copied out, and only
pages that the file still holds (Linux; elsewhere nothing is dropped)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedmerge.io import load_state, pages
from fedmerge.offline import merge_checkpoints


def rss() -> int:
    """This process's resident set, in bytes."""
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def _pt_merge_inputs(tmp_path):
    """A base and two fine-tuned .pt state dicts, and their FedAvg merge written in numpy float64."""
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(32, generator=gen)}
    tuned = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    paths = []
    for i, state in enumerate([base, *tuned]):
        torch.save(state, tmp_path / f"m{i}.pt")
        paths.append(tmp_path / f"m{i}.pt")
    expected = {k: base[k].double().numpy() + np.mean([t[k].double().numpy() - base[k].double().numpy()
                                                       for t in tuned], axis=0) for k in base}
    return paths, expected


@pytest.mark.parametrize("platform", ["no smaps", "unreadable smaps", "no madvise", "garbled smaps"])
def test_page_dropping_can_never_fail_a_merge(tmp_path, monkeypatch, platform):
    """Every place where the lookup is impossible (macOS, Windows, sandboxes, an unknown smaps
    format) drops nothing and merges exactly as usual."""
    if platform == "no smaps":
        monkeypatch.setattr(pages, "SMAPS", str(tmp_path / "missing"))
    elif platform == "unreadable smaps":
        monkeypatch.setattr(pages, "SMAPS", str(tmp_path))  # a directory: open() fails
    elif platform == "no madvise":
        monkeypatch.setattr(pages, "_MADVISE", None)
    else:
        garbled = tmp_path / "smaps"
        garbled.write_text("zz-yy rw-p nothex 00:00 notanumber\nRss: lots kB\n")
        monkeypatch.setattr(pages, "SMAPS", str(garbled))
    paths, expected = _pt_merge_inputs(tmp_path)
    out = tmp_path / "merged.safetensors"
    merge_checkpoints(paths[0], paths[1:], "fedavg", out)
    merged = load_state(out)
    for key, value in expected.items():
        np.testing.assert_allclose(merged[key].double().numpy(), value, atol=1e-6)
    assert pages.clean_file_mapping([torch.ones(4)], inode=1) is None


@pytest.mark.skipif(pages._MALLOPT is None, reason="glibc's mallopt only")
def test_within_large_buffers_mapped_a_freed_buffer_leaves_the_resident_set_at_once():
    """Freed buffers in the middle of glibc's heap stay resident until a trim; within
    ``large_buffers_mapped`` a buffer of a megabyte or more is its own mapping and goes when freed."""
    def resident_after_freeing_every_other_buffer() -> int:
        buffers = [torch.ones(2**19) for _ in range(32)]  # 32 buffers of 2 MB, touched
        before = rss()
        del buffers[::2]  # holes, not the top of the heap
        return before - rss()

    pages.release_free_heap()
    with pages.large_buffers_mapped():
        freed_mapped = resident_after_freeing_every_other_buffer()
    assert freed_mapped >= 24 * 2**20  # 16 buffers of 2 MB went back
    # after it, glibc's largest dynamic threshold: the same buffers come from the heap and stay
    assert resident_after_freeing_every_other_buffer() <= 8 * 2**20
    pages.release_free_heap()
