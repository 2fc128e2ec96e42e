"""Every rule merges on the device its task vectors are on: no tensor of its own lands elsewhere.

Tested on the CPU alone by making every tensor created without a device land on the ``meta``
device: a rule that made one without following its inputs' device (as a CUDA merge would need)
then mixes devices and fails, or returns a result that differs from the ordinary run's."""

from __future__ import annotations

import pytest
import torch

from fedmerge import METHODS, merge


def task_vectors(n: int = 5, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (96, 80), "fc.bias": (80,), "proj.weight": (72, 96), "scale": ()}
    return [{k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()} for _ in range(n)]


def options_for(method: str, n: int) -> dict:
    return {"local_steps": [float(i + 1) for i in range(n)]} if method == "fednova" else {}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_rule_creates_its_tensors_on_its_inputs_device(method):
    taus = task_vectors()
    weights = [0.1, 0.2, 0.3, 0.15, 0.25]
    expected = merge(method, taus, weights, **options_for(method, len(taus)))
    with torch.device("meta"):  # what a rule creates without naming a device lands here
        merged = merge(method, taus, weights, **options_for(method, len(taus)))
    assert {t.device.type for t in merged.values()} == {"cpu"}
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["tsv", "tsv_compress", "iso_c", "iso_cts"])
def test_the_spectral_rules_fast_paths_follow_their_inputs_device(method):
    """Large enough that TSV-M takes its randomized Krylov path (11 blocks of 13 columns, at most
    half the smaller side), with one task of rank 8, whose Krylov basis needs fresh random columns."""
    gen = torch.Generator().manual_seed(1)
    taus = [{"w": torch.randn(400, 300, generator=gen)} for _ in range(7)]
    taus.append({"w": torch.randn(400, 8, generator=gen) @ torch.randn(8, 300, generator=gen)})
    expected = merge(method, taus)
    with torch.device("meta"):
        merged = merge(method, taus)
    torch.testing.assert_close(merged["w"], expected["w"], rtol=0, atol=0)


def test_merge_on_a_named_device_returns_to_the_inputs_device_and_changes_nothing_on_the_cpu():
    taus = task_vectors()
    for device in ("cpu", "auto", torch.device("cpu")):
        merged = merge("tsv", taus, device=device)
        torch.testing.assert_close(merged, merge("tsv", taus), rtol=0, atol=0)


def test_a_lazy_task_vector_is_moved_one_tensor_at_a_time():
    from collections.abc import Mapping

    reads = []

    class Lazy(Mapping):  # stands for a checkpoint read tensor by tensor
        def __init__(self, tensors):
            self.tensors = tensors

        def __getitem__(self, key):
            reads.append(key)
            return self.tensors[key]

        def __iter__(self):
            return iter(self.tensors)

        def __len__(self):
            return len(self.tensors)

    from fedmerge.merging.registry import on_device

    taus = task_vectors(3)
    view = on_device(Lazy(taus[0]), torch.device("cpu"))
    assert reads == []  # nothing read, let alone copied, up front
    view["fc.bias"]
    assert reads == ["fc.bias"]
    merged = merge("fedavg", [Lazy(t) for t in taus], device="cpu")
    torch.testing.assert_close(merged, merge("fedavg", taus), rtol=0, atol=0)


@pytest.mark.parametrize("name,needle", [("tpu", "not a device"), ("cuda:99", "not available"),
                                         ("mps" if not torch.backends.mps.is_available() else "cuda:99",
                                          "not available"), ("meta", "not supported")])
def test_a_merge_device_this_machine_lacks_is_one_clear_error(name, needle):
    from fedmerge import MergeError

    if name.startswith("cuda") and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    with pytest.raises(MergeError, match=needle):
        merge("fedavg", task_vectors(2), device=name)


def test_a_server_asked_to_merge_on_a_gpu_this_machine_lacks_refuses_before_the_round():
    from fedmerge import MergeError
    from strategies.one_shot import OneShotMerge

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(MergeError, match="merge-device 'cuda' is not available on this machine"):
        OneShotMerge(["fedavg"], merge_device="cuda")
    assert OneShotMerge(["fedavg"]).merge_device == torch.device("cpu")  # auto, without a GPU


def test_cli_merge_on_a_gpu_this_machine_lacks_is_one_line_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from fedmerge import save_state
    from simulations.cli import app

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    paths = []
    for i, tau in enumerate([{"w": torch.zeros(3)}, *task_vectors(2)]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_state({"w": tau["scale"].expand(3).clone()} if "scale" in tau else tau, paths[-1])
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(app, ["merge", "--base", str(paths[0]), "--models", str(paths[1]), str(paths[2]),
                                      "--method", "fedavg", "--out", str(out), "--merge-device", "cuda", "-q"])
    assert result.exit_code != 0 and "merge-device 'cuda' is not available on this machine" in result.output
    assert "Traceback" not in result.output and not out.exists()
    ok = CliRunner().invoke(app, ["merge", "--base", str(paths[0]), "--models", str(paths[1]), str(paths[2]),
                                  "--method", "fedavg", "--out", str(out), "--merge-device", "cpu", "-q"])
    assert ok.exit_code == 0, ok.output


def test_llm_sized_tall_matrices_take_the_gram_path_and_merge_as_the_reference(monkeypatch):
    """Above ``_GRAM_FROM`` entries a tall matrix's triplets come from AᵀA, not a full SVD (lowered
    here so that small matrices take that path); the merge still matches the float64 reference."""
    import fedmerge.merging.spectral.linalg as linalg
    from fedmerge.merging.spectral import tsv_merge_matrix_reference

    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(600, 96, generator=gen) for _ in range(4)]
    calls = []
    real = linalg._gram_top_k
    monkeypatch.setattr(linalg, "_gram_top_k", lambda a, k: calls.append(a.shape) or real(a, k))
    monkeypatch.setattr(linalg, "_GRAM_FROM", 600 * 96)
    merged = merge("tsv", [{"w": m} for m in mats])["w"]
    assert calls  # the path was taken
    reference = tsv_merge_matrix_reference(mats)
    assert float((merged.double() - reference).norm() / reference.norm()) < 1e-5
