"""Tests of ppzoo.data: tokenizer, built-in corpus, packed datasets, sampler, and tools/train_tokenizer.py."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ppzoo.data.corpus import SPLITS, builtin_documents, builtin_texts, corpus_fingerprint
from ppzoo.data.datasets import (
    BuiltinCorpus,
    BuiltinCorpusConfig,
    PackedLMDataset,
    TextFiles,
    TextFilesConfig,
    build_dataset,
)
from ppzoo.data.sampler import DistributedBatchSampler, collate
from ppzoo.data.tokenizer import Tokenizer, train_byte_level_bpe
from ppzoo.errors import ConfigError, DataError
from ppzoo.registry import DATASETS

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_CHARS = 200_000
SMALL_VOCAB = 512

TRICKY_TEXTS = [
    "def f(x):\n\tif x:\n\t\treturn  x   # two spaces, tabs\n    \n\n",
    "Grüße, naïve café — 日本語のテキスト, emoji 🙂👋🏽, math ∑∫√, RTL עברית",
    "   leading and trailing spaces   ",
    "\r\nwindows line ends\r\n\x00\x7f control chars",
    "a document that mentions </s> and <s> and <pad> literally",
    "",
]


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_byte_level_bpe(builtin_texts("train", SMALL_CHARS), SMALL_VOCAB)


@pytest.fixture(scope="module")
def small_tokenizer_file(small_tokenizer, tmp_path_factory):
    return small_tokenizer.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


# ---------------------------------------------------------------- tokenizer


def test_round_trip_on_code_whitespace_and_unicode(small_tokenizer):
    for text in TRICKY_TEXTS:
        ids = small_tokenizer.encode(text)
        assert small_tokenizer.decode(ids) == text
    batch = small_tokenizer.encode_batch(TRICKY_TEXTS)
    assert batch == [small_tokenizer.encode(text) for text in TRICKY_TEXTS]


def test_trained_tokenizer_special_tokens(small_tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == SMALL_VOCAB
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.id_to_token(2) == "</s>"
    # Special-token strings inside a document are plain text: they must not become eos/bos ids.
    ids = tok.encode("x </s> y <s>")
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.encode("hello", add_bos=True) == [tok.bos_id] + tok.encode("hello")
    assert tok.decode([tok.bos_id] + tok.encode("hi") + [tok.eos_id]) == "hi"
    assert tok.decode([tok.eos_id], skip_special_tokens=False) == "</s>"


def test_training_is_deterministic(small_tokenizer):
    again = train_byte_level_bpe(builtin_texts("train", SMALL_CHARS), SMALL_VOCAB)
    assert again.hf.to_str() == small_tokenizer.hf.to_str()


def test_training_rejects_too_small_vocab_and_no_text():
    with pytest.raises(DataError, match="at least 260"):
        train_byte_level_bpe(["some text"], 100)
    with pytest.raises(DataError, match="no text"):
        train_byte_level_bpe(["", ""], 300)


def test_save_and_load_from_file_or_directory(small_tokenizer, small_tokenizer_file):
    for where in (small_tokenizer_file, small_tokenizer_file.parent):
        loaded = Tokenizer.from_file(where)
        assert loaded.vocab_size == small_tokenizer.vocab_size
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
        assert loaded.encode(TRICKY_TEXTS[0]) == small_tokenizer.encode(TRICKY_TEXTS[0])
        assert loaded.fingerprint() == small_tokenizer.fingerprint()


def _write_llama_like_tokenizer(directory, special_tokens):
    """A tokenizer.json in the style of a LLaMA/SentencePiece checkpoint (Metaspace, bos post-processor)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, show_progress=False)
    hf.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    # Checkpoints usually prepend bos in the post-processor; our encode must not add it.
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    return hf


def test_loads_hf_tokenizer_json_with_tokenizer_config(tmp_path):
    hf = _write_llama_like_tokenizer(tmp_path, ["<unk>", "<s>", "</s>", "<|eot_id|>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>",
        "eos_token": {"content": "<|eot_id|>", "lstrip": False, "normalized": False},  # dict form
        "pad_token": None,
    }))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.bos_id == hf.token_to_id("<s>")
    assert tok.eos_id == hf.token_to_id("<|eot_id|>")  # the config wins over the known name "</s>"
    assert tok.pad_id == tok.eos_id  # no pad token anywhere: falls back to eos
    ids = tok.encode("the lazy fox")
    assert ids[0] != tok.bos_id  # the checkpoint's post-processor did not sneak a bos in
    assert tok.decode(ids) == "the lazy fox"
    assert tok.encode("the lazy fox", add_bos=True) == [tok.bos_id] + ids


def test_special_tokens_map_and_known_name_fallback(tmp_path):
    with_map = tmp_path / "with_map"
    hf = _write_llama_like_tokenizer(with_map, ["<unk>", "<s>", "</s>", "<my_pad>"])
    (with_map / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<my_pad>"}}))
    tok = Tokenizer.from_file(with_map)
    assert tok.pad_id == hf.token_to_id("<my_pad>")
    assert tok.eos_id == hf.token_to_id("</s>")  # not in the map: found by its well-known name

    gpt_style = tmp_path / "gpt_style"
    hf = _write_llama_like_tokenizer(gpt_style, ["<unk>", "<s>", "<|endoftext|>"])
    tok = Tokenizer.from_file(gpt_style)
    assert tok.eos_id == hf.token_to_id("<|endoftext|>")
    assert tok.pad_id == tok.eos_id


def test_missing_tokenizer_file_says_how_to_get_one(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(DataError) as info:
        Tokenizer.from_file(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "tools/train_tokenizer.py --out" in message and "Data.tokenizer" in message


def test_corrupt_tokenizer_files_are_named(tmp_path):
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match="tokenizer.json"):
        Tokenizer.from_file(corrupt)

    _write_llama_like_tokenizer(tmp_path / "ok", ["<unk>", "<s>", "</s>"])
    (tmp_path / "ok" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer_config.json"):
        Tokenizer.from_file(tmp_path / "ok")


# ---------------------------------------------------------------- built-in corpus


def _document_names(split):
    return [name for name, _text in builtin_documents(split)]


def test_corpus_is_deterministic_across_processes():
    # Python's own hash() is salted per process; a different PYTHONHASHSEED must not change anything.
    script = (
        "import json; from ppzoo.data.corpus import builtin_documents; "
        "print(json.dumps({s: [n for n, _ in builtin_documents(s)] for s in ('train', 'validation')}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO_ROOT))
    output = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    other_process = json.loads(output.stdout)
    assert other_process == {split: _document_names(split) for split in SPLITS}


def test_corpus_splits_are_disjoint_mixed_and_sized():
    train, validation = _document_names("train"), _document_names("validation")
    assert len(train) > 100 and len(validation) >= 1
    assert not set(train) & set(validation)
    assert len(validation) < len(train) / 20  # about 1 in 50
    assert len(set(train)) == len(train)
    for names in (train, validation + train):
        assert any(n.startswith("pydoc:") for n in names) and any(n.startswith("stdlib:") for n in names)
    assert not any(part in n.split("/") for n in train for part in ("test", "tests", "idlelib", "site-packages"))
    # Interleaved, not all prose first: prose and code both appear early in the train order.
    head = train[:40]
    assert any(n.startswith("pydoc:") for n in head) and any(n.startswith("stdlib:") for n in head)
    # The fingerprint counts indexed documents, including the few empty files that yield nothing.
    fingerprint = corpus_fingerprint()
    assert fingerprint.startswith(f"python-{sys.version.split()[0]}-docs-")
    assert int(fingerprint.rsplit("-", 1)[1]) >= len(train) + len(validation)


def test_builtin_texts_stops_after_max_chars():
    texts = list(builtin_texts("train", SMALL_CHARS))
    total = sum(len(t) for t in texts)
    assert total >= SMALL_CHARS and total - len(texts[-1]) < SMALL_CHARS
    assert texts == [text for _name, text in builtin_documents("train")][: len(texts)]
    with pytest.raises(DataError, match="split"):
        list(builtin_texts("dev"))


# ---------------------------------------------------------------- packing


def test_packing_by_hand():
    eos = 2
    dataset = PackedLMDataset([[5, 6, 7], [], [8], [9, 10, 11, 12]], seq_len=4, eos_id=eos)
    # The empty document is skipped; each other document is followed by eos.
    assert dataset.stream.tolist() == [5, 6, 7, 2, 8, 2, 9, 10, 11, 12, 2]
    assert len(dataset) == 2  # (11 - 1) // 4; the partial last window is dropped
    first, second = dataset[0], dataset[1]
    assert first["input_ids"].tolist() == [5, 6, 7, 2] and first["labels"].tolist() == [6, 7, 2, 8]
    assert first["doc_ids"].tolist() == [0, 0, 0, 0]  # the eos belongs to the document it ends
    assert second["input_ids"].tolist() == [8, 2, 9, 10] and second["doc_ids"].tolist() == [0, 0, 1, 1]
    assert first["input_ids"].dtype == np.int64 and first["doc_ids"].dtype == np.int32
    assert dataset[-1]["input_ids"].tolist() == second["input_ids"].tolist()
    with pytest.raises(IndexError):
        dataset[2]


def test_packing_facts_on_builtin_corpus(small_tokenizer):
    seq_len = 64
    dataset = build_dataset(
        SimpleNamespace(dataset="BuiltinCorpus", args=BuiltinCorpusConfig(split="validation", max_chars=50_000)),
        small_tokenizer,
        seq_len,
    )
    assert isinstance(dataset, BuiltinCorpus) and len(dataset) > 10
    eos = small_tokenizer.eos_id
    inputs = np.concatenate([dataset[i]["input_ids"] for i in range(len(dataset))])
    labels = np.concatenate([dataset[i]["labels"] for i in range(len(dataset))])
    # Across the whole stream, labels are the inputs shifted by one.
    assert np.array_equal(inputs[1:], labels[:-1])
    assert np.array_equal(inputs, dataset.stream[: len(inputs)])
    # One eos per (non-empty) document, and nowhere else.
    documents = [t for t in builtin_texts("validation", 50_000) if small_tokenizer.encode(t)]
    assert int((dataset.stream == eos).sum()) == len(documents)
    assert dataset.stream[-1] == eos
    for i in range(len(dataset)):
        sample = dataset[i]
        steps = np.diff(sample["doc_ids"])
        assert sample["doc_ids"][0] == 0
        assert np.array_equal(steps, (sample["input_ids"][:-1] == eos).astype(np.int32))


def test_empty_dataset_error_gives_counts_and_fix(small_tokenizer, tmp_path):
    with pytest.raises(DataError) as info:
        PackedLMDataset([[1, 2, 3]], seq_len=8, eos_id=2)
    message = str(info.value)
    assert "too small" in message and "4 tokens" in message and "seq_len + 1 = 9" in message
    assert "seq_len" in message and "Add more text" in message

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="0 tokens"):
        TextFiles.build(TextFilesConfig(paths=[str(empty)]), small_tokenizer, 16)


def test_text_files_txt_and_jsonl(small_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("First document.\nStill the first one.\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"content": "second doc"}) + "\n\n" + json.dumps({"content": "third doc", "id": 3}) + "\n"
    )
    args = TextFilesConfig(paths=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], text_key="content")
    dataset = build_dataset(SimpleNamespace(dataset="TextFiles", args=args), small_tokenizer, seq_len=4)
    eos = small_tokenizer.eos_id
    expected = []
    for text in ["First document.\nStill the first one.\n", "second doc", "third doc"]:
        expected += small_tokenizer.encode(text) + [eos]
    assert dataset.stream.tolist() == expected


def test_text_files_errors_name_file_line_and_key(small_tokenizer, tmp_path):
    def build(paths, text_key="text"):
        return TextFiles.build(TextFilesConfig(paths=[str(p) for p in paths], text_key=text_key), small_tokenizer, 4)

    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="missing.jsonl.*does not exist"):
        build([missing])

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        build([bad_json])

    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text('{"text": "fine"}\n{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nokey.jsonl, line 3: no key 'text'.*'body'"):
        build([no_key])

    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"Unsupported data file .*data.csv"):
        build([csv])

    with pytest.raises(DataError, match="needs `paths`"):
        TextFiles.build(TextFilesConfig(), small_tokenizer, 4)


def test_registered_datasets_and_unknown_name(small_tokenizer):
    for name in ("BuiltinCorpus", "TextFiles"):
        dataset_class = DATASETS.get(name)
        assert dataclasses.is_dataclass(dataset_class.config_class)
        assert callable(dataset_class.build)
    assert {f.name for f in dataclasses.fields(BuiltinCorpusConfig)} == {"split", "max_chars"}
    with pytest.raises(ConfigError, match="BuiltinCorpus"):
        build_dataset(SimpleNamespace(dataset="BuiltinCorpos", args=None), small_tokenizer, 16)
    with pytest.raises(DataError, match="split"):
        BuiltinCorpus.build(BuiltinCorpusConfig(split="dev"), small_tokenizer, 16)


# ---------------------------------------------------------------- sampler


def _step_samples(sampler):
    return [index for micro_batch in sampler for index in micro_batch]


def test_sampler_step_is_independent_of_dp_and_accumulation_split():
    num_samples, global_batch, seed = 50, 8, 7
    single = DistributedBatchSampler(num_samples, global_batch, 8, 1, 0, 1, seed)
    assert single.steps_per_epoch == 6
    splits = [(2, 2, 2), (1, 4, 2), (4, 1, 2), (1, 1, 8), (2, 4, 1)]  # (micro, accumulate, dp)
    for step in range(14):  # crosses two epoch boundaries
        (expected,) = single.indices_for_step(step)
        for micro, accumulate, dp in splits:
            gathered = []
            for rank in range(dp):
                sampler = DistributedBatchSampler(num_samples, global_batch, micro, accumulate, rank, dp, seed)
                batches = sampler.indices_for_step(step)
                assert len(batches) == accumulate and all(len(b) == micro for b in batches)
                gathered += _step_samples(batches)
            assert len(gathered) == len(set(gathered)) == global_batch
            assert set(gathered) == set(expected)


def test_sampler_epochs_cover_samples_once_and_reshuffle():
    sampler = DistributedBatchSampler(20, 6, 3, 1, 0, 2, seed=3)
    other_rank = DistributedBatchSampler(20, 6, 3, 1, 1, 2, seed=3)
    def epoch_samples(epoch):
        steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
        return [i for s in steps for b in (sampler.indices_for_step(s) + other_rank.indices_for_step(s)) for i in b]
    first, second = epoch_samples(0), epoch_samples(1)
    assert len(first) == len(set(first)) == 18  # 20 samples, 3 full global batches, 2 dropped
    assert first != second
    ordered = DistributedBatchSampler(20, 6, 6, 1, 0, 1, seed=3, shuffle=False)
    assert ordered.indices_for_step(1) == [[6, 7, 8, 9, 10, 11]]
    assert ordered.indices_for_step(3) == [[0, 1, 2, 3, 4, 5]]  # epoch 1 starts over


def test_sampler_is_resumable():
    running = DistributedBatchSampler(100, 12, 3, 2, 1, 2, seed=11)
    history = [running.indices_for_step(step) for step in range(20)]
    for step in (0, 7, 8, 19):
        fresh = DistributedBatchSampler(100, 12, 3, 2, 1, 2, seed=11)
        assert fresh.indices_for_step(step) == history[step]
    assert [batches for _step, batches in fresh.iter_steps(start_step=5, num_steps=3)] == history[5:8]
    assert DistributedBatchSampler(100, 12, 3, 2, 1, 2, seed=12).indices_for_step(0) != history[0]


def test_sampler_validation():
    with pytest.raises(ValueError, match="must equal"):
        DistributedBatchSampler(100, 10, 3, 1, 0, 3, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedBatchSampler(100, 8, 4, 1, 2, 2, seed=0)
    with pytest.raises(DataError, match="5 samples"):
        DistributedBatchSampler(5, 8, 8, 1, 0, 1, seed=0)


def test_collate_stacks_samples():
    dataset = PackedLMDataset([list(range(3, 40))], seq_len=8, eos_id=2)
    batch = collate([dataset[i] for i in (0, 2, 1)])
    assert set(batch) == {"input_ids", "labels", "doc_ids"}
    assert batch["input_ids"].shape == (3, 8) and batch["input_ids"].dtype == np.int64
    assert np.array_equal(batch["labels"][1], dataset[2]["labels"])


# ---------------------------------------------------------------- tools/train_tokenizer.py


def _run_tool(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "train_tokenizer.py"), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


def test_train_tokenizer_tool(tmp_path):
    out = tmp_path / "run" / "tokenizer.json"
    result = _run_tool("--out", str(out), "--vocab-size", "400", "--max-chars", "50000")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokenizer"] == str(out) and report["vocab_size"] == 400
    assert report["chars"] >= 50_000 and report["round_trip_ok"] is True
    assert "characters per token" in result.stdout
    assert Tokenizer.from_file(out).vocab_size == 400


def test_train_tokenizer_tool_user_errors_exit_2_without_traceback(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = _run_tool("--out", str(blocker / "tokenizer.json"), "--vocab-size", "300", "--max-chars", "1000")
    assert result.returncode == 2
    assert "a_file is a file, not a directory" in result.stderr and "Traceback" not in result.stderr

    result = _run_tool("--out", str(tmp_path / "t.json"), "--vocab-size", "10", "--max-chars", "1000")
    assert result.returncode == 2 and "at least 260" in result.stderr and "Traceback" not in result.stderr
