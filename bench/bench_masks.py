"""Structured mask builders (SPEC §5): eager reference vs ``torch.compile(reference)`` vs sparsekern
on ResNet-50's 3×3 conv shapes (N:M 2:4, window, CK, intra at s = 0.5) and an LLM-sized Linear
4096×11008 (N:M 2:4, 4×4 blocks at s = 0.5). Every provider's mask is checked equal.

pytest-benchmark (timing only)::

    pytest bench/bench_masks.py --benchmark-only

Script (all providers side by side in one run, target ≥ 10× eager; writes a Markdown table)::

    python -m bench.bench_masks
"""
import argparse
import os

import torch

from . import harness as H
from . import suites

PROVIDERS = ("eager", "compile", "sparsekern")
TARGET = 10.0  # sparsekern speedup over eager, every mask builder
SPARSITY = 0.5
#: builder -> (kwargs, weight kind)
BUILDERS = {
    "nm_mask": ({"n": 2, "m": 4}, "conv+linear"),
    "window_mask": ({"sparsity": SPARSITY}, "conv"),
    "ck_mask": ({"sparsity": SPARSITY}, "conv"),
    "intra_mask": ({"sparsity": SPARSITY}, "conv"),
    "block_mask": ({"block": 4, "sparsity": SPARSITY}, "linear"),
}
LINEAR = (4096, 11008)


def conv_shapes():
    """The distinct 3×3 conv weights of ResNet-50 (suites.resnet50), in model order."""
    return list(dict.fromkeys(s for s in suites.resnet50() if len(s) == 4 and s[2:] == (3, 3)))


def cases():
    """(builder, shape) pairs: conv builders on every 3×3 shape, Linear builders on 4096×11008."""
    out = []
    for name, (_, kind) in BUILDERS.items():
        if "conv" in kind:
            out += [(name, s) for s in conv_shapes()]
        if "linear" in kind:
            out.append((name, LINEAR))
    return out


def provider_fn(builder, provider):
    """``w -> bool mask`` for ``provider``; ``compile`` compiles a fresh static-shape graph."""
    import sparsekern as sk
    from sparsekern import reference

    kwargs = BUILDERS[builder][0]
    if provider == "sparsekern":
        fn = getattr(sk, builder)
        return lambda w: fn(w, **kwargs)
    ref = getattr(reference, builder)
    if provider == "eager":
        return lambda w: ref(w, **kwargs)
    torch._dynamo.reset()
    return torch.compile(lambda w: ref(w, **kwargs), dynamic=False)


def label(builder, shape):
    return f"{builder} {'×'.join(map(str, shape))}"


# --- pytest-benchmark -----------------------------------------------------------------------------

@H.parametrize("provider", PROVIDERS)
@H.parametrize("case", cases(), ids=lambda c: label(*c).replace(" ", "-"))
def test_mask(benchmark, case, provider):
    builder, shape = case
    device = H.default_device()
    w = suites.make_weights([shape], device=device)[0]
    fn = provider_fn(builder, provider)

    def run():
        fn(w)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = label(builder, shape) + " fp32"
    benchmark.extra_info.update(H.environment(device))
    benchmark.pedantic(run, rounds=10 if provider == "sparsekern" else 3, warmup_rounds=1)


# --- script ---------------------------------------------------------------------------------------

def bench_case(builder, shape, device):
    w = suites.make_weights([shape], device=device)[0]
    rows, masks = [], {}
    for p in PROVIDERS:
        fn = provider_fn(builder, p)
        masks[p] = fn(w)
        stats = H.time_step(lambda: fn(w), device, budget_s=1.0, min_reps=5, max_reps=50)
        rows.append({"case": label(builder, shape), "provider": p, **stats})
    for p in PROVIDERS[1:]:
        assert torch.equal(masks[p], masks["eager"]), f"{label(builder, shape)}: {p} differs from eager"
    return rows


def _ms(s):
    return f"{s * 1e3:.1f}" if s >= 0.01 else f"{s * 1e3:.3f}"


def table(rows):
    lines = ["| case (fp32) | provider | median ms (IQR) | min ms | eager / this (median) "
             "| eager / this (min) |", "|---|---|---|---|---|---|"]
    eager = {r["case"]: r for r in rows if r["provider"] == "eager"}
    for r in rows:
        e = eager[r["case"]]
        lines.append(f"| {r['case']} | {r['provider']} | {_ms(r['median_s'])} "
                     f"({_ms(r['q1_s'])}–{_ms(r['q3_s'])}, {r['reps']} runs) | {_ms(r['min_s'])} "
                     f"| {e['median_s'] / r['median_s']:.1f}× | {e['min_s'] / r['min_s']:.1f}× |")
    return lines


def targets(rows):
    by = {(r["case"], r["provider"]): r for r in rows}
    out, worst = [], {}
    for (case, p), r in by.items():
        if p != "sparsekern":
            continue
        builder = case.split()[0]
        x = by[case, "eager"]["median_s"] / r["median_s"]
        if builder not in worst or x < worst[builder][0]:
            worst[builder] = (x, case)
    for builder, (x, case) in worst.items():
        out.append(f"- {builder}: sparsekern ≥ {TARGET:.0f}× eager (median) on every shape: worst "
                   f"{x:.1f}× ({case}) — {'PASS' if x >= TARGET else 'FAIL'}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_masks", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="Markdown output (default: bench/results/masks-<device>.md)")
    args = p.parse_args(argv)
    device = H.default_device()
    env = H.environment(device)
    print(f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, "
          f"{env['sparsekern_backend']}", flush=True)
    load0 = os.getloadavg()[0]
    rows = []
    for builder, shape in cases():
        print(f"  {label(builder, shape)} ...", flush=True)
        rows += bench_case(builder, shape, device)
    md = [f"# Structured mask builders (masks family, SPEC §5) — {env['device_name']}", "",
          "- command: `python -m bench.bench_masks`",
          f"- machine: {env['device_name']}, {env['cpu_count']} CPUs, {env['threads']} threads; "
          f"torch {env['torch']}; sparsekern backend: {env['sparsekern_backend']}",
          f"- git {env['git_sha'][:10]}{' (dirty)' if env['git_dirty'] else ''}, {env['date']}",
          f"- 1-min load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"(this benchmark alone is about {env['threads']}; more means other jobs shared the machine)",
          f"- weights ~ He-init normal (seeded), fp32; s = {SPARSITY}, N:M 2:4, blocks 4×4; providers "
          "run one after another per case; every provider's mask equals eager's (checked)",
          "- eager = `sparsekern.reference` (sort-based, straight from SPEC §5); compile = "
          "`torch.compile(reference, dynamic=False)`", ""]
    md += table(rows) + [""] + targets(rows)
    text = "\n".join(md) + "\n"
    H.write_report(args.out or H.results_path("masks", env["device_name"]), text)


if __name__ == "__main__":
    main()
