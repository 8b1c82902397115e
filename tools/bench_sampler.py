"""Sampler overhead: the share of generation time spent outside the model's forward passes.

    python tools/bench_sampler.py [--batch 16] [--repeats 5] [--ckpt runs/demo_tasks2]
                                  [--against GIT_REV] [--layers 4 --hidden 128]

The demo-sized model (4 layers, hidden 128, vocabulary 1549, context 160; random weights, the
plain-PyTorch twin; ``--layers``/``--hidden`` for a bigger one) fills 16 buffers of 12 prompt
+ 128 masked text tokens, or t2i-like buffers (64 image codes), per strategy. ``--ckpt``: a
trained checkpoint's weights and vocabulary instead (trained models give peaked distributions,
which e.g. top-p filtering exploits).
``overhead = 1 - time in logits_fn / total time`` per run, in wall time (median and best of
``--repeats`` runs after a warm-up) and in this process's CPU time (median; steadier on a shared
machine). The model is asked only for the candidates' logits in their modality's columns (as
``megadiff generate`` does); the sampler of ``--against REV`` gets whatever it asks for (a
sampler from before that asked for every position's logits).

    python tools/bench_sampler.py --cache-sweep [--layers 8 --hidden 256] [--gen-lengths 64,256]
        [--prompt-lengths 16,512] [--batches 1,16] [--blocks 1] [--repeats 3] [--tp 2]

``--cache-sweep``: tokens/s of the block KV caches (``none`` / ``prefix`` / ``dual``) instead,
confidence decoding with block 32 and one token per step, the three runs interleaved in each
repeat (medians reported; ratios from interleaved runs hold on a drifting shared machine), as
tokens per second of this process's CPU time (``--threads 1``: the compute spent, which a busy
machine's preemption does not inflate) and as wall-time ratios. A
buffer is a text prompt plus the generation length; only ``--blocks`` evenly spaced blocks of
it are masked and generated (the rest holds text tokens: a step's cost depends on the buffer's
length, not on what is masked, and ``prefix``'s on the block's place: each block's index
is rounded down, leaving more buffer after it, which favors ``none``), so long generations are
timed in minutes. ``--tp N``: the megatron-core model (same shape, megadiff's initialisation) at
tensor parallel size N in N gloo processes, through ``megatron_logits_fn`` (every rank samples;
rank 0 prints, its CPU time).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
import types
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadiff.data.vocab import VocabLayout  # noqa: E402
from megadiff.diffusion.sampling import SamplerConfig, sample  # noqa: E402
from megadiff.generation.adapters import reference_logits_fn  # noqa: E402
from megadiff.generation.tasks import IMAGE_CODES, sampling_ranges  # noqa: E402
from megadiff.model.reference import ReferenceConfig, ReferenceModel  # noqa: E402

CASES = [
    ("text", SamplerConfig("confidence", steps=32)),
    ("text", SamplerConfig("confidence", steps=32, temperature=1.0)),
    ("text", SamplerConfig("confidence", steps=32, block_length=32, temperature=1.0, top_p=0.9)),
    ("text", SamplerConfig("margin", steps=32)),
    ("text", SamplerConfig("random", steps=32, temperature=1.0)),
    ("text", SamplerConfig("threshold", threshold=0.9, steps=32)),
    ("text", SamplerConfig("entropy", entropy_bound=0.1, steps=32)),
    ("t2i", SamplerConfig("confidence", steps=16, temperature=1.0, top_k=20, cfg_scale=1.0)),
]


def buffers(kind: str, v: VocabLayout, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "text":
        x = torch.full((batch, 140), v.mask_id)
        x[:, :12] = torch.randint(0, v.text_size, (batch, 12), generator=g)
        return x, torch.zeros_like(x)
    x = torch.full((batch, 78), v.mask_id)
    x[:, :12] = torch.randint(0, v.text_size, (batch, 12), generator=g)
    x[:, 12], x[:, 77] = v.specials["<boi>"], v.specials["<eoi>"]
    mod = torch.zeros_like(x)
    mod[:, 12:] = IMAGE_CODES
    mod[:, 12], mod[:, 77] = 1, 1
    return x, mod


SAMPLER_MODULES = ("sampling", "step_scores", "kernels", "strategies")  # megadiff/diffusion/


def sampler_at(rev: str):
    """``sample`` as it was at git revision ``rev``: the sampler's modules
    (``SAMPLER_MODULES``, those that exist there) read from that revision, the rest of megadiff
    from this tree."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        cmd = ["git", *args]
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        present = set(git("ls-tree", "--name-only", rev, "megadiff/diffusion/").split())
        sources = {
            f"megadiff.diffusion.{name}": (git("show", f"{rev}:{path}"), f"{rev}:{path}")
            for name in SAMPLER_MODULES
            if (path := f"megadiff/diffusion/{name}.py") in present
        }
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", "") or e
        raise SystemExit(f"--against {rev}: cannot read the sampler at that revision: {err}") from e
    if "megadiff.diffusion.sampling" not in sources:
        raise SystemExit(f"--against {rev}: no megadiff/diffusion/sampling.py at that revision")
    return _import_from(sources, "megadiff.diffusion.sampling").sample


class _SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the modules of ``sources`` (name -> (source, file name)) from those sources."""

    def __init__(self, sources: dict[str, tuple[str, str]]) -> None:
        self.sources = sources

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.sources:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=self.sources[fullname][1])

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        source, origin = self.sources[module.__name__]
        exec(compile(source, origin, "exec"), module.__dict__)


def _import_from(sources: dict[str, tuple[str, str]], name: str) -> types.ModuleType:
    """Module ``name`` imported with the modules of ``sources`` taken from their given source
    text (its imports of them included); this process's own modules of those names are set
    aside meanwhile and put back after."""
    package = importlib.import_module(name.rpartition(".")[0])
    own = {n: sys.modules.pop(n) for n in sources if n in sys.modules}
    own_attrs = {n: vars(package).get(n.rpartition(".")[2]) for n in sources}
    finder = _SourceFinder(sources)
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)
        for n, attr in own_attrs.items():
            sys.modules.pop(n, None)
            short = n.rpartition(".")[2]
            if attr is None:
                vars(package).pop(short, None)
            else:
                setattr(package, short, attr)
        sys.modules.update(own)


def sweep_buffer(v: VocabLayout, batch: int, prompt: int, gen: int, block: int, blocks: int):
    """``[batch, prompt + gen]`` random text with ``blocks`` evenly spaced blocks of the
    generation masked (each block's index rounded down: more of the buffer after it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, v.text_size, (batch, prompt + gen), generator=g)
    n = gen // block
    for i in range(min(blocks, n)):
        b = max(int((i + 0.5) * n / min(blocks, n) - 0.5), 0)
        x[:, prompt + b * block : prompt + (b + 1) * block] = v.mask_id
    return x, torch.zeros_like(x)


def show(line: str) -> None:
    print(line, flush=True)


def cache_sweep(args, fn, v: VocabLayout, ranges, weights: str, say=show) -> int:
    """Tokens/s of ``none`` / ``prefix`` / ``dual`` per (generation, prompt, batch), interleaved;
    ``say``: where the table's lines go."""
    block = 32
    modes = ("none", "prefix", "dual")
    warnings.filterwarnings("ignore", message="cache '.*single block")  # one block timed
    say(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, weights {weights}, block {block}, one token per "
        f"step, {args.blocks} block(s) timed per run, median of {args.repeats}")  # fmt: skip
    say("| gen | prompt | batch | tokens/run | none tok/CPU-s | prefix tok/CPU-s | dual "
        "tok/CPU-s | prefix x | dual x | prefix x (wall) | dual x (wall) |")  # fmt: skip
    say("| --- " * 11 + "|")
    ints = lambda text: [int(t) for t in text.split(",")]  # noqa: E731
    for gen in ints(args.gen_lengths):
        for prompt in ints(args.prompt_lengths):
            for batch in ints(args.batches):
                x, mod = sweep_buffer(v, batch, prompt, gen, block, args.blocks)
                n_tokens = int((x == v.mask_id).sum())
                steps = n_tokens // batch
                cfgs = {
                    m: SamplerConfig("confidence", steps=steps, block_length=block, cache=m)
                    for m in modes
                }
                rates: dict[str, list[float]] = {m: [] for m in modes}  # per CPU second
                walls: dict[str, list[float]] = {m: [] for m in modes}  # per wall second
                for m in modes:  # warm-up
                    sample(fn, x[:1, : prompt + gen // 2], mod[:1, : prompt + gen // 2], ranges,
                           v.mask_id, replace(cfgs[m], steps=4))  # fmt: skip
                for _ in range(args.repeats):
                    for m in modes:
                        t0 = time.process_time()
                        out = sample(fn, x, mod, ranges, v.mask_id, cfgs[m])
                        rates[m].append(n_tokens / (time.process_time() - t0))
                        walls[m].append(n_tokens / out.seconds)
                        assert int((out.tokens == v.mask_id).sum()) == 0
                med = {m: statistics.median(r) for m, r in rates.items()}
                wall = {m: statistics.median(r) for m, r in walls.items()}
                say(f"| {gen} | {prompt} | {batch} | {n_tokens} | {med['none']:.1f} | "
                    f"{med['prefix']:.1f} | {med['dual']:.1f} | "
                    f"{med['prefix'] / med['none']:.2f} | {med['dual'] / med['none']:.2f} | "
                    f"{wall['prefix'] / wall['none']:.2f} | "
                    f"{wall['dual'] / wall['none']:.2f} |")  # fmt: skip
    return 0


def megatron_cache_sweep(args, v: VocabLayout, weights: str) -> int:
    """:func:`cache_sweep` on one rank of a TP world: the megatron-core model of the same shape
    (``--layers``/``--hidden``), initialised as megadiff trains it, fp32."""
    from megadiff.config import load_config
    from megadiff.generation.adapters import megatron_logits_fn
    from megadiff.model.build import build_model
    from megadiff.parallel.state import destroy_distributed, init_distributed

    longest = max(int(g) for g in args.gen_lengths.split(",")) + max(
        int(p) for p in args.prompt_lengths.split(",")
    )
    h = args.hidden
    cfg = load_config(None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={h}",
        "model.num_attention_heads=4", f"model.ffn_hidden_size={3 * h}",
        f"model.vocab_size={v.vocab_size}", f"model.seq_length={longest}",
        "model.transformer_impl=local", f"parallel.tensor_parallel={args.tp}",
        "train.precision=fp32",
    ])  # fmt: skip
    ranks = init_distributed(cfg)
    torch.set_num_threads(args.threads or 1)
    fn = megatron_logits_fn(build_model(cfg), v.pad_id, v.vocab_size)
    try:
        quiet = lambda line: None  # noqa: E731 - the other ranks only sample
        return cache_sweep(args, fn, v, sampling_ranges(v), weights, quiet if ranks.rank else show)
    finally:
        destroy_distributed()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16, help="overhead table: buffers per run")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per case (medians are reported)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--ckpt", help="a trained checkpoint (default: random demo-sized weights)")
    p.add_argument("--layers", type=int, default=4, help="random weights: transformer layers")
    p.add_argument("--hidden", type=int, default=128, help="random weights: hidden size")
    p.add_argument(
        "--against",
        metavar="REV",
        help="also time the sampler of git revision REV, runs interleaved with this one's "
        "(a before/after comparison that a drifting shared machine does not bias)",
    )
    p.add_argument("--cache-sweep", action="store_true", help="tokens/s of the block KV caches")
    p.add_argument("--gen-lengths", default="64,256,512,1024", help="cache sweep: generated tokens")
    p.add_argument("--prompt-lengths", default="16,512", help="cache sweep: prompt tokens")
    p.add_argument("--batches", default="1,16", help="cache sweep: batch sizes")
    p.add_argument("--blocks", type=int, default=1, help="cache sweep: blocks generated per run")
    p.add_argument("--tp", type=int, default=0, help="cache sweep: megatron-core model at TP=N")
    args = p.parse_args()
    other = sampler_at(args.against) if args.against else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt:
        from megadiff.generation.load import load_for_generation

        bundle = load_for_generation(args.ckpt)
        v, inner = bundle.vocab, bundle.logits_fn
    else:
        v = VocabLayout(1024, 256, 128, 2)
        torch.manual_seed(0)
        h = args.hidden
        model = ReferenceModel(ReferenceConfig(args.layers, h, 4, 4, 3 * h, v.vocab_size, 1600))
        inner = reference_logits_fn(model, v.pad_id, v.vocab_size)
    cpu = {"model": 0.0}

    def fn(tokens: torch.Tensor, positions=None, columns=None) -> torch.Tensor:
        t0 = time.process_time()
        out = inner(tokens, positions, columns)
        cpu["model"] += time.process_time() - t0
        return out

    ranges = sampling_ranges(v)
    weights = args.ckpt or f"random, {args.layers} layers x hidden {args.hidden}"
    if args.cache_sweep and args.tp:
        from megadiff.parallel.launch import run_world

        weights = (
            f"random (megadiff's init), megatron-core at TP={args.tp}, {args.layers} layers x "
            f"hidden {args.hidden}"
        )
        return max(run_world(megatron_cache_sweep, args.tp, (args, v, weights), timeout=1e6))
    if args.cache_sweep:
        return cache_sweep(args, inner, v, ranges, weights)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, weights {weights}")  # fmt: skip
    extra = f" overhead at {args.against} (median) | total s at {args.against} |" if other else ""
    print("| buffer | settings | NFE/sample | total s | model s | overhead (median) | overhead "
          f"(best) | overhead (CPU time, median) |{extra}")  # fmt: skip
    print("| --- " * (8 + 2 * bool(other)) + "|")
    for kind, c in CASES:
        x, mod = buffers(kind, v, args.batch)
        sample(fn, x, mod, ranges, v.mask_id, c)  # warm-up
        runs, before = [], []  # (total s, model s, overhead, CPU-time overhead) per repeat
        for _ in range(args.repeats):
            cpu["model"], t0 = 0.0, time.process_time()
            out = sample(fn, x, mod, ranges, v.mask_id, c)
            cpu_over = 1 - cpu["model"] / (time.process_time() - t0)
            t, m = out.seconds, out.model_seconds
            runs.append((t, m, 1 - m / t, cpu_over))
            if other:
                o = other(fn, x, mod, ranges, v.mask_id, c)
                before.append((1 - o.model_seconds / o.seconds, o.seconds))
        t, m, over, cpu_over = (statistics.median(r[i] for r in runs) for i in range(4))
        s = f"{c.strategy} steps={c.steps} T={c.temperature}"
        s += f" block={c.block_length}" if c.block_length else ""
        s += f" top_p={c.top_p}" if c.top_p < 1 else ""
        s += f" top_k={c.top_k}" if c.top_k else ""
        s += f" cfg={c.cfg_scale}" if c.cfg_scale else ""
        nfe = out.nfe.float().mean().item()
        best = min(r[2] for r in runs)
        cols = f"{100 * over:.1f}% | {100 * best:.1f}% | {100 * cpu_over:.1f}%"
        if other:
            cols += f" | {100 * statistics.median(b[0] for b in before):.1f}%"
            cols += f" | {statistics.median(b[1] for b in before):.2f}"
        print(f"| {kind} | {s} | {nfe:.1f} | {t:.2f} | {m:.2f} | {cols} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
