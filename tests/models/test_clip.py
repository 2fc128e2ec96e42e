"""The CLIP benchmark path, end to end, offline, on stand-ins.

What stands in for what: a randomly initialised *tiny* CLIP (2 layers, width 32, 32×32 images, patch 8)
with a real ``CLIPTokenizer`` over a byte-level vocabulary and no BPE merges (text is tokenised
character by character) replaces ``openai/clip-vit-base-patch32``; three folders of generated 32×32 PNGs
(``folder:PATH`` tasks, three colour classes each) replace the eight vision datasets. Everything else is
the real code: zero-shot heads from the text tower and their cache, CLIP preprocessing, AdamW with
warm-up, cosine decay and clipping, the Flower ClientApp/ServerApp (in-process engine), every merging
method, evaluation, ``save_pretrained``/loading, ``fedmerge merge``/``fedmerge evaluate``. Not covered:
real weights and datasets (no network here), accuracy levels, GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from fedmerge.errors import CheckpointError, ConfigError  # noqa: E402
from fedmerge.train import TrainPlan  # noqa: E402

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: torch's thread pool costs more than it saves (100× on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A save_pretrained directory: tiny random CLIPModel + CLIPTokenizer (characters as tokens)."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    eos = vocab["<|endoftext|>"]
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-clip")
    transformers.CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _write_task(root, rng, shift: int) -> str:
    from PIL import Image

    for split, n in (("train", 16), ("test", 6)):
        for name, rgb in COLOURS.items():
            (root / split / f"{name}_thing").mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, size=(32, 32, 3))
                base = np.roll(np.array(rgb), shift)  # each task maps colours to classes differently
                img = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"{name}_thing" / f"{i}.png")
    (root / "templates.txt").write_text("a photo of a {c}.\na {c} picture.\n")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[str]:
    rng = np.random.default_rng(0)
    return [_write_task(tmp_path_factory.mktemp(f"task{i}"), rng, i) for i in range(3)]


def test_lr_schedule_and_defaults_are_backward_compatible():
    plan = TrainPlan(local_steps=10, lr=1.0, warmup_steps=2, lr_schedule="cosine")
    assert [plan.lr_at(s) for s in (0, 1)] == [0.5, 1.0] and plan.lr_at(2) == pytest.approx(1.0)
    assert plan.lr_at(6) == pytest.approx(0.5) and plan.lr_at(9) < 0.1
    assert not TrainPlan(local_steps=3).scheduled and TrainPlan(local_steps=3, lr=0.05).lr_at(2) == 0.05
    for bad in ({"lr_schedule": "step"}, {"warmup_steps": -1}, {"grad_clip": -1.0}, {"optimizer": "lion"}):
        with pytest.raises(ConfigError):
            TrainPlan(local_steps=3, **bad)


def test_zero_shot_head_is_normalised_scaled_and_cached(tiny_clip, tmp_path):
    from fedmerge.models.clip import head_from_text_embeddings, zero_shot_head

    emb = torch.randn(4, 3, 8)
    head = head_from_text_embeddings(emb, 100.0)
    assert head.shape == (4, 8) and torch.allclose(head.norm(dim=1), torch.full((4,), 100.0))
    first = zero_shot_head(tiny_clip, ["red thing", "blue thing"], ["a photo of a {c}."], tmp_path)
    assert first.shape == (2, 16) and len(list((tmp_path / "heads").iterdir())) == 1
    assert torch.equal(zero_shot_head(tiny_clip, ["red thing", "blue thing"], ["a photo of a {c}."], tmp_path), first)
    other = zero_shot_head(tiny_clip, ["red thing", "blue thing"], ["a {c}."], tmp_path)
    assert not torch.equal(other, first) and len(list((tmp_path / "heads").iterdir())) == 2


@pytest.mark.slow  # fine-tunes a tiny CLIP on 3 tasks
def test_federated_fine_tuning_of_tasks_through_flower_merges_and_saves(tiny_clip, tasks, tmp_path):
    from fedmerge.models.clip import build_classifier, encoder_state, save_pretrained
    from fedmerge.merging import METHODS
    from fedmerge.task_vector import apply
    from simulations.clip_report import rows_from_run
    from simulations.config import ExperimentConfig
    from simulations.experiment import run_experiment

    config = ExperimentConfig(
        name="clip-test", num_clients=3, model=f"clip:{tiny_clip}", tasks=tuple(tasks), local_steps=[6, 8, 10],
        lr=1e-3, batch_size=8, optimizer="adamw", weight_decay=0.1, warmup_steps=2, lr_schedule="cosine",
        grad_clip=1.0, strategies=tuple(sorted(METHODS)), scale=1.0 / 3, engine="inprocess",
        cache_dir=str(tmp_path / "cache"), min_clients=3,
    )
    out = run_experiment(config, tmp_path / "run", progress=False)
    r = out.results
    assert r["failures"] == [] and [c["task"] for c in r["clients"]] == [Path(t[7:]).name for t in tasks]
    assert set(r["strategies"]) == set(METHODS)
    base = encoder_state(tiny_clip)
    assert set(out.base) == set(base) and all(torch.equal(out.base[k], base[k]) for k in base)
    for c in r["clients"]:
        assert c["task_vector_norm"] > 0 and 0 <= c["accuracy"] <= 1 and c["num_examples"] == 16 * 3 - 5
        assert c["accuracy"] == pytest.approx(c["reported_accuracy"])
    for s in r["strategies"].values():
        assert len(s["client_accuracies"]) == 3 and all(0 <= a <= 1 for a in s["client_accuracies"])
    table = rows_from_run(r)
    assert list(table["rows"])[:2] == ["fine-tuned", "zero-shot"] and len(table["rows"]) == 2 + len(METHODS)
    # heads stayed out of the weights: only the image encoder travelled and was merged
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in out.merged["tsv"])
    assert (tmp_path / "cache" / "heads").is_dir()
    # a merged encoder round-trips through save_pretrained and transformers' own loader
    merged = apply(out.base, out.merged["tsv"], 1.0)
    save_pretrained(merged, tiny_clip, tmp_path / "tsv-merged")
    reloaded = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "tsv-merged")
    assert all(torch.equal(reloaded.state_dict()[k], merged[k]) for k in merged)
    model = build_classifier(str(tmp_path / "tsv-merged"), encoder_state(tmp_path / "tsv-merged"))
    assert model(torch.randn(2, 3, 32, 32), torch.randn(3, 16)).shape == (2, 3)
    print("\ntiny run:", json.dumps({k: round(v["accuracy"], 3) for k, v in table["rows"].items()}))


def test_offline_merge_and_evaluate_from_save_pretrained_directories(tiny_clip, tasks, tmp_path):
    from simulations.cli import app

    from fedmerge.models.clip import encoder_state, save_pretrained

    base = encoder_state(tiny_clip)
    gen = torch.Generator().manual_seed(1)
    models = []
    for i in range(3):  # stand-ins for published fine-tuned checkpoints
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        models.append(str(save_pretrained(ft, tiny_clip, tmp_path / f"ft{i}")))
    merged_dir = tmp_path / "merged-tsv"
    result = runner.invoke(app, ["merge", "--base", tiny_clip, "--models", *models, "--method", "tsv",
                                 "--out", str(merged_dir), "-q"])
    assert result.exit_code == 0, result.output
    assert (merged_dir / "config.json").is_file()
    report_file = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", "--base", tiny_clip, "--tasks", ",".join(tasks), "--models", *models,
                                 "--methods", "task_arithmetic,tsv,fedavg", "--scale", "tsv=1.0",
                                 "--scale", "task_arithmetic=0.3", "--merged", f"tsv-cli={merged_dir}",
                                 "--cache-dir", str(tmp_path / "cache"), "--out", str(report_file)])
    assert result.exit_code == 0, result.output
    assert "Avg norm" in result.output
    report = json.loads(report_file.read_text())
    rows = report["rows"]
    assert set(rows) == {"fine-tuned", "zero-shot", "task_arithmetic", "tsv", "fedavg", "tsv-cli"}
    assert rows["fine-tuned"]["normalized_accuracy"] == pytest.approx(1.0)
    assert rows["tsv-cli"]["accuracies"] == rows["tsv"]["accuracies"]  # the CLI's merge = evaluate's merge
    assert rows["task_arithmetic"]["scale"] == 0.3


def test_without_network_a_hub_id_fails_at_once_with_what_to_fetch(tmp_path, monkeypatch, tasks):
    from simulations.cli import app

    from fedmerge.models.clip import encoder_state
    from fedmerge.data.image_tasks import load_task

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="hf download nobody/not-a-cached-clip"):
        encoder_state("nobody/not-a-cached-clip")
    result = runner.invoke(app, ["evaluate", "--base", "nobody/not-a-cached-clip", "--tasks", tasks[0],
                                 "--models", "nobody/not-a-cached-clip"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "error:" in line]) == 1
    assert "hf download nobody/not-a-cached-clip" in result.output.replace("\n", " ")
    result = runner.invoke(app, ["merge", "--base", "nobody/not-a-cached-clip", "--models", "nobody/x",
                                 "--method", "tsv", "--out", str(tmp_path / "m"), "-q"])
    assert result.exit_code == 2 and "hf download" in result.output
    with pytest.raises(ConfigError, match="ylecun/mnist"):
        load_task("MNIST")


@pytest.mark.parametrize("values,needle", [
    ({"model": "clip"}, "clip needs its checkpoint"),
    ({"model": "mlp", "tasks": ["MNIST"], "num-clients": 1}, "tasks need a CLIP model"),
    ({"model": "clip:openai/clip-vit-base-patch32", "tasks": ["MNIST", "SVHN"], "num-clients": 3}, "tasks lists 2"),
    ({"model": "clip:openai/clip-vit-base-patch32", "tasks": ["ImageNet"], "num-clients": 1}, "task 'ImageNet'"),
    ({"lr-schedule": "linear"}, "lr-schedule='linear'"),
])
def test_bad_clip_settings_are_one_clear_error(values, needle):
    from simulations.config import ExperimentConfig

    with pytest.raises(ConfigError, match=needle):
        ExperimentConfig.from_mapping(values)


def test_preset_parses_with_the_papers_recipe(monkeypatch):
    import simulations.config
    from simulations.config import PRESETS_DIR, load_config

    monkeypatch.setattr(simulations.config, "machine_resources", lambda: (8, 4))  # the GPU machine it is for
    config = load_config(PRESETS_DIR / "clip-vit-b32-8tasks.toml")
    assert config.data.tasks == ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")
    plan = config.client_plans()[0]
    assert (plan.optimizer, plan.lr, plan.weight_decay, plan.batch_size) == ("adamw", 1e-5, 0.1, 128)
    assert (plan.warmup_steps, plan.lr_schedule, plan.grad_clip, plan.local_steps) == (500, "cosine", 1.0, 2000)
    assert config.run.client_gpus > 0 and config.model == "clip:openai/clip-vit-base-patch32"
    assert config.scale_of("iso_c") == "tune"  # α chosen on validation data, as its authors do
