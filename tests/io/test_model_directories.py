"""Merging Hugging Face model directories of any architecture: sharded safetensors and .bin inputs,
sharded outputs that ``from_pretrained`` loads, bf16 kept, vocabularies that differ, and the errors.

The models are tiny Llama-shaped ones built here from a transformers config (nothing downloads);
expected weights are computed in float64 numpy from whole state dicts, sharing no code with the
tensor-by-tensor path under test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge import merge
from fedmerge.errors import CheckpointError, ConfigError
from fedmerge.offline import merge_checkpoints, merge_models

transformers = pytest.importorskip("transformers")

VOCAB = 48


def tiny_config(**changes):
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**settings, **changes})


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def save_model(model, directory: Path, *, shard: str = "20KB") -> Path:
    model.save_pretrained(directory, max_shard_size=shard)
    return directory


def save_bin_shards(directory: Path, out: Path) -> Path:
    """The model as transformers 4 saved it without safetensors: pytorch_model-0000i-of-00002.bin
    pickles and pytorch_model.bin.index.json."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(tensors)
    out.mkdir()
    shutil.copy(directory / "config.json", out / "config.json")
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        file = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: tensors[k] for k in part}, out / file)
        weight_map |= {k: file for k in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A bf16 base and three fine-tuned bf16 models (the base plus noise of different sizes), sharded."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_config()).to(torch.bfloat16)
    base.generation_config.max_new_tokens = 7
    save_model(base, root / "base")
    save_tokenizer(root / "base")
    tuned = []
    for i in range(3):
        model = transformers.LlamaForCausalLM(tiny_config()).to(torch.bfloat16)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p, dtype=torch.float32).mul(0.01 * (i + 1)).to(p.dtype))
        tuned.append(save_model(model, root / f"ft{i}"))
    return root / "base", tuned


def state(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory as float64 numpy, read with transformers' own loader."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).double().numpy()


def test_a_sharded_bf16_merge_loads_with_from_pretrained_and_equals_the_float64_reference(models, tmp_path):
    base, tuned = models
    out = tmp_path / "merged"
    summary = merge_models(base, tuned, "task_arithmetic", out, scale=0.5, max_shard_size="30KB")
    assert summary["models"] == 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert all(f.stat().st_size <= 30_000 + 10_000 for f in out.glob("model-*.safetensors"))  # header slack
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and merged.generation_config.max_new_tokens == 7
    theta0, thetas = state(base), [state(d) for d in tuned]
    got = {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}
    for key, b in theta0.items():
        expected = b + 0.5 * sum(t[key] - b for t in thetas)
        ulp = np.abs(expected) * 2.0**-8 + 1e-30  # one bf16 rounding of a float32 result
        assert np.all(np.abs(got[key] - bf16(expected)) <= ulp), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w3 w5")["input_ids"] == [3, 5]


def test_bin_shards_merge_as_safetensors_do(models, tmp_path):
    base, tuned = models
    bins = [save_bin_shards(directory, tmp_path / f"{directory.name}-bin") for directory in tuned[:2]]
    merge_models(base, tuned[:2], "median", tmp_path / "a")
    merge_models(base, bins, "median", tmp_path / "b")
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ties", "cclip", "tsv", "fednova"])
def test_every_rule_merges_directories_as_it_merges_task_vectors_in_memory(models, tmp_path, method):
    base, tuned = models
    options = {"local_steps": [10, 20, 40]} if method == "fednova" else {}
    merge_models(base, tuned, method, tmp_path / "out", options=options, dtype="float32")
    theta0 = {k: torch.from_numpy(v).float() for k, v in state(base).items()}
    taus = [{k: torch.from_numpy(v).float() - theta0[k] for k, v in state(d).items()} for d in tuned]
    expected = merge(method, taus, **options)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"
    for key, tau in expected.items():
        torch.testing.assert_close(got[key], theta0[key] + tau, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def added_token(models, tmp_path_factory):
    """A fine-tuned model whose vocabulary has one token more (as WizardMath-13B has over Llama-2-13B)."""
    base, tuned = models
    model = transformers.AutoModelForCausalLM.from_pretrained(tuned[0], dtype=torch.bfloat16)
    model.resize_token_embeddings(VOCAB + 1)
    with torch.no_grad():
        model.get_input_embeddings().weight[-1] = 7.0
    return save_model(model, tmp_path_factory.mktemp("bigger") / "ft-extra")


def test_a_vocabulary_mismatch_is_one_error_naming_the_tensors_and_shapes(models, added_token, tmp_path):
    base, tuned = models
    with pytest.raises(CheckpointError) as caught:
        merge_models(base, [added_token, tuned[1]], "fedavg", tmp_path / "out")
    message = str(caught.value)
    assert "model.embed_tokens.weight (49, 32) (base (48, 32))" in message and "lm_head.weight" in message
    assert 'embeddings = "base"' in message and not (tmp_path / "out").exists()


def test_embeddings_base_merges_the_shared_rows_and_keeps_the_base_vocabulary(models, added_token, tmp_path):
    base, tuned = models
    merge_models(base, [added_token, tuned[1]], "fedavg", tmp_path / "out", embeddings="base")
    got, theta0 = state(tmp_path / "out"), state(base)
    extra, other = state(added_token), state(tuned[1])
    key = "model.embed_tokens.weight"
    assert got[key].shape == theta0[key].shape
    expected = theta0[key] + 0.5 * ((extra[key][:VOCAB] - theta0[key]) + (other[key] - theta0[key]))
    assert np.all(np.abs(got[key] - bf16(expected)) <= np.abs(expected) * 2.0**-8 + 1e-30)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == VOCAB


def test_another_architecture_or_missing_tensors_are_one_error_naming_them(models, tmp_path):
    base, tuned = models
    deeper = save_model(transformers.LlamaForCausalLM(tiny_config(num_hidden_layers=3)), tmp_path / "deeper")
    with pytest.raises(CheckpointError, match=r"not in the base: \['model.layers.2"):
        merge_models(base, [tuned[0], deeper], "fedavg", tmp_path / "out")
    gpt = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB)
                                 ).save_pretrained(gpt)
    with pytest.raises(CheckpointError, match="model_type 'gpt2' differs from the base's 'llama'"):
        merge_models(base, [tuned[0], gpt], "fedavg", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_hub_id_in_the_local_cache_merges_like_its_directory(models, tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache layout (models--ORG--NAME/snapshots/REV),
    offline; nothing is downloaded."""
    base, tuned = models
    cache = tmp_path / "hub"
    revision = "0" * 40
    for name, directory in (("base", base), ("ft0", tuned[0]), ("ft1", tuned[1])):
        repo = cache / f"models--tiny--{name}"
        shutil.copytree(directory, repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    merge_checkpoints("tiny/base", ["tiny/ft0", "tiny/ft1"], "fedavg", tmp_path / "from-hub")
    merge_models(base, tuned[:2], "fedavg", tmp_path / "from-dirs")
    a, b = state(tmp_path / "from-hub"), state(tmp_path / "from-dirs")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_each_tensor_is_on_disk_before_the_next_is_merged(models, tmp_path, monkeypatch):
    """The mechanism behind the memory bound: merging and writing alternate tensor by tensor, and a
    written tensor's bytes are in its file before the next tensor is merged."""
    import fedmerge.io.sharded as sharded
    import fedmerge.offline as offline

    base, tuned = models
    events: list[tuple[str, str]] = []
    real_rows, real_write = offline.merge_rows, sharded.ShardedWriter.write

    def logged_rows(*args, **kwargs):
        for key, start, tensor in real_rows(*args, **kwargs):
            events.append(("merged", key))
            yield key, start, tensor

    def logged_write(self, name, tensor, start=0):
        real_write(self, name, tensor, start)
        self._file.flush()
        events.append(("written", name))
        on_disk = sum(f.stat().st_size for f in self.directory.glob("*.safetensors"))
        events.append(("bytes", str(on_disk)))

    monkeypatch.setattr(offline, "merge_rows", logged_rows)
    monkeypatch.setattr(sharded.ShardedWriter, "write", logged_write)
    merge_models(base, tuned, "fedavg", tmp_path / "out", max_shard_size="1GB")
    steps = [e for e in events if e[0] != "bytes"]
    order = list(sharded.ModelWeights(base).meta)  # the base's order, shard by shard
    assert steps == [step for key in order for step in (("merged", key), ("written", key))]
    sizes = [int(size) for kind, size in events if kind == "bytes"]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)  # every write reached the file at once


# --- merge recipes -------------------------------------------------------------------------------


def write_recipe(path: Path, base: Path, tuned: list[Path], body: str) -> Path:
    path.write_text(f'base = "{base}"\nmodels = {json.dumps([str(t) for t in tuned])}\n' + body)
    return path


def test_a_recipe_merges_each_rule_into_its_directory_as_the_command_line_would(models, tmp_path):
    from typer.testing import CliRunner

    from simulations.cli import app

    base, tuned = models
    recipe = write_recipe(tmp_path / "recipe.toml", base, tuned, f'''
methods = ["ties", "fednova"]
out = "{tmp_path / 'merged'}"
dtype = "float32"
max-shard-size = "40KB"
[scale]
ties = 0.8
fednova = 1.0
[options.ties]
k = 0.3
[options.fednova]
local_steps = [10, 20, 40]
''')
    result = CliRunner().invoke(app, ["merge", "--recipe", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    merge_models(base, tuned, "ties", tmp_path / "ties", scale=0.8, options={"k": 0.3}, dtype="float32")
    merge_models(base, tuned, "fednova", tmp_path / "fednova", options={"local_steps": [10, 20, 40]}, dtype="float32")
    for method in ("ties", "fednova"):
        assert "merged 3 models with " + method in result.output
        a, b = state(tmp_path / "merged" / method), state(tmp_path / method)
        assert all(np.array_equal(a[k], b[k]) for k in a), method
    assert (tmp_path / "merged" / "ties" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("body,needle", [
    ('method = "tie"\nout = "x"\n', "'tie' is not a merging rule"),
    ('method = "ties"\nmethods = ["median"]\nout = "x"\n', "give method or methods, not both"),
    ('method = "ties"\nout = "x"\n[options.ties]\nkk = 1\n', "ties: unknown option 'kk'"),
    ('method = "ties"\nout = "x"\n[options.median]\n', "options.median is for a rule the recipe does not use"),
    ('methods = ["ties", "median"]\nout = "x"\n[scale]\nties = 1.0\n', "scale has no value for median"),
    ('method = "fednova"\nout = "x"\n', "required option 'local_steps' is missing"),
    ('method = "ties"\nout = "x"\nweights = [1, 2]\n', "weights has 2 entries for 3 models"),
    ('method = "ties"\nout = "x"\ndtype = "float8"\n', "dtype"),
    ('method = "ties"\nout = "x"\nembedings = "base"\n', "embedings"),
    ('method = "ties"\nout = "x"\nmerge-device = "tpu"\n', "merge-device 'tpu' is not a device"),
    ('method = "ties"\nout = "x"\nscale = "big"\n', "scale"),
    ('method = "ties"\nout = "x"\n[[', "not valid TOML"),
])
def test_a_bad_recipe_is_one_line_naming_what_is_wrong_and_nothing_is_read(models, tmp_path, body, needle):
    from typer.testing import CliRunner

    from simulations.cli import app

    base, tuned = models
    recipe = write_recipe(tmp_path / "recipe.toml", base, tuned, body)
    result = CliRunner().invoke(app, ["merge", "--recipe", str(recipe)], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_the_shipped_llama2_recipe_names_the_papers_models_and_rules():
    from fedmerge.recipe import MergeRecipe
    from simulations.config import RECIPES_DIR

    recipe = MergeRecipe.load(RECIPES_DIR / "llama2-13b-wizard.toml")
    assert recipe.base == "meta-llama/Llama-2-13b-hf" and len(recipe.models) == 3
    assert set(recipe.methods) == {"task_arithmetic", "fednova", "fedgma", "median", "cclip", "ties", "tsv"}
    assert recipe.embeddings == "base"  # WizardMath-13B has one token more than Llama-2-13B
    assert set(recipe.outputs()) == set(recipe.methods)


def test_force_replaces_an_existing_merged_directory_whole(models, tmp_path):
    base, tuned = models
    out = tmp_path / "out"
    merge_models(base, tuned, "fedavg", out, max_shard_size="30KB")
    with pytest.raises(ConfigError, match="not empty"):
        merge_models(base, tuned, "median", out)  # without overwrite: refused before any work
    merge_models(base, tuned, "median", out, overwrite=True, max_shard_size="1GB")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # the old shards are gone
    merge_models(base, tuned, "median", tmp_path / "again", max_shard_size="1GB")
    a, b = state(out), state(tmp_path / "again")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old copy left


def test_a_recipe_takes_no_other_merge_settings_from_the_command_line(models, tmp_path):
    from typer.testing import CliRunner

    from simulations.cli import app

    base, tuned = models
    recipe = write_recipe(tmp_path / "recipe.toml", base, tuned, f'method = "ties"\nout = "{tmp_path / "x"}"\n')
    for flags in (["--scale", "5"], ["--dtype", "float32"], ["--option", "k=0.9"], ["--merge-device", "cpu"]):
        result = CliRunner().invoke(app, ["merge", "--recipe", str(recipe), *flags], terminal_width=400)
        assert result.exit_code == 2 and "set " + flags[0] + " in it instead" in result.output, result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["fedavg", "median", "ties", "cclip", "fedgma", "trimmed_mean"])
def test_merging_in_pieces_of_rows_changes_no_bit(models, added_token, tmp_path, monkeypatch, method):
    """Elementwise rules merge a tensor a few rows at a time (memory bounded by pieces, not by the
    largest tensor); here pieces of 512 bytes per client cut every tensor into many."""
    import fedmerge.offline as offline

    base, tuned = models
    inputs = [added_token, *tuned[1:]]  # one vocabulary with an extra row: shared rows, piece by piece
    merge_models(base, inputs, method, tmp_path / "whole", embeddings="base")
    pieces = count_written_pieces(monkeypatch)
    monkeypatch.setattr(offline, "MERGE_PIECE_BYTES", 512)
    merge_models(base, inputs, method, tmp_path / "pieces", embeddings="base")
    a, b = state(tmp_path / "whole"), state(tmp_path / "pieces")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sum(1 for start in pieces if start > 0) > len(a)


def count_written_pieces(monkeypatch) -> list[int]:
    """The first row of every piece the writer is given, from now on."""
    import fedmerge.io.sharded as sharded

    pieces: list[int] = []
    real_write = sharded.ShardedWriter.write

    def counted(self, name, tensor, start=0):
        pieces.append(start)
        real_write(self, name, tensor, start)

    monkeypatch.setattr(sharded.ShardedWriter, "write", counted)
    return pieces


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("method", ["tsv", "tsv_compress", "iso_c", "iso_cts"])
def test_spectral_rules_merge_directories_from_pieces_of_rows_and_columns(models, tmp_path, monkeypatch,
                                                                         method, layout):
    """Spectral rules read a model directory's matrices in pieces too (a tall one's rows, a wide one's
    columns; a wide result is gathered whole): here 512-byte pieces. Every 2-D tensor equals the published,
    whole-matrix algorithm (full SVDs in float64) on the float64 task matrices; other tensors get
    the mean."""
    import fedmerge.offline as offline
    from fedmerge.merging.spectral.iso import iso_c_matrix, iso_cts_matrix
    from fedmerge.merging.spectral.tsv import tsv_compress_matrix, tsv_merge_matrix_reference

    base, tuned = models
    if layout == "bin":
        tuned = [save_bin_shards(directory, tmp_path / f"{directory.name}-bin") for directory in tuned]
    pieces = count_written_pieces(monkeypatch)
    monkeypatch.setattr(offline, "MERGE_PIECE_BYTES", 512)
    merge_models(base, tuned, method, tmp_path / "out", dtype="float32")
    theta0, thetas = state(base), [state(d) for d in tuned]
    got = {k: v.detach().double().numpy() for k, v in transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32).state_dict().items()}
    reference = {"tsv": lambda mats, p: tsv_merge_matrix_reference(mats), "tsv_compress": tsv_compress_matrix,
                 "iso_c": iso_c_matrix, "iso_cts": iso_cts_matrix}[method]
    shapes = set()
    for key, b in theta0.items():
        taus = [t[key] - b for t in thetas]
        if b.ndim == 2:
            shapes.add("tall" if b.shape[0] > b.shape[1] else "wide" if b.shape[0] < b.shape[1] else "square")
            tau = reference([torch.from_numpy(t) for t in taus], [1 / 3] * 3).numpy()
        else:
            tau = sum(taus) / 3
        np.testing.assert_allclose(got[key], b + tau, rtol=0, atol=1e-6 * np.abs(tau).max() + 1e-7, err_msg=key)
    assert shapes == {"tall", "wide", "square"}
    assert sum(1 for start in pieces if start > 0) > 10  # tall matrices come in pieces of rows


def test_the_writer_refuses_a_whole_tensor_after_some_of_its_rows(tmp_path):
    from fedmerge.io.sharded import ShardedWriter

    with pytest.raises(CheckpointError, match="from row 0 written where 'a'"):
        with ShardedWriter(tmp_path, [("a", (4, 3), torch.float32), ("b", (2,), torch.float32)], 10**9) as writer:
            writer.write("a", torch.zeros(2, 3), 0)
            writer.write("a", torch.zeros(4, 3), 0)  # rows 0:2 are written: this would overrun its slot


def test_each_base_piece_is_read_once_for_every_clients_tau_and_for_the_result(models, tmp_path, monkeypatch):
    import fedmerge.io.checkpoint as checkpoint
    import fedmerge.offline as offline

    base, tuned = models
    reads: dict[tuple[str, str, int, int], int] = {}
    real = checkpoint.safe_open

    class Counting:
        def __init__(self, path, framework):
            self.path, self.handle = path, real(path, framework=framework)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            outer = self

            class Slice:
                def __getitem__(self, index):
                    (rows,) = index  # pieces of rows, all columns
                    where = (str(Path(outer.path).parent.name), key, rows.start, rows.stop)
                    reads[where] = reads.get(where, 0) + 1
                    return outer.inner.get_slice(key)[index]

                def get_shape(self):
                    return outer.inner.get_slice(key).get_shape()

                def get_dtype(self):
                    return outer.inner.get_slice(key).get_dtype()

            return Slice()

        def get_tensor(self, key):
            return self.inner.get_tensor(key)

    monkeypatch.setattr(checkpoint, "safe_open", Counting)
    monkeypatch.setattr(offline, "MERGE_PIECE_BYTES", 2048)
    merge_models(base, tuned, "fedavg", tmp_path / "out")
    base_reads = [n for (model, *_), n in reads.items() if model == "base"]
    assert base_reads and max(base_reads) == 1  # not once per client, nor again for θ0 + λτ
