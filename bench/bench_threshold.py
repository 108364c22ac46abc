"""pytest-benchmark suite of the threshold family (``pytest bench/bench_threshold.py
--benchmark-only``): the cases of ``python -m bench`` (full suite: op × size × dtype × mode) ×
provider, grouped so the three providers of one case sit side by side."""
import torch

from . import families
from . import harness as H

CASES = families.threshold_cases(families.Context("cpu", "full"))


@H.parametrize("provider", H.PROVIDERS)
@H.parametrize("case", CASES, ids=lambda c: "-".join(c.values()))
def test_threshold(benchmark, case, provider):
    device = H.default_device()
    op, size, dtype, mode = case["op"], case["size"], case["dtype"], case["mode"]
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
