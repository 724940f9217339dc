"""corpus=hf (issue 20 item 7): any Hugging Face `datasets` source, streamed; here local parquet and jsonl
files built in tmp_path, and a hub data set that is not in the cache while offline (conftest sets
HF_DATASETS_OFFLINE=1)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from sparse_coding import corpus as corpus_mod
from sparse_coding.corpus import validate_corpus
from sparse_coding.errors import ConfigError, DataError
from tinymodels import run_cfg


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
    docs = corpus_mod.load_documents(cfg)
    assert list(docs) == ["the cat sat on the mat", "a second document here"]  # a row without text is skipped
    ctx = corpus_mod.build_contexts(hf_corpus(path=str(pq_file), text_field="body"), WordTokenizer())
    assert ctx.n_rows == 8 and ctx.input_ids[0].tolist() == [3, 3, 3, 2, 3, 3, 0, 1]  # 0: the separator

    jsonl = tmp_path / "d" / "rows.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3)))
    assert list(corpus_mod.load_documents(hf_corpus(path=str(jsonl.parent)))) == ["row 0", "row 1", "row 2"]

    with pytest.raises(ConfigError, match="text_field='content' is not a column.*body, id"):
        list(corpus_mod.load_documents(hf_corpus(path=str(pq_file), text_field="content")))


def test_hf_fingerprint_follows_the_source(tmp_path):
    pq_file = tmp_path / "docs.parquet"
    write_parquet(pq_file, ["the cat sat on the mat"])
    cfg = hf_corpus(path=str(pq_file), text_field="body")
    first = corpus_mod.corpus_fingerprint(cfg)
    assert corpus_mod.corpus_fingerprint(cfg) == first
    write_parquet(pq_file, ["the dog sat on the mat"])
    changed = corpus_mod.corpus_fingerprint(cfg)
    assert changed != first
    assert corpus_mod.corpus_fingerprint(hf_corpus(path=str(pq_file), text_field="id")) != changed
    hub = corpus_mod.corpus_fingerprint(hf_corpus(dataset="someone/stories"))
    assert hub == corpus_mod.corpus_fingerprint(hf_corpus(dataset="someone/stories"))
    for other in ({"config": "en"}, {"split": "validation"}, {"revision": "abc123"}, {"dataset": "someone/else"}):
        assert corpus_mod.corpus_fingerprint(hf_corpus(**{"dataset": "someone/stories", **other})) != hub


def test_hf_missing_hub_dataset_offline_is_one_line():
    cfg = hf_corpus(dataset="nobody-here/no-such-dataset-xyz")
    validate_corpus(cfg)
    with pytest.raises(DataError) as err:
        list(corpus_mod.load_documents(cfg))
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


def test_hf_corpus_builds_a_cache(tmp_path):
    from sparse_coding.cache import build
    from tinymodels import make_tiny_gpt2

    tiny = make_tiny_gpt2(tmp_path / "tiny")
    data = tmp_path / "docs.parquet"
    write_parquet(data, [f"the cat sat on mat number {i}" for i in range(40)], column="text")
    cfg = run_cfg(["model=gpt2", f"model.path={tiny}", "layer=1", "corpus=hf", f"corpus.path={data}",
                   "corpus.context_len=8", "corpus.max_tokens=60", f"cache_dir={tmp_path / 'c'}"])
    path = build.ensure_cache(cfg)
    assert path.name.startswith("hf-")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["corpus"]["fingerprint"] == corpus_mod.corpus_fingerprint(cfg.corpus)
