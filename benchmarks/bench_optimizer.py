"""One optimizer step over a recipe's LoRA tensors, side by side: bitsandbytes' paged 8-bit AdamW as
it ships, the same optimizer as `summ` runs it (`summ.optimizer`: no device-wide wait per tensor),
and torch's fused AdamW (32-bit states, one kernel for all tensors) as the peer outside the recipe.

    python benchmarks/bench_optimizer.py --model phi2 --out benchmarks/measured/DATE-DEVICE/optimizer

The tensors have the shapes the config's LoRA gives the real model (built on the meta device, so no
weights load) and random gradients. Two times per optimizer, as medians over `--steps` steps:
- idle: `step()` with nothing else queued, until the device is done;
- behind queued work: how much longer `--busy-ms` of queued matrix products take when `step()` is
  called right after them, as in training, where the step follows the backward pass. An optimizer
  that waits on the device idles it while Python launches each update; one that only queues its
  kernels launches them while the queued work runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_train import MODELS, REPO, environment, header  # noqa: E402


def lora_shapes(model: str) -> list[tuple[int, ...]]:
    """The trainable tensors' shapes of the model's config with its LoRA (on the meta device)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from summ.config import load_config
    from summ.model import peft_lora_config

    spec = MODELS[model]
    cfg = load_config(REPO / spec["config"], [f"model.name_or_path={REPO / spec['fixture']}"])
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path))
        lora = get_peft_model(base, peft_lora_config(cfg, base.config.model_type))
    return [tuple(p.shape) for p in lora.parameters() if p.requires_grad]


def optimizers(device: torch.device) -> dict:
    import bitsandbytes as bnb

    from summ.optimizer import stream_ordered_adamw_8bit

    paged = device.type == "cuda"
    stock = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return {f"bitsandbytes {stock.__name__}": stock, f"summ {stock.__name__}": stream_ordered_adamw_8bit(paged),
            "torch AdamW (fused)": lambda params, **kw: torch.optim.AdamW(params, fused=device.type == "cuda", **kw)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_work(device: torch.device, busy_ms: float):
    """A queue of matrix products that keeps the device busy for about `busy_ms` (calibrated once)."""
    size = 2048 if device.type == "cuda" else 256
    x = torch.randn(size, size, device=device)

    def run(n: int) -> None:
        y = x
        for _ in range(n):
            y = torch.tanh(y @ x)  # tanh keeps the values finite

    run(2)  # kernels loaded before the clock starts
    synchronize(device)
    start = time.perf_counter()
    run(10)
    synchronize(device)
    per_product_ms = (time.perf_counter() - start) * 100
    n = max(1, round(busy_ms / per_product_ms))
    return lambda: run(n)


def timed(device: torch.device, fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000


def measure(shapes, optimizer_class, device: torch.device, steps: int, busy) -> dict:
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = optimizer_class(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for _ in range(3):  # states created, kernels loaded
        optimizer.step()
    idle = [timed(device, optimizer.step) for _ in range(steps)]
    alone = [timed(device, busy) for _ in range(steps)]
    behind = [timed(device, lambda: (busy(), optimizer.step())) for _ in range(steps)]
    return {"idle_ms": statistics.median(idle), "busy_alone_ms": statistics.median(alone),
            "behind_busy_ms": statistics.median(behind),
            "added_behind_busy_ms": statistics.median(behind) - statistics.median(alone)}


def markdown(results: dict) -> str:
    lines = [*header(results),
             f"{results['tensors']} LoRA tensors ({results['parameters']:,} parameters) of {results['model']}; "
             f"medians over {results['steps']} steps.", "",
             "| optimizer | step, idle device (ms) | step behind queued work: added ms |",
             "|---|---|---|"]
    lines += [f"| {name} | {r['idle_ms']:.2f} | {r['added_behind_busy_ms']:.2f} "
              f"(queued work alone {r['busy_alone_ms']:.1f} ms) |" for name, r in results["results"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="phi2")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--busy-ms", type=float, default=40.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    device = torch.device(args.device)
    shapes = lora_shapes(args.model)
    busy = busy_work(device, args.busy_ms)
    results = {"command": "python " + " ".join(sys.argv), "environment": environment(), "model": args.model,
               "tensors": len(shapes), "parameters": sum(torch.Size(s).numel() for s in shapes), "steps": args.steps,
               "results": {name: measure(shapes, cls, device, args.steps, busy)
                           for name, cls in optimizers(device).items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_optimizer.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "bench_optimizer.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
