"""How much of a CUDA-graphed training step is padding, and how many graphs a run records. Host only:
no model loads and no GPU is needed, so the shapes of a graphed run can be weighed before renting one.

    python benchmarks/graph_shapes.py --model phi2 --data-xsum DIR --rows 2331 --steps-of recipe 32 --graph-rows 8 4 2 \
        --length-multiple 64 16

For each way to fill an optimizer step (`recipe`: the config's micro_batch_size x grad_accum_steps
rows, as shipped; N: N rows per step in one planned micro-batch, as `bench_train.py`'s `ours` plans
them) and each graph size (rows per graph, i.e. a token budget of rows x data.max_length), it plans
one epoch as the loop does (`summ.train.setup_data`), groups each step's rows into graphs as
`train.cuda_graphs` does (`step_batches`, `GraphedMicroSteps.inputs_for`, at each
`train.graph_length_multiple` given) and prints the share of the
graphs' tokens that are real (not padding) and how many graphs the epoch records (lengths x head
position counts). The GPU time of a graphed step follows its tokens: RESULTS.md measures it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_train import MODELS, REPO, add_data_arguments  # noqa: E402
from summ.config import TrainConfig  # noqa: E402


def shape_config(args, steps_of: str, length_multiple: int):
    from summ.config import load_config

    spec = MODELS[args.model]
    sets = [f"model.name_or_path={REPO / spec['fixture']}", f"data.dataset={args.data[spec['data']]}",
            "data.train_split=train", "data.eval_split=validation", f"data.max_train_rows={args.rows}",
            "data.max_eval_rows=1", "model.init=random", "train.warmup_steps=0",  # no schedule runs
            f"train.graph_length_multiple={length_multiple}"]
    if steps_of != "recipe":
        sets += [f"train.micro_batch_size={int(steps_of)}", "train.grad_accum_steps=1"]
    return load_config(REPO / spec["config"], sets)


def measure(args, steps_of: str, graph_rows: int, length_multiple: int) -> dict:
    from summ.data import padded_length
    from summ.micro_batch import MicroBatching
    from summ.train import setup_data, setup_graphed_steps, step_batches

    cfg = shape_config(args, steps_of, length_multiple)
    host = SimpleNamespace(num_processes=1, process_index=0, print=lambda *a, **k: None,
                           device=torch.device("cpu"))
    data = setup_data(cfg, host)
    # The token budget that holds `graph_rows` full-length rows, as train.micro_batch_tokens would set it.
    micro_batching = MicroBatching(graph_rows * padded_length(cfg.data.max_length), 0, 0, "config")
    # As the loop sets graphs up (at most a step's rows per graph); no model: the shapes need none.
    graphed = setup_graphed_steps(torch.nn.Linear(1, 1), cfg, host, micro_batching, data)
    real = graph_tokens = replays = 0
    keys: set[tuple[int, int]] = set()
    windows = data.windows_of_epoch(0)
    for window in windows:
        for batch in step_batches(window, data, cfg, micro_batching, graphed):
            key, inputs = graphed.inputs_for(batch)
            keys.add(key)
            real += int(batch["attention_mask"].sum())
            graph_tokens += inputs.input_ids.numel()
            replays += 1
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    return {"steps_of": steps_of, "rows_per_step": rows_per_step, "graph_rows": graphed.rows,
            "length_multiple": graphed.length_multiple,
            "graph_length": graphed.length, "steps": len(windows), "replays_per_step": replays / len(windows),
            "real_tokens": real, "graph_tokens": graph_tokens, "real_share": real / graph_tokens,
            "graphs": len(keys), "graph_lengths": sorted({length for length, _ in keys})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="phi2", choices=sorted(MODELS))
    add_data_arguments(parser)
    parser.add_argument("--steps-of", nargs="+", default=["recipe", "32"],
                        help="'recipe' (the config's rows per step, as shipped) or N (N rows per step, "
                             "length-grouped as `ours` plans them)")
    parser.add_argument("--graph-rows", nargs="+", type=int, default=[8, 4, 2], help="rows per graph")
    parser.add_argument("--length-multiple", nargs="+", type=int, default=[TrainConfig.graph_length_multiple],
                        help="train.graph_length_multiple values to count (default: the config's default)")
    parser.add_argument("--out", type=Path, help="folder for graph_shapes.json")
    args = parser.parse_args()
    for value in args.steps_of:
        if value != "recipe" and not value.isdigit():
            parser.error(f"--steps-of: 'recipe' or a number of rows, got {value!r}")
    args.data = {"xsum": args.data_xsum, "cnn": args.data_cnn}

    results = [measure(args, steps_of, rows, multiple) for steps_of in args.steps_of for rows in args.graph_rows
               for multiple in args.length_multiple]
    print(f"\n{args.model}, {args.rows} rows read, one epoch\n")
    print("| rows per step | rows per graph | length multiple | graph replays per step | real tokens / graph tokens "
          "| graphs | graph lengths |\n|---|---|---|---|---|---|---|")
    for r in results:
        name = f"{r['rows_per_step']} (recipe)" if r["steps_of"] == "recipe" else f"{r['rows_per_step']}"
        print(f"| {name} | {r['graph_rows']} | {r['length_multiple']} | {r['replays_per_step']:.2f} | {r['real_share']:.3f} "
              f"({r['real_tokens']:,} / {r['graph_tokens']:,}) | {r['graphs']} | "
              f"{', '.join(map(str, r['graph_lengths']))} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graph_shapes.json").write_text(json.dumps(
            {"command": " ".join(sys.argv), "model": args.model, "rows": args.rows, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
