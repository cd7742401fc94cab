"""The command answers at once: `--help`, `--version` and argument errors import no torch or transformers,
every option explains itself, and options that take one of a fixed set of strings list that set."""

import argparse
import dataclasses
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetrace.cli import build_parser
from sparsetrace.config import StreamConfig

HEAVY = ("torch", "transformers", "numpy", "matplotlib")

# Runs main(argv) in a fresh interpreter and prints, last, its exit code and the heavy modules it loaded.
CHILD = f"""
import json, sys
from sparsetrace.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exit:
    code = exit.code
print("\\nRESULT " + json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def run_fresh(*argv: str) -> tuple[int, list[str], str, str]:
    """(exit code, heavy modules loaded, stdout before the result line, stderr) of main(argv) in a new process."""
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(list(argv))], capture_output=True, text=True,
                           timeout=60)
    out, _, result = child.stdout.rpartition("\nRESULT ")
    assert child.returncode == 0 and result, child.stderr
    result = json.loads(result)
    return result["code"], result["loaded"], out, child.stderr


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"sparsetrace": parser} | {f"sparsetrace {name}": sub for name, sub in commands.choices.items()}


@pytest.mark.parametrize("argv", [["--help"], ["trace", "--help"], ["--version"]])
def test_help_and_version_import_no_torch(argv):
    code, loaded, out, err = run_fresh(*argv)
    assert code == 0 and err == ""
    assert loaded == [], f"sparsetrace {' '.join(argv)} imported {loaded}"
    if argv == ["--version"]:
        assert out.strip() == f"sparsetrace {importlib.metadata.version('sparsetrace')}"
    else:
        assert out.startswith("usage: sparsetrace")


def test_every_commands_help_imports_no_torch():
    """One process, every command's --help: a module-level import anywhere in the CLI shows up here."""
    names = [name.split()[1] for name in subparsers() if " " in name]
    script = f"""
import contextlib, io, json, sys
from sparsetrace.cli import main
for name in {names!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([name, "--help"])
        except SystemExit as exit:
            assert exit.code == 0 and out.getvalue().startswith(f"usage: sparsetrace {{name}}"), name
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == []


@pytest.mark.parametrize(
    "argv,words",
    [
        (["trace", "--k", "notanumber"], ["--k", "invalid int value", "sparsetrace trace --help"]),
        (["trace", "--score", "median"], ["--score", "'max', 'logsumexp'"]),
        (["trace", "--dtype", "int8"], ["--dtype", "'float32', 'bfloat16', 'float16'"]),
        ([], ["COMMAND", "sparsetrace --help"]),
        (["tarce"], ["invalid choice: 'tarce'", "'trace'"]),
        (["attribute", "ctx.txt", "-o", "out"], ["--query"]),
    ],
)
def test_argument_error_is_one_line_and_exits_2(argv, words):
    code, loaded, out, err = run_fresh(*argv)
    assert code == 2 and loaded == [] and out.strip() == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsetrace: error: ") and "usage:" not in err, err
    assert all(word in lines[0] for word in words), lines[0]


def test_console_script_prints_its_version():
    script = Path(sys.executable).with_name("sparsetrace")
    if not script.exists():
        pytest.skip("sparsetrace is not installed as a console script next to this interpreter")
    child = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0 and child.stdout == f"sparsetrace {importlib.metadata.version('sparsetrace')}\n"


def test_every_option_has_help_and_shows_its_choices():
    for name, parser in subparsers().items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{name} {label} has no help text"
            if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
                shown = "{" + ",".join(map(str, action.choices)) + "}"
                assert shown in text, f"{name} --help does not list the choices of {label}"


def test_string_fields_of_the_estimator_offer_their_choices():
    """Every StreamConfig field that takes a string takes one of a fixed set: its flag lists the set, and every
    value of it makes a valid StreamConfig."""
    flags = {a.dest: a for a in subparsers()["sparsetrace trace"]._actions}
    strings = [f.name for f in dataclasses.fields(StreamConfig) if f.type == "str"]
    assert strings, "StreamConfig has string fields (partition, score, ...)"
    for field in strings:
        assert flags[field].choices, f"--{field.replace('_', '-')} lists no choices"
        assert getattr(StreamConfig(), field) in flags[field].choices
        for value in flags[field].choices:
            assert getattr(StreamConfig(**{field: value}), field) == value


def test_light_names_match_the_modules_that_use_them():
    """`choices` repeats no code, but DTYPES names models.DTYPES' keys, which need torch."""
    from sparsetrace.analysis.attribution import METHODS
    from sparsetrace.choices import ATTRIBUTION_METHODS, DEFAULT_METHOD, DTYPES, FALLBACK_METHOD, MASS_METHODS
    from sparsetrace.models import DTYPES as MODEL_DTYPES

    assert DTYPES == tuple(MODEL_DTYPES)
    assert tuple(METHODS) == MASS_METHODS and FALLBACK_METHOD in METHODS
    assert set(MASS_METHODS) < set(ATTRIBUTION_METHODS) and DEFAULT_METHOD in ATTRIBUTION_METHODS


def test_the_package_loads_its_names_on_first_use():
    child = subprocess.run([sys.executable, "-c", "import sys, sparsetrace as st; "
                            f"print(st.__version__, [m for m in {HEAVY!r} if m in sys.modules])"],
                           capture_output=True, text=True, timeout=60)
    assert child.stdout.split() == [importlib.metadata.version("sparsetrace"), "[]"], child.stderr

    import sparsetrace as st
    import sparsetrace.trace  # noqa: F401  (the module named like the function st.trace)
    from sparsetrace.tracer import trace

    assert st.trace is trace and st.report is sys.modules["sparsetrace.report"].report
    assert all(getattr(st, name) is not None for name in st.__all__)
    assert set(st.__all__) <= set(dir(st))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        st.nope  # noqa: B018
