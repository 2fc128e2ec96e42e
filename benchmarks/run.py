"""One command for every performance target of fedmerge: ``python -m benchmarks [--quick] [--only ...]``.

Sections (each prints a table):
  tsv      TSV-M: fedmerge's fast path against the published algorithm (float32 full SVDs, as the TSV
           authors' code), on ViT-B/32 and ViT-L/14 shapes (open_clip layout: in_proj 3d×d, out_proj
           d×d, fc1 4d×d, fc2 d×4d per block; one B/32 row in Hugging Face's q/k/v layout) at
           T = 8, 14, 20, random task matrices with σ_j ∝ 1/j or exp(−16 j/r), or a low-rank signal
           plus noise (a spectrum flat around the cut-off), or "shared": IID clients, a common 1/j
           update plus 0.3 × each task's own (nearly singular stacked bases). Errors against the
           float64 full-SVD reference. The baseline runs on one block and is scaled ("*"); L/14's
           fast path runs on two blocks and is scaled to 24.
  linear   every registered merging rule outside fedmerge.merging.spectral on 8 task vectors:
           seconds, GB/s of task vectors read, extra peak memory (resident set size above the inputs).
           Options come from the registry: defaults, one value per client for per-client options.
  offline  ``fedmerge merge`` on 8 checkpoints of a ~100M-parameter model, as safetensors (fedavg,
           task_arithmetic, median) and as memory-mapped .pt (fedavg): peak memory (/usr/bin/time -v)
           against the model size. Writes both formats: about 8 GB of temporary disk.
  default  the default run (``fedmerge run``'s preset) on both engines: results.json's timing split.
  sim      both engines from 8 to 128 clients (Ray at 8, 32, 128): the timing split and the
           engine's overhead per client beyond the clients' own reported seconds.
  cache    reading a cache entry with its checksum and finiteness checked against a plain read.
  llm      ``fedmerge merge`` on a 1.1B-parameter Llama-shaped bf16 base and 4 fine-tuned models,
           sharded (about 11 GB of temporary disk): peak memory against the largest tensor, GB/s read.
  gpu      (CUDA only) TSV-M on ViT-B/32 and ViT-L/14 blocks at T = 8, 14, 20 against the published
           algorithm on the same GPU, and the linear rules in GB/s.
  sweep    the shipped data-heterogeneity sweep over 6 seeds on 1 and 2 Ray workers and on a
           two-node cluster on 127.0.0.1, and its cells with 2000 local steps: throughput, parallel
           efficiency, identical CSVs, and one cell's time per stage.
Timings are wall-clock on whatever machine runs this; min of repeats where cheap. How the numbers
shaped the code is in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fedmerge import merge
from fedmerge.merging import METHODS, MergeMethod

# Transformer blocks' 2-D weights, as (name, rows, columns) in multiples of the width d. "open_clip"
# is the layout the TSV authors merge (one d→3d attention in-projection: 4 matrices per block, 48 in
# ViT-B/32); "hf" is Hugging Face's CLIPVisionModel, which fedmerge's CLIP path loads (q, k, v apart).
LAYOUTS = {"open_clip": [("in_proj", 3, 1), ("out_proj", 1, 1), ("fc1", 4, 1), ("fc2", 1, 4)],
           "hf": [("q", 1, 1), ("k", 1, 1), ("v", 1, 1), ("out", 1, 1), ("fc1", 4, 1), ("fc2", 1, 4)]}
MODELS = {"ViT-B/32": (768, 12), "ViT-L/14": (1024, 24)}  # width, blocks


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:.4g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------
# TSV-M
# ------------------------------------------------------------------------------------------------


def decaying_matrix(m: int, n: int, decay: str, gen: torch.Generator) -> torch.Tensor:
    """float32 m×n with (nearly) orthonormal random singular vectors and a decaying spectrum.

    ``decay``: "power" σ_j = 1/j, "exp" σ_j = exp(−16 j/r), "noise" a rank-32 1/j signal plus Gaussian
    noise of spectral norm ≈ 0.2 σ_1 (flat around σ_k: the fast path's Krylov space cannot resolve it).
    """
    r = min(m, n)
    j = torch.arange(1, r + 1, dtype=torch.float32)
    s = {"power": 1.0 / j, "exp": torch.exp(-16.0 * j / r), "noise": torch.where(j <= 32, 1.0 / j, 0.0)}[decay]
    u = torch.randn(m, r, generator=gen) / math.sqrt(m)
    v = torch.randn(n, r, generator=gen) / math.sqrt(n)
    out = (u * s) @ v.T
    if decay == "noise":
        out += 0.1 * torch.randn(m, n, generator=gen) / math.sqrt(max(m, n))
    return 1e-2 * out


def block_task_vectors(width: int, block: int, tasks: int, decay: str, seed: int,
                       layout: str = "hf") -> list[dict[str, torch.Tensor]]:
    """One transformer block's 2-D tensors for ``tasks`` task vectors (generated, never downloaded)."""
    gen = torch.Generator().manual_seed(seed * 1000 + block)
    if decay == "shared":  # IID clients: one common 1/j update plus 0.3 × each task's own
        common = {name: decaying_matrix(rows * width, cols * width, "power", gen) for name, rows, cols in LAYOUTS[layout]}
        return [{f"{block}.{name}": common[name] + 0.3 * decaying_matrix(rows * width, cols * width, "power", gen)
                 for name, rows, cols in LAYOUTS[layout]} for _ in range(tasks)]
    return [{f"{block}.{name}": decaying_matrix(rows * width, cols * width, decay, gen)
             for name, rows, cols in LAYOUTS[layout]} for _ in range(tasks)]


def published_tsv_merge(matrices: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M as the TSV authors' code computes it, transcribed: float32 thin SVD of every task
    matrix, k = ⌊r/T⌋ triplets each, SVDs of the stacked bases, U⊥ diag(σ) V⊥ᵀ. The baseline.

    The published code takes int(r/T), which is 0 for T > r; max(1, …) as fedmerge does keeps one
    triplet per task there (no benchmarked shape has T > r, so the timings are unaffected)."""
    k = max(1, min(matrices[0].shape) // len(matrices))
    svds = [torch.linalg.svd(m, full_matrices=False) for m in matrices]
    u = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    s = torch.cat([s[:k] for _, s, _ in svds])
    v = torch.cat([vh[:k].T for _, _, vh in svds], dim=1)
    uu, _, uvh = torch.linalg.svd(u, full_matrices=False)
    vu, _, vvh = torch.linalg.svd(v, full_matrices=False)
    return torch.linalg.multi_dot([uu, uvh, torch.diag(s), (vu @ vvh).T])


def rel_err(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(num / den)


def tsv_floor_seconds(tvs: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Seconds of the work the fast path cannot avoid on these task vectors, timed alone: the two
    eigendecompositions of the stacked bases' Gram matrices per matrix (T·k wide; float32 for a side at
    least twice T·k long, float64 otherwise, as the fast path takes them for independent tasks), and
    the float32 products of the block Krylov recursion (2·depth + 2 products of every task matrix with
    ⌈k/3⌉ columns)."""
    from fedmerge.merging.spectral.linalg import _KRYLOV_DEPTH, krylov_block_size
    from fedmerge.merging.spectral.tsv import task_rank

    eigh_s = products_s = 0.0
    gen = torch.Generator().manual_seed(0)
    for key in tvs[0]:
        a = torch.stack([tv[key] for tv in tvs])
        if a.shape[-2] < a.shape[-1]:
            a = a.mT.contiguous()
        t, m, n = a.shape
        width = t * task_rank((m, n), t)
        for side in (m, n):
            gram = torch.randn(width, width, generator=gen, dtype=torch.float32 if side >= 2 * width else torch.float64)
            gram = gram @ gram.mT
            t0 = time.perf_counter()
            torch.linalg.eigh(gram)
            eigh_s += time.perf_counter() - t0
        z = torch.randn(t, n, krylov_block_size(task_rank((m, n), t)), generator=gen)
        t0 = time.perf_counter()
        for _ in range(_KRYLOV_DEPTH + 1):
            a.mT @ (a @ z)
        products_s += time.perf_counter() - t0
    return eigh_s, products_s


def bench_tsv(quick: bool) -> list[list]:
    """fedmerge's TSV-M against the published float32 algorithm; errors against the float64 reference."""
    from fedmerge.merging.spectral import tsv_merge_matrix_reference

    def per_key(fn, tvs):
        return {k: fn([tv[k] for tv in tvs]) for k in tvs[0]}

    configs = [("ViT-B/32", "open_clip", t, "power") for t in (8, 14, 20)]
    configs += [("ViT-B/32", "open_clip", 8, d) for d in ("exp", "noise", "shared")]
    configs += [("ViT-B/32", "hf", 8, "power")]
    configs += [("ViT-L/14", "open_clip", t, "power") for t in (8, 14, 20)]
    if quick:
        configs = [("ViT-B/32", "open_clip", 8, "power"), ("ViT-B/32", "open_clip", 8, "exp")]
    rows, floor = [], None
    for model, layout, tasks, decay in configs:
        width, blocks = MODELS[model]
        fast_blocks = (2 if quick else blocks) if model == "ViT-B/32" else 2
        fast_s = pub_s = 0.0
        params = 0
        for b in range(fast_blocks):
            tvs = block_task_vectors(width, b, tasks, decay, seed=tasks, layout=layout)
            params = sum(t.numel() for t in tvs[0].values())
            t0 = time.perf_counter()
            out = merge("tsv", tvs)
            fast_s += time.perf_counter() - t0
            if b == 0:  # the baseline and the float64 reference on one block
                t0 = time.perf_counter()
                pub = per_key(published_tsv_merge, tvs)
                pub_s = time.perf_counter() - t0
                ref = per_key(lambda mats: tsv_merge_matrix_reference(mats).float(), tvs)
                err, pub_err = rel_err(out, ref), rel_err(pub, ref)
                del pub, ref
                if floor is None:
                    floor = (model, layout, tasks, decay, *tsv_floor_seconds(tvs), pub_s)
            del tvs, out
        fast_total = fast_s * blocks / fast_blocks
        pub_total = pub_s * blocks
        rows.append([model, layout, tasks, {"power": "1/j", "exp": "exp", "noise": "noise", "shared": "shared"}[decay], f"{params * blocks / 1e6:.0f}M",
                     f"{fast_total:.1f}" + ("" if fast_blocks == blocks else "*"), f"{pub_total:.1f}*",
                     f"{pub_total / fast_total:.1f}×", f"{err:.1e}", f"{pub_err:.1e}"])
        print(f"  tsv {model} {layout} T={tasks} {decay}: fast {fast_total:.1f}s published {pub_total:.1f}s",
              flush=True)
    table("TSV-M, 2-D tensors of the model (* = timed on a subset of blocks, scaled to all; errors: relative "
          "Frobenius distance to the float64 full-SVD reference on the first block)",
          ["model", "layout", "T", "σ_j", "params", "fedmerge s", "published s", "speed-up", "error",
           "published error"], rows)
    model, layout, tasks, decay, eigh_s, products_s, pub_s = floor
    print(f"\nFloor, one {model} {layout} block, T = {tasks}, {decay}: the polar step's eigendecompositions "
          f"{eigh_s:.2f} s + the Krylov products {products_s:.2f} s = {eigh_s + products_s:.2f} s, timed alone; the "
          f"published code takes {pub_s:.2f} s on that block, so 8× would need ≤ {pub_s / 8:.2f} s for everything.")
    return rows


def bench_gpu(quick: bool) -> list[list]:
    """On the GPU (skipped without one): TSV-M on ViT-B/32 and ViT-L/14 blocks at T = 8, 14, 20
    against the published algorithm (FusionBench's and the authors' float32 SVDs) on the same GPU,
    errors against the float64 full-SVD reference; then the linear and order-statistic rules in GB/s."""
    from fedmerge.merging.spectral import tsv_merge_matrix_reference

    if not torch.cuda.is_available():
        print("\ngpu: no CUDA device here; skipped")
        return []
    gpu = torch.device("cuda")
    name = torch.cuda.get_device_name(gpu)

    def timed(fn: Callable[[], object]) -> float:
        fn()  # warm-up: kernels, cuSOLVER handles, the caching allocator
        torch.cuda.synchronize()
        best = math.inf
        for _ in range(1 if quick else 3):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    rows = []
    configs = [(model, t) for model in ("ViT-B/32", "ViT-L/14") for t in ((8,) if quick else (8, 14, 20))]
    for model, tasks in configs:
        width, blocks = MODELS[model]
        tvs = [{k: v.to(gpu) for k, v in tv.items()}
               for tv in block_task_vectors(width, 0, tasks, "power", seed=tasks, layout="open_clip")]
        fast_s = timed(lambda tvs=tvs: merge("tsv", tvs))
        pub_s = timed(lambda tvs=tvs: {k: published_tsv_merge([tv[k] for tv in tvs]) for k in tvs[0]})
        out = merge("tsv", tvs)
        pub = {k: published_tsv_merge([tv[k] for tv in tvs]) for k in tvs[0]}
        ref = {k: tsv_merge_matrix_reference([tv[k].cpu() for tv in tvs]).float() for k in tvs[0]}
        rows.append([model, tasks, f"{fast_s * blocks:.2f}", f"{pub_s * blocks:.2f}", f"{pub_s / fast_s:.1f}×",
                     f"{rel_err({k: v.cpu() for k, v in out.items()}, ref):.1e}",
                     f"{rel_err({k: v.cpu() for k, v in pub.items()}, ref):.1e}"])
        del tvs, out, pub
        torch.cuda.empty_cache()
    table(f"TSV-M on {name}: one block timed (best of 3 after a warm-up), scaled to the model's blocks; "
          "errors: relative Frobenius distance to the float64 full-SVD reference",
          ["model", "T", "fedmerge s", "published s", "speed-up", "error", "published error"], rows)
    n, numel = 8, (4 if quick else 64) * 2**20
    gen = torch.Generator(device=gpu).manual_seed(0)
    shapes = [(numel // 8 // 1024, 1024)] * 8
    tvs = [{f"t{i}": torch.randn(*sh, generator=gen, device=gpu) for i, sh in enumerate(shapes)} for _ in range(n)]
    size = sum(t.numel() * t.element_size() for t in tvs[0].values())
    linear_rows = []
    for method, entry in sorted(METHODS.items()):
        options = bench_options(entry, n)
        if is_spectral(entry) or isinstance(options, str):
            continue
        seconds = timed(lambda method=method, options=options: merge(method, tvs, **options))
        linear_rows.append([method, f"{seconds * 1e3:.1f}", f"{n * size / seconds / 1e9:.1f}"])
    table(f"Linear and order-statistic rules on {name}: {n} task vectors × {size / 1e6:.0f} MB float32",
          ["method", "ms", "GB/s of task vectors"], linear_rows)
    return rows + linear_rows


# ------------------------------------------------------------------------------------------------
# Linear and order-statistic methods
# ------------------------------------------------------------------------------------------------


_CHILD = """
import sys, torch
from fedmerge import merge
def high_water():  # peak RSS of this process image (VmHWM starts afresh at exec; ru_maxrss does not)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
method, n, numel, opts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), eval(sys.argv[4])
tvs = [{f"t{i}": torch.randn(numel // 8 // 1024, 1024) for i in range(8)} for _ in range(n)]
before = high_water()
out = merge(method, tvs, **opts)
print(1024 * (high_water() - before))
"""


def _peak_extra_memory(method: str, n: int, numel: int, options: dict) -> int:
    """Peak resident memory a fresh process adds while merging (its inputs already in memory)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, method, str(n), str(numel), repr(options)],
                          capture_output=True, text=True)
    return int(proc.stdout.split()[-1]) if proc.returncode == 0 else -1


SPECTRAL_PACKAGE = "fedmerge.merging.spectral"  # rules defined there are timed in the tsv section

# Benchmark choices, not facts about the rules: trimmed_mean's default beta = 0.1 trims nothing from
# 8 clients (⌊0.8⌋ = 0) and streams as the mean, so time one that trims 2 values per end.
TIMED_OPTIONS = {"trimmed_mean": {"beta": 0.25}}


def is_spectral(entry: MergeMethod) -> bool:
    """Whether a registered rule is one of the singular-vector rules (by the module defining it)."""
    module = getattr(entry.function, "__module__", "") or ""
    return module == SPECTRAL_PACKAGE or module.startswith(SPECTRAL_PACKAGE + ".")


def bench_options(entry: MergeMethod, n: int) -> dict | str:
    """Options to time ``entry`` with on ``n`` clients, read from its registry entry: defaults, one
    value per client (10, 11, ... as local step counts) for each per-client option, ``TIMED_OPTIONS``
    where set; or a note saying why it cannot be timed (a required option without a default)."""
    options: dict = {name: [10 + i for i in range(n)] for name in sorted(entry.per_client)}
    options.update(TIMED_OPTIONS.get(entry.name, {}))
    missing = sorted(entry.required - set(options))
    if missing:
        return f"skipped: required option {missing[0]!r} has no default"
    return options


def bench_linear(quick: bool) -> list[list]:
    n, numel = 8, (4 if quick else 22) * 2**20
    gen = torch.Generator().manual_seed(0)
    shapes = [(numel // 8 // 1024, 1024)] * 8  # eight 2-D tensors (spectral methods are timed above)
    tvs = [{f"t{i}": torch.randn(*s, generator=gen) for i, s in enumerate(shapes)} for _ in range(n)]
    size = sum(t.numel() * t.element_size() for t in tvs[0].values())
    rows = []
    for method, entry in sorted(METHODS.items()):
        if is_spectral(entry):
            continue
        options = bench_options(entry, n)
        settable = {k: v for k, v in options.items() if k not in entry.per_client} if isinstance(options, dict) else {}
        label = method + (f" ({', '.join(f'{k}={v}' for k, v in settable.items())})" if settable else "")
        if isinstance(options, str):
            rows.append([label, "", "", "", options])
            continue
        fn: Callable = lambda method=method, options=options: merge(method, tvs, **options)
        try:
            fn()
        except Exception as exc:  # a rule that fails on these inputs: say so, go on
            rows.append([label, "", "", "", f"skipped: {exc}"])
            continue
        best = math.inf
        for _ in range(2 if quick else 3):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
            del out
        extra = _peak_extra_memory(method, n, numel, options)
        rows.append([label, f"{best:.3f}", f"{n * size / best / 1e9:.2f}", f"{extra / size:.2f}", ""])
    table(f"Linear and order-statistic methods: {n} task vectors × {size / 1e6:.0f} MB float32 "
          "(GB/s = task-vector bytes read / s; extra memory = peak RSS added by the merge, in task vectors)",
          ["method", "seconds", "GB/s", "extra mem (×τ)", "note"], rows)
    return rows


# ------------------------------------------------------------------------------------------------
# Offline merge memory
# ------------------------------------------------------------------------------------------------


def bench_offline(quick: bool) -> list[list]:
    try:
        import fedmerge.offline  # noqa: F401
    except ImportError:
        print("\noffline: fedmerge.offline is not available; skipped")
        return []
    from safetensors.torch import save_file

    exe = shutil.which("fedmerge")
    if exe is None or not Path("/usr/bin/time").exists():
        print("\noffline: needs the `fedmerge` command and /usr/bin/time; skipped")
        return []
    params = (25 if quick else 100) * 10**6
    tensors = 100
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-") as tmp:
        gen = torch.Generator().manual_seed(0)
        per = params // tensors
        shape = (per // 1000, 1000)
        base = {f"layer{i}.weight": torch.randn(*shape, generator=gen) for i in range(tensors)}
        save_file(base, f"{tmp}/base.safetensors")
        torch.save(base, f"{tmp}/base.pt")
        size = sum(t.numel() * 4 for t in base.values())
        for j in range(8):
            ft = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
            save_file(ft, f"{tmp}/ft{j}.safetensors")
            torch.save(ft, f"{tmp}/ft{j}.pt")
            del ft
        del base
        # What the command costs before it reads a checkpoint: the resident set of an interpreter that
        # imported what `fedmerge merge` imports (torch's CUDA build alone maps ~0.5 GB).
        probe = subprocess.run([sys.executable, "-c", "import simulations.cli, fedmerge.offline; "
                                "import os; print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"],
                               capture_output=True, text=True)
        baseline = int(probe.stdout.split()[-1]) if probe.returncode == 0 else 0
        runs = [("safetensors", "fedavg"), ("safetensors", "task_arithmetic"), ("safetensors", "median"),
                ("pt", "fedavg")]  # .pt: memory-mapped PyTorch files
        for suffix, method in runs:
            out = f"{tmp}/merged-{suffix}-{method}.safetensors"
            cmd = ["/usr/bin/time", "-v", exe, "merge", "--base", f"{tmp}/base.{suffix}",
                   "--models", *(f"{tmp}/ft{j}.{suffix}" for j in range(8)), "--method", method, "--out", out, "--quiet"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            peak = next((int(line.split(":")[1]) * 1024 for line in proc.stderr.splitlines()
                         if "Maximum resident set size" in line), 0)
            note = "" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1][:80]
            rows.append([method, suffix, f"{params / 1e6:.0f}M", f"{size / 1e9:.2f}", f"{wall:.1f}", f"{peak / 1e9:.2f}",
                         f"{baseline / 1e9:.2f}", f"{(peak - baseline) / size:.2f}", note])
    table("Offline merge (`fedmerge merge`, 8 checkpoints, float32): peak RSS of the process (GB), the RSS of "
          "the same imports before any work, and the difference in model sizes",
          ["method", "format", "params", "model GB", "seconds", "peak GB", "imports GB", "merge / model", "note"], rows)
    return rows


def _synthetic_llama(directory: Path, seed: int, like: Path | None = None, noise: float = 0.01,
                     layers: int = 22) -> int:
    """A Llama-shaped causal LM in bf16 with TinyLlama-1.1B's shapes (1.1B parameters at 22 layers),
    written tensor by tensor as sharded safetensors with config.json: random, or ``like`` plus
    Gaussian noise. Returns the size of its weights in bytes."""
    from fedmerge.io.sharded import ModelWeights, ShardedWriter

    hidden, inter, vocab, kv = 2048, 5632, 32000, 256
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    directory.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 4, "vocab_size": vocab, "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    source = None if like is None else ModelWeights(like)
    entries = [(k, shape, torch.bfloat16) for k, shape in shapes.items()]
    with ShardedWriter(directory, entries, 2 * 10**9) as writer:
        for key, shape, _ in entries:
            values = torch.randn(shape, generator=gen).mul_(0.02 if source is None else noise)
            if source is not None:
                values += source[key].float()
            writer.write(key, values.to(torch.bfloat16))
    return sum(torch.Size(s).numel() * 2 for s in shapes.values())


SPECTRAL_RULES = ("tsv", "tsv_compress", "iso_c", "iso_cts")
LLM_RULES = ("fedavg", "task_arithmetic", "median", "cclip", "ties", *SPECTRAL_RULES)


def bench_llm(quick: bool, methods: Sequence[str] | None = None) -> list[list]:
    """`fedmerge merge` on model directories at LLM scale: a 1.1B-parameter Llama-shaped base and 4
    fine-tuned models in bf16, sharded: peak memory above the imports against the largest tensor, and
    GB/s of checkpoints read, per rule (``methods``, default all; the spectral rules on 2 layers)."""
    exe = shutil.which("fedmerge")
    if exe is None or not Path("/usr/bin/time").exists():
        print("\nllm: needs the `fedmerge` command and /usr/bin/time; skipped")
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-llm-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model_bytes = {}
        methods = methods or (["fedavg", "ties"] if quick else list(LLM_RULES))
        sizes = {"" if m not in SPECTRAL_RULES else "small-" for m in methods}
        for name, layers in (("", 22), ("small-", 2)):  # spectral rules on 22 layers take an hour on two cores
            if name not in sizes:
                continue
            model_bytes[name] = _synthetic_llama(root / f"{name}base", 0, layers=layers)
            for i in range(4):
                _synthetic_llama(root / f"{name}ft{i}", i + 1, like=root / f"{name}base", noise=0.001 * (i + 1),
                                 layers=layers)
        print(f"  llm: 5 models each of {', '.join(f'{b / 1e9:.2f}' for b in model_bytes.values())} GB "
              f"written in {time.perf_counter() - t0:.0f} s", flush=True)
        largest = 32000 * 2048 * 2  # the embedding and the LM head, in bf16
        probe = subprocess.run([sys.executable, "-c", "import simulations.cli, fedmerge.offline; "
                                "import os; print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"],
                               capture_output=True, text=True)
        baseline = int(probe.stdout.split()[-1]) if probe.returncode == 0 else 0
        for method in methods:
            name = "small-" if method in SPECTRAL_RULES else ""
            out = root / f"merged-{method}"
            cmd = ["/usr/bin/time", "-v", exe, "merge", "--base", str(root / f"{name}base"),
                   "--models", *(str(root / f"{name}ft{i}") for i in range(4)), "--method", method, "--out", str(out),
                   "--quiet", "--max-shard-size", "2GB"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            peak = next((int(line.split(":")[1]) * 1024 for line in proc.stderr.splitlines()
                         if "Maximum resident set size" in line), 0)
            if proc.returncode != 0:
                print(proc.stderr, flush=True)
            note = "" if proc.returncode == 0 else "failed (printed above)"
            extra = peak - baseline
            size = model_bytes[name]
            rows.append([method, f"{size * 1e-9:.2f}", f"{wall:.1f}", f"{5 * size / 1e9 / wall:.2f}",
                         f"{peak / 1e9:.2f}", f"{baseline / 1e9:.2f}", f"{extra / largest:.1f}", f"{extra / size:.2f}",
                         note])
            print(f"  llm {method}: {wall:.1f} s, {extra / largest:.1f} largest tensors", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    table(f"Model directories at LLM scale: `fedmerge merge` over a Llama-shaped bf16 base and 4 fine-tuned models "
          f"(TinyLlama-1.1B's shapes, sharded; the spectral rules on 2 of its 22 layers, the same largest tensor); memory above "
          f"the imports in units of the largest tensor ({largest / 1e6:.0f} MB in bf16; the bound (inputs + 2) is 6) "
          f"and of the model",
          ["method", "model GB", "seconds", "GB/s read", "peak GB", "imports GB", "above imports / largest tensor",
           "/ model", "note"], rows)
    return rows


# ------------------------------------------------------------------------------------------------
# Simulation scaling
# ------------------------------------------------------------------------------------------------


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as Ray counts them; os.cpu_count() elsewhere)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def bench_sim(quick: bool) -> list[list]:
    """Both engines from 8 to 128 clients. The clients report their own seconds (``train-seconds``:
    data and training; a worker's first import of torch is the engine's), so the engine's overhead
    per client is the worker-seconds of the client phase not spent in them: (workers × client phase
    − Σ clients' seconds) / clients, one worker in-process, one Ray actor per usable CPU."""
    from simulations.config import ExperimentConfig
    from simulations.experiment import run_experiment

    sizes = {"inprocess": (8, 32) if quick else (8, 16, 32, 64, 128), "ray": (8,) if quick else (8, 32, 128)}
    rows = []
    cache = tempfile.mkdtemp(prefix="fedmerge-bench-cache-")
    try:
        for engine, counts in sizes.items():
            for n in counts:
                config = ExperimentConfig(name="bench", num_clients=n, partition="iid", local_steps=[5] * n,
                                          test_fraction=0.15, strategies=("fedavg", "median"), engine=engine,
                                          pretrain_steps=30, cache_dir=cache, seed=0)
                results = run_experiment(config, progress=False).results
                timing, own = results["timing"], sum(c["train_seconds"] for c in results["clients"])
                workers = 1 if engine == "inprocess" else min(n, usable_cpus() // config.run.client_cpus)
                overhead = (workers * timing["clients"] - own) / n
                rows.append([engine, n, *(f"{v:.2f}" for v in (timing.get("wait_for_nodes", 0.0) + timing.get("query", 0.0),
                                                                timing["clients"], own)),
                             f"{1e3 * overhead:.1f}", f"{timing['merging']:.3f}", f"{1e3 * timing['merging'] / n:.2f}",
                             f"{timing['evaluation']:.2f}", f"{timing['total']:.2f}"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    table("Both engines, MLP, 5 local steps per client (seconds; ms per client; overhead = (workers × client "
          "phase − clients' own seconds) / clients)",
          ["engine", "clients", "engine start", "client phase", "clients' own", "overhead ms/client", "merging",
           "merging ms/client", "evaluation", "total"], rows)
    return rows


def bench_default(quick: bool) -> list[list]:
    from simulations.config import load_config
    from simulations.experiment import run_experiment

    stages = ["data", "pretrain", "wait_for_nodes", "query", "clients", "merging", "evaluation"]
    rows = []
    cache = tempfile.mkdtemp(prefix="fedmerge-bench-cache-")
    try:
        config = load_config(overrides=[f"cache-dir={cache!r}"])
        run_experiment(config.replace(engine="inprocess"), progress=False)  # warm the pre-training cache
        for engine in ("inprocess", "ray"):
            timing = run_experiment(config.replace(engine=engine), progress=False).results["timing"]
            other = timing["total"] - sum(timing.get(k, 0.0) for k in stages)
            rows.append([engine, *(f"{v:.2f}" for v in [*(timing.get(k, 0.0) for k in stages), other, timing["total"]])])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    table(f"Default run ({config.num_clients} clients, pre-trained base cached; seconds; 'start/stop' = "
          "total minus the stages: engine start and stop)", ["engine", *stages, "start/stop", "total"], rows)
    return rows


def bench_cache(quick: bool) -> list[list]:
    """A cache entry read with its checksum and finiteness checked (``load_verified``) against a plain
    safetensors read plus one pass over its values, side by side, from the default MLP's size up."""
    from fedmerge.io import load_state, load_verified, save_verified

    sizes = (0.2, 25) if quick else (0.2, 25, 250)  # millions of float32 parameters
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-cache-") as tmp:
        for millions in sizes:
            numel = int(millions * 1e6)
            tensors = {f"layer{i}.weight": torch.randn(numel // 4) for i in range(4)}
            path = Path(tmp) / f"entry-{millions}.safetensors"
            save_verified(tensors, path)
            load_verified(path)  # warm: the file in the page cache, the code paths run once
            plain = min(_seconds(_touch_all, load_state, path) for _ in range(3))
            verified = min(_seconds(load_verified, path) for _ in range(3))
            gb = path.stat().st_size / 1e9
            rows.append([f"{millions:g}M", f"{gb * 1e3:.0f}", f"{plain * 1e3:.1f}", f"{verified * 1e3:.1f}",
                         f"{verified / plain:.1f}×", f"{gb / verified:.2f}"])
            path.unlink()
    table("Cache entries: read with checksum and finiteness check vs plain read + one pass (ms, min of 3)",
          ["parameters", "MB", "plain ms", "verified ms", "ratio", "verified GB/s"], rows)
    return rows


def _touch_all(read: Callable[[Path], dict[str, torch.Tensor]], path: Path) -> None:
    """Read ``path`` and make one pass over every value, as any use of a cache entry does
    (safetensors reads lazily)."""
    for t in read(path).values():
        t.sum()


def _seconds(work: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    work(*args)
    return time.perf_counter() - t0


def bench_sweep(quick: bool) -> list[list]:
    """The shipped data-heterogeneity sweep (7 alphas × 6 seeds = 42 cells; --quick: 2 seeds) one cell
    after another and on 2 Ray workers, each from an empty cache, in fresh processes: wall time,
    cells per minute per worker, parallel efficiency, the CSVs compared byte for byte. Then the same
    cells with 2000 local steps, where Ray's fixed start is a small part of the sweep; the shipped
    sweep on a two-node Ray cluster on 127.0.0.1 (one CPU each); and where one cell's time goes."""
    from simulations.cluster import set_offline_env

    set_offline_env()  # before Ray's import: the cluster below stays on 127.0.0.1
    from ray.cluster_utils import Cluster

    seeds = [0, 1] if quick else list(range(6))
    shipped = (Path(__file__).parent.parent / "simulations" / "sweeps" / "data-heterogeneity.toml").read_text()
    shipped = shipped.replace("seeds = [0, 1, 2]", f"seeds = {seeds}")
    variants = {"shipped (50 local steps)": shipped,
                "2000 local steps": shipped.replace("local-steps = 50", "local-steps = 2000")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-sweep-") as tmp:

        def sweep(i: int, workers: int, tag: str, env: dict[str, str]) -> tuple[float, int, bytes]:
            out, cache = Path(tmp) / f"out-{i}-{tag}", Path(tmp) / f"cache-{i}-{tag}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "simulations.cli", "sweep", str(Path(tmp) / f"spec-{i}.toml"),
                            "-q", "--workers", str(workers), "--out", str(out)],
                           env={**env, "FEDMERGE_CACHE": str(cache)}, check=True, capture_output=True)
            return time.perf_counter() - t0, len(list((out / "cells").iterdir())), (out / "results.csv").read_bytes()

        def row(variant: str, how: str, workers: int, result: tuple[float, int, bytes],
                sequential: tuple[float, int, bytes]) -> list[str]:
            wall, cells, csv = result
            speedup = sequential[0] / wall
            print(f"  sweep {variant}, {how}, {workers} worker(s): {wall:.1f} s", flush=True)
            return [variant, how, str(workers), str(cells), f"{wall:.1f}", f"{cells / (wall / 60) / workers:.1f}",
                    "" if result is sequential else f"{speedup:.2f}× ({csv == sequential[2]})",
                    "" if result is sequential else f"{speedup / workers:.2f}"]

        for i, (variant, text) in enumerate(variants.items()):
            (Path(tmp) / f"spec-{i}.toml").write_text(text)
            sequential = sweep(i, 1, "1", dict(os.environ))
            rows.append(row(variant, "this machine", 1, sequential, sequential))
            rows.append(row(variant, "this machine", 2, sweep(i, 2, "2", dict(os.environ)), sequential))
            if i == 0:  # two Ray nodes of one CPU each, every address 127.0.0.1
                cluster = Cluster(initialize_head=True, connect=False,
                                  head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                  "include_dashboard": False})
                try:
                    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
                    cluster.wait_for_nodes()
                    on_cluster = sweep(i, 2, "cluster", {**os.environ, "RAY_ADDRESS": cluster.address})
                finally:
                    cluster.shutdown()
                rows.append(row(variant, "two-node cluster", 2, on_cluster, sequential))
        table("Sweep throughput: data-heterogeneity (7 alphas), from an empty cache; speed-up over one worker "
              "(CSV identical) and parallel efficiency (speed-up / workers)",
              ["sweep", "where", "workers", "cells", "wall s", "cells/min/worker", "speed-up", "efficiency"], rows)
        stages = ["data", "pretrain", "clients", "merging", "evaluation"]
        timings = [json.loads(p.read_text())["timing"] for p in (Path(tmp) / "out-0-1" / "cells").glob("*/results.json")]
        mean = {k: sum(t.get(k, 0.0) for t in timings) / len(timings) for k in [*stages, "total"]}
        work = mean["clients"] + mean["merging"] + mean["evaluation"]
        table("One cell of the shipped sweep, sequential (mean over cells; seconds from results.json's timing)",
              [*stages, "total", "total / (clients + merging + evaluation)"],
              [[*(f"{mean[k]:.3f}" for k in stages), f"{mean['total']:.3f}", f"{mean['total'] / work:.2f}"]])
    return rows


SECTIONS = {"tsv": bench_tsv, "linear": bench_linear, "offline": bench_offline, "default": bench_default,
            "sim": bench_sim, "cache": bench_cache, "sweep": bench_sweep, "gpu": bench_gpu,
            "llm": bench_llm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute or so")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--llm-methods", nargs="+", choices=LLM_RULES, help="the rules the llm section runs")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for name in args.only or list(SECTIONS):
        if name == "llm":
            bench_llm(args.quick, args.llm_methods)
        else:
            SECTIONS[name](args.quick)


if __name__ == "__main__":
    main()
