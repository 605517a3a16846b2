"""Training speed and memory: our loop against HF Trainer peers, on the same rows, in one invocation.

    python benchmarks/bench_train.py --data-xsum DIR --data-cnn DIR [--models phi2 tinyllama] [--t4]
    python benchmarks/bench_train.py --models phi2 --variant ck8 train.micro_batch_tokens=4096 \
        model.checkpointed_layers=8   # one more row of our loop: a lever measured beside the others
    python benchmarks/bench_train.py --models phi2 --runners reference tuned recipe \
        --variant recipe:compiled model.compile_layers=true   # a lever on top of the config as shipped
    python benchmarks/bench_train.py --models phi2 --runners tuned recipe --repeat 3   # each runner 3 times,
        in turn: the median run, and the spread, where the host's speed varies from run to run
    python benchmarks/bench_train.py --models phi2 --runners tuned recipe \
        --variant recipe:graphs train.cuda_graphs=true   # the step recorded as CUDA graphs (GPU only)
    python benchmarks/bench_train.py --tiny          # seconds on a CPU; what CI runs to keep this working

An optimizer step holds train.micro_batch_size x train.grad_accum_steps rows (the optimization);
how our loop splits those rows into micro-batches (train.micro_batch_tokens, or the memory probe of
train.auto_micro_batch) changes speed and memory, never the step's gradient. Each row of the table
says how many rows its optimizer steps hold.

Peers (both HF Trainer, NF4 + double quant, LoRA r16 on the reference targets,
prepare_model_for_kbit_training, gradient checkpointing, paged_adamw_8bit):
  reference  batch 1 x accumulation 8 (8 rows per step), padded to max_length, fp16 (the recipe
             being reproduced)
  tuned      batch 16 x accumulation 1 (16 rows per step), dynamic padding, bf16 (what a careful user sets)
  tuned_liger_packed  tuned, padding-free (DataCollatorWithFlattening) and, for Llama-family models
             on a GPU, Liger-Kernel (use_liger_kernel=True): what a user who knows the ecosystem picks
and summ.training.train() itself:
  recipe     the config as shipped (configs/xsum.json, configs/cnn_dailymail.json): batch 1 x
             accumulation 8, the same 8 rows per step as the reference, run in the micro-batches the
             memory probe chooses (train.auto_micro_batch)
  ours       more rows per step, run as micro-batches of a token budget (MODELS[...]["ours"]): the
             fastest settings measured

Weights are random, built once from the real configs (tests/fixtures); sequence lengths come from
real rows tokenized with the real tokenizers. Each runner is its own process, under a GPU memory cap
(15 GiB by default, a T4's usable memory); `--t4` adds `recipe_t4` and `ours_t4`, the same in fp16
without flash attention. Output: JSON and a markdown table (with device and library versions) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# As run.py sets it (before torch loads), so the benchmarks measure what users run.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

# "ours": the settings our loop is benchmarked with on top of the config, the fastest measured under
# the 15 GiB cap on an H100 (RESULTS.md): rows per optimizer step (micro_batch_size x grad_accum_steps),
# and the token budget their micro-batches run at; "t4": the same for the T4 profile (fp16 keeps an
# fp32 residual stream, so it recomputes every layer).
MODELS = {
    "phi2": {"config": "configs/xsum.json", "fixture": "tests/fixtures/phi-2", "data": "xsum",
             "ours": ("train.micro_batch_size=32", "train.grad_accum_steps=1", "train.micro_batch_tokens=16384"),
             "t4": ("train.micro_batch_size=32", "train.grad_accum_steps=1", "train.micro_batch_tokens=16384")},
    "tinyllama": {"config": "configs/cnn_dailymail.json", "fixture": "tests/fixtures/tinyllama", "data": "cnn",
                  "ours": ("train.micro_batch_size=16", "train.grad_accum_steps=1", "train.micro_batch_tokens=4096",
                           "model.checkpointed_layers=0"),
                  "t4": ("train.micro_batch_size=32", "train.grad_accum_steps=1", "train.micro_batch_tokens=8192")},
}
# --tiny (max_length 128, a handful of rows): our runners take 2 rows per step in micro-batches of up
# to 256 tokens, the recipe runners batch 1 x accumulation 2, as the tiny reference peer does.
TINY_OURS = {"train.micro_batch_size": "2", "train.grad_accum_steps": "1", "train.micro_batch_tokens": "256"}
TINY_RECIPE = {"train.grad_accum_steps": "2"}
# Model types Liger-Kernel patches (it has no Phi-2 kernels; the peer then runs packing alone).
LIGER_MODEL_TYPES = ("llama",)
# --tiny on top of a shipped config: CPU-sized rows in fp32. The shipped configs compile their
# layers; on a CPU that takes longer than the tiny run.
TINY_SETS = ("data.max_length=128", "data.min_article_tokens=16", "quant.compute_dtype=float32",
             "train.mixed_precision=no", "model.attn_implementation=eager", "model.compile_layers=false")
TINY_OVERRIDES = {
    "phi2": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 4},
    "tinyllama": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16},
}


# ----------------------------------------------------------------------------- shared setup


def run_config(args, model: str, out_dir: Path, extra: tuple[str, ...] = ()):
    from summ.config import load_config

    spec = MODELS[model]
    tiny = args.tiny
    sets = [
        "model.init=random", f"model.name_or_path={REPO / spec['fixture']}",
        f"data.dataset={args.data[spec['data']]}", "data.train_split=train", "data.eval_split=validation",
        f"data.max_train_rows={args.rows}", "data.max_eval_rows=1",
        f"train.max_steps={args.warmup + args.steps}", "train.warmup_steps=0", "train.save_every=100000",
        "eval.at_start=false", "eval.at_end=false", "eval.eval_every=0", "eval.generate=false",
        f"log.output_dir={out_dir}", "log.log_every=1", "log.trackers=[]", "log.progress_bar=false",
    ]
    if tiny:
        sets += ["model.config_overrides=" + json.dumps(TINY_OVERRIDES[model]), *TINY_SETS]
    return load_config(REPO / spec["config"], sets + list(extra))


def add_data_arguments(parser, rows_help: str = "training rows read", measured_steps: bool = False) -> None:
    """Where the rows come from and how many are read (every benchmark script); with `measured_steps`,
    the optimizer steps skipped and then measured."""
    parser.add_argument("--data-xsum", default=str(REPO / "data" / "xsum_sample"))
    parser.add_argument("--data-cnn", default=str(REPO / "tests" / "fixtures" / "cnn_tiny"))
    parser.add_argument("--rows", type=int, default=600, help=rows_help)
    if measured_steps:
        parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
        parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before measuring")


def add_one_model_arguments(parser) -> None:
    """The arguments of the scripts that look at one model (profile_vram, profile_kernels)."""
    parser.add_argument("--model", default="phi2", choices=sorted(MODELS))
    add_data_arguments(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. --set model.checkpointed_layers=8")
    parser.add_argument("--cap-gib", type=float, default=15.0, help="GPU memory cap (a T4: 15)")
    parser.add_argument("--tiny", action="store_true", help="2-layer models, CPU-sized: keeps the script working")


def encoded_rows(cfg):
    from summ.data import Encoder, encode_rows, load_rows
    from summ.model import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    rows, _ = load_rows(cfg.data, cfg.data.train_split, cfg.data.max_train_rows)
    return tokenizer, encode_rows(Encoder(tokenizer, cfg.data), rows, "bench")


def one_process():
    """What the library's setup helpers read of an accelerator (`summ.training.setup_data`,
    `summ.speed.step.setup_step_runner`), for one process on the host: no model or GPU is set up."""
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"),
                           print=lambda *a, **k: None, unwrap_model=lambda model: model)


def cap_memory(cap_gib: float) -> None:
    import torch

    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0"))  # a data-parallel rank caps its own GPU
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device)


def summarize_steps(step_seconds: list[float], step_tokens: list[int], warmup: int) -> dict:
    seconds, tokens = step_seconds[warmup:], step_tokens[warmup:]
    total = sum(seconds)
    return {"measured_steps": len(seconds), "non_pad_tokens_per_s": sum(tokens) / total,
            "steps_per_s": len(seconds) / total, "s_per_step_median": statistics.median(seconds),
            "s_per_step_min": min(seconds), "s_per_step_max": max(seconds),
            "s_per_step_stdev": statistics.stdev(seconds) if len(seconds) > 1 else 0.0}


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


# ----------------------------------------------------------------------------- runners (one process each)


def run_trainer_peer(args, model: str, runner: str) -> dict:
    """The HF Trainer recipe (hf_trainer_peer.py), as a user of the reference notebook would run it,
    on the rows in file order."""
    import torch
    from transformers import TrainerCallback

    from hf_trainer_peer import padded_collator, peer_model, train_peer

    with tempfile.TemporaryDirectory() as tmp:
        # Stock transformers modules: our fused ops are one of the levers being measured.
        cfg = run_config(args, model, Path(tmp), ("model.fused_ops=false",))
        tokenizer, examples = encoded_rows(cfg)
        reference = runner == "reference"
        # What a user who knows the ecosystem adds: padding-free batches (DataCollatorWithFlattening:
        # one sequence, position ids restarting per row) and Liger's kernels (Llama-family only).
        liger_packed = runner == "tuned_liger_packed"
        on_gpu = torch.cuda.is_available()
        half = (torch.float16 if reference else torch.bfloat16) if on_gpu else torch.float32
        # --tiny keeps the shapes of the recipes at a size a handful of fixture rows can feed.
        batch, accumulation = ((1, 2) if reference else (2, 1)) if args.tiny else ((1, 8) if reference else (16, 1))
        pad_to = cfg.data.max_length if reference else 8
        peft_model = peer_model(cfg, torch.device("cuda" if on_gpu else "cpu"), half)
        liger = liger_packed and on_gpu and peft_model.get_base_model().config.model_type in LIGER_MODEL_TYPES

        class Timer(TrainerCallback):
            def __init__(self):
                self.marks = []

            def on_train_begin(self, *a, **k):
                self.marks.append(time.perf_counter())

            def on_step_end(self, *a, **k):
                if on_gpu:
                    torch.cuda.synchronize()
                self.marks.append(time.perf_counter())

        if liger_packed:
            from transformers import DataCollatorWithFlattening

            collator = DataCollatorWithFlattening(return_position_ids=True)
        else:
            collator = padded_collator(tokenizer.pad_token_id, pad_to)
        timer = Timer()
        steps = args.warmup + args.steps
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        train_peer(peft_model, examples, range(len(examples)), output_dir=tmp, batch=batch, accumulation=accumulation,
                   steps=steps, dtype=half, collator=collator, callbacks=[timer], learning_rate=2e-4,
                   lr_scheduler_type="cosine", warmup_steps=0, optim="paged_adamw_8bit", seed=0,
                   use_liger_kernel=liger)
        per_step = batch * accumulation
        tokens = [sum(len(e.input_ids) for e in examples[i * per_step:(i + 1) * per_step]) for i in range(steps)]
        seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
        return {**summarize_steps(seconds, tokens, args.warmup), **memory(), "rows_per_step": per_step,
                "micro_batch": f"{batch} rows" + (f" padded to {pad_to}" if reference else
                                                  " packed (padding-free)" + (", Liger kernels" if liger else "")
                                                  if liger_packed else " (dynamic padding)"),
                "accumulation": accumulation, "dtype": str(half).replace("torch.", "")}


def ours_settings(args, model: str, runner: str) -> list[str]:
    """Config overrides of one of our runners: `recipe` / `recipe_t4` (the config as shipped),
    `ours` / `ours_t4` (MODELS[...]) or a `--variant` (`BASE:NAME`, on top of one of those four)."""
    base = runner.split(":", 1)[0]
    recipe = base in ("recipe", "recipe_t4")
    t4 = base in ("recipe_t4", "ours_t4")
    sets = [] if recipe else list(MODELS[model]["t4" if t4 else "ours"])
    if args.tiny:
        tiny = TINY_RECIPE if recipe else TINY_OURS
        sets = [x for x in sets if x.split("=", 1)[0] not in tiny] + [f"{k}={v}" for k, v in tiny.items()]
    if args.tokens and not recipe:
        sets.append(f"train.micro_batch_tokens={args.tokens}")
    sets += args.overrides
    if t4:
        sets += ["train.mixed_precision=fp16", "quant.compute_dtype=float16", *args.t4_overrides]
    return sets + list(dict(args.variants).get(runner, ()))


def variant_row(name: str) -> str:
    """`--variant NAME` is a row on top of `ours`; `--variant BASE:NAME` on top of BASE."""
    base = name.split(":", 1)[0] if ":" in name else "ours"
    if base not in OUR_RUNNERS:
        raise SystemExit(f"--variant {name}: the part before ':' must be one of {', '.join(OUR_RUNNERS)}")
    return name if ":" in name else f"ours:{name}"


def rows_per_step(cfg) -> int:
    """Rows per optimizer step of one process: the optimization, however the rows are split."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps


def describe(cfg, metrics: dict) -> str:
    """What a user would need to reproduce one of our rows: rows per optimizer step, and how they ran:
    the micro-batch token budget and recompute in effect, from the run's `metrics` (so what the memory
    probe chose is reported)."""
    import torch

    t, m = cfg.train, cfg.model
    step = f"{rows_per_step(cfg)} rows per step" + \
        (f" ({t.micro_batch_size} x{t.grad_accum_steps} accumulation)" if t.grad_accum_steps > 1 else "") + \
        (", length-grouped" if t.length_grouping else "")
    tokens, recomputed, layers = metrics["micro_batch_tokens"], metrics["recomputed_layers"], metrics["decoder_layers"]
    if tokens is None:
        run = f"run as micro-batches of {t.micro_batch_size} rows"
    else:
        how = ("set" if t.micro_batch_tokens is not None else
               "probe" if torch.cuda.is_available() else "whole step")
        run = f"run as micro-batches of up to {tokens} tokens ({how})"
    if recomputed == 0:
        ckpt = "no recompute"
    elif recomputed == layers:
        ckpt = "recomputing every layer"
    else:
        ckpt = f"recomputing {recomputed} of {layers} layers"
    extras = [x for x, on in (("rows packed", t.packing), ("layers compiled", m.compile_layers),
                              ("Liger kernels", m.liger_kernel), ("fused ops off", not m.fused_ops)) if on]
    if metrics.get("cuda_graphs_recorded"):
        extras.append(f"{metrics['cuda_graphs_recorded']} CUDA graphs recorded before step 1 in "
                      f"{metrics['cuda_graphs_record_seconds']:.1f} s (warm-up runs and any compiling included)")
    return ", ".join([step, run, ckpt, *extras])


def run_ours(args, model: str, runner: str) -> dict:
    import torch

    from summ.files import json_records
    from summ.precision import mixed_precision_mode
    from summ.training import train

    with tempfile.TemporaryDirectory() as tmp:
        if runner.split(":", 1)[0] in ("recipe_t4", "ours_t4"):
            torch.backends.cuda.enable_flash_sdp(False)  # a T4 (sm75) has no flash-attention kernels
        cfg = run_config(args, model, Path(tmp), tuple(ours_settings(args, model, runner)))
        result = train(cfg)
        steps = [x for x in json_records(Path(tmp) / "log.jsonl") if "train/tokens" in x]
        return {**summarize_steps([x["train/seconds"] for x in steps], [x["train/tokens"] for x in steps],
                                  args.warmup),
                "peak_allocated_gib": result.metrics.get("memory/peak_allocated_gib"),
                "peak_reserved_gib": result.metrics.get("memory/peak_reserved_gib"),
                "rows_per_step": rows_per_step(cfg), "micro_batch_tokens": result.metrics["micro_batch_tokens"],
                "recompute": result.metrics["recompute"],
                "recomputed_layers": result.metrics["recomputed_layers"], "micro_batch": describe(cfg, result.metrics),
                "accumulation": cfg.train.grad_accum_steps,
                "dtype": mixed_precision_mode(cfg.train.mixed_precision), "last_step_train_loss": result.train_losses[-1]}


OUR_RUNNERS = ("recipe", "recipe_t4", "ours", "ours_t4")
RUNNERS = {"reference": run_trainer_peer, "tuned": run_trainer_peer, "tuned_liger_packed": run_trainer_peer,
           **{runner: run_ours for runner in OUR_RUNNERS}}


def runner_function(runner: str):
    return run_ours if ":" in runner else RUNNERS[runner]


# ----------------------------------------------------------------------------- driver


def environment() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "bitsandbytes": installed("bitsandbytes"),
            "liger_kernel": installed("liger-kernel"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def header(results: dict) -> list[str]:
    """The lines above a benchmark's table: device, library versions, date, and the command."""
    env = results["environment"]
    return [f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
            f"accelerate {env['accelerate']}, bitsandbytes {env['bitsandbytes']}, "
            f"liger-kernel {env.get('liger_kernel') or 'not installed'}; {env['date']}.",
            f"Command: `{results['command']}`", ""]


def write_results(out: Path, name: str, results: dict, table: str) -> None:
    """`name`.json (everything measured) and `name`.md (the table) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)


def markdown(results: dict) -> str:
    lines = [*header(results),
             "| model | runner | dtype | rows / step | micro-batch | non-pad tok/s | opt steps/s "
             "| s/step median (min-max) | peak alloc / reserved GiB | tok/s vs reference | tok/s vs tuned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, runs in results["models"].items():
        ref = runs.get("reference", {}).get("non_pad_tokens_per_s")
        tuned = runs.get("tuned", {}).get("non_pad_tokens_per_s")
        for runner, r in runs.items():
            if "error" in r:
                lines.append(f"| {model} | {runner} | | | | failed: {r['error'][:80]} | | | | | |")
                continue
            mem = ("n/a" if r["peak_allocated_gib"] is None
                   else f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}")
            tps = r["non_pad_tokens_per_s"]
            spread = (f" ({min(r['repeats']):,.0f}-{max(r['repeats']):,.0f} over {len(r['repeats'])} runs)"
                      if "repeats" in r else "")
            head = f"| {model} | {runner} | {r['dtype']} | {r['rows_per_step']} | {r['micro_batch']} | {tps:,.0f}" \
                f"{spread} | {r['steps_per_s']:.3f} | "
            # A ratio needs its peer in this run; a run without one leaves the column empty.
            vs_ref, vs_tuned = (f"{tps / peer:.2f}x" if peer else "" for peer in (ref, tuned))
            lines.append(head + f"{r['s_per_step_median']:.3f} ({r['s_per_step_min']:.3f}-{r['s_per_step_max']:.3f}) | "
                         f"{mem} | {vs_ref} | {vs_tuned} |")
    return "\n".join(lines) + "\n"


def run_child(args, model: str, runner: str) -> dict:
    """One runner in its own process: its RESULT, or {"error": ...} (its stderr kept under --out)."""
    child = [sys.executable, __file__, *sys.argv[1:], "--child", model, runner]
    started = time.perf_counter()
    proc = subprocess.run(child, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{model}-{runner.replace(':', '-')}.stderr.txt").write_text(proc.stderr)
        print(f"{model}/{runner}: FAILED ({tail[0]})\n{proc.stderr[-3000:]}", file=sys.stderr)
        # A negative code is the signal that ended the child (a crash leaves no traceback).
        return {"error": f"exit code {proc.returncode}: {tail[0].strip()}"}
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"{model}/{runner}: {result['non_pad_tokens_per_s']:,.0f} tok/s ({time.perf_counter() - started:.0f} s)",
          flush=True)
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle of an even count), and with more than one,
    every run's tokens/s under "repeats" in the order they ran; an error if any run failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["non_pad_tokens_per_s"])
    middle = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        middle["repeats"] = [r["non_pad_tokens_per_s"] for r in runs]
    return middle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["phi2", "tinyllama"], choices=sorted(MODELS))
    parser.add_argument("--runners", nargs="+", default=["reference", "tuned", "recipe", "ours"],
                        choices=sorted(RUNNERS))
    parser.add_argument("--t4", action="store_true",
                        help="also run recipe_t4 and ours_t4: our loop in the T4 profile (fp16, no flash)")
    add_data_arguments(parser, "training rows read (enough for every runner)", measured_steps=True)
    parser.add_argument("--tokens", type=int,
                        help="token budget per micro-batch of ours, ours_t4 and the variants, with their rows per "
                             "step unchanged (default: MODELS[...]['ours']); the recipe runners keep the probe's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for our runners (recipe and ours), "
                             "e.g. --set model.gradient_checkpointing=false")
    parser.add_argument("--t4-set", dest="t4_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for the T4 profile only")
    parser.add_argument("--variant", dest="variants", action="append", default=[], nargs="+",
                        metavar="NAME [SECTION.KEY=VALUE ...]",
                        help="one more row of our loop with these overrides: NAME on top of ours (row ours:NAME), "
                             "BASE:NAME on top of BASE (recipe, recipe_t4, ours or ours_t4)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every runner this many times, in turn, and report the median run and the spread")
    parser.add_argument("--cap-gib", type=float, default=15.0, help="GPU memory cap per runner")
    parser.add_argument("--tiny", action="store_true", help="2-layer models, CPU-sized: keeps the script working")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "RUNNER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = {"xsum": args.data_xsum, "cnn": args.data_cnn}
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    args.variants = [(variant_row(v[0]), v[1:]) for v in args.variants]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name, _ in args.variants:  # a typo fails here, not after the peers have run
        for model in args.models:
            run_config(args, model, Path(tempfile.gettempdir()), tuple(ours_settings(args, model, name)))

    if args.child:
        model, runner = args.child
        cap_memory(args.cap_gib)
        print("RESULT " + json.dumps(runner_function(runner)(args, model, runner)), flush=True)
        return 0

    runners = args.runners + [r for r in (("recipe_t4", "ours_t4") if args.t4 else ()) if r not in args.runners]
    runners += [name for name, _ in args.variants]
    results = {"environment": environment(), "command": " ".join(["python"] + sys.argv), "models": {}}
    for model in args.models:
        results["models"][model] = {}
        runs: dict[str, list[dict]] = {runner: [] for runner in runners}
        # Repetitions go round the runners (A B A B, not A A B B), so a drift of the machine's speed
        # during the run spreads over every runner instead of favouring one.
        for _ in range(args.repeat):
            for runner in runners:
                if runs[runner] and "error" in runs[runner][-1]:
                    continue
                runs[runner].append(run_child(args, model, runner))
                results["models"][model][runner] = median_run(runs[runner])
                # After every row, so a run cut short keeps the rows it finished.
                write_results(Path(args.out), "bench_train", results, markdown(results))
    table = markdown(results)
    write_results(Path(args.out), "bench_train", results, table)
    print(table)
    return 0 if all("error" not in r for runs in results["models"].values() for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
