"""The training step and the data path (issue 7).

1. A full Lightning training step of `SparseCodingModule` against its encode (X @ Phi) and decode
   (alpha @ Phi^T) GEMMs, with a torch-profiler breakdown of the step.
2. Streaming a real cache with `CacheDataModule` against the rate a training step consumes rows.
3. Cache extraction (`build_hidden_states`) against a bare forward pass over the same token batches
   (interleaved repetitions, medians, wall and CPU seconds, the load beside each).
4. Peak memory of a process streaming caches 1x and 4x a memory budget (RSS flat in cache size?).

    python -m benchmarks.data_bench [--device cpu|cuda] [--quick] [--only extract ...] [--out NAME] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import best_time, fmt_seconds, machine, sync, write_results
from benchmarks.solver_bench import REAL_CACHE, synthetic_problem

ROOT = Path(__file__).resolve().parent.parent


class _StepTimer:
    """Lightning callback recording the wall time of each training step (data loading excluded)."""

    def __new__(cls, device: str):
        import pytorch_lightning as pl

        class StepTimer(pl.Callback):
            def __init__(self):
                self.times, self._t = [], 0.0

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._t)

        return StepTimer()


def _trainer(device: str, max_steps: int, callbacks):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=max_steps,
                      max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def training_step_vs_gemms(device: str, d: int, mult: int, batch: int, steps: int, loader=None, init_rows=None) -> dict:
    """Median step time of a fit over `loader` (default: sparse-linear batches) and the step's two GEMMs."""
    from sparse_coding.module import SparseCodingModule

    if loader is None:
        x, _, _ = synthetic_problem(d, mult * d, batch * 8)
        init_rows = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
        loader = torch.utils.data.DataLoader(list(x.split(batch)), batch_size=None, shuffle=False)
    module = SparseCodingModule(dim=d, grid=[(mult, "auto")], init_rows=init_rows)
    timer = _StepTimer(device)
    _trainer(device, steps, [timer]).fit(module, train_dataloaders=loader)
    times = timer.times[2:]  # the first step also fits the starting lambda
    step = float(np.median(times))
    phi = module.phis[0].detach().to(device)
    xb = torch.randn(batch, d, device=device)
    alpha = torch.rand(batch, mult * d, device=device)
    t_enc = best_time(lambda: xb @ phi, 7)
    t_dec = best_time(lambda: alpha @ phi.T, 7)
    return dict(d=d, m=mult * d, batch=batch, steps_timed=len(times), step_seconds=step, min_step_seconds=min(times),
                encode_gemm_seconds=t_enc, decode_gemm_seconds=t_dec, ratio_to_gemms=step / (t_enc + t_dec),
                rows_per_second=batch / step, lam=module.lam(0))


def profile_step(d: int, mult: int, batch: int) -> list[dict]:
    """Where a training step's time goes: torch profiler over a few steps (self CPU time by op)."""
    from torch.profiler import ProfilerActivity, profile

    from sparse_coding.module import SparseCodingModule

    x, _, _ = synthetic_problem(d, mult * d, batch * 6)
    loader = torch.utils.data.DataLoader(list(x.split(batch)), batch_size=None)
    module = SparseCodingModule(dim=d, grid=[(mult, "auto")], init_rows=x)
    trainer = _trainer("cpu", 6, [])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit(module, train_dataloaders=loader)
    rows = []
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]:
        rows.append(dict(op=e.key, self_cpu_ms=e.self_cpu_time_total / 1e3, share=e.self_cpu_time_total / total, calls=e.count))
    return rows


def streaming_rate(layer: str, batch: int, passes: int = 3) -> dict:
    from sparse_coding.data.cache_datamodule import CacheDataModule

    dm = CacheDataModule(REAL_CACHE, layer=layer, batch_size=batch, verify=False)
    rates = []
    for _ in range(passes):
        rows, start = 0, time.perf_counter()
        for xb in dm.train_dataloader():
            rows += xb.shape[0]
        rates.append(rows / (time.perf_counter() - start))
    return dict(rows_per_pass=rows, rows_per_second=max(rates), all_rates=rates, d=dm.dim)


def training_on_cache(device: str, layer: str, batch: int, mult: int, steps: int) -> dict:
    from sparse_coding.data.cache_datamodule import CacheDataModule

    dm = CacheDataModule(REAL_CACHE, layer=layer, batch_size=batch, verify=False)
    first = next(iter(dm.train_dataloader()))
    return training_step_vs_gemms(device, dm.dim, mult, batch, steps, loader=dm.train_dataloader(), init_rows=first)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: every thread, the cache writer's included) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def extraction_vs_forward(max_tokens: int, device: str = "cpu", repeats: int = 5) -> dict:
    """`build_hidden_states` (every layer) against the bare forward pass over the same token batches.

    The bare forward pass: the same model on the same device in the same dtype, the cache's contexts in the
    cache's batches (`corpus.batch_size`) with `output_hidden_states=True`, nothing copied or kept (on CUDA,
    synchronised at the end). Tokenising is outside it. The extraction is the whole build into a fresh folder (deleting it is not timed):
    reading and tokenising the corpus (`build_contexts`, timed on its own inside the build), the forward pass,
    the copies, sha256, files, fsync and statistics. One warm-up of each, then `repeats` interleaved pairs
    (forward, extraction, forward, ...): medians, wall and CPU seconds, and the 1-minute load before each pair.
    """
    from sparse_coding import corpus as corpus_mod
    from sparse_coding import models
    from sparse_coding.cache import build
    from sparse_coding.config.compose import compose_config

    cfg = compose_config(["model=minilm", "corpus=wiki", f"corpus.max_tokens={max_tokens}", "layer=all",
                          f"model.device={device}"])
    model, tokenizer, info = models.load_model(cfg.model, device=models.resolve_device(cfg.model))
    layers = list(range(info["num_layers"] + 1))
    cold_ctx = _timed(lambda: corpus_mod.build_contexts(cfg.corpus, tokenizer))  # the corpus's imports included
    ctx = corpus_mod.build_contexts(cfg.corpus, tokenizer)
    B = int(cfg.corpus.batch_size)
    dev = torch.device(info["device"])

    def forward():
        with torch.inference_mode():
            for b0 in range(0, len(ctx.input_ids), B):
                ids = torch.as_tensor(ctx.input_ids[b0 : b0 + B]).to(dev)
                model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        sync(str(dev))

    context_times: list[float] = []
    build_contexts = corpus_mod.build_contexts

    def timed_contexts(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return build_contexts(*args, **kwargs)
        finally:
            context_times.append((time.perf_counter() - wall, time.process_time() - cpu))

    def extract(folder: Path):
        build.build_hidden_states(folder / "c", model, tokenizer, info, cfg.corpus, layers)
        sync(str(dev))

    def timed_extract() -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as tmp:  # deleting the cache is not timed
            return _timed(lambda: extract(Path(tmp)))

    corpus_mod.build_contexts = timed_contexts
    try:
        forward(), timed_extract()  # warm-up
        runs = []
        for _ in range(repeats):
            load = os.getloadavg()[0]
            f_wall, f_cpu = _timed(forward)
            e_wall, e_cpu = timed_extract()
            runs.append(dict(load=load, forward_wall=f_wall, forward_cpu=f_cpu, extraction_wall=e_wall,
                             extraction_cpu=e_cpu, context_wall=context_times[-1][0], context_cpu=context_times[-1][1]))
    finally:
        corpus_mod.build_contexts = build_contexts
    med = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    overheads = [r["extraction_wall"] / r["forward_wall"] - 1 for r in runs]
    without = [(r["extraction_wall"] - r["context_wall"]) / r["forward_wall"] - 1 for r in runs]
    cpu_without = [(r["extraction_cpu"] - r["context_cpu"]) / r["forward_cpu"] - 1 for r in runs]
    return dict(model=info["name"], device=info["device"], dtype=info["dtype"], layers=len(layers), rows=int(ctx.n_rows),
                d=info["hidden_size"], batch_size=B, contexts=len(ctx.input_ids), corpus_tokens_read=ctx.corpus_tokens,
                torch_threads=torch.get_num_threads(), repeats=repeats, runs=runs, median=med,
                cold_context_wall=cold_ctx[0], cold_context_cpu=cold_ctx[1],
                overhead=float(np.median(overheads)), overhead_without_context_building=float(np.median(without)),
                cpu_overhead=float(np.median([r["extraction_cpu"] / r["forward_cpu"] - 1 for r in runs])),
                cpu_overhead_without_context_building=float(np.median(cpu_without)),
                load_at_end=os.getloadavg())


_RSS_CHILD = r"""
import sys, time, threading
from sparse_coding.data.cache_datamodule import CacheDataModule
peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in peak:
            out[k] = int(v.split()[0]) * 1024
    return out
stop = False
def sample():
    while not stop:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
t = threading.Thread(target=sample, daemon=True); t.start()
base = status()
dm = CacheDataModule(sys.argv[1], batch_size=1024, verify=False)
rows = 0
for _ in range(int(sys.argv[2])):
    for xb in dm.train_dataloader():
        rows += xb.shape[0]
stop = True; t.join()
import json; print(json.dumps({"peak": peak, "baseline": base, "rows": rows}))
"""


def rss_while_streaming(budget_mb: int, multiples: list[int], d: int = 512, passes: int = 2) -> dict:
    """Stream caches of `multiple` x budget bytes in a fresh process each; peak RSS (anon and file-backed)."""
    from sparse_coding.cache.build import import_array

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for mult in multiples:
            n = mult * budget_mb * 2**20 // (4 * d)
            src = Path(tmp) / f"acts_{mult}.npy"
            arr = np.lib.format.open_memmap(src, mode="w+", dtype=np.float32, shape=(n, d))
            rng = np.random.default_rng(mult)
            for lo in range(0, n, 65536):
                arr[lo : lo + 65536] = rng.standard_normal((min(65536, n - lo), d), dtype=np.float32)
            arr.flush()
            del arr
            cache = Path(tmp) / f"cache_{mult}"
            import_array(src, cache)
            src.unlink()
            res = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(cache), str(passes)], capture_output=True,
                                 text=True, cwd=ROOT, check=True)
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            rec.update(cache_bytes=n * d * 4, multiple_of_budget=mult)
            out.append(rec)
    peaks = [r["peak"]["VmRSS"] for r in out]
    for r in out:  # memory the streaming itself holds: peak minus the process after its imports
        r["anon_over_baseline"] = r["peak"]["RssAnon"] - r["baseline"]["RssAnon"]
        r["rss_over_baseline"] = r["peak"]["VmRSS"] - r["baseline"]["VmRSS"]
    return dict(budget_bytes=budget_mb * 2**20, runs=out, peak_rss_growth=peaks[-1] / peaks[0],
                anon_within_budget=all(r["anon_over_baseline"] <= budget_mb * 2**20 for r in out),
                rss_within_budget=all(r["rss_over_baseline"] <= budget_mb * 2**20 for r in out))


def extraction_markdown(e: dict) -> list[str]:
    m = e["median"]
    lines = ["## Cache extraction vs bare forward pass", "",
             f"{e['model']} on {e['device']} ({e['dtype']}, torch threads: {e['torch_threads']}), {e['layers']} hidden states, "
             f"{e['rows']} rows (d={e['d']}), {e['contexts']} contexts in batches of {e['batch_size']}. Bare forward: the same "
             "model, device, dtype and token batches with output_hidden_states=True, nothing copied or kept; tokenising "
             "is outside it. Extraction: `build_hidden_states` into a fresh folder, reading and tokenising the corpus "
             f"inside ({e['corpus_tokens_read']:,} tokens read and tokenised). One warm-up each, then "
             f"{e['repeats']} interleaved pairs; medians.", "",
             "| pair | load (1 min) | forward wall | forward CPU | extraction wall | extraction CPU | of which contexts (wall) | overhead | without contexts |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(e["runs"], 1):
        lines.append(f"| {i} | {r['load']:.2f} | {fmt_seconds(r['forward_wall'])} | {fmt_seconds(r['forward_cpu'])} | "
                     f"{fmt_seconds(r['extraction_wall'])} | {fmt_seconds(r['extraction_cpu'])} | {fmt_seconds(r['context_wall'])} | "
                     f"{r['extraction_wall'] / r['forward_wall'] - 1:+.1%} | "
                     f"{(r['extraction_wall'] - r['context_wall']) / r['forward_wall'] - 1:+.1%} |")
    lines.append(f"| **median** | {m['load']:.2f} | {fmt_seconds(m['forward_wall'])} | {fmt_seconds(m['forward_cpu'])} | "
                 f"{fmt_seconds(m['extraction_wall'])} | {fmt_seconds(m['extraction_cpu'])} | {fmt_seconds(m['context_wall'])} | "
                 f"**{e['overhead']:+.1%}** | **{e['overhead_without_context_building']:+.1%}** |")
    target = lambda x: "met" if x <= 0.15 else "not met"  # noqa: E731
    lines += ["", f"Overhead (median of the pairs), target ≤ 15 %: wall {e['overhead']:+.1%} with the corpus read inside "
              f"({target(e['overhead'])}), {e['overhead_without_context_building']:+.1%} without it "
              f"({target(e['overhead_without_context_building'])}); CPU seconds {e['cpu_overhead']:+.1%} with, "
              f"{e['cpu_overhead_without_context_building']:+.1%} without. Reading the corpus cold (its imports "
              f"included, once per process): {fmt_seconds(e['cold_context_wall'])}. Load at the end: "
              f"{', '.join(f'{x:.2f}' for x in e['load_at_end'])}.", ""]
    return lines


def markdown(rec: dict) -> str:
    lines = ["# Training step and data path", "", f"Machine: {rec['machine']}", ""]
    if "train_synthetic" in rec:
        lines += ["## Training step vs its encode + decode GEMMs", "",
                  "| data | d | m | batch | step (median) | encode GEMM | decode GEMM | step / GEMMs |", "|---|---|---|---|---|---|---|---|"]
        for key in ("train_synthetic", "train_cache"):
            if key in rec:
                r = rec[key]
                lines.append(f"| {key.split('_')[1]} | {r['d']} | {r['m']} | {r['batch']} | {fmt_seconds(r['step_seconds'])} | "
                             f"{fmt_seconds(r['encode_gemm_seconds'])} | {fmt_seconds(r['decode_gemm_seconds'])} | {r['ratio_to_gemms']:.2f}× |")
        if "step_profile" in rec:
            lines += ["", "Profile of the synthetic step (self CPU time, top ops):", "", "| op | ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| {p['op']} | {p['self_cpu_ms']:.0f} | {p['share']:.0%} | {p['calls']} |" for p in rec["step_profile"]]
        lines.append("")
    if "streaming" in rec:
        s, c = rec["streaming"], rec.get("train_cache")
        lines += ["## Cache streaming vs training consumption", "",
                  f"CacheDataModule over {REAL_CACHE.name} layer {rec['layer']} (d={s['d']}): {s['rows_per_second']:,.0f} rows/s "
                  f"(best of {len(s['all_rates'])} passes of {s['rows_per_pass']} rows)."]
        if c:
            lines.append(f"Training consumes {c['rows_per_second']:,.0f} rows/s (m={c['m']}, batch {c['batch']}): streaming is "
                         f"{s['rows_per_second'] / c['rows_per_second']:.1f}× faster (target ≥ 5×).")
        lines.append("")
    if "extraction" in rec:
        lines += extraction_markdown(rec["extraction"])
    if "rss" in rec:
        r = rec["rss"]
        lines += ["## Peak memory while streaming", "", f"Memory cap for the streaming (over the process after its imports): "
                  f"{r['budget_bytes'] / 2**20:.0f} MiB. Two passes, batch 1024, default shuffle buffer.", "",
                  "| cache size | × cap | peak RSS | peak anon | peak file-backed (mmap) | anon over baseline | RSS over baseline |",
                  "|---|---|---|---|---|---|---|"]
        for run in r["runs"]:
            p = run["peak"]
            lines.append(f"| {run['cache_bytes'] / 2**20:.0f} MiB | {run['multiple_of_budget']} | {p['VmRSS'] / 2**20:.0f} MiB | "
                         f"{p['RssAnon'] / 2**20:.0f} MiB | {p['RssFile'] / 2**20:.0f} MiB | {run['anon_over_baseline'] / 2**20:.0f} MiB | "
                         f"{run['rss_over_baseline'] / 2**20:.0f} MiB |")
        lines += ["", f"Peak RSS growth from the smallest to the largest cache: {r['peak_rss_growth']:.2f}×; anonymous memory within "
                  f"the cap: {r['anon_within_budget']}; all RSS (file-backed pages included) within the cap: {r['rss_within_budget']}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layer", default="15")
    parser.add_argument("--only", nargs="*", default=["train", "stream", "extract", "rss"])
    parser.add_argument("--out", help="results name: benchmarks/results/OUT.{json,md} (default data, data_quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is steadier on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = {"machine": machine(args.device), "layer": args.layer}
    batch, steps = (256, 6) if args.quick else (1024, 12)
    if "train" in args.only:
        print("[data] training step vs GEMMs", flush=True)
        rec["train_synthetic"] = training_step_vs_gemms(args.device, 64 if args.quick else 256, 8, batch, steps)
        if args.device == "cpu":
            rec["step_profile"] = profile_step(64 if args.quick else 256, 8, batch)
    if "stream" in args.only and REAL_CACHE.exists():
        print("[data] streaming", flush=True)
        rec["streaming"] = streaming_rate(args.layer, batch)
        rec["train_cache"] = training_on_cache(args.device, args.layer, batch, 8, steps)
    if "extract" in args.only:
        print("[data] extraction", flush=True)
        rec["extraction"] = extraction_vs_forward(2048 if args.quick else 8192, args.device, 2 if args.quick else 5)
    if "rss" in args.only:
        print("[data] rss", flush=True)
        rec["rss"] = rss_while_streaming(64 if args.quick else 256, [1, 4])
    md = markdown(rec)
    print(md)
    print("wrote", *write_results(args.out or ("data_quick" if args.quick else "data"), rec, md))
    return rec


if __name__ == "__main__":
    main()
