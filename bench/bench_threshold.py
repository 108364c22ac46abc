"""pytest-benchmark suite of the threshold family (``pytest bench/bench_threshold.py
--benchmark-only``): op × provider × mode × size × dtype, grouped so the three providers of
one case sit side by side. Sizes are kept to 64K and 1M here; ``python -m bench`` runs 16M."""
import pytest
import torch

from . import harness as H

SIZES = ("64K", "1M")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", H.MODES)
@pytest.mark.parametrize("provider", H.PROVIDERS)
@pytest.mark.parametrize("op", list(H.OPS))
def test_threshold(benchmark, op, provider, mode, size, dtype):
    device = H.default_device()
    inputs = H.make_inputs(op, H.SIZES[size], H.DTYPES[dtype], device, grad=mode == "fwd+bwd")
    step, _ = H.make_step(H.provider_fn(op, provider), inputs, mode)

    def run():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warmup; compilation happens here, outside the timed rounds
        run()
    benchmark.group = f"{op} {mode} {size} {dtype}"
    benchmark.extra_info.update(H.environment(device))
    benchmark(run)
