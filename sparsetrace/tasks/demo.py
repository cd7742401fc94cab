"""`demo()`: the README's first run, a needle in a haystack written up as one HTML report.

On the model given (the default one for `sparsetrace demo`): RULER's needle prompt of `length`
tokens (`niah.niah_prompt`); the dense answer, the smallest k that keeps it, the trace at that k
and the needle's route to the answer (`needle_runs.run_niah`, files by `save_niah`); a fidelity
check at that k (`fidelity.check`: attention recall against the oracle, behaviour); and
report.html with all of it. The command loads the model, calls this and prints the summary.

>>> result = demo(model, tokenizer, "sparsetrace-demo")   # doctest: +SKIP
>>> result.report                                         # doctest: +SKIP
PosixPath('sparsetrace-demo/report.html')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..choices import SIBLING_FIDELITY, SIBLING_FIGURES
from ..config import StreamConfig
from ..fidelity import FidelityReport, check
from ..files import write_json
from ..report import report
from .needle_runs import NiahRun, run_niah, save_niah
from .niah import NiahPrompt, niah_prompt


@dataclass
class Demo:
    """What the demo made: the prompt, the needle run at its k, the fidelity check at that k, and the
    files written (`paths`: route, heads, json, trace, fidelity; `report`: the HTML page)."""

    prompt: NiahPrompt
    run: NiahRun
    fidelity: FidelityReport
    paths: dict[str, str]
    report: Path


def demo(
    model,
    tokenizer,
    folder: str | Path,
    *,
    length: int = 4096,
    depth: float = 0.5,
    progress: bool | None = None,
    kernel: str = "auto",
    log: Callable[[str], None] | None = None,
) -> Demo:
    """Run the demo (module docstring) into the existing `folder`; `log` hears each of its 3 steps."""
    log = log or (lambda line: None)
    folder = Path(folder)
    prompt = niah_prompt(tokenizer, length, depth)
    log("1/3  dense answer, smallest k that keeps it, trace and route")
    run = run_niah(model, tokenizer, prompt, StreamConfig(), k="auto", progress=progress, kernel=kernel)
    paths = save_niah(run, tokenizer, folder)
    log(f"2/3  fidelity check at k = {run.k} (a dense pass with exact block masses, then a sparse one)")
    fidelity = check(model, tokenizer, config=StreamConfig(k=run.k), input_ids=prompt.token_ids, progress=progress,
                     kernel=kernel)
    paths["fidelity"] = str(write_json(folder / SIBLING_FIDELITY, fidelity.to_dict()))
    log("3/3  report")
    figures = {caption: folder / name for name, caption in SIBLING_FIGURES.items()}
    page = report(run.trace, folder / "report.html", tokenizer, extras={"figures": figures, "fidelity": fidelity},
                  title=f"sparsetrace demo: needle in {prompt.num_tokens:,} tokens")
    return Demo(prompt, run, fidelity, paths, page)
