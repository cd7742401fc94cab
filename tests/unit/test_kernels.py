"""The execution paths of `sparsetrace.kernels` against the eager reference and plain dense attention.

Compiling is slow on a small CPU: tiny shapes, and the compiled functions are built once per
process (`kernels.compiled_version`) and shared by every test here.
"""

import pytest
import torch
from reference import dense_attention
from tiny_models import tiny_model
from torch._dynamo.utils import counters

from sparsetrace import tracer as tracer_module
from sparsetrace.block_attention import block_sparse_attention, flex_block_attention
from sparsetrace.cli import build_parser, main
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.kernels import KERNELS, choose_kernel
from sparsetrace.stream import select_blocks
from sparsetrace.tracer import trace

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def qkv(tokens: int, seed: int = 0):
    """q [1, 4, T, 16], k and v [1, 2, T, 16]: grouped-query attention."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, tokens, 16, generator=gen), *(torch.randn(1, 2, tokens, 16, generator=gen)
                                                           for _ in range(2))


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("search,window,softcap", [("hierarchical", None, None), ("exhaustive", 40, 5.0)])
def test_compile_equals_eager_and_a_new_length_compiles_nothing(search, window, softcap):
    cfg = StreamConfig(k=2, block_size=16, search=search)
    blocks = dict(block_q=16, block_k=16, sliding_window=window, softcap=softcap)
    for tokens in (150, 203):  # partial last blocks both; the second length must reuse the compiled code
        q, k, v = qkv(tokens)
        graphs = compiled_graphs()
        eager = select_blocks(q, k, cfg, sliding_window=window)
        compiled = select_blocks(q, k, cfg, sliding_window=window, compiled=True)
        assert torch.equal(compiled.indices, eager.indices)
        torch.testing.assert_close(compiled.scores, eager.scores, equal_nan=True)
        out, mass = block_sparse_attention(q, k, v, eager.indices, **blocks)
        out_c, mass_c = block_sparse_attention(q, k, v, eager.indices, **blocks, compiled=True)
        torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass_c, mass, atol=1e-5, rtol=1e-5)
        if tokens == 203:
            assert compiled_graphs() == graphs, "a new sequence length recompiled"


@pytest.mark.parametrize("window,softcap", [(None, None), (40, 5.0)])
def test_flex_equals_eager_and_with_full_k_plain_dense_attention(window, softcap):
    q, k, v = qkv(150, seed=1)
    blocks = dict(block_q=16, block_k=16, sliding_window=window, softcap=softcap)
    indices = select_blocks(q, k, StreamConfig(k=2, block_size=16), sliding_window=window).indices
    out, mass = block_sparse_attention(q, k, v, indices, **blocks)
    out_f, mass_f = flex_block_attention(q, k, v, indices, **blocks)
    torch.testing.assert_close(out_f, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass_f, mass)
    every = select_blocks(q, k, StreamConfig(k=10, block_size=16), sliding_window=window).indices
    out_f, mass_f = flex_block_attention(q, k, v, every, **blocks)
    dense, _ = dense_attention(q, k, v, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out_f.double(), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass_f.sum(-1), torch.ones_like(mass_f[..., 0]))


@pytest.mark.parametrize("kernel", ["compile", "flex"])
def test_a_model_traced_on_a_fast_path_gives_the_eager_trace(kernel, tiny_tokenizer):
    model = tiny_model("gemma2")  # sliding-window and global layers, softcap, grouped-query heads
    text = "Sparse traces keep the blocks that matter. " * 4  # 172 tokens, several windows
    config = StreamConfig(k=2, block_size=16)
    eager = trace(model, tiny_tokenizer, text, config, kernel="eager")
    fast = trace(model, tiny_tokenizer, text, config, kernel=kernel)
    for layer in range(eager.num_layers):
        (indices, mass), (indices_e, mass_e) = fast.blocks(layer), eager.blocks(layer)
        assert torch.equal(indices, indices_e)
        torch.testing.assert_close(mass, mass_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.next_token_logits, eager.next_token_logits, atol=1e-4, rtol=1e-4)


def test_auto_picks_by_device_and_flex_falls_back_where_it_cannot_serve():
    assert choose_kernel("auto", CPU) == "eager"
    assert choose_kernel("auto", CUDA) == "flex"
    assert choose_kernel("auto", CUDA, probabilities=True) == "eager"
    assert choose_kernel("flex", CPU, probabilities=True) == "eager"
    assert choose_kernel("compile", CPU, probabilities=True) == "compile"  # the hook runs between compiled chunks
    with pytest.raises(InputError, match="use one of auto, eager, compile, flex"):
        choose_kernel("fast", CPU)


def test_a_bad_kernel_is_refused_before_the_forward_pass(tiny_tokenizer):
    with pytest.raises(InputError, match="kernel='fast'; use one of auto, eager, compile, flex"):
        trace(tiny_model("llama"), tiny_tokenizer, "some text", kernel="fast")


@pytest.mark.parametrize("command", [["trace", "--sample", "-o", "x.sptrace"], ["check", "--sample"],
                                     ["min-k", "--sample"], ["niah", "-o", "d"], ["sweep", "-o", "d"],
                                     ["anchors", "--sample", "-o", "d"], ["demo"]])
def test_every_tracing_command_takes_kernel_and_no_compile(command):
    parser = build_parser()
    assert parser.parse_args(command).kernel == "auto"
    assert parser.parse_args([*command, "--no-compile"]).kernel == "eager"
    for kernel in KERNELS:
        assert parser.parse_args([*command, "--kernel", kernel]).kernel == kernel
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--kernel", "compile", "--no-compile"])


@pytest.mark.parametrize("flags,kernel", [([], "auto"), (["--no-compile"], "eager"), (["--kernel", "flex"], "flex")])
def test_the_kernel_flags_reach_the_tracer(flags, kernel, tmp_path, model_folder, monkeypatch):
    text = tmp_path / "input.txt"
    text.write_text("The keeper lit the lamp at dusk. " * 4)
    seen = []

    def run_trace(*args, **kwargs):
        seen.append(kwargs["kernel"])
        raise InputError("stop here")

    monkeypatch.setattr(tracer_module, "run_trace", run_trace)
    assert main(["trace", str(text), "-o", str(tmp_path / "t.sptrace"), "--model", model_folder, *flags]) == 2
    assert seen == [kernel]
