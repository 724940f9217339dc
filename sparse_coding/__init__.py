"""sparse-coding: measure how sparse the features inside language models are (arXiv 2310.07837).

    from sparse_coding import SparseDictionary, measure
    result = measure(["model=minilm", "layer=3"])       # a whole train.py run; its metrics dict
    d = SparseDictionary.load("outputs/...")           # a run's dictionary: encode, decode, measure

Both are imported on first use, so `import sparse_coding` (and the fast config validation under
it) stays free of torch.
"""

__version__ = "0.1.0"
__all__ = ["SparseDictionary", "measure"]


def __getattr__(name: str):
    if name == "SparseDictionary":
        from sparse_coding.dictionary import SparseDictionary

        return SparseDictionary
    if name == "measure":
        from sparse_coding.api import measure

        return measure
    raise AttributeError(f"module 'sparse_coding' has no attribute {name!r}")
