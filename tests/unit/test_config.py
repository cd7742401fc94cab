"""StreamConfig's field descriptions: one text for the docstring and every command's --help."""

import argparse
import dataclasses

from sparsetrace.cli.common import add_run_arguments
from sparsetrace.config import StreamConfig, field_help


def test_every_field_is_described_once():
    described = field_help()
    assert list(described) == [f.name for f in dataclasses.fields(StreamConfig)]
    assert described["sinks"] == "leading key blocks always kept (attention sinks); 0 turns them off."
    assert all(text and "  " not in text and "\n" not in text for text in described.values())


def test_cli_flags_show_the_docstring_text():
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    helps = {action.dest: action.help for action in parser._actions}
    for name, text in field_help().items():
        assert helps[name].startswith(text)
    assert helps["k"].endswith("Default: 8.")
    assert "Default" not in helps["beam"], "a text that names its default gets none appended"
