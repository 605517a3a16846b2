import dataclasses
import json
import re

import pytest
from transformers import AutoTokenizer

from summ.config import ConfigError, DataConfig
from summ.data import (IGNORE_INDEX, DataError, Encoder, PromptTemplate, collate, load_rows, plan_batches,
                       split_by_tokens, warn_shared_ids)
from tests.conftest import FIXTURES, TINY

XSUM_TEMPLATE = TINY["phi"]["template"]
CNN_TEMPLATE = TINY["llama"]["template"]


@pytest.fixture(scope="module")
def phi_tok():
    tok = AutoTokenizer.from_pretrained(FIXTURES / "phi-2")
    tok.pad_token = tok.eos_token  # Phi-2 has no pad token: pad == eos, the case that hides masking bugs
    return tok


@pytest.fixture(scope="module")
def llama_tok():
    return AutoTokenizer.from_pretrained(FIXTURES / "tinyllama")


def rows_of(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("tok_name, template", [("phi_tok", XSUM_TEMPLATE), ("llama_tok", CNN_TEMPLATE)])
def test_labels_are_exactly_summary_and_eos(request, tok_name, template):
    tok = request.getfixturevalue(tok_name)
    enc = Encoder(tok, DataConfig(dataset="x", template=template, max_length=512))
    article, summary = "The council approved the plan on Monday. It costs 3.5m.", "Council backs 3.5m plan."
    ex = enc.encode(article, summary)
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert labelled[-1] == tok.eos_token_id
    assert tok.decode(labelled[:-1]).strip() == summary
    prompt = tok.decode(ex.input_ids[:len(ex.input_ids) - len(labelled)])
    assert prompt.rstrip().endswith("Summary:") and article in prompt
    # The prompt is one contiguous run of ignored positions, the completion one run of labels.
    first = ex.labels.index(labelled[0])
    assert all(t == IGNORE_INDEX for t in ex.labels[:first]) and IGNORE_INDEX not in ex.labels[first:]
    # Generation sees exactly the prompt tokens the model was trained on.
    assert enc.encode_prompt(article) == ex.input_ids[:first]


def test_eos_inside_text_keeps_its_label_when_pad_is_eos(phi_tok):
    # With pad == eos, masking by id would drop the EOS label; masking by position keeps it.
    enc = Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=256))
    batch = collate([enc.encode("a b c", "short."), enc.encode("a b c " * 20, "a longer summary here.")],
                    pad_id=phi_tok.pad_token_id)
    for row in range(2):
        labels, mask = batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        assert labels[n - 1] == phi_tok.eos_token_id  # the real EOS is labelled
        assert (labels[n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == phi_tok.eos_token_id).all()


@pytest.mark.parametrize("tok_name, template", [("phi_tok", XSUM_TEMPLATE), ("llama_tok", CNN_TEMPLATE)])
def test_truncation_cuts_article_never_summary(request, tok_name, template):
    tok = request.getfixturevalue(tok_name)
    enc = Encoder(tok, DataConfig(dataset="x", template=template, max_length=128, min_article_tokens=16))
    row = rows_of(FIXTURES / "xsum_tiny" / "train.jsonl")[0]
    ex = enc.encode(row["document"], row["summary"])
    assert len(ex.input_ids) == 128 and ex.article_truncated and not ex.summary_truncated
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled[:-1]).strip() == row["summary"]
    assert tok.decode(ex.input_ids).rstrip().find("Summary:") > 0  # the template tail survived


def test_summary_longer_than_budget_is_cut_and_flagged(phi_tok):
    enc = Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=64, min_article_tokens=8))
    ex = enc.encode("An article " * 50, "word " * 200)
    assert ex.summary_truncated and len(ex.input_ids) == 64 and ex.labels[-1] == phi_tok.eos_token_id
    article_tokens = len(ex.input_ids) - enc.fixed_tokens - sum(t != IGNORE_INDEX for t in ex.labels)
    assert article_tokens == 8


def test_max_length_too_small_for_template(phi_tok):
    with pytest.raises(ConfigError, match="data.max_length=20 is too small for data.template"):
        Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=20))


def test_article_reserve_that_leaves_no_summary_room_is_refused(phi_tok):
    # The template takes 26 tokens (BOS-free Phi-2): 26 + 64 article tokens + a summary token + EOS do not fit in 80.
    # Before this check the summary budget went negative and summary[:negative] cut it from the end.
    fixed = Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=512)).fixed_tokens
    assert fixed == 26
    with pytest.raises(ConfigError, match=re.escape(
            "data.min_article_tokens=64 does not fit data.max_length=80: the template takes 26 tokens, and a "
            "summary token and EOS must fit too; lower data.min_article_tokens to at most 52")):
        Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=80, min_article_tokens=64))
    # At the limit the summary keeps its head (one token) and the article keeps its 52 tokens.
    enc = Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=80, min_article_tokens=52))
    summary = "The council approved the plan to build homes on Monday."
    ex = enc.encode("word " * 500, summary)
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert len(ex.input_ids) == 80 and ex.summary_truncated and ex.article_truncated
    assert labelled == phi_tok(" " + summary)["input_ids"][:1] + [phi_tok.eos_token_id]


def test_generation_prompt_carries_the_article_training_did(phi_tok):
    """A long article fills max_length less EOS in the generation prompt, whatever max_new_tokens is,
    so the model summarizes at least the article it saw in training with any summary."""
    enc = Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=64, min_article_tokens=8))
    article = "word " * 100
    prompt = enc.encode_prompt(article)
    assert len(prompt) == 63 and enc.fixed_tokens == 26
    trained = enc.encode(article, "Council backs plan.")
    first = next(i for i, t in enumerate(trained.labels) if t != IGNORE_INDEX)
    pre, _, post, _ = enc._split(article, None)
    assert len(prompt) - len(pre) - len(post) == 64 - 26 - 1 > first - len(pre) - len(post)
    assert trained.input_ids[:first - len(post)] == prompt[:first - len(post)]  # the same article, longer


def test_generation_prompt_never_keeps_the_article_end_when_the_template_fills_max_length(phi_tok, monkeypatch):
    """A template that tokenizes longer beside some article than when checked can leave no room for
    the article: the prompt then holds none of it, not its last tokens (a negative slice bound)."""
    enc = Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=32, min_article_tokens=1))
    pre, art, post, _ = enc._split("word " * 40, None)
    monkeypatch.setattr(enc, "_split", lambda article, summary: (pre + pre, art, post, []))
    assert len(pre + pre + post) > 32 - 1 and len(art) == 41
    assert enc.encode_prompt("word " * 40) == pre + pre + post


def test_template_whitespace_goes_with_completion():
    t = PromptTemplate.parse("Summarize: {article}\n\nSummary: {summary}")
    assert (t.head, t.prompt_tail, t.completion_prefix) == ("Summarize: ", "\n\nSummary:", " ")


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    good = json.dumps({"id": "g", "document": "text", "summary": "sum"})
    write_jsonl(tmp_path / "train.jsonl", [
        good,
        json.dumps({"id": "a", "document": "", "summary": "s"}),
        json.dumps({"id": "b", "document": "t"}),
        json.dumps({"id": "c", "document": 5, "summary": "s"}),
        "{not json",
        json.dumps(["a list"]),
        good.replace('"g"', '"h"'),
    ])
    cfg = DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary",
                     max_bad_row_share=1.0)
    rows, stats = load_rows(cfg, "train")
    assert [r["id"] for r in rows] == ["g", "h"] and stats.read == 7 and stats.kept == 2
    path = tmp_path / "train.jsonl"
    assert stats.examples == [f"{path}:2: empty article field 'document'", f"{path}:3: missing summary field 'summary'",
                              f"{path}:4: article field 'document' is int, expected a string",
                              f"{path}:5: not valid JSON (Expecting property name enclosed in double quotes)",
                              f"{path}:6: not a JSON object"]
    assert stats.n_skipped == 5 and stats.summary()["used"] == 2
    assert "skipped 5 of 7 rows" in caplog.text
    assert f"{path}:3 (id b): missing summary field 'summary'; row skipped" in caplog.text

    # The same file under the default share (10%) is a wrong file, not a few bad rows.
    with pytest.raises(DataError, match=r"train.jsonl: 5 of 7 rows are unusable .* more than "
                                        r"data.max_bad_row_share=0.1"):
        load_rows(DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary"), "train")


def test_undecodable_line_costs_one_row_and_a_bom_costs_none(tmp_path):
    rows_in = [json.dumps({"id": f"r{i}", "document": f"article {i}", "summary": f"summary {i}"}) for i in range(12)]
    data = "\n".join(rows_in).encode("utf-8").split(b"\n")
    data[5] = data[5].replace(b"article 5", b"article \xff\xfe 5")  # one bad byte sequence on line 6
    (tmp_path / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(data) + b"\n")
    cfg = DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary")
    rows, stats = load_rows(cfg, "train")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(12) if i != 5]  # r0 survives the byte-order mark
    assert stats.examples == [f"{tmp_path / 'train.jsonl'}:6: not UTF-8 text"]


def test_csv_with_bom_bad_bytes_and_quoted_newlines(tmp_path):
    text = 'id,document,summary\n1,"An article,\nover two lines",First\n2,"bad \xff byte",Second\n3,Third one,Third\n'
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("latin-1"))
    cfg = DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary", max_bad_row_share=0.5)
    rows, stats = load_rows(cfg, "train")
    assert rows == [{"id": "1", "article": "An article,\nover two lines", "summary": "First"},
                    {"id": "3", "article": "Third one", "summary": "Third"}]
    assert stats.examples == [f"{tmp_path / 'train.csv'}:4: not UTF-8 text"]  # row 2 starts on line 4


@pytest.mark.parametrize("name, content, message", [
    ("train.jsonl", b"", "train.jsonl: empty file"),
    ("train.jsonl", b"\n\n  \n", "train.jsonl: no rows"),
    ("train.csv", b"", "train.csv: empty file"),
    ("train.csv", b"id,document,summary\n", "train.csv: no rows"),
    ("train.jsonl", b"PK\x03\x04\x00\x00binary", "train.jsonl: binary file; expected UTF-8 text (jsonl)"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    cfg = DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary")
    with pytest.raises(DataError, match=re.escape(message)):
        load_rows(cfg, "train")


def test_missing_relative_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = DataConfig(dataset="data/xsum_missing", article_field="document", summary_field="summary")
    with pytest.raises(ConfigError, match=re.escape(f"data.dataset: {tmp_path}/data/xsum_missing is not a folder")):
        load_rows(cfg, "train")


def test_strict_mode_names_the_row(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [json.dumps({"id": "x1", "document": "t", "summary": "s"}),
                                           json.dumps({"id": "x2", "document": "  ", "summary": "s"})])
    cfg = DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary", strict=True)
    with pytest.raises(DataError, match=r"train.jsonl:2 \(id x2\): empty article field 'document' \(data.strict is on\)"):
        load_rows(cfg, "train")
    write_jsonl(tmp_path / "train.jsonl", [json.dumps({"id": "x1", "document": "t", "summary": "s"}), "{oops"])
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        load_rows(cfg, "train")


def test_split_spec_wrong_column_and_missing_split():
    cfg = DataConfig(dataset=str(FIXTURES / "xsum_tiny"), article_field="document", summary_field="summary")
    rows, _ = load_rows(cfg, "train[2:5]")
    assert [r["id"] for r in rows] == [json.loads(x)["id"] for x in open(FIXTURES / "xsum_tiny/train.jsonl")][2:5]
    with pytest.raises(ConfigError, match="data.article_field='article' is not a column"):
        load_rows(DataConfig(dataset=str(FIXTURES / "xsum_tiny")), "train")
    with pytest.raises(ConfigError, match="no test.jsonl"):
        load_rows(cfg, "test")


def test_csv_source(tmp_path):
    (tmp_path / "train.csv").write_text('id,document,summary\n1,"An article, with a comma",A summary\n2,,empty\n')
    cfg = DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary", max_bad_row_share=0.5)
    rows, stats = load_rows(cfg, "train")
    assert rows == [{"id": "1", "article": "An article, with a comma", "summary": "A summary"}]
    assert sum(stats.skipped.values()) == 1


def test_plan_covers_every_row_once_and_is_deterministic():
    lengths = [(i * 37) % 120 + 5 for i in range(101)]
    kwargs = dict(micro_batch_size=4, seed=3, length_grouping=True)
    plan = plan_batches(lengths, epoch=0, **kwargs)
    assert sorted(i for b in plan for i in b) == list(range(101))
    assert plan == plan_batches(lengths, epoch=0, **kwargs)
    assert plan != plan_batches(lengths, epoch=1, **kwargs)
    assert [len(b) for b in plan].count(4) == 25 and [len(b) for b in plan].count(1) == 1
    # Grouping keeps padding low: far less than random batches would pad.
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    assert padded < 1.15 * sum(lengths)
    assert max(lengths[i] for i in plan[0]) * len(plan[0]) == max(max(lengths[i] for i in b) * len(b) for b in plan)


def test_split_by_tokens_makes_the_fewest_micro_batches_within_the_budget():
    lengths = {0: 100, 1: 20, 2: 61, 3: 9, 4: 58, 5: 300}
    rows = [0, 1, 2, 3, 4]
    # Padded to multiples of 8 and longest first: 104, 64, 64, 24, 16. [0, 2] is 2 x 104 = 208 tokens;
    # a third row would make 312.
    assert split_by_tokens(rows, lengths, 256) == [[0, 2], [4, 1, 3]]
    assert split_by_tokens(rows, lengths, 104) == [[0], [2], [4], [1, 3]]
    assert split_by_tokens(rows, lengths, 10_000) == [[0, 2, 4, 1, 3]]
    # A row longer than the budget runs alone rather than being dropped.
    assert split_by_tokens([5, 1], lengths, 64) == [[5], [1]]
    # Packed into rows of up to 128 tokens, a micro-batch costs its packed tensor: [100, 20] and
    # [61, 58, 9] in rows of 128 (padded) -> 2 x 128 = 256; the same rows unpacked cost 5 x 104 = 520.
    assert split_by_tokens(rows, lengths, 256, pack_into=128) == [[0, 2, 4, 1, 3]]
    # Real tokens would count 512 + 5 x 260 = 1812 <= 2048, but the packed tensor is 6 rows x 512.
    long = {0: 512, 1: 260, 2: 260, 3: 260, 4: 260, 5: 260}
    assert split_by_tokens(list(long), long, 2048, pack_into=512) == [[0, 1, 2, 3], [4, 5]]


def test_collate_pads_to_longest_not_max_length(phi_tok):
    enc = Encoder(phi_tok, DataConfig(dataset="x", template=XSUM_TEMPLATE, max_length=512))
    batch = collate([enc.encode("one two", "s."), enc.encode("one two three four", "s.")], pad_id=0)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] < 64


def test_hub_dataset_failure_is_a_clear_error():
    # HF_HUB_OFFLINE=1 (conftest) makes the hub unreachable at once, as on machines without network.
    cfg = DataConfig(dataset="EdinburghNLP/xsum", article_field="document", summary_field="summary")
    with pytest.raises(DataError, match=r"cannot load hub dataset EdinburghNLP/xsum:train\[:5\]"):
        load_rows(cfg, "train[:5]")


def test_parquet_csv_line_numbers_and_a_field_only_some_rows_lack(tmp_path):
    import pandas as pd

    rows = [{"id": str(i), "document": f"article {i}", "summary": f"summary {i}"} for i in range(20)]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    cfg = DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary")
    loaded, _ = load_rows(cfg, "train")
    assert [r["id"] for r in loaded] == [str(i) for i in range(20)]

    # Blank lines before a bad row: its number is the line it is on.
    (tmp_path / "validation.csv").write_text("id,document,summary\n\n\n1,text,\n" + "".join(
        f"{i},article {i},summary {i}\n" for i in range(2, 22)))
    loaded, stats = load_rows(cfg, "validation")
    assert len(loaded) == 20 and stats.examples == [f"{tmp_path / 'validation.csv'}:4: empty summary field 'summary'"]

    # The first row lacking the summary field is a bad row, not a wrong field name.
    lines = [json.dumps({"id": "0", "document": "text"})] + [json.dumps(r) for r in rows]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    loaded, stats = load_rows(cfg, "test")
    assert len(loaded) == 20 and stats.examples == [f"{tmp_path / 'test.jsonl'}:1: missing summary field 'summary'"]


def test_chat_format_labels_the_assistant_turn_and_prompts_as_the_chat_template_does(llama_tok):
    """The summary and the end of the assistant turn (TinyLlama's EOS) are labelled; the generation
    prompt is exactly the chat template's own generation prompt, and a long article is cut, never
    the summary."""
    cfg = DataConfig(dataset="x", prompt_format="chat", max_length=96, min_article_tokens=8)
    enc = Encoder(llama_tok, cfg)
    article, summary = "The council approved the plan on Monday. It costs 3.5m.", "Council backs 3.5m plan."
    ex = enc.encode(article, summary)
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert ex.labels[first:] == ex.input_ids[first:]
    assert ex.input_ids[-1] == llama_tok.eos_token_id and llama_tok.decode(ex.input_ids[first:-1]) == summary
    # The tokens are the chat template's own for the whole conversation (it ends the turn with "</s>\n").
    conversation = [{"role": "user", "content": "Summarize the following news article.\n\n" + article},
                    {"role": "assistant", "content": summary}]
    whole = llama_tok(llama_tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False).input_ids
    assert ex.input_ids == whole[:len(ex.input_ids)] and llama_tok.decode(whole[len(ex.input_ids):]) == "\n"
    chat = llama_tok.apply_chat_template(
        [{"role": "user", "content": "Summarize the following news article.\n\n" + article}],
        tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nSummarize the following news article.\n\n" + article + "</s>\n<|assistant|>\n"
    assert ex.input_ids[:first] == llama_tok(chat, add_special_tokens=False).input_ids
    assert enc.encode_prompt(article) == ex.input_ids[:first]

    long = enc.encode("The council met again. " * 200, summary)
    assert len(long.input_ids) == 96 and long.article_truncated and not long.summary_truncated
    assert [t for t in long.labels if t != IGNORE_INDEX] == ex.input_ids[first:]


def test_chat_format_needs_a_chat_template(phi_tok):
    with pytest.raises(ConfigError, match=re.escape(
            f"data.prompt_format: 'chat' needs a tokenizer with a chat template; {phi_tok.name_or_path} has none "
            f"(use 'raw' and data.template)")):
        Encoder(phi_tok, DataConfig(dataset="x", prompt_format="chat"))


def test_decoding_options_round_trip(tmp_path):
    from summ.config import config_from_dict

    cfg = config_from_dict({"model": {"name_or_path": "m"}, "data": {"dataset": "d", "prompt_format": "chat"},
                            "eval": {"num_beams": 4, "length_penalty": 2.0, "min_new_tokens": 55, "max_new_tokens": 140,
                                     "no_repeat_ngram_size": 3}})
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and (again.eval.length_penalty, again.eval.min_new_tokens) == (2.0, 55)
    with pytest.raises(ConfigError, match=re.escape("'eval.min_new_tokens' must be <= eval.max_new_tokens (64), got 65")):
        config_from_dict({"model": {"name_or_path": "m"}, "data": {"dataset": "d"}, "eval": {"min_new_tokens": 65}})


def test_duplicate_ids_are_counted_and_warned_or_dropped(tmp_path, caplog):
    rows = [json.dumps({"id": i, "document": f"text {n}", "summary": "s"})
            for n, i in enumerate(["a", "b", "a", "c", "b", "a"])]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(dataset=str(tmp_path), article_field="document", summary_field="summary")
    kept, stats = load_rows(cfg, "train")
    path = tmp_path / "train.jsonl"
    assert [r["id"] for r in kept] == ["a", "b", "a", "c", "b", "a"]
    assert (stats.duplicate_ids, stats.first_duplicates) == (3, [f"id a at {path}:3", f"id b at {path}:5",
                                                                 f"id a at {path}:6"])
    assert stats.summary()["duplicate_ids"] == 3
    assert (f"{path}: 3 rows repeat an id read before (first: id a at {path}:3, id b at {path}:5, id a at {path}:6); "
            "each copy is used as a row of its own; data.drop_duplicate_ids=true keeps the first only") in caplog.text

    dropped, stats = load_rows(dataclasses.replace(cfg, drop_duplicate_ids=True), "train")
    assert [(r["id"], r["article"]) for r in dropped] == [("a", "text 0"), ("b", "text 1"), ("c", "text 3")]
    assert stats.duplicate_ids == 3 and stats.kept == 3 and stats.n_skipped == 0


def test_validation_ids_shared_with_training_are_a_loud_warning(caplog):
    cfg = DataConfig(dataset="x", train_split="train", eval_split="validation")
    train = [{"id": i} for i in ("a", "b", "c")]
    assert warn_shared_ids(train, [{"id": "x"}, {"id": "y"}], cfg) == 0
    assert "LEAKAGE" not in caplog.text
    assert warn_shared_ids(train, [{"id": "b"}, {"id": "y"}, {"id": "c"}], cfg) == 2
    assert ("LEAKAGE: 2 of 3 validation rows have an id that train also holds (first: b, c); validation loss "
            "and ROUGE score articles the model trained on") in caplog.text
