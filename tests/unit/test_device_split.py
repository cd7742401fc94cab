"""Tracing a model that accelerate split across devices: CPU layers, disk-offloaded layers (weights on
"meta", streamed in by accelerate's hooks) and, where there is one, a GPU.

Every split must trace exactly like the unsplit model: the same logits at full k, the same blocks at
small k.
"""

import accelerate
import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from sparsetrace import tracer as tracer_module
from sparsetrace.config import StreamConfig
from sparsetrace.errors import MemoryRequestError
from sparsetrace.fidelity import check
from sparsetrace.models import describe_model, execution_devices, input_device, load_model
from sparsetrace.tracer import estimate_memory, trace

TEXT = "Sparse traces keep the blocks that matter. " * 8  # 344 byte tokens
FULL_K, SMALL_K = StreamConfig(k=64, block_size=16), StreamConfig(k=2, block_size=16)
ARCHITECTURES = ["llama", "gemma3"]  # gemma3: tied embeddings, sliding-window layers
LAYER_GPU = "cuda:0"


def _split_map(model, layer_devices: list[str]) -> dict[str, str]:
    """A device map: decoder layer i on layer_devices[i], the embedding and lm_head on disk, the rest on cpu."""
    inner = model.model
    device_map = {f"model.{name}": "cpu" for name, _ in inner.named_children() if name != "layers"}
    device_map["model.embed_tokens"] = "disk"
    device_map |= {f"model.layers.{i}": device for i, device in enumerate(layer_devices)}
    device_map["lm_head"] = "disk"
    return device_map


@pytest.fixture(scope="module", params=ARCHITECTURES)
def saved(request, tmp_path_factory, tiny_tokenizer):
    """(folder, unsplit model) for a tiny model saved with its tokenizer."""
    folder = tmp_path_factory.mktemp(request.param)
    model = tiny_model(request.param, attn_implementation="sdpa")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder, model


def _load_split(saved, tmp_path, how: str):
    """The saved model loaded again, split across devices as `how` says."""
    folder, whole = saved
    offload = tmp_path / "offload"
    if how == "cuda|cpu layers":  # layers compute on the GPU and the CPU in turn: hidden states cross devices
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
        device_map = _split_map(whole, [LAYER_GPU, "cpu", LAYER_GPU])
        model = accelerate.dispatch_model(model, device_map, main_device="cpu", offload_dir=offload)
    else:
        placement = {
            "cpu+disk": {"device_map": _split_map(whole, ["cpu", "disk", "cpu"])},
            # accelerate's own placement: what does not fit the CPU budget goes to disk
            "max_memory": {"device_map": "auto", "max_memory": {"cpu": 300_000}},
            # accelerate's usual GPU split: the CPU and disk weights stream to the GPU for each forward
            "cuda+cpu+disk": {"device_map": _split_map(whole, ["cuda:0", "disk", "cpu"])},
        }[how]
        model = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="sdpa", offload_folder=offload, **placement
        )
    assert any(p.device.type == "meta" for p in model.parameters()), "some weights must be offloaded"
    return model.eval()


# the GPU splits join where a GPU is present (a device session); the CPU ones run everywhere
SPLITS = ["cpu+disk", "max_memory"] + (["cuda+cpu+disk", "cuda|cpu layers"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("how", SPLITS)
def test_full_k_trace_of_a_split_model_reproduces_the_unsplit_logits(saved, tmp_path, tiny_tokenizer, how):
    whole = saved[1]
    split = _load_split(saved, tmp_path, how)
    ids = tiny_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        dense = whole(ids).logits[0, -1]
    for forward in ("sparse", "dense"):
        tr = trace(split, tiny_tokenizer, TEXT, FULL_K, forward=forward)
        torch.testing.assert_close(tr.next_token_logits, dense, atol=1e-4, rtol=1e-4)
    assert split.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("how", SPLITS)
def test_small_k_trace_of_a_split_model_keeps_the_unsplit_blocks(saved, tmp_path, tiny_tokenizer, how):
    whole = saved[1]
    split = _load_split(saved, tmp_path, how)
    expected = trace(whole, tiny_tokenizer, TEXT, SMALL_K)
    got = trace(split, tiny_tokenizer, TEXT, SMALL_K)
    for layer in range(expected.num_layers):
        assert torch.equal(got.blocks(layer)[0], expected.blocks(layer)[0]), f"layer {layer}"
        torch.testing.assert_close(got.blocks(layer)[1], expected.blocks(layer)[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.next_token_logits, expected.next_token_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", SPLITS)
def test_check_of_a_split_model_equals_the_unsplit_check(saved, tmp_path, tiny_tokenizer, how):
    """check's dense continuation decodes on a KV cache whose layers live where the model's do."""
    whole = saved[1]
    split = _load_split(saved, tmp_path, how)
    expected, got = (check(model, tiny_tokenizer, TEXT, SMALL_K, n_match=3) for model in (whole, split))
    assert got.continuation == expected.continuation and got.sparse_predictions == expected.sparse_predictions
    assert got.recall == pytest.approx(expected.recall, abs=1e-5)
    assert got.kl_next_token == pytest.approx(expected.kl_next_token, abs=1e-4)


def test_model_facts_and_memory_checks_read_offloaded_weights(saved, tmp_path, tiny_tokenizer, monkeypatch):
    whole = saved[1]
    split = _load_split(saved, tmp_path, "cpu+disk")
    assert split.get_input_embeddings().weight.device.type == "meta"
    assert input_device(split) == torch.device("cpu")
    assert execution_devices(split) == {torch.device("cpu")}
    facts = {key: value for key, value in describe_model(split).items() if key != "name"}
    assert facts == {key: value for key, value in describe_model(whole).items() if key != "name"}
    assert estimate_memory(split, 10_000, SMALL_K) == estimate_memory(whole, 10_000, SMALL_K)
    tracer_module.check_memory(split, 344, SMALL_K)
    monkeypatch.setattr(tracer_module, "available_memory", lambda: 1 << 20)
    with pytest.raises(MemoryRequestError, match="GiB but only 0.0 GiB"):
        trace(split, tiny_tokenizer, TEXT, SMALL_K)  # the CPU layers still need CPU memory


def test_load_model_auto_traces_like_the_unsplit_model(saved, tiny_tokenizer):
    folder, whole = saved
    model, tokenizer = load_model(str(folder), device="auto")
    if not torch.cuda.is_available():
        assert execution_devices(model) == {torch.device("cpu")} and input_device(model).type == "cpu"
    ids = tiny_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        dense = whole(ids).logits[0, -1]
    tr = trace(model, tokenizer, TEXT, FULL_K)
    torch.testing.assert_close(tr.next_token_logits, dense, atol=1e-4, rtol=1e-4)
    assert torch.equal(tr.token_ids, ids[0])
