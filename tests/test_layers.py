"""Imports flow one way: config -> data -> model -> train -> evaluate -> report. Evaluation, prediction
and reporting must work without the training code (and without Ray)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
EVALUATION_SIDE = ["summ.evaluation", "summ.generate", "summ.lead", "summ.predict", "summ.eval_report", "summ.compare",
                   "summ.runs", "summ.comparison_rows", "summ.comparison_table", "summ.comparison_report",
                   "summ.comparison_plots", "summ.rouge", "summ.errors", "summ.published"]


def test_evaluation_side_never_imports_training():
    code = ("import json, sys\n"
            f"for name in {EVALUATION_SIDE!r}: __import__(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m in ('summ.training', 'summ.tune', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
