"""Command line: `python run.py --config configs/xsum.json [--set train.lr=1e-4] [--resume [PATH]]`.

Also runs under `accelerate launch run.py ...` for several GPUs. It only parses and wires; the
work lives in the `summ` package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="QLoRA fine-tuning of causal LMs into news summarizers")
    parser.add_argument("--config", required=True, help="a JSON config, e.g. configs/xsum.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.lr=1e-4")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the latest checkpoint of log.output_dir, or from CHECKPOINT")
    args = parser.parse_args(argv)

    logging.basicConfig(level=os.environ.get("SUMM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from summ.config import ConfigError, load_config
    from summ.data import DataError

    try:
        config = load_config(args.config, args.overrides)
        from summ.train import TrainingDiverged, train

        result = train(config, resume=args.resume)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    m = result.metrics
    print(f"done: {result.steps} steps, final val loss {m['final_val_loss']}, outputs in {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
