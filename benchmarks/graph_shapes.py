"""How much of a CUDA-graphed training step is padding, and how many graphs a run records. Host only:
no model loads and no GPU is needed, so the shapes of a graphed run can be weighed before renting one.

    python benchmarks/graph_shapes.py --model phi2 --data-xsum DIR --rows 2331 --steps-of recipe 32 --graph-rows 8 4 2 \
        --length-multiple 64 16

For each way to fill an optimizer step (`recipe`: the config's micro_batch_size x grad_accum_steps
rows, as shipped; N: N rows per step in one planned micro-batch, as `bench_train.py`'s `ours` plans
them) and each graph size (rows per graph, i.e. a token budget of rows x data.max_length), it plans
one epoch as the loop does (`summ.training.setup_data`), groups each step's rows into graphs as
`train.cuda_graphs` does (`summ.speed.step.setup_step_runner`, `StepRunner.batches`,
`GraphedMicroSteps.inputs_for`) and prints the share of the graphs' tokens that are real (not
padding) and how many graphs the epoch records (lengths x head position counts). Graph lengths are
multiples of `summ.speed.graphs.LENGTH_MULTIPLE` (16); `--length-multiple` counts other roundings
too, to weigh that constant. The GPU time of a graphed step follows its tokens: RESULTS.md measures it.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_train import MODELS, REPO, add_data_arguments, one_process  # noqa: E402
from summ.speed import graphs  # noqa: E402


def shape_config(args, steps_of: str, graph_rows: int):
    from summ.config import load_config
    from summ.data import padded_length

    spec = MODELS[args.model]
    max_length = load_config(REPO / spec["config"]).data.max_length
    sets = [f"model.name_or_path={REPO / spec['fixture']}", f"data.dataset={args.data[spec['data']]}",
            "data.train_split=train", "data.eval_split=validation", f"data.max_train_rows={args.rows}",
            "data.max_eval_rows=1", "model.init=random", "train.warmup_steps=0",  # no schedule runs
            # The token budget that holds `graph_rows` full-length rows: graphs of that many rows.
            "train.cuda_graphs=true", f"train.micro_batch_tokens={graph_rows * padded_length(max_length)}"]
    if steps_of != "recipe":
        sets += [f"train.micro_batch_size={int(steps_of)}", "train.grad_accum_steps=1"]
    return load_config(REPO / spec["config"], sets)


@contextmanager
def length_multiple(multiple: int):
    """Graph lengths rounded up to `multiple` tokens instead of summ.speed.graphs.LENGTH_MULTIPLE."""
    shipped = graphs.LENGTH_MULTIPLE
    graphs.LENGTH_MULTIPLE = multiple
    try:
        yield
    finally:
        graphs.LENGTH_MULTIPLE = shipped


def measure(args, steps_of: str, graph_rows: int, multiple: int) -> dict:
    from summ.speed.step import setup_step_runner
    from summ.training import setup_data

    cfg = shape_config(args, steps_of, graph_rows)
    host = one_process()
    data = setup_data(cfg, host)
    # As the loop sets graphs up (at most a step's rows per graph); no model: the shapes need none.
    runner = setup_step_runner(torch.nn.Linear(1, 1), cfg, host, data.train_examples, data.plan.lengths,
                               data.tokenizer.pad_token_id)
    graphed = runner.graphed
    real = graph_tokens = replays = 0
    keys: set[tuple[int, int]] = set()
    windows = data.plan.windows(0)
    with length_multiple(multiple):
        for window in windows:
            for batch in runner.batches(window):
                key, inputs = graphed.inputs_for(batch)
                keys.add(key)
                real += int(batch["attention_mask"].sum())
                graph_tokens += inputs.input_ids.numel()
                replays += 1
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    return {"steps_of": steps_of, "rows_per_step": rows_per_step, "graph_rows": graphed.rows,
            "length_multiple": multiple,
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
    parser.add_argument("--length-multiple", nargs="+", type=int, default=[graphs.LENGTH_MULTIPLE],
                        help="graph lengths rounded up to these multiples of tokens (default: "
                             "summ.speed.graphs.LENGTH_MULTIPLE, what train.cuda_graphs runs)")
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
