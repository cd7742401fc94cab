"""The flags of the commands that run many units (`batch`): resume, retry, and where they run (Ray)."""

from __future__ import annotations

import argparse
import importlib.util

from ..batch import RAY_INSTALL
from ..errors import InputError

# Every flag of many units, as (flag, argparse dest): a command run without its batch switch refuses them.
BATCH_FLAGS = (("--ray", "ray"), ("--ray-address", "ray_address"), ("--workers", "workers"), ("--num-cpus", "num_cpus"),
               ("--num-gpus", "num_gpus"), ("--retry-failed", "retry_failed"))


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """--ray, --ray-address, --workers, --num-cpus, --num-gpus and --retry-failed."""
    group = parser.add_argument_group("many units (each result kept as it finishes; run again to resume)")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--ray", action="store_true", help="run the units on a local Ray started on this machine, "
                       f"one worker per --num-cpus CPUs, each loading the model once ({RAY_INSTALL})")
    where.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="run the units on the Ray cluster at ADDRESS (e.g. auto, or host:6379 from `ray start "
                       "--head`); every node needs sparsetrace and the model (its cache, or the same folder)")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="Ray workers, one model each (default: as many as the CPUs hold at --num-cpus each)")
    group.add_argument("--num-cpus", type=float, default=None, metavar="C",
                       help="CPUs (and threads) per Ray worker (default 1)")
    group.add_argument("--num-gpus", type=float, default=None, metavar="G",
                       help="GPUs per Ray worker, fractions share one (default 0: the model runs on CPU)")
    group.add_argument("--retry-failed", action="store_true",
                       help="run again the units the last run over -o failed (default: report and skip them)")


def batch_executor(args: argparse.Namespace):
    """The `RayExecutor` the flags ask for (None: in this process), checked before any work."""
    ray = args.ray or args.ray_address is not None
    sized = [flag for flag, value in (("--workers", args.workers), ("--num-cpus", args.num_cpus),
                                      ("--num-gpus", args.num_gpus)) if value is not None]
    if not ray:
        if sized:
            raise InputError(f"{', '.join(sized)} size Ray workers; add --ray (a local Ray) or --ray-address ADDRESS, "
                             "or drop them to run in this process")
        return None
    if importlib.util.find_spec("ray") is None:
        raise InputError(f"Ray is not installed; {RAY_INSTALL} (or run without --ray / --ray-address)")
    from ..batch import RayExecutor

    return RayExecutor(model=args.model, dtype=args.dtype, address=args.ray_address, workers=args.workers,
                       num_cpus=1 if args.num_cpus is None else args.num_cpus,
                       num_gpus=0 if args.num_gpus is None else args.num_gpus)
