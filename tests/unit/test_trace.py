"""`Trace`: round trip, stats against brute force, atomic save, and every way a file can be bad."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import pickle
import random
from pathlib import Path

import hypothesis.strategies as st
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from tiny_models import tiny_model

from sparsetrace import InputError, StreamConfig, TraceFileError
from sparsetrace.trace import PRE_SEARCH_CONFIG, VERSION, InvalidTraceError, Trace, load_trace
from sparsetrace.tracer import trace as run_trace

# Written by sparsetrace at commit 2f59503, before `StreamConfig.search` existed (tests/data/README.md).
TRACE_BEFORE_SEARCH = Path(__file__).parents[1] / "data" / "trace_v1_before_search.sptrace"

FIXES = ("sparsetrace trace", "newer sparsetrace", ".sptrace", "Trace.save")
STATS_KEYS = {
    "tokens", "layers", "heads", "block_q", "block_k", "k", "kept_blocks", "selected_blocks", "forced_blocks",
    "sparsity", "sparsity_selected_only", "block_sparsity", "compression", "trace_bytes",
    "dense_pattern_bytes", "dense_to_trace_ratio", "kept_per_row_mean", "kept_per_row_max",
}


def last_block(i: int, tokens: int, block_q: int, block_k: int) -> int:
    return (min((i + 1) * block_q, tokens) - 1) // block_k


def make_trace(
    tokens: int = 37, block_q: int = 8, block_k: int = 5, k: int = 2, sinks: int = 1, local: int = 1,
    heads: int = 2, windows: tuple[int | None, ...] = (None, 12), seed: int = 0, logits: bool = True,
) -> tuple[Trace, list[torch.Tensor]]:
    """A valid random trace, and per layer bool [H, n_q, K]: which entries the helper forced."""
    rng = random.Random(seed)
    config = StreamConfig(k=k, block_q=block_q, block_k=block_k, sinks=sinks, local=local)
    n_q, width = math.ceil(tokens / block_q), sinks + k + local
    indices, masses, forced = [], [], []
    for _ in windows:
        idx = torch.full((heads, n_q, width), -1, dtype=torch.int32)
        mass = torch.zeros(heads, n_q, width)
        is_forced = torch.zeros(heads, n_q, width, dtype=torch.bool)
        for h in range(heads):
            for i in range(n_q):
                last = last_block(i, tokens, block_q, block_k)
                must = {j for j in range(sinks) if j <= last}
                must |= {j for j in range(last - local + 1, last + 1) if j >= 0}
                free = [j for j in range(last + 1) if j not in must]
                row = sorted(must | set(rng.sample(free, min(k, len(free), rng.randint(0, k)))))
                weights = torch.rand(len(row), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                idx[h, i, : len(row)] = torch.tensor(row, dtype=torch.int32)
                mass[h, i, : len(row)] = weights / weights.sum()
                is_forced[h, i, : len(row)] = torch.tensor([j in must for j in row])
        indices.append(idx)
        masses.append(mass)
        forced.append(is_forced)
    model_info = {
        "name": "tiny", "architecture": "TinyForCausalLM", "num_layers": len(windows), "num_heads": heads,
        "num_kv_heads": 1, "head_dim": 8, "sliding_windows": list(windows), "revision": None,
        "dtype": "float32",
    }
    trace = Trace(
        token_ids=torch.randint(0, 100, (tokens,), generator=torch.Generator().manual_seed(seed)),
        config=config, indices=indices, mass=masses, model_info=model_info,
        next_token_logits=torch.randn(50, generator=torch.Generator().manual_seed(seed)) if logits else None,
        extra={"forward": "sparse", "seconds": 1.5},
    )
    return trace, forced


def brute_pairs(trace: Trace, only_selected: bool) -> int:
    """Kept causal (in-window) token pairs, from a dense T x T mask per layer and head."""
    tokens, c = trace.num_tokens, trace.config
    t, s = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    total = 0
    for layer in range(trace.num_layers):
        window = trace.model_info["sliding_windows"][layer]
        allowed = (s <= t) & ((s > t - window) if window is not None else True)
        idx, _ = trace.blocks(layer)
        for h in range(trace.num_heads):
            kept = torch.zeros(tokens, tokens, dtype=torch.bool)
            for i in range(trace.num_query_blocks):
                last = last_block(i, tokens, c.block_q, c.block_k)
                for j in idx[h, i].tolist():
                    if j >= 0 and not (only_selected and (j < c.sinks or j > last - c.local)):
                        kept[i * c.block_q : (i + 1) * c.block_q, j * c.block_k : (j + 1) * c.block_k] = True
            total += int((kept & allowed).sum())
    return total


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The documented checksum, written out independently of the module."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_raw(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata())


def metadata_checksum(metadata) -> str:
    """The header's checksum as the format defines it: every other entry, key and value, sorted by key."""
    digest = hashlib.sha256()
    for key in sorted(set(metadata) - {"metadata_sha256"}):
        digest.update(key.encode() + b"\0" + metadata[key].encode() + b"\0")
    return digest.hexdigest()


def write_raw(path, tensors, metadata, fix_checksum: bool = True) -> None:
    if fix_checksum:
        metadata = metadata | {"sha256": checksum(tensors)}
        if "metadata_sha256" in metadata:
            metadata["metadata_sha256"] = metadata_checksum(metadata)
    tensors = {name: x.contiguous() for name, x in tensors.items()}
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def assert_good_error(error: TraceFileError, path, fragment: str) -> None:
    message = str(error)
    assert str(path) in message, message
    assert fragment in message, message
    assert "\n" not in message, message
    assert any(fix in message for fix in FIXES), message


# --- round trip and accessors -------------------------------------------------------------------


@pytest.mark.parametrize("logits", [True, False])
def test_round_trip_keeps_everything(tmp_path, logits):
    trace, _ = make_trace(logits=logits)
    path = trace.save(tmp_path / "run.sptrace")
    assert path == tmp_path / "run.sptrace"
    loaded = load_trace(path)
    assert loaded.config == trace.config
    assert loaded.model_info == trace.model_info
    assert loaded.extra == trace.extra == {"forward": "sparse", "seconds": 1.5}
    assert loaded.token_ids.dtype == trace.token_ids.dtype == torch.int64
    assert torch.equal(loaded.token_ids, trace.token_ids)
    for layer in range(trace.num_layers):
        for a, b in zip(loaded.blocks(layer), trace.blocks(layer), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    if logits:
        assert torch.equal(loaded.next_token_logits, trace.next_token_logits)
    else:
        assert loaded.next_token_logits is None
    assert loaded.stats() == trace.stats()
    assert repr(loaded) == repr(trace) == "Trace(tokens=37, layers=2, heads=2, k=2, block=8/5)"


def test_header_keys(tmp_path):
    trace, _ = make_trace()
    tensors, metadata = read_raw(trace.save(tmp_path / "run.sptrace"))
    assert set(metadata) == {
        "format", "format_version", "config", "model", "extra", "created_with", "created", "sha256", "metadata_sha256"
    }
    assert metadata["format"] == "sparsetrace" and metadata["format_version"] == "2"
    assert metadata["created_with"] == f"sparsetrace {VERSION}" and VERSION == importlib.metadata.version("sparsetrace")
    assert json.loads(metadata["config"]) == trace.config.to_dict()
    assert json.loads(metadata["model"]) == trace.model_info
    assert metadata["sha256"] == checksum(tensors)
    assert metadata["metadata_sha256"] == metadata_checksum(metadata)
    assert tensors["token_ids"].dtype == torch.int32
    assert set(tensors) == {"token_ids", "next_token_logits", "layers.0.indices", "layers.0.mass",
                            "layers.1.indices", "layers.1.mass"}


def test_a_file_from_before_search_loads_with_the_search_it_ran(tiny_tokenizer):
    """Its config has no "search"; the loader names the halving search, which reproduces its blocks, and
    today's default ("auto") would not."""
    _, metadata = read_raw(TRACE_BEFORE_SEARCH)
    assert "search" not in json.loads(metadata["config"]) and metadata["created_with"] == "sparsetrace 0.1.0"
    old = load_trace(TRACE_BEFORE_SEARCH)
    assert old.config == StreamConfig(k=2, block_size=8, **PRE_SEARCH_CONFIG) and old.config.search == "hierarchical"
    assert (old.num_tokens, old.num_layers, old.num_heads) == (93, 3, 4)
    assert metadata["format_version"] == "1" and old.coverage(0) is None, "a version 1 file has no coverage"
    model = tiny_model("llama")  # the model that wrote it
    again = run_trace(model, tiny_tokenizer, input_ids=old.token_ids, config=old.config)
    default = run_trace(model, tiny_tokenizer, input_ids=old.token_ids,
                        config=dataclasses.replace(old.config, search=StreamConfig().search))
    kept = [old.blocks(layer)[0] for layer in range(old.num_layers)]
    assert all(torch.equal(again.blocks(layer)[0], kept[layer]) for layer in range(old.num_layers))
    assert not all(torch.equal(default.blocks(layer)[0], kept[layer]) for layer in range(old.num_layers))


@pytest.fixture
def coverage_trace(tiny_tokenizer):
    text = "The needle is 7421. The haystack goes on and on; the answer, asked at the end, is the needle. " * 3
    return run_trace(tiny_model("llama"), tiny_tokenizer, text, StreamConfig(block_size=8, coverage=0.8, k_max=4))


def test_coverage_round_trips_and_shows_in_stats(coverage_trace, tmp_path):
    path = coverage_trace.save(tmp_path / "c.sptrace")
    tensors, metadata = read_raw(path)
    assert metadata["format_version"] == "2" and "layers.0.coverage" in tensors
    loaded = load_trace(path)
    for layer in range(loaded.num_layers):
        assert torch.equal(loaded.coverage(layer), coverage_trace.coverage(layer))
        assert loaded.coverage(layer).shape == (loaded.num_heads, loaded.num_query_blocks)
    stats = loaded.stats()
    counts = torch.stack([loaded.kept_counts(layer) for layer in range(loaded.num_layers)])
    assert stats["kept_per_row_mean"] == pytest.approx(float(counts.float().mean()))
    assert stats["kept_per_row_max"] == int(counts.max()) <= 1 + 4 + 1
    estimated = torch.stack([loaded.coverage(layer) for layer in range(loaded.num_layers)])
    assert stats["coverage_mean"] == pytest.approx(float(estimated.mean()))
    assert stats["rows_short_of_coverage"] == pytest.approx(float((estimated < 0.8 - 1e-6).float().mean()))


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda t, m: t.pop("layers.1.coverage"), "missing tensors ['layers.1.coverage']"),
    (lambda t, m: t.update({"layers.0.coverage": t["layers.0.coverage"] + 2}), "coverage must lie in [0, 1]"),
    (lambda t, m: t.update({"layers.0.coverage": t["layers.0.coverage"][:, :-1]}), "coverage must be float32"),
    (lambda t, m: m.update(config=json.dumps(json.loads(m["config"]) | {"coverage": None, "k_min": None, "k": 4,
                                                                         "k_max": None})), "coverage=None"),
])
def test_broken_coverage_is_refused(coverage_trace, tmp_path, edit, fragment):
    path = coverage_trace.save(tmp_path / "c.sptrace")
    tensors, metadata = read_raw(path)
    edit(tensors, metadata)
    write_raw(path, tensors, metadata)
    with pytest.raises(TraceFileError) as error:
        load_trace(path)
    assert fragment in str(error.value)


def test_accessors_and_bad_layer():
    trace, _ = make_trace(tokens=37, block_q=8, block_k=5)
    assert (trace.num_layers, trace.num_heads, trace.num_tokens) == (2, 2, 37)
    assert (trace.num_query_blocks, trace.num_key_blocks) == (5, 8)
    for bad in (2, -1, True):
        with pytest.raises(IndexError, match=r"0\.\.1"):
            trace.blocks(bad)


def test_trace_owns_copies_of_its_tensors():
    trace, _ = make_trace()
    idx, _ = trace.blocks(0)
    source = idx.clone()
    rebuilt = Trace(token_ids=trace.token_ids, config=trace.config, indices=[source, trace.blocks(1)[0]],
                    mass=[trace.blocks(0)[1], trace.blocks(1)[1]], model_info=trace.model_info)
    source.fill_(-7)
    assert torch.equal(rebuilt.blocks(0)[0], idx)


def test_construction_errors_are_value_errors():
    trace, _ = make_trace()
    idx, mass = trace.blocks(0)
    args = dict(token_ids=trace.token_ids, config=trace.config, model_info=trace.model_info)
    with pytest.raises(InvalidTraceError, match="summing past 1"):
        Trace(**args, indices=[idx, idx], mass=[mass * 2, mass])
    with pytest.raises(ValueError, match="indices must be int32"):
        Trace(**args, indices=[idx.long(), idx], mass=[mass, mass])
    with pytest.raises(ValueError, match="model_info lacks"):
        Trace(**args | {"model_info": {"name": "x"}}, indices=[idx, idx], mass=[mass, mass])
    with pytest.raises(ValueError, match="JSON"):
        Trace(**args, indices=[idx, idx], mass=[mass, mass], extra={"when": object()})


# --- stats and forced blocks --------------------------------------------------------------------

GEOMETRIES = [  # tokens, block_q, block_k, k, sinks, local, windows
    (37, 8, 5, 2, 1, 1, (None, 12)),
    (64, 16, 16, 3, 1, 1, (None, 20)),
    (50, 4, 8, 2, 0, 2, (7, None, 1)),
    (33, 5, 3, 4, 2, 0, (None, 4)),
    (1, 4, 4, 1, 1, 1, (None,)),
    (29, 7, 7, 1, 0, 0, (3,)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_stats_match_brute_force(geometry, seed):
    tokens, block_q, block_k, k, sinks, local, windows = geometry
    trace, forced = make_trace(tokens, block_q, block_k, k, sinks, local, heads=3, windows=windows, seed=seed)
    stats = trace.stats()
    assert set(stats) == STATS_KEYS
    layers, heads = len(windows), 3
    kept = sum(int((trace.blocks(layer)[0] >= 0).sum()) for layer in range(layers))
    n_forced = sum(int(f.sum()) for f in forced)
    triangle = layers * heads * tokens * (tokens + 1) / 2
    n_q, n_k = math.ceil(tokens / block_q), math.ceil(tokens / block_k)
    trace_bytes = layers * heads * n_q * (sinks + k + local) * 8
    assert stats["tokens"] == tokens and stats["layers"] == layers and stats["heads"] == heads
    assert (stats["block_q"], stats["block_k"], stats["k"]) == (block_q, block_k, k)
    assert (stats["kept_blocks"], stats["forced_blocks"]) == (kept, n_forced)
    assert stats["selected_blocks"] == kept - n_forced
    assert stats["sparsity"] == pytest.approx(1 - brute_pairs(trace, False) / triangle)
    assert stats["sparsity_selected_only"] == pytest.approx(1 - brute_pairs(trace, True) / triangle)
    assert stats["block_sparsity"] == pytest.approx(1 - kept / (layers * heads * n_q * n_k))
    assert stats["compression"] == pytest.approx(layers * heads * tokens**2 / kept)
    assert stats["trace_bytes"] == trace_bytes
    assert stats["dense_pattern_bytes"] == layers * heads * tokens**2 * 2
    assert stats["dense_to_trace_ratio"] == pytest.approx(layers * heads * tokens**2 * 2 / trace_bytes)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_forced_mask_matches_how_the_blocks_were_made(geometry):
    tokens, block_q, block_k, k, sinks, local, windows = geometry
    trace, forced = make_trace(tokens, block_q, block_k, k, sinks, local, windows=windows, seed=3)
    for layer in range(trace.num_layers):
        assert torch.equal(trace.forced_mask(layer), forced[layer])


@pytest.mark.parametrize("window", [None, 100, 1])
def test_all_causal_blocks_kept_gives_closed_form_pairs(window):
    """Long T (no brute force): keeping every causal block computes exactly the (windowed) triangle."""
    tokens, block = 3001, 64
    n_q = math.ceil(tokens / block)
    config = StreamConfig(k=n_q, block_size=block, sinks=0, local=0)
    row = torch.arange(n_q, dtype=torch.int32)
    idx = torch.where(row[None, :] <= row[:, None], row[None, :], -1)[None]
    mass = torch.where(idx >= 0, 1.0 / (torch.arange(n_q)[None, :, None] + 1), 0.0)
    info = {"name": "t", "architecture": "T", "num_layers": 1, "num_heads": 1, "num_kv_heads": 1,
            "head_dim": 4, "sliding_windows": [window]}
    trace = Trace(token_ids=torch.zeros(tokens, dtype=torch.int64), config=config, indices=[idx],
                  mass=[mass.float()], model_info=info)
    expected = sum(min(t + 1, window or tokens) for t in range(tokens))
    assert trace.stats()["sparsity"] == pytest.approx(1 - expected / (tokens * (tokens + 1) / 2), abs=1e-12)


# --- saving -------------------------------------------------------------------------------------


def test_save_into_missing_folder_is_refused(tmp_path):
    trace, _ = make_trace()
    with pytest.raises(InputError, match="create it first or choose another path"):
        trace.save(tmp_path / "missing" / "run.sptrace")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("failing", ["replace", "fsync", "interrupt"])
def test_save_is_atomic(tmp_path, monkeypatch, existing, failing):
    target = tmp_path / "run.sptrace"
    if existing:
        make_trace(seed=1)[0].save(target)
    before = target.read_bytes() if existing else None
    trace, _ = make_trace(seed=2)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt if failing == "interrupt" else OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace" if failing == "replace" else "fsync", fail)
    with pytest.raises(KeyboardInterrupt if failing == "interrupt" else InputError):
        trace.save(target)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == (["run.sptrace"] if existing else [])
    if existing:
        assert target.read_bytes() == before


def test_save_gives_the_usual_file_mode(tmp_path):
    path = make_trace()[0].save(tmp_path / "run.sptrace")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# --- loading bad files --------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A valid trace file and its raw tensors and metadata, for building broken variants."""
    path = make_trace()[0].save(tmp_path / "good.sptrace")
    tensors, metadata = read_raw(path)
    return path, tensors, metadata


def test_load_not_a_file(tmp_path):
    with pytest.raises(TraceFileError) as error:
        load_trace(tmp_path / "absent.sptrace")
    assert_good_error(error.value, tmp_path / "absent.sptrace", "no such file")
    with pytest.raises(TraceFileError) as error:
        load_trace(tmp_path)
    assert_good_error(error.value, tmp_path, "is a folder")


@pytest.mark.parametrize("content", [
    b"",
    b"\x00" * 3,
    os.urandom(200),
    json.dumps({"format": "sparsetrace", "config": {}}).encode(),
    b"\xff" * 8 + b"{}",
    (24).to_bytes(8, "little") + b'{"a": [1, 2, 3]}' + b" " * 8,
])
def test_load_unparseable(tmp_path, content):
    path = tmp_path / "bad.sptrace"
    path.write_bytes(content)
    with pytest.raises(TraceFileError) as error:
        load_trace(path)
    assert_good_error(error.value, path, "not a readable safetensors file")


def test_load_truncated(saved):
    path, *_ = saved
    data = path.read_bytes()
    for length in (7, 8, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:length])
        with pytest.raises(TraceFileError) as error:
            load_trace(path)
        assert_good_error(error.value, path, "not a readable safetensors file")


def test_load_uses_no_pickle(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_trace(saved[0]).num_layers == 2


def _set(tensors, name, fn):
    tensors[name] = fn(tensors[name].clone())


def _edit(name, fn):
    return lambda t, m: _set(t, name, fn)


def _put(row, values):
    def edit(x):
        x[0, row, : len(values)] = torch.tensor(values, dtype=x.dtype)
        return x
    return edit


def _config(**changes):
    return lambda t, m: m.update(config=json.dumps(json.loads(m["config"]) | changes))


BROKEN = {  # what to change -> (edit of tensors t and metadata m, fragment of the message)
    "no format key": (lambda t, m: m.pop("format"), "no 'format' key"),
    "foreign format": (lambda t, m: m.update(format="pt"), "has format 'pt'"),
    "newer version": (lambda t, m: m.update(format_version="3"), "newer sparsetrace"),
    "no version": (lambda t, m: m.pop("format_version"), "version None"),
    "no checksum": (lambda t, m: m.pop("sha256"), "no checksum"),
    "missing tensor": (lambda t, m: t.pop("layers.1.mass"), "missing tensors ['layers.1.mass']"),
    "missing token ids": (lambda t, m: t.pop("token_ids"), "missing tensors ['token_ids']"),
    "extra tensor": (lambda t, m: t.update({"layers.0.scores": torch.zeros(2)}), "unexpected tensors"),
    "layer gap": (lambda t, m: t.update({"layers.2.indices": t.pop("layers.1.indices"),
                                         "layers.2.mass": t.pop("layers.1.mass")}), "numbered [0, 2]"),
    "indices int64": (_edit("layers.0.indices", lambda x: x.long()), "indices must be int32"),
    "indices shape": (_edit("layers.1.indices", lambda x: x[:, :-1]), "indices must be int32"),
    "mass float64": (_edit("layers.0.mass", lambda x: x.double()), "mass must be float32"),
    "mass shape": (_edit("layers.0.mass", lambda x: x[:1]), "mass must be float32"),
    "token ids float": (_edit("token_ids", lambda x: x.float()), "token_ids"),
    "token ids negative": (_edit("token_ids", lambda x: x - 1000), "token_ids"),
    "index after last causal block": (_edit("layers.0.indices", _put(1, [0, 5])), "after its last causal"),
    "index below -1": (_edit("layers.0.indices", _put(1, [-2])), "below -1"),
    "padding in the middle": (_edit("layers.0.indices", _put(4, [0, -1, 3])), "padding before a kept block"),
    "duplicate index": (_edit("layers.0.indices", _put(4, [0, 3, 3])), "not strictly ascending"),
    "unsorted indices": (_edit("layers.0.indices", _put(4, [0, 3, 2])), "not strictly ascending"),
    "NaN mass": (_edit("layers.1.mass", _put(2, [float("nan")])), "NaN"),
    "infinite mass": (_edit("layers.1.mass", _put(2, [float("inf")])), "infinite"),
    "negative mass": (_edit("layers.1.mass", _put(2, [-0.5])), "negative mass"),
    "mass too large": (_edit("layers.1.mass", _put(2, [1.5])), "summing past 1"),
    "mass on padding": (_edit("layers.1.mass", _put(0, [0.5, 0.2, 0.1, 0.1])), "mass on -1 padding"),
    "logits NaN": (_edit("next_token_logits", lambda x: x.fill_(float("nan"))), "next_token_logits"),
    "logits 2-D": (_edit("next_token_logits", lambda x: x[None]), "next_token_logits"),
    "config invalid": (_config(k=0), "k=0"),
    "config unknown field": (_config(kk=1), "unknown StreamConfig field"),
    "config disagrees with shapes": (_config(k=3, beam=3), "indices must be int32"),
    "config not JSON": (lambda t, m: m.update(config="{k: 8"), "not valid JSON"),
    "config not an object": (lambda t, m: m.update(config="[8]"), "must be a JSON object"),
    "config missing": (lambda t, m: m.pop("config"), "'config' is missing"),
    "model lacks a key": (lambda t, m: m.update(model=json.dumps({"name": "x"})), "model_info lacks"),
    "model disagrees": (lambda t, m: m.update(model=json.dumps(json.loads(m["model"]) | {"num_heads": 3})),
                        "model_info says"),
    "windows wrong length": (lambda t, m: m.update(model=json.dumps(json.loads(m["model"])
                                                                    | {"sliding_windows": [None]})),
                             "sliding_windows"),
    "model huge number": (lambda t, m: m.update(model=m["model"].replace(": 8,", ": 9e99999,")),
                          "JSON-serialisable"),
    "extra not JSON": (lambda t, m: m.update(extra="nope"), "not valid JSON"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_load_broken_trace(saved, case):
    path, tensors, metadata = saved
    edit, fragment = BROKEN[case]
    edit(tensors, metadata)
    write_raw(path, tensors, metadata, fix_checksum="sha256" in metadata)
    with pytest.raises(TraceFileError) as error:
        load_trace(path)
    assert_good_error(error.value, path, fragment)


def test_load_checksum_mismatch(saved):
    path, tensors, metadata = saved
    tensors["layers.1.mass"][0, 0, 0] += 0.25  # still valid data: only the checksum can tell
    write_raw(path, tensors, metadata, fix_checksum=False)
    with pytest.raises(TraceFileError) as error:
        load_trace(path)
    assert_good_error(error.value, path, "checksum mismatch")


def test_load_plain_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3)}, path)
    with pytest.raises(TraceFileError) as error:
        load_trace(path)
    assert_good_error(error.value, path, "not a sparsetrace trace")


# --- fuzzing ------------------------------------------------------------------------------------

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def fuzz_file(tmp_path):
    trace, _ = make_trace(tokens=12, block_q=4, block_k=4, k=1, heads=1, windows=(None, 5))
    path = trace.save(tmp_path / "fuzz.sptrace")
    return path, path.read_bytes()


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, bits in flips:
        out[position % len(out)] ^= bits
    return bytes(out)


@FUZZ
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_fuzz_truncation_always_raises(fuzz_file, fraction):
    path, data = fuzz_file
    path.write_bytes(data[: int(fraction * len(data))])
    with pytest.raises(TraceFileError):
        load_trace(path)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_byte_flips_load_or_raise_trace_file_error(fuzz_file, flips):
    path, data = fuzz_file
    path.write_bytes(_flip(data, flips))
    try:
        trace = load_trace(path)
    except TraceFileError as error:
        assert "\n" not in str(error) and str(path) in str(error)
    else:  # the flips hit metadata that stays valid (a date, a name): the data must be intact
        assert trace.num_tokens == 12 and trace.num_layers == 2


@FUZZ
@given(position=st.integers(0, 2**16), bits=st.integers(1, 255))
def test_fuzz_flip_in_tensor_data_is_caught_by_checksum(fuzz_file, position, bits):
    path, data = fuzz_file
    start = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(_flip(data, [(start + position % (len(data) - start), bits)]))
    with pytest.raises(TraceFileError, match="checksum mismatch"):
        load_trace(path)
