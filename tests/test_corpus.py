"""The text corpora (sparse_coding.corpus): corpus=hf (any Hugging Face `datasets` source, streamed; here local
parquet and jsonl files, and a hub data set not in the cache while offline: conftest sets HF_DATASETS_OFFLINE=1),
wiki and kjv read only as far as the contexts need, text files read lazily with one-line errors, and inputs that
are not regular files named for what they are."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from sparse_coding import corpus
from sparse_coding.cache import build
from sparse_coding.config.compose import compose_config
from sparse_coding.corpus import validate_corpus
from sparse_coding.errors import ConfigError, DataError
from tests.helpers import one_line, unblock_after
from tests.tinymodels import run_cfg


def hf_corpus(**fields):
    base = {"name": "hf", "dataset": None, "config": None, "split": "train", "revision": None, "text_field": "text",
            "path": None, "files": [], "context_len": 8, "max_tokens": 40, "keep_special_tokens": False,
            "batch_size": 4}
    return OmegaConf.create({**base, **fields})


class WordTokenizer:
    """Each word one token (its length), no special tokens: enough for build_contexts."""

    def __call__(self, texts, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": [len(w) for w in texts.split()] or [0]}
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def write_parquet(path, texts, column="body"):
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)


def test_hf_corpus_from_local_parquet_and_jsonl(tmp_path):
    pq_file = tmp_path / "docs.parquet"
    write_parquet(pq_file, ["the cat sat on the mat", None, "a second document here"])
    cfg = run_cfg(["corpus=hf", f"corpus.path={pq_file}", "corpus.text_field=body"]).corpus
    assert cfg.name == "hf" and cfg.split == "train"
    validate_corpus(cfg)
    docs = corpus.load_documents(cfg)
    assert list(docs) == ["the cat sat on the mat", "a second document here"]  # a row without text is skipped
    ctx = corpus.build_contexts(hf_corpus(path=str(pq_file), text_field="body"), WordTokenizer())
    assert ctx.n_rows == 8 and ctx.input_ids[0].tolist() == [3, 3, 3, 2, 3, 3, 0, 1]  # 0: the separator

    jsonl = tmp_path / "d" / "rows.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3)))
    assert list(corpus.load_documents(hf_corpus(path=str(jsonl.parent)))) == ["row 0", "row 1", "row 2"]

    with pytest.raises(ConfigError, match="text_field='content' is not a column.*body, id"):
        list(corpus.load_documents(hf_corpus(path=str(pq_file), text_field="content")))


def test_hf_fingerprint_follows_the_source(tmp_path):
    pq_file = tmp_path / "docs.parquet"
    write_parquet(pq_file, ["the cat sat on the mat"])
    cfg = hf_corpus(path=str(pq_file), text_field="body")
    first = corpus.corpus_fingerprint(cfg)
    assert corpus.corpus_fingerprint(cfg) == first
    write_parquet(pq_file, ["the dog sat on the mat"])
    changed = corpus.corpus_fingerprint(cfg)
    assert changed != first
    assert corpus.corpus_fingerprint(hf_corpus(path=str(pq_file), text_field="id")) != changed
    hub = corpus.corpus_fingerprint(hf_corpus(dataset="someone/stories"))
    assert hub == corpus.corpus_fingerprint(hf_corpus(dataset="someone/stories"))
    for other in ({"config": "en"}, {"split": "validation"}, {"revision": "abc123"}, {"dataset": "someone/else"}):
        assert corpus.corpus_fingerprint(hf_corpus(**{"dataset": "someone/stories", **other})) != hub


def test_hf_missing_hub_dataset_offline_is_one_line():
    cfg = hf_corpus(dataset="nobody-here/no-such-dataset-xyz")
    validate_corpus(cfg)
    with pytest.raises(DataError) as err:
        list(corpus.load_documents(cfg))
    message = str(err.value)
    assert "\n" not in message
    assert "nobody-here/no-such-dataset-xyz" in message and "not in the Hugging Face cache" in message


@pytest.mark.parametrize("fields, error, match", [
    ({}, ConfigError, "needs corpus.dataset=.* or corpus.path="),
    ({"dataset": "a/b", "path": "x.parquet"}, ConfigError, "not both"),
    ({"path": "/no/such/file.parquet"}, DataError, "corpus.path: /no/such/file.parquet"),
    ({"path": "/no/such/*.parquet"}, DataError, "matches no file"),
    ({"dataset": "a/b", "split": "train[:10%]"}, ConfigError, "cannot be sliced"),
    ({"dataset": "a/b", "text_field": ""}, ConfigError, "corpus.text_field=''"),
])
def test_hf_fields_are_validated_in_one_line(fields, error, match):
    with pytest.raises(error, match=match) as err:
        validate_corpus(hf_corpus(**fields))
    assert "\n" not in str(err.value)


def test_hf_path_of_unknown_format(tmp_path):
    odd = tmp_path / "notes.txt"
    odd.write_text("hello")
    with pytest.raises(ConfigError, match="is not a"):
        validate_corpus(hf_corpus(path=str(odd)))


def test_hf_corpus_builds_a_cache(tiny_gpt2, tmp_path):
    tiny = tiny_gpt2
    data = tmp_path / "docs.parquet"
    write_parquet(data, [f"the cat sat on mat number {i}" for i in range(40)], column="text")
    cfg = run_cfg(["model=gpt2", f"model.path={tiny}", "layer=1", "corpus=hf", f"corpus.path={data}",
                   "corpus.context_len=8", "corpus.max_tokens=60", f"cache_dir={tmp_path / 'c'}"])
    path = build.ensure_cache(cfg)
    assert path.name.startswith("hf-")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["corpus"]["fingerprint"] == corpus.corpus_fingerprint(cfg.corpus)


def test_wiki_is_read_and_tokenised_only_as_far_as_the_contexts_need(monkeypatch):
    cleaned = []
    real = corpus.clean_wiki
    monkeypatch.setattr(corpus, "clean_wiki", lambda text: cleaned.append(1) or real(text))

    batches = []  # word counts of the documents of each tokenizer call

    class Tok:  # one token per word; "\n\n" is one token
        def __call__(self, texts, add_special_tokens=True):
            if isinstance(texts, str):
                return {"input_ids": [1] * max(1, len(texts.split()))}
            batches.append([len(t.split()) for t in texts])
            return {"input_ids": [[1] * len(t.split()) for t in texts]}

    cfg = OmegaConf.create({"name": "wiki", "context_len": 16, "max_tokens": 100_000, "keep_special_tokens": False})
    ctx = corpus.build_contexts(cfg, Tok())

    def stream(bs):
        return sum(words + 1 for b in bs for words in b)

    assert ctx.n_rows == 100_000 and len(batches) > 1
    assert len(cleaned) == sum(map(len, batches))  # no article read beyond those tokenised
    assert stream(batches[:-1]) < 100_000 <= stream(batches) == ctx.corpus_tokens
    assert ctx.corpus_tokens - (batches[-1][-1] + 1) < 100_000  # the last article tokenised was needed


def test_kjv_chapters_are_the_documents_datasets_read():
    """The Bible read with `json` (fast) gives the chapters the `datasets` JSON loader gave (the caches' tokens)."""
    import datasets  # heavy: only here

    (path,) = corpus.source_files(OmegaConf.create({"name": "kjv"}))
    verses = datasets.load_dataset("json", data_files=str(path), split="train")
    chapters: dict = {}
    for book, chapter, text in zip(verses["book"], verses["chapter"], verses["text"]):
        chapters.setdefault((book, chapter), []).append(text)
    assert corpus._kjv_chapters(path) == [" ".join(v) for v in chapters.values()]


def test_text_corpora_fail_with_one_line_and_one_enormous_line_is_read_lazily(tmp_path):
    cases = {"empty.txt": (b"", "is empty"), "binary.txt": (b"\x00\x01\x02" * 100, "binary"),
             "latin1.txt": ("caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
             "bad.jsonl": (b'{"text": "ok"}\n{"text": oops}\n', "line 2 is not valid JSON"),
             "notext.jsonl": (b'{"body": "x"}\n', "line 1 has no string field 'text'")}
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=pattern) as e:
            list(corpus.text_documents([tmp_path / name]))
        one_line(e.value)
    big = tmp_path / "one_line.txt"
    with open(big, "w") as f:
        for _ in range(40):
            f.write("word " * 100_000)  # 20 MB, no newline
    tracemalloc.start()
    docs = corpus.text_documents([big])
    first = [next(docs) for _ in range(3)]  # what build_contexts needs for a few thousand tokens
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert all(len(d) <= 2 * corpus.PIECE_CHARS for d in first) and peak < 16 << 20


def test_corpus_files_that_are_not_regular_files_are_named_for_what_they_are(tmp_path, fifo):
    (tmp_path / "folder.txt").mkdir()
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    timer = unblock_after(fifo, 20)
    try:
        for path, what in ((tmp_path / "folder.txt", "is a directory"), (fifo, "is a FIFO"),
                           (Path("/dev/zero"), "is a character device"),
                           (tmp_path / "dangling.txt", "broken symbolic link"), (tmp_path / "nope.txt", "does not exist")):
            cfg = compose_config(["corpus=text", f"corpus.files=[{path}]"])
            with pytest.raises(DataError, match=what) as e:
                corpus.validate_corpus(cfg.corpus)
            one_line(e.value)
            with pytest.raises(DataError, match=what):
                corpus.source_files(cfg.corpus)
            with pytest.raises(DataError, match=what):
                next(corpus.text_documents([path]))
    finally:
        timer.cancel()
