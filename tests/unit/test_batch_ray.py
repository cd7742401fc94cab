"""Units on a local Ray (`batch.RayExecutor`): the same results as in this process, and a worker killed in
the middle of a unit loses nothing finished while its unit runs again. One small local Ray for the module."""

import json
import os
import signal
import sys
import threading
import time

import pytest
import ray
import torch

from sparsetrace.batch import RayExecutor, Unit, run_units
from sparsetrace.config import StreamConfig
from sparsetrace.models import load_model
from sparsetrace.tasks.needle_runs import sweep

CONFIG = StreamConfig(k=2, block_size=32)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    yield
    ray.shutdown()


def test_a_sweep_on_ray_equals_the_sweep_in_process(local_ray, model_folder, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker: the same float arithmetic
    try:
        model, tokenizer = load_model(model_folder)
        here = sweep(model, tokenizer, [500, 650], [0.3], tmp_path / "here", CONFIG, progress=False)
    finally:
        torch.set_num_threads(threads)
    with RayExecutor(model_folder, workers=2) as executor:
        there = sweep(None, None, [500, 650], [0.3], tmp_path / "ray", CONFIG, progress=False, executor=executor)
    assert [c["seconds"] >= 0 for c in there] == [True, True]
    assert [{**c, "seconds": 0} for c in there] == [{**c, "seconds": 0} for c in here], "field by field"
    summary = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert (summary["executor"], summary["done"], summary["remaining"]) == ("ray", 2, 0)
    assert sum(w["units"] for w in summary["worker_usage"]) == 2
    assert ray.is_initialized(), "a Ray the executor did not start is left running"


def slow_once(model, tokenizer, inputs):
    """A task whose unit "slow" waits, the first time, to be killed (it says where, in pid.txt)."""
    folder = inputs["folder"]
    with open(os.path.join(folder, f"{inputs['name']}.starts"), "a") as log:
        log.write("start\n")
    starts = len(open(os.path.join(folder, f"{inputs['name']}.starts")).read().split())
    if inputs["name"] == "slow" and starts == 1:
        with open(os.path.join(folder, "pid.tmp"), "w") as pid:
            pid.write(str(os.getpid()))
        os.replace(os.path.join(folder, "pid.tmp"), os.path.join(folder, "pid.txt"))
        time.sleep(120)
    return {"name": inputs["name"], "starts": starts, "pid": os.getpid(), "layers": model.config.num_hidden_layers}


def test_a_killed_worker_loses_no_result_and_its_unit_runs_again(local_ray, model_folder, tmp_path):
    units = [Unit(name, {"name": name, "folder": str(tmp_path)}) for name in ("a", "slow", "b", "c")]
    finished = {}
    with RayExecutor(model_folder, workers=2) as executor:
        runner = threading.Thread(target=lambda: finished.update(batch=run_units(
            units, slow_once, tmp_path / "results", executor, progress=False)))
        runner.start()
        deadline = time.time() + 120
        while not (tmp_path / "pid.txt").exists() and time.time() < deadline:
            time.sleep(0.2)
        killed = int((tmp_path / "pid.txt").read_text())
        os.kill(killed, signal.SIGKILL)  # the actor's process, in the middle of unit "slow"
        runner.join(timeout=180)
    assert not runner.is_alive()
    batch = finished["batch"]
    assert batch.failures == {} and list(batch.results) == ["a", "slow", "b", "c"]
    assert batch.results["slow"]["starts"] == 2 and batch.results["slow"]["pid"] != killed, "run again elsewhere"
    assert all(batch.results[name]["starts"] == 1 for name in ("a", "b", "c")), "no finished unit is redone"
    for name in ("a", "slow", "b", "c"):
        assert json.loads((tmp_path / "results" / f"{name}.json").read_text()) == batch.results[name]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["a.json", "b.json", "c.json", "slow.json"]
    assert json.loads((tmp_path / "run.json").read_text())["done"] == 4
