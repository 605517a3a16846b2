"""Published ROUGE of reference systems on XSum and CNN/DailyMail, for scale beside our own runs.

These are full-test-set figures of pretrained encoder-decoder summarizers fine-tuned on the whole
training set (or, for LEAD, no training at all). Our runs score a slice of the validation split after
training on a few thousand rows, so the published rows show how far a recipe is from the field, not a
like-for-like comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class PublishedResult:
    system: str
    rouge1: float
    rouge2: float
    # CNN/DailyMail papers report the summary-level LCS (our rougeLsum) as "ROUGE-L"; XSum summaries
    # are one sentence, where sentence- and summary-level LCS coincide.
    rougeL: float
    source: str


UNILM_V2 = "UniLMv2 paper (arXiv 2002.12804), Table 4"
BART = "fairseq examples/bart/README.md"
PEGASUS = "google-research/pegasus README"

PUBLISHED = {
    "cnn_dailymail": (
        PublishedResult("LEAD-3", 40.42, 17.62, 36.67, UNILM_V2),
        PublishedResult("BART-large", 44.16, 21.28, 40.90, BART),
        PublishedResult("PEGASUS-large (HugeNews)", 44.17, 21.47, 41.11, PEGASUS),
    ),
    "xsum": (
        PublishedResult("LEAD-1", 16.30, 1.60, 11.95, UNILM_V2),
        PublishedResult("BART-large", 45.14, 22.27, 37.25, BART),
        PublishedResult("PEGASUS-large (HugeNews)", 47.21, 24.56, 39.25, PEGASUS),
    ),
}

# Rows in the public splits (EdinburghNLP/xsum; abisee/cnn_dailymail 3.0.0).
TRAIN_ROWS = {"xsum": 204_045, "cnn_dailymail": 287_113}
TEST_ROWS = {"xsum": 11_334, "cnn_dailymail": 11_490}

DATASET_TITLES = {"xsum": "XSum", "cnn_dailymail": "CNN/DailyMail"}


def dataset_family(dataset: str, summary_field: str = "") -> str | None:
    """"xsum", "cnn_dailymail" or None, from data.dataset (a hub id or a folder) and data.summary_field.

    The last part of the name decides ("EdinburghNLP/xsum", "runs/data/xsum_sample",
    "abisee/cnn_dailymail"); a folder named otherwise is CNN/DailyMail when its summaries are in
    `highlights`, the dataset's own field name. XSum's `summary` is too common a name to tell anything.
    """
    name = PurePosixPath(dataset.replace("\\", "/").rstrip("/")).name.lower()
    if "xsum" in name:
        return "xsum"
    if "cnn" in name or "dailymail" in name or "daily_mail" in name or summary_field == "highlights":
        return "cnn_dailymail"
    return None
