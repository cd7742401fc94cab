"""Issue #21, "nothing refused late, nothing lost silently": bad requests are refused before any work
(exit 2, one line, nothing written), what goes ahead differently from how it was asked says so in one
line, and a signal leaves no temporary file behind (exit 130 / 143)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from tiny_models import tiny_model

from sparsetrace import models
from sparsetrace.cli import main
from sparsetrace.config import StreamConfig
from sparsetrace.errors import SparsetraceError, SparsetraceWarning, TraceFileError
from sparsetrace.selection import fit_to_input, kept_width
from sparsetrace.trace import load_trace
from sparsetrace.tracer import estimate_memory, trace

TEXT = "The keeper lit the lamp at dusk. The lamp burned until dawn. " * 2  # 122 byte tokens
BLOCK = 16  # 8 key blocks: sinks 1 + local 1 leave a row at most 6 to select


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return str(path)


def run(capsys, *argv):
    capsys.readouterr()  # what fixtures printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The one line sparsetrace wrote (transformers' own weight-loading bars aside)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("sparsetrace: ") and "Traceback" not in err, err
    return lines[0]


def written(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


# --- k above the blocks that exist --------------------------------------------------------------

def test_k_beyond_the_blocks_is_clamped_said_once_and_recorded(capsys, tmp_path, text_file, model_folder):
    out = tmp_path / "k.sptrace"
    code, _, err = run(capsys, "trace", text_file, "-o", out, "--model", model_folder, "--k", "100000",
                       "--block-size", BLOCK, "--no-progress")
    assert code == 0, err
    note = one_line(err)
    assert note.startswith("sparsetrace: note: k=100,000 is more than the 6 key blocks") and "k=6" in note
    saved = load_trace(out)
    assert saved.config.k == 6 and saved.blocks(0)[0].shape[-1] == 1 + 6 + 1, "the width actually used"


def test_clamped_k_selects_every_block_and_equals_dense_attention(tiny_tokenizer):
    model = tiny_model("llama")
    config = StreamConfig(k=100000, block_size=BLOCK)
    with pytest.warns(SparsetraceWarning, match="k=100,000 is more than"):
        huge = trace(model, tiny_tokenizer, TEXT, config)
    exact = trace(model, tiny_tokenizer, TEXT, fit_to_input(len(TEXT), config))
    assert huge.config == exact.config == fit_to_input(len(TEXT), config)
    for layer in range(huge.num_layers):
        indices = huge.blocks(layer)[0]
        assert torch.equal(indices, exact.blocks(layer)[0])
        kept = (indices >= 0).sum(-1)
        assert torch.equal(kept, torch.arange(1, huge.num_query_blocks + 1).expand_as(kept)), "every causal block"
    with torch.no_grad():
        dense = model(tiny_tokenizer(TEXT, return_tensors="pt").input_ids).logits[0, -1]
    torch.testing.assert_close(huge.next_token_logits, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("partition", ["row", "global"])
def test_fit_to_input_keeps_the_selection_and_bounds_the_width(partition):
    config = StreamConfig(k=500, block_size=BLOCK, partition=partition, coverage=0.9, k_max=900)
    fitted = fit_to_input(len(TEXT), config)
    cap = 8 - 1 - (1 if partition == "row" else 0)
    assert (fitted.k, fitted.k_max, fitted.beam) == (cap, cap, 2 * cap) and fitted.k_min == 1
    assert fit_to_input(len(TEXT), fitted) == fitted and fit_to_input(10**6, config) == config
    model = tiny_model("llama")
    assert estimate_memory(model, len(TEXT), config) == estimate_memory(model, len(TEXT), fitted)
    assert kept_width(len(TEXT), fitted) == 1 + cap + 1


# --- blocks longer than the text; padding in the memory estimate ------------------------------

def test_block_longer_than_the_text_is_refused_before_the_model_runs(capsys, tmp_path, text_file, model_folder):
    before = written(tmp_path)
    code, _, err = run(capsys, "trace", text_file, "-o", tmp_path / "b.sptrace", "--model", model_folder,
                       "--block-size", "100000")
    assert code == 2 and "block_q=100,000 tokens is longer than the 122-token input" in one_line(err)
    assert "--block-size" in err and written(tmp_path) == before


def test_default_blocks_still_trace_a_short_text(tiny_tokenizer):
    result = trace(tiny_model("llama"), tiny_tokenizer, "Hello there.", StreamConfig())
    assert result.num_query_blocks == 1 and result.config.block_q == 64


def test_memory_estimate_counts_padding_and_the_block_buffers():
    model = tiny_model("llama")
    heads = 4
    small = estimate_memory(model, 4096, StreamConfig(k=2, block_size=64))
    whole = estimate_memory(model, 4096, StreamConfig(k=2, block_size=4096))
    assert whole - small >= heads * 4096 * 4096 * 4, "one query block's scores over a 4096-token key block"
    padded = estimate_memory(model, 4097, StreamConfig(k=2, block_size=4096))
    assert padded > whole, "a second, padded block costs more"


# --- outputs: writable before any work, created only after validation -------------------------

@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be created in, even by root (for whom permission bits do not count)."""
    if os.geteuid() == 0:
        if not Path("/sys").is_dir():
            pytest.skip("root, and no read-only /sys to write to")
        yield Path("/sys")
        return
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def test_unwritable_output_is_refused_before_the_model_loads(capsys, read_only_folder, text_file, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    code, _, err = run(capsys, "trace", text_file, "-o", read_only_folder / "run.sptrace")
    assert code == 2 and f"cannot write to the folder {read_only_folder}" in one_line(err)
    code, _, err = run(capsys, "niah", "-o", read_only_folder / "niah")
    assert code == 2 and "cannot write to the folder" in one_line(err)


def test_niah_refusal_leaves_no_output_folder(capsys, tmp_path, model_folder):
    folder = tmp_path / "niah"
    code, _, err = run(capsys, "niah", "--model", model_folder, "--length", "2000", "--k", "2", "-o", folder)
    assert code == 2 and "context" in one_line(err)
    assert not folder.exists()


@pytest.fixture
def saved_trace(tmp_path, tiny_tokenizer):
    model, _ = models.load_model(_model_copy(tmp_path, tiny_tokenizer))
    path = tmp_path / "run.sptrace"
    trace(model, tiny_tokenizer, TEXT, StreamConfig(k=2, block_size=BLOCK)).save(path)
    return path


def _model_copy(tmp_path, tiny_tokenizer) -> str:
    folder = tmp_path / "tiny-model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


def test_flow_refusal_leaves_no_output_folder(capsys, tmp_path, saved_trace):
    folder = tmp_path / "flow"
    code, _, err = run(capsys, "flow", saved_trace, "--from", "no such words", "-o", folder)
    assert code == 2 and "no such words" in one_line(err)
    assert not folder.exists()


# --- signals -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("signum", "status", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                       (signal.SIGINT, 130, "interrupted")])
def test_signal_during_the_save_leaves_nothing(capsys, tmp_path, text_file, model_folder, monkeypatch, signum, status,
                                               word):
    """A real signal to this process while the trace's temporary file is open (its fsync)."""
    real_fsync = os.fsync

    def fsync_then_signal(fd):
        real_fsync(fd)
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(os, "fsync", fsync_then_signal)
    before = written(tmp_path)
    code, _, err = run(capsys, "trace", text_file, "-o", tmp_path / "run.sptrace", "--model", model_folder,
                       "--k", "2", "--block-size", BLOCK, "--no-progress")
    assert code == status and one_line(err) == f"sparsetrace: {word} ({'SIGTERM' if status == 143 else 'Ctrl-C'})"
    assert written(tmp_path) == before, "no .tmp file, no trace"


def test_sigterm_handler_is_restored_after_main(capsys, tmp_path, text_file):
    before = signal.getsignal(signal.SIGTERM)
    run(capsys, "trace", text_file, "-o", tmp_path / "no" / "run.sptrace")
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_while_loading_is_one_line(capsys, tmp_path, text_file, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    code, _, err = run(capsys, "trace", text_file, "-o", tmp_path / "run.sptrace")
    assert code == 130 and one_line(err) == "sparsetrace: interrupted (Ctrl-C)"


# --- the model's path and revision; text that cannot be decoded ---------------------------------

def test_relative_model_folder_is_recorded_absolute(capsys, tmp_path, tiny_tokenizer, monkeypatch):
    folder = Path(_model_copy(tmp_path, tiny_tokenizer))
    monkeypatch.chdir(folder.parent)
    model, tokenizer = models.load_model(f"./{folder.name}")
    result = trace(model, tokenizer, TEXT, StreamConfig(k=2, block_size=BLOCK))
    assert result.model_info["name"] == result.model_info["tokenizer"] == str(folder)
    assert "revision" in result.model_info
    result.save(tmp_path / "run.sptrace")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run(capsys, "report", tmp_path / "run.sptrace", "-o", "report.html")
    assert code == 0 and "note" not in err, err
    assert "lit the lamp" in (elsewhere / "report.html").read_text()


def test_report_says_on_stderr_when_the_text_cannot_be_decoded(capsys, tmp_path, saved_trace, monkeypatch):
    monkeypatch.setattr(models, "load_tokenizer", lambda name: (_ for _ in ()).throw(SparsetraceError("gone")))
    code, _, err = run(capsys, "report", saved_trace, "-o", tmp_path / "report.html")
    assert code == 0 and one_line(err).startswith("sparsetrace: note: no block text") and "gone" in err


# --- hub ids: local files first, a fast refusal without a network -------------------------------

def test_uncached_hub_id_offline_fails_fast_naming_the_fixes(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    with pytest.raises(SparsetraceError) as error:
        models.load_model("sparsetrace-tests/not-cached-anywhere")
    message = str(error.value)
    assert time.perf_counter() - started < 5
    assert "HF_HUB_OFFLINE is set" in message and "not in the Hugging Face cache" in message
    assert "SPARSETRACE_CACHE" in message and str(tmp_path / "cache") in message and "local model folder" in message
    assert "\n" not in message


def test_unreachable_hub_is_not_retried(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_unreachable", lambda endpoint: "huggingface.co: no route")
    calls = []

    def loader(source, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise OSError("not cached")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", loader)
    with pytest.raises(SparsetraceError, match="hub cannot be reached .huggingface.co: no route"):
        models.load_model("org/name")
    assert calls == [True], "the cache only: no hub call once the hub is known unreachable"


def test_cached_hub_id_never_asks_the_hub(monkeypatch, tmp_path, tiny_tokenizer):
    folder = _model_copy(tmp_path, tiny_tokenizer)
    asked = []

    def from_cache(load):
        def call(source, **kwargs):
            asked.append(kwargs.get("local_files_only"))
            return load(folder, **{k: v for k, v in kwargs.items() if k != "revision"})
        return call

    for auto in (models.AutoConfig, models.AutoTokenizer, models.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", from_cache(auto.from_pretrained))
    monkeypatch.setattr(models, "_hub_unreachable", lambda endpoint: pytest.fail("the hub was probed"))
    model, _ = models.load_model("org/cached")
    assert asked[0] is True and False not in asked, "local files first, and only them"
    assert models.describe_model(model)["name"] == "org/cached"


# --- the header's checksum -------------------------------------------------------------------------

def _rewrite(path, **changes):
    with safetensors.safe_open(path, framework="pt") as file:
        tensors, metadata = {n: file.get_tensor(n) for n in file.keys()}, dict(file.metadata())
    metadata |= changes
    safetensors.torch.save_file(tensors, path, metadata={k: v for k, v in metadata.items() if v is not None})


def test_an_edited_header_is_refused(saved_trace):
    with safetensors.safe_open(saved_trace, framework="pt") as file:
        info = json.loads(file.metadata()["model"])
    _rewrite(saved_trace, model=json.dumps(info | {"name": "org/another-model"}))
    with pytest.raises(TraceFileError, match="header checksum mismatch"):
        load_trace(saved_trace)


def test_a_file_without_the_header_checksum_loads_with_a_note(saved_trace):
    _rewrite(saved_trace, metadata_sha256=None)
    with pytest.warns(SparsetraceWarning, match="header is unverified"):
        assert load_trace(saved_trace).num_tokens == len(TEXT)
    old = Path(__file__).parents[1] / "data" / "trace_v1_before_search.sptrace"
    with pytest.warns(SparsetraceWarning, match="header is unverified"):
        load_trace(old)


def test_info_says_so_in_one_line(capsys, saved_trace):
    _rewrite(saved_trace, metadata_sha256=None)
    code, _, err = run(capsys, "info", saved_trace)
    assert code == 0 and one_line(err).startswith("sparsetrace: note: ") and "unverified" in err


# --- notes: --max-tokens, flow backwards, salience with no block to rank ------------------------

def test_max_tokens_cut_is_noted(capsys, tmp_path, text_file, model_folder):
    code, _, err = run(capsys, "trace", text_file, "-o", tmp_path / "cut.sptrace", "--model", model_folder,
                       "--k", "1", "--block-size", BLOCK, "--max-tokens", "40")
    assert code == 0 and one_line(err) == "sparsetrace: note: the input is 122 tokens; kept the first 40 " \
                                          "(max_tokens / --max-tokens)"
    assert load_trace(tmp_path / "cut.sptrace").num_tokens == 40


def test_flow_backwards_says_flow_runs_forward(capsys, tmp_path, saved_trace):
    code, out, err = run(capsys, "flow", saved_trace, "--from", "tokens:100-110", "--to", "tokens:0-10", "-o",
                         tmp_path / "f")
    assert code == 0 and "NOT connected" in out
    assert "flow runs forward only" in one_line(err) and "swap --from and --to" in err
    code, _, err = run(capsys, "flow", saved_trace, "--from", "tokens:0-10", "--to", "tokens:100-110", "-o",
                       tmp_path / "g")
    assert code == 0 and "forward only" not in err


def test_salience_with_too_many_readers_says_why_nothing_is_listed(capsys, tmp_path, saved_trace):
    code, out, err = run(capsys, "salience", saved_trace, "--min-readers", "100000", "-o", tmp_path / "s")
    readers = len(TEXT) // BLOCK + 1 - 2  # query blocks past the sink and local ones: the most any block has
    assert code == 0 and "min_readers=100,000" in one_line(err) and f"any one block is {readers}" in err
    code, out, err = run(capsys, "salience", saved_trace, "--min-readers", str(readers), "-o", tmp_path / "t")
    assert code == 0 and "note" not in err and "  1. block" in out


@pytest.mark.parametrize(("signum", "status", "line"), [(signal.SIGINT, 130, "sparsetrace: interrupted (Ctrl-C)"),
                                                       (signal.SIGTERM, 143, "sparsetrace: terminated (SIGTERM)")])
def test_signal_while_torch_imports_is_one_line(tmp_path, text_file, model_folder, signum, status, line):
    """The first seconds of a command import torch; `-X importtime` reports each module as it loads, so the
    signal is sent once torch's own modules are loading (no sleeps)."""
    command = [sys.executable, "-X", "importtime", "-c", "import sys; from sparsetrace.cli import main; "
               "sys.exit(main())", "trace", text_file, "-o", str(tmp_path / "run.sptrace"), "--model", model_folder]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    for report in child.stderr:
        if report.rstrip().endswith("torch._C") or report.rstrip().endswith("| torch.version"):
            child.send_signal(signum)
            break
    rest = child.stderr.read()
    assert child.wait(timeout=120) == status
    said = [text for text in rest.splitlines() if not text.startswith("import time:")]
    assert said == [line] and not any(tmp_path.glob("*.sptrace*")) and not any(tmp_path.glob(".*.tmp"))
