"""Hub ids resolve to local snapshots holding the weights: safetensors where the repo has them, else
its PyTorch ``.bin`` files (``openai/clip-vit-base-patch32``'s main branch has only those).

A fake ``snapshot_download`` stands in for the Hub: it "downloads" by copying, from a fake repo, the
files that match the patterns it is asked for into one snapshot folder, as the Hugging Face cache
does, and records every call. Nothing touches the network.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedmerge.io import hub
from fedmerge.models.clip import encoder_state

WEIGHTS = {"vision_model.embeddings.patch_embedding.weight": torch.arange(12.0).reshape(3, 1, 2, 2),
           "vision_model.post_layernorm.bias": torch.tensor([0.5, -1.5, 2.0]),
           "visual_projection.weight": torch.eye(3),
           "text_model.final_layer_norm.bias": torch.ones(3)}


class FakeHub:
    def __init__(self, tmp_path: Path, files: dict[str, bytes]) -> None:
        self.files, self.calls = files, []
        self.snapshot = tmp_path / "hub" / "snapshots" / "main"

    def snapshot_download(self, repo_id: str, *, allow_patterns: list[str], local_files_only: bool) -> str:
        self.calls.append((repo_id, tuple(allow_patterns), local_files_only))
        self.snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (self.snapshot / name).write_bytes(data)
        return str(self.snapshot)

    def fetched(self) -> set[str]:
        return {p.name for p in self.snapshot.iterdir()}


def _repo_files(tmp_path: Path, *, safetensors: bool) -> dict[str, bytes]:
    """A CLIP repo's files: config, a .bin (always), TF and Flax weights, safetensors only if asked."""
    torch.save(WEIGHTS, tmp_path / "w.bin")
    files = {"config.json": json.dumps({"model_type": "clip"}).encode(), "pytorch_model.bin":
             (tmp_path / "w.bin").read_bytes(), "tf_model.h5": b"tf", "flax_model.msgpack": b"flax"}
    if safetensors:
        save_file({k: v + 100 for k, v in WEIGHTS.items()}, str(tmp_path / "w.safetensors"))
        files["model.safetensors"] = (tmp_path / "w.safetensors").read_bytes()
    return files


@pytest.mark.parametrize("offline", [False, True])
def test_a_repo_without_safetensors_resolves_to_its_bin_weights(tmp_path, monkeypatch, offline):
    fake = FakeHub(tmp_path, _repo_files(tmp_path, safetensors=False))
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    directory = hub.resolve("openai/clip-vit-base-patch32")
    assert fake.fetched() == {"config.json", "pytorch_model.bin"}  # never the TF or Flax weights
    assert all(local is offline for _, _, local in fake.calls)  # offline stays cache-only
    state = encoder_state("openai/clip-vit-base-patch32")
    assert directory == fake.snapshot
    assert set(state) == {k for k in WEIGHTS if not k.startswith("text_model.")}
    for key, tensor in state.items():
        assert torch.equal(tensor, WEIGHTS[key])


def test_a_repo_with_safetensors_never_fetches_its_bin(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path, _repo_files(tmp_path, safetensors=True))
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    state = encoder_state("openai/clip-vit-base-patch32")
    assert fake.fetched() == {"config.json", "model.safetensors"} and len(fake.calls) == 1
    assert torch.equal(state["visual_projection.weight"], torch.eye(3) + 100)  # the safetensors' tensors
