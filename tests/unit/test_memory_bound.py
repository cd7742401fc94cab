"""Nothing T x T is allocated: peak RSS growth of `select_blocks` and `block_sparse_attention` on a
long input stays under a bound that is a small multiple of the input, far below any T x T tensor.

The measurement runs in a fresh process (this file run as a script), so the RSS is that of one
call and nothing else: freed heap pages are handed back (glibc malloc_trim), the peak is reset
("5" into /proc/self/clear_refs sets VmHWM to the current RSS), the call runs, and VmHWM minus the
RSS before it is the growth. Linux with glibc only.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

from sparsetrace.block_attention import block_sparse_attention
from sparsetrace.config import StreamConfig
from sparsetrace.stream import select_blocks

TOKENS, HEADS, KV_HEADS, DIM, BLOCK = 131072, 2, 1, 16, 64
# The bound: 64 * T * H * d bytes = 256 MiB here, 16x the bytes of q (16 MiB). It leaves room for
# O(T) copies of the inputs and outputs (out is the size of q) and for the fixed working memory of
# the query chunks (measured: select_blocks ~60 MiB, block_sparse_attention ~40 MiB at this size).
# Anything T x T breaks it many times over: a bool mask of one head is T^2 bytes = 16 GiB (64x the
# bound), a float32 score matrix for all heads 4 H T^2 = 128 GiB. It does not rule out a dense
# tensor over block pairs (H n_q n_k float32 = 32 MiB here); benchmarks/estimator_scale fits the
# memory exponent up to 1M tokens for that.
BOUND = 64 * TOKENS * HEADS * DIM

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _growth(call) -> tuple[object, int]:
    """Run call(); return its result and the peak RSS growth during it, in bytes."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = _status_bytes("VmRSS")
    result = call()
    return result, _status_bytes("VmHWM") - base


def _child() -> None:
    torch.set_num_threads(1)  # the bound does not depend on threads; one keeps the test cheap
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, TOKENS, DIM, generator=gen)
    k = torch.randn(1, KV_HEADS, TOKENS, DIM, generator=gen)
    v = torch.randn(1, KV_HEADS, TOKENS, DIM, generator=gen)
    selection, select_growth = _growth(lambda: select_blocks(q, k, StreamConfig(k=4, block_size=BLOCK)))
    (out, mass), attention_growth = _growth(
        lambda: block_sparse_attention(q, k, v, selection.indices, block_q=BLOCK, block_k=BLOCK)
    )
    print(json.dumps({"select_blocks": select_growth, "block_sparse_attention": attention_growth,
                      "indices_shape": list(selection.indices.shape), "out_shape": list(out.shape)}))


@pytest.fixture(scope="module")
def growth() -> dict:
    # glibc's dynamic mmap threshold lets freed chunk temporaries fragment the heap, and the RSS growth
    # then varies 25-220 MiB between runs of the same call; a fixed threshold gives every large tensor
    # its own mapping, returned when freed, so the RSS follows what is live
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_select_blocks_builds_nothing_t_by_t(growth):
    assert growth["indices_shape"] == [1, HEADS, TOKENS // BLOCK, 6]  # 1 sink + k=4 + 1 local
    assert growth["select_blocks"] < BOUND, f"{growth['select_blocks'] / 2**20:.0f} MiB >= {BOUND / 2**20:.0f} MiB"


def test_block_sparse_attention_builds_nothing_t_by_t(growth):
    assert growth["out_shape"] == [1, HEADS, TOKENS, DIM]
    assert growth["block_sparse_attention"] < BOUND, (
        f"{growth['block_sparse_attention'] / 2**20:.0f} MiB >= {BOUND / 2**20:.0f} MiB")


if __name__ == "__main__":
    _child()
