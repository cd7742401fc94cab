"""check() and min_k(): recall against the oracle, and the next-token behaviour check."""

import pytest
import torch
from tiny_models import tiny_model

from sparsetrace.backend import sparse_attention
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.fidelity import check, greedy_continuation, min_coverage, min_k

IDS = torch.randint(0, 250, (300,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _independent_greedy(model, ids, n):
    """Greedy decoding with the model's own attention, one full forward per token."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq[None]).logits[0, -1:].argmax(-1)])
    return seq[len(ids):]


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_full_k_keeps_everything(name):
    model = tiny_model(name)
    report = check(model, None, input_ids=IDS, config=StreamConfig(k=30, block_size=16))
    assert report.recall == pytest.approx([1.0] * 3, abs=1e-5)
    assert report.oracle_recall == pytest.approx([1.0] * 3, abs=1e-5)
    assert report.match and report.top1_agreement == 1.0 and abs(report.kl_next_token) < 1e-5
    assert report.continuation == _independent_greedy(model, IDS, 2).tolist()
    assert report.tokens == len(IDS) + 1
    # nothing pruned beyond what sliding windows prune anyway
    assert (report.stats["sparsity"] == 0.0) == (name == "llama")


def test_oracle_bounds_recall_per_layer_and_head(llama):
    report = check(llama, None, input_ids=IDS, config=StreamConfig(k=2, block_size=16))
    for r, o in zip(report.recall, report.oracle_recall, strict=True):
        assert 0 < r <= o + 1e-6 <= 1 + 1e-6
    for heads, best in zip(report.recall_per_head, report.oracle_recall_per_head, strict=True):
        assert len(heads) == 4 and all(r <= o + 1e-6 for r, o in zip(heads, best, strict=True))
    assert all(0 < x <= 1 + 1e-9 for x in report.recall_ratio)


def test_behaviour_check_detects_a_broken_attention(llama):
    """k = 1 with no sink and no local block changes this prompt's answer; check must say so."""
    broken = StreamConfig(k=1, block_size=16, sinks=0, local=0)
    report = check(llama, None, input_ids=IDS, config=broken, n_match=2)
    extended = torch.cat([IDS, torch.tensor(report.continuation[:1])])
    with torch.no_grad(), sparse_attention(llama, broken, lambda record: None):
        sparse = llama(extended[None], use_cache=False).logits[0, -2:].argmax(-1).tolist()
    assert report.sparse_predictions == sparse
    assert sparse != report.continuation and not report.match
    assert report.kl_next_token > 0 and report.top1_agreement < 1.0


def test_min_k_passes_and_k_minus_one_fails(llama):
    config = StreamConfig(block_size=16)
    result = min_k(llama, None, input_ids=IDS, config=config)
    assert result.min_k is not None and result.min_k > 1
    assert check(llama, None, input_ids=IDS, config=config.with_k(result.min_k)).match
    assert not check(llama, None, input_ids=IDS, config=config.with_k(result.min_k - 1)).match
    assert result.passed[result.min_k] and not result.passed[result.min_k - 1]
    assert result.stats_at_min_k["k"] == result.min_k


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_greedy_continuation_matches_plain_decoding(name):
    """The cached decoding gives the tokens and logits of full forward passes (sliding layers too)."""
    model = tiny_model(name)
    extended, continuation, logits = greedy_continuation(model, IDS, 3)
    assert continuation.tolist() == _independent_greedy(model, IDS, 3).tolist()
    assert torch.equal(extended, torch.cat([IDS, continuation[:2]])) and logits.shape == (3, 260)
    with torch.no_grad():
        full = model(extended[None], use_cache=False).logits[0, -3:]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="n_match"):
        greedy_continuation(model, IDS, 0)


@pytest.mark.parametrize("run", [check, min_k])
def test_an_input_whose_continuation_would_pass_the_context_is_refused_before_any_pass(llama, run, monkeypatch):
    ids = torch.randint(0, 250, (1024,), generator=torch.Generator().manual_seed(1))  # the context: 1,024
    monkeypatch.setattr(llama, "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(InputError, match=r"up to 1 more positions: 1,025.*1,023 tokens or fewer"):
        run(llama, None, input_ids=ids, config=StreamConfig(block_size=64))
    with pytest.raises(InputError, match="n_match=0"):
        run(llama, None, input_ids=ids[:100], config=StreamConfig(block_size=64), n_match=0)


def test_min_coverage_passes_and_the_target_below_fails(llama):
    grid = (0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 1.0)
    result = min_coverage(llama, None, input_ids=IDS, config=StreamConfig(block_size=16, sinks=0, local=0),
                          n_match=2, grid=grid)
    assert result.k_max == 19, "rows may keep every key block, so p = 1 is dense attention"
    assert result.passed[1.0] is True and result.min_coverage is not None
    assert result.passed[result.min_coverage] is True
    position = grid.index(result.min_coverage)
    if position:
        assert result.passed[grid[position - 1]] is False
    assert result.trace.config.coverage == result.min_coverage
    assert result.trace.stats()["kept_per_row_mean"] == result.stats_at_min_coverage["kept_per_row_mean"]


def test_coverage_check_measures_the_oracle_of_each_rows_own_count(llama):
    config = StreamConfig(block_size=16, coverage=0.6, k_max=6)
    report = check(llama, None, input_ids=IDS, config=config)
    for r, o in zip(report.recall, report.oracle_recall, strict=True):
        assert 0 < r <= o + 1e-6 <= 1 + 1e-6
    fixed = check(llama, None, input_ids=IDS, config=StreamConfig(k=6, block_size=16))
    assert sum(report.oracle_recall) < sum(fixed.oracle_recall), "fewer blocks a row: a smaller oracle"
