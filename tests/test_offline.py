"""fedmerge merge: offline merging of checkpoints written by the project's own models."""

from __future__ import annotations


import pytest
import torch
from typer.testing import CliRunner

from fedmerge import CheckpointError, TaskVector, apply, load_state, merge, save_state
from fedmerge.models import build_model
from fedmerge.offline import merge_checkpoints
from simulations.cli import app

runner = CliRunner()


def perturbed(state, seed, dtype=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            v = v + 0.05 * torch.randn(v.shape, generator=g)
            v = v.to(dtype) if dtype else v
        out[k] = v
    return out


@pytest.fixture
def checkpoints(tmp_path):
    """A CNN with a BatchNorm (integer buffer) base and three fine-tuned versions, mixed file formats."""
    model = torch.nn.Sequential(build_model("cnn", (1, 8, 8), 10, seed=0), torch.nn.BatchNorm1d(10))
    base = model.state_dict()
    save_state(base, tmp_path / "base.safetensors")
    fts = [perturbed(base, i) for i in range(3)]
    save_state(fts[0], tmp_path / "ft0.safetensors")
    torch.save(fts[1], tmp_path / "ft1.pt")
    save_state(fts[2], tmp_path / "ft2.safetensors")
    paths = [tmp_path / "ft0.safetensors", tmp_path / "ft1.pt", tmp_path / "ft2.safetensors"]
    return tmp_path, base, fts, paths


@pytest.mark.parametrize("method,options", [("fedavg", {}), ("ties", {"k": 0.3}), ("tsv", {}), ("cclip", {})])
def test_offline_merge_equals_the_in_memory_merge(checkpoints, method, options):
    tmp, base, fts, paths = checkpoints
    reads = []
    summary = merge_checkpoints(tmp / "base.safetensors", paths, method, tmp / "out.safetensors", scale=0.7,
                                options=options, on_read=lambda: reads.append(1))
    expected = apply(base, merge(method, [TaskVector.between(base, ft) for ft in fts], **options), 0.7)
    got = load_state(tmp / "out.safetensors")
    assert set(got) == set(base) and reads
    for k in base:
        assert got[k].dtype == base[k].dtype
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0)
    assert summary["copied"] == ["1.num_batches_tracked"]
    assert torch.equal(got["1.num_batches_tracked"], base["1.num_batches_tracked"])


@pytest.mark.parametrize("method,base_reads,model_reads", [
    ("fedavg", 3, 2),  # passes: validation, merge, θ0 + λτ (the base's only)
    ("ties", 3 + 2 * 3, 4),  # + two threshold passes over each client's whole τ (histogram, bucket)
])
def test_each_pass_reads_a_tensor_once_and_the_base_once_per_key(checkpoints, monkeypatch, method, base_reads,
                                                                   model_reads):
    # every client's τ needs the base's tensor; the checkpoint keeps the one read last, so a pass that
    # goes key by key reads the base once per key, not once per client
    from collections import Counter

    from fedmerge.io.checkpoint import Checkpoint

    tmp, base, _, paths = checkpoints
    reads, read = Counter(), Checkpoint._read
    monkeypatch.setattr(Checkpoint, "_read", lambda self, key: reads.update([(self.path.name, key)]) or read(self, key))
    merge_checkpoints(tmp / "base.safetensors", paths, method, tmp / "out.safetensors")
    floats = [k for k, v in base.items() if v.is_floating_point()]
    assert {key: reads["base.safetensors", key] for key in floats} == {key: base_reads for key in floats}
    for path in paths:
        assert {key: reads[path.name, key] for key in floats} == {key: model_reads for key in floats}


def test_bf16_checkpoints_are_merged_in_float32_and_written_in_bf16(tmp_path):
    base = {k: v.to(torch.bfloat16) for k, v in build_model("mlp", (1, 8, 8), 10, seed=1).state_dict().items()}
    save_state(base, tmp_path / "base.safetensors")
    fts = [perturbed({k: v.float() for k, v in base.items()}, i, torch.bfloat16) for i in range(2)]
    for i, ft in enumerate(fts):
        save_state(ft, tmp_path / f"ft{i}.safetensors")
    result = runner.invoke(app, ["merge", "--base", str(tmp_path / "base.safetensors"), "--models",
                                 str(tmp_path / "ft0.safetensors"), str(tmp_path / "ft1.safetensors"),
                                 "--method", "iso_c", "--scale", "0.5", "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    got = load_state(tmp_path / "m.safetensors")
    taus = [TaskVector.between(base, ft) for ft in fts]
    expected = apply(base, merge("iso_c", taus), 0.5)
    for k in base:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], expected[k])
    # and the merge really did move the weights
    assert any(not torch.equal(got[k], base[k]) for k in base)


def invoke(tmp, *args):
    return runner.invoke(app, ["merge", "--base", str(tmp / "base.safetensors"), *args, "-q"])


def test_cli_merge_with_options_and_hyphenated_names(checkpoints):
    tmp, base, fts, paths = checkpoints
    result = invoke(tmp, "--models", *map(str, paths), "--method", "iso_cts", "--option", "common-space-fraction=0.5",
                    "--out", str(tmp / "o.safetensors"))
    assert result.exit_code == 0, result.output
    taus = [TaskVector.between(base, ft) for ft in fts]
    expected = apply(base, merge("iso_cts", taus, common_space_fraction=0.5), 1.0)
    got = load_state(tmp / "o.safetensors")
    for k in base:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0)


def write_variant(tmp, name, change):
    state = load_state(tmp / "ft0.safetensors")
    change(state)
    save_state(state, tmp / name)
    return str(tmp / name)


@pytest.mark.parametrize("make,needle", [
    (lambda t: write_variant(t, "missing.safetensors", lambda s: s.pop("0.0.bias")),
     "tensor '0.0.bias' of the base model is missing"),
    (lambda t: write_variant(t, "extra.safetensors", lambda s: s.update(extra=torch.zeros(2))),
     "tensor 'extra' is not in the base model"),
    (lambda t: write_variant(t, "shape.safetensors", lambda s: s.update({"0.0.bias": torch.zeros(3)})),
     "tensor '0.0.bias' has shape (3,), the base has (16,)"),
    (lambda t: write_variant(t, "dtype.safetensors", lambda s: s.update({"0.0.bias": s["0.0.bias"].half()})),
     "tensor '0.0.bias' is torch.float16, the base is torch.float32"),
    (lambda t: str(t / "nope.safetensors"), "no such file"),
    (lambda t: (t / "junk.safetensors").write_text("junk") and str(t / "junk.safetensors"),
     "not a readable safetensors"),
    (lambda t: (t / "junk.pt").write_text("junk") and str(t / "junk.pt"), "weights-only PyTorch state dict"),
])
def test_bad_checkpoints_are_one_clear_line_with_exit_code_2(checkpoints, make, needle):
    tmp, _, _, paths = checkpoints
    bad = make(tmp)
    result = invoke(tmp, "--models", str(paths[0]), bad, "--method", "fedavg", "--out", str(tmp / "o.safetensors"))
    assert result.exit_code == 2, result.output
    assert needle in result.output.replace("\n", " ") and "Traceback" not in result.output
    assert not (tmp / "o.safetensors").exists()


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "unknown merging method 'nope'"),
    (["--method", "ties", "--option", "k=0"], "ties: k must lie in (0.0, 1.0], got 0.0"),
    (["--method", "ties", "--option", "k"], "--option expects key=value"),
    (["--method", "fedavg", "--option", "rho=1"], "unknown option 'rho'"),
    (["--method", "fednova"], "required option 'local_steps'"),
])
def test_bad_methods_and_options(checkpoints, args, needle):
    tmp, _, _, paths = checkpoints
    result = invoke(tmp, "--models", *map(str, paths), *args, "--out", str(tmp / "o.safetensors"))
    assert result.exit_code == 2 and needle in result.output.replace("\n", " "), result.output
    assert len([line for line in result.output.splitlines() if "error:" in line]) == 1


def test_output_is_never_an_input_nor_silently_overwritten(checkpoints):
    tmp, _, _, paths = checkpoints
    result = invoke(tmp, "--models", *map(str, paths), "--method", "fedavg", "--out", str(paths[0]))
    assert result.exit_code == 2 and "would overwrite one of the input" in result.output
    (tmp / "keep.safetensors").write_bytes(b"precious")
    result = invoke(tmp, "--models", *map(str, paths), "--method", "fedavg", "--out", str(tmp / "keep.safetensors"))
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp / "keep.safetensors").read_bytes() == b"precious"
    result = invoke(tmp, "--models", *map(str, paths), "--method", "fedavg", "--force",
                    "--out", str(tmp / "keep.safetensors"))
    assert result.exit_code == 0, result.output
    result = invoke(tmp, "--models", *map(str, paths), "--method", "fedavg", "--out", str(tmp / "x.pt"))
    assert result.exit_code == 2 and "must be a .safetensors file" in result.output


def test_library_errors_are_checkpoint_errors(checkpoints):
    tmp, _, _, _ = checkpoints
    with pytest.raises(CheckpointError, match="no fine-tuned models"):
        merge_checkpoints(tmp / "base.safetensors", [], "fedavg", tmp / "o.safetensors")


@pytest.mark.parametrize("victim", [1, 2])  # ft1.pt (memory-mapped once), ft2.safetensors (reopened per read)
def test_a_checkpoint_replaced_during_the_merge_stops_it_before_writing(checkpoints, victim):
    tmp, base, _, paths = checkpoints
    reads = []

    def replace_after_a_few_reads():
        reads.append(1)
        if len(reads) == 5:  # another process writes a new file in its place (same shapes)
            new = tmp / f"new{paths[victim].suffix}"
            (torch.save if new.suffix == ".pt" else save_state)(perturbed(base, 99), new)
            new.replace(paths[victim])

    out = tmp / "merged.safetensors"
    with pytest.raises(CheckpointError, match=f"{paths[victim].name}: changed on disk during the merge"):
        merge_checkpoints(tmp / "base.safetensors", paths, "fedavg", out, on_read=replace_after_a_few_reads)
    assert not out.exists()


def test_cli_merge_whose_model_overflows_is_one_clear_line_and_writes_nothing(tmp_path):
    # θ0 + 10·τ with τ = 1e38 leaves float32's range: one error line naming the tensor and λ, exit
    # code 2 (a value the user chose), and no file, where the merged model used to hold inf.
    base = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    save_state(base, tmp_path / "base.safetensors")
    for i in range(2):
        save_state({"w": torch.full((2, 2), 1e38), "b": torch.ones(2)}, tmp_path / f"ft{i}.safetensors")
    models = [str(tmp_path / f"ft{i}.safetensors") for i in range(2)]
    out = tmp_path / "o.safetensors"
    result = invoke(tmp_path, "--models", *models, "--method", "fedavg", "--scale", "10", "--out", str(out))
    assert result.exit_code == 1, result.output  # the input was accepted; its result does not fit
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "λ = 10, tensor 'w'" in text and "float32" in text and "use a smaller scale" in text
    assert not out.exists()
    # the same models at λ = 1 merge to a finite model: θ0 + 1e38
    assert invoke(tmp_path, "--models", *models, "--method", "fedavg", "--out", str(out)).exit_code == 0
    assert torch.equal(load_state(out)["w"], torch.full((2, 2), 1.0 + 1e38))
