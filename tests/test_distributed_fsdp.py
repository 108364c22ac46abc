"""FSDP2 (``fully_shard``, gloo, 2 ranks on 127.0.0.1): every method against one process, and the
exact selection over shards (``sparsekern.ops.distributed``) it rests on.

One spawn of 2 ranks (this file run as a script) runs every case below and rank 0 saves what the
tests assert here, in the parent:

* selection: ``global_magnitude_threshold`` / ``magnitude_thresholds`` over uneven shards (one
  empty; ties, inf, ±0, scales, every interpolation) bit-identical to one process on the full
  tensors, on each code path (CPU with and without the local-quantile bracket, accelerator);
  the public functions with DTensors and with plain shards + ``group=``;
* training (``sparsify``, then ``fully_shard`` per layer and at the root; STR/ASL pass
  ``sparsifier.replicated_params()`` as ``ignored_params``), 5 steps, different data per rank:
  both ranks hold the same bits (gathered weights, thresholds, masks, s/r, effective weights);
  the thresholds are bit-identical to a one-process Sparsifier's on the gathered full weights
  (scopes, scales, ``min_density``); masks and ``sparsity()`` equal a single-process run on the
  global batch, whose weights and thresholds they match within ``GLOBAL_BATCH_REL`` (float
  reassociation of the reduce-scatter, as in tests/test_distributed.py);
* also root-only ``fully_shard``, ``fully_shard`` before ``sparsify`` (magnitude methods),
  transformers' ``Conv1D`` (stored ``[in, out]``), STARFIRE ``fc_inputs``, ``freeze()`` /
  ``finalize()`` on sharded weights, a layer pruned to 100 % (warned on both ranks);
* STARFIRE and N:M masks built from the shards equal the single-process masks of the whole
  weights bit for bit, for every pattern (uneven shards: 7 and 5 rows over 2 ranks);
* DCP: save on 2 ranks after 2 steps, resume in fresh models, 2 more steps: bit-identical to the
  uninterrupted run; state_dict keys plain;
* refusals: tensor parallel (a DTensor FSDP2 does not manage), at ``sparsify`` and at ``step()``,
  naming the weight; ``fully_shard`` before ``sparsify`` for STR/ASL/masks; STR whose ``s`` is
  neither sharded nor synchronised; ``step()`` on unsharded weights; a NaN on one rank raises on
  both.

Bounded time: process-group timeout 60 s; the parent kills both ranks after ``PARENT_TIMEOUT_S``.
"""
import os
import re
import sys
import time
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from utils import rank_case, spawn_ranks

WORLD = 2
STEPS = 5
BATCH = 8  # per rank
LR, WD, MOMENTUM = 0.1, 5e-4, 0.9
PG_TIMEOUT_S = 60
PARENT_TIMEOUT_S = 150
RESULTS = "results.pt"
GLOBAL_BATCH_REL = 2e-6  # see tests/test_distributed.py (same model scale, same reassociation)
FEATHER_P = 3.0

#: (run, method, sparsify options, order): "first" = sparsify, then fully_shard per layer + root;
#: "root" = sparsify, then fully_shard at the root only; "after" = fully_shard per layer + root, then sparsify
RUNS = [
    ("str", "str", dict(s_init=-3.0), "first"),
    ("st3", "st3", "schedule", "first"),
    ("st3_sigma", "st3_sigma", "schedule", "first"),
    ("feather", "feather", "schedule", "first"),
    ("gmp", "gmp", "schedule", "first"),
    ("asl", "asl", dict(sparsity=0.5), "first"),
    ("starfire", "starfire", dict(sparsity=0.5, era=(0, 3)), "first"),
    ("nm", "nm", dict(era=(0, 3)), "first"),
    ("gmp_root", "gmp", "schedule", "root"),
    ("str_root", "str", dict(s_init=-3.0), "root"),
    ("starfire_root", "starfire", dict(sparsity=0.5, era=(0, 3)), "root"),
    ("st3_after", "st3", "schedule", "after"),
    ("gmp_global_after", "gmp", dict(schedule="schedule", scope="global"), "after"),
    ("gmp_freeze", "gmp", "schedule", "first"),  # + freeze(), one more step, finalize()
    ("gmp_min_density", "gmp", dict(schedule="schedule", scope="global", min_density=0.45), "first"),
    ("st3_min_density", "st3", dict(schedule="schedule", min_density=0.48), "first"),
    ("gmp_conv1d", "gmp", "schedule", "first"),
    ("nm_conv1d", "nm", dict(era=(0, 3)), "first"),
    ("starfire_conv1d", "starfire", dict(sparsity=0.5, era=(0, 3)), "first"),
    ("starfire_ck_fc_inputs", "starfire", dict(sparsity=0.5, era=(0, 3), conv3x3="ck", fc_inputs={"6": "2"}), "first"),
]
RUN_NAMES = [r[0] for r in RUNS]

#: every method: DCP save after 2 steps, resume, 2 more steps
DCP_RUNS = ["str", "st3", "st3_sigma", "feather", "gmp", "asl", "starfire", "nm"]

#: STARFIRE patterns whose masks are built from the shards (weights of every kind, uneven shards)
MASK_CASES = [
    ("intra_in", dict(conv3x3="intra")),
    ("intra_out", dict(conv3x3="intra", ck_group="out")),
    ("ck_in", dict(conv3x3="ck")),
    ("ck_out", dict(conv3x3="ck", ck_group="out")),
    ("window", dict(conv3x3="window", max_nonzero=4)),
    ("block", dict(fc="block", block=2)),
]


#: ops.distributed's paths: CPU with the local-quantile bracket, CPU radix alone, accelerator (no host sync)
MODES = {"cpu": (True, True), "cpu_radix": (True, False), "accelerator": (False, False)}


def _cases():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(64, 27, generator=g), torch.randn(10, generator=g) * 1e-3, torch.randn(300, generator=g) * 5,
          torch.zeros(7), torch.tensor([float("inf"), 1.0, -0.0, 2.0])]
    ws[0][0, :5] = ws[0][1, :5]  # ties
    return ws


def _shards(w, rank):
    """Rank 0 gets the first third (rank 1 the rest); a 7-element zero tensor goes all to rank 1."""
    flat = w.reshape(-1)
    cut = flat.numel() // 3 if flat.numel() != 7 else 0
    return flat[:cut] if rank == 0 else flat[cut:]


def _select_case(rank):
    """ops.distributed and the public selections over this rank's shards (uneven, one empty)."""
    import torch.distributed as dist

    import sparsekern as sk
    from sparsekern.ops import distributed as D
    ws = _cases()
    local = [_shards(w, rank) for w in ws]
    numels = [w.numel() for w in ws]
    res = {}
    scales = [1.0, 3.5, 0.25, 1.0, 2.0]
    for mode in MODES:
        D._SHRINK_ON_CPU, D._NARROW_ON_CPU = MODES[mode]
        got = res[mode] = {"global": [], "layer": []}
        for s in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0):
            for interp in ("linear", "lower", "higher", "nearest"):
                got["global"].append(D.global_magnitude_threshold(local, sum(numels), s, scales=scales,
                                                                  interpolation=interp))
            got["layer"].append(D.magnitude_thresholds(local, numels, s))
    D._SHRINK_ON_CPU = D._NARROW_ON_CPU = True
    # the public functions: this rank's plain shards + group=, and DTensors (Shard(0), Shard(1))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (2,))
    finite = ws[:4]
    public = res["public"] = []
    for s in (0.3, 0.9):
        public.append(sk.global_magnitude_threshold([_shards(w, rank) for w in finite], s, scales=scales[:4],
                                                    group=dist.group.WORLD))
        public.append(sk.magnitude_thresholds([_shards(w, rank) for w in finite], s, group=dist.group.WORLD))
        dts = [distribute_tensor(finite[0], mesh, [Shard(1)]), distribute_tensor(finite[2], mesh, [Shard(0)])]
        public.append(sk.global_magnitude_threshold(dts, s))
        public.append(sk.magnitude_thresholds(dts, s))
    errors = res["errors"] = []
    for bad in ([distribute_tensor(finite[0], mesh, [Replicate()])],
                [distribute_tensor(finite[0], mesh, [Shard(0)]), finite[1]]):
        try:
            sk.global_magnitude_threshold(bad, 0.5)
            errors.append("no exception")
        except (TypeError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    return res


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` (GPT-2; sparsekern recognises it by name and ``nf``): a Linear whose
    weight is stored ``[in, out]``. Defined here, as in transformers, to spare the ranks its import."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):  # x: [batch, in] here
        return torch.addmm(self.bias, x, self.weight)


def _net(run=""):
    torch.manual_seed(0)
    if run.endswith("_conv1d"):  # transformers' Conv1D stores [in, out]: Shard(0) splits the canonical `in`
        return nn.Sequential(nn.Flatten(), Conv1D(12, 3 * 8 * 8), nn.ReLU(), Conv1D(5, 12))  # in 192, 12: 2:4
    return nn.Sequential(  # 8, 7 and 5 output rows: shards 4+4, 4+3, 3+2; C_in 8 and 112 divisible by 4 (2:4)
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 7, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(7 * 4 * 4, 5))


def _data(rank):
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(STEPS, BATCH, 3, 8, 8, generator=g), torch.randint(0, 5, (STEPS, BATCH), generator=g)


def _sparsify(model, method, options):
    import sparsekern as sk
    options = dict(schedule="schedule") if options == "schedule" else dict(options)
    if options.get("schedule") == "schedule":
        options["schedule"] = sk.CubicSchedule(0, 3, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nm: the first conv (C_in = 3) stays dense
        return sk.sparsify(model, method, **options)


def _shard(model, sp, per_layer=True):
    from torch.distributed.fsdp import fully_shard
    ignored = sp.replicated_params() if sp is not None else None
    if per_layer:
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def _optimizer(model, sp):
    return torch.optim.SGD(sp.param_groups(model, lr=LR, weight_decay=WD), momentum=MOMENTUM)


def _loss(net, sp, x, y):
    return F.cross_entropy(net(x), y) + sp.loss()


def _full(t):
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


@torch.no_grad()
def _snapshot(model, sp):
    out = {f"param {n}": _full(p) for n, p in model.named_parameters()}
    out.update({f"buffer {n}": _full(b) for n, b in model.named_buffers()})
    if not sp._finalized:
        out.update({f"effective {n}": sp._full_effective(sw).clone() for n, sw in sp.layers.items()})
    return out


def _train(run, method, options, order, x, y, steps=range(STEPS), sharded=True):
    """One run; ``sharded``: FSDP2 on this rank's data, else one process on the global batch
    (``x``, ``y``: lists over ranks)."""
    model = _net(run)
    if sharded and order == "after":
        _shard(model, None)
    sp = _sparsify(model, method, options)
    if sharded and order != "after":
        _shard(model, sp, per_layer=order == "first")
    opt = _optimizer(model, sp)
    extra = 1 if run == "gmp_freeze" else 0
    for t in list(steps) + list(range(STEPS, STEPS + extra)):
        if t == STEPS:
            sp.freeze()
        xt = x[t % STEPS] if sharded else torch.cat([xr[t % STEPS] for xr in x])
        yt = y[t % STEPS] if sharded else torch.cat([yr[t % STEPS] for yr in y])
        opt.zero_grad()
        _loss(model, sp, xt, yt).backward()
        opt.step()
        sp.step()
    snap = _snapshot(model, sp)
    info = dict(sparsity=sp.sparsity(), step=sp.step_count, scales=sp.scales, scope=sp.scope,
                target=sp.target(), keys=list(model.state_dict()))
    if run == "gmp_freeze":
        sp.finalize()
        snap.update({f"final {n}": _full(p) for n, p in model.named_parameters()})
        info["final"] = dict(tables=[n for n, m in model.named_modules() if "_sparsekern" in m.__dict__],
                             keys=list(model.state_dict()))
    return snap, info


def _expected_thresholds(run, snap, method, options):
    """Thresholds of one process at step STEPS on the gathered full weights: a fresh model holding
    them, sparsified the same way, stepped once at that step (same rules: scope, scales, min_density)."""
    model = _net(run)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(snap[f"param {n}"])
    sp = _sparsify(model, method, options)
    sp.step_count = STEPS - 1
    sp.step()
    return [sw.threshold.clone() for sw in sp.layers.values()]


def _masks_case():
    """Masks of STARFIRE (and N:M) built from FSDP2 shards and from the whole weights."""
    import sparsekern as sk
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, opts in MASK_CASES + [("nm", None)]:
        model = _net()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            model[2].weight[0, :3] = model[2].weight[1, :3]  # ties across shards (rows 0, 1) and within
            model[6].weight[4, :8] = model[6].weight[0, :8]
        method = "nm" if opts is None else "starfire"
        kw = dict(era=(0, 2)) if opts is None else dict(sparsity=0.6, era=(0, 2), **opts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sp = sk.sparsify(model, method, **kw)
        whole = sp.method.masks([sw.weight.detach() for sw in sp.layers.values()], 0.6 if opts else 0.5)
        _shard(model, sp)
        sharded = sp.method.sharded_masks(list(sp.layers.values()), 0.6 if opts else 0.5,
                                          torch.distributed.group.WORLD)
        out[name] = [(a.clone(), b.clone()) for a, b in zip(sharded, whole)]
    return out


def _dcp_case(run, method, options, x, y, outdir):
    """Save after 2 steps (DCP, 2 ranks), continue 2 steps; resume fresh models from the save, 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = os.path.join(outdir, f"ckpt_{run}")

    def build():
        model = _net()
        sp = _sparsify(model, method, options)
        _shard(model, sp)
        return model, sp, _optimizer(model, sp)

    def train(model, sp, opt, steps):
        for t in steps:
            opt.zero_grad()
            _loss(model, sp, x[t], y[t]).backward()
            opt.step()
            sp.step()

    model, sp, opt = build()
    train(model, sp, opt, range(2))
    msd, osd = get_state_dict(model, opt)
    keys = list(msd)
    dcp.save({"model": msd, "optim": osd, "sparsifier": sp.state_dict()}, checkpoint_id=path)
    train(model, sp, opt, range(2, 4))
    a = _snapshot(model, sp)
    model, sp, opt = build()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "sparsifier": sp.state_dict()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sp.load_state_dict(state["sparsifier"])
    train(model, sp, opt, range(2, 4))
    return dict(uninterrupted=a, resumed=_snapshot(model, sp), keys=keys, step=sp.step_count)


def _refusals():
    """Collective: both ranks run it. Each case: (exception type, message)."""
    import sparsekern as sk
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    def attempt(fn):
        try:
            fn()
            return None, "no exception"
        except Exception as e:  # noqa: BLE001 - reported to the parent, which asserts the type
            return type(e).__name__, str(e)

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}

    def tp_model():
        model = _net()
        model[6].weight = nn.Parameter(distribute_tensor(model[6].weight.detach(), mesh, [Shard(0)]))
        return model
    tp = tp_model()
    keys = list(tp.state_dict())
    out["tp_sparsify"] = attempt(lambda: sk.sparsify(tp, "gmp", sparsity=0.5))
    out["tp_untouched"] = (list(tp.state_dict()) == keys and not any("_sparsekern" in m.__dict__ for m in tp.modules()),
                           "")

    def tp_after():
        model = _net()
        sp = sk.sparsify(model, "gmp", sparsity=0.5)
        model[6]._parameters["weight"] = nn.Parameter(distribute_tensor(model[6]._parameters["weight"].detach(),
                                                                        mesh, [Shard(0)]))
        sp.step()
    out["tp_step"] = attempt(tp_after)
    for method, kw in [("str", {}), ("asl", dict(sparsity=0.5)), ("nm", dict(era=(0, 2))),
                       ("starfire", dict(sparsity=0.5, era=(0, 2)))]:
        def after(method=method, kw=kw):
            model = _net()
            _shard(model, None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sk.sparsify(model, method, **kw)
        out[f"{method}_after_shard"] = attempt(after)

    def unsynced_s():
        from torch.distributed.fsdp import fully_shard
        model = _net()
        sp = sk.sparsify(model, "str")
        fully_shard(model, ignored_params={sw.s for sw in sp.layers.values()})  # not replicated_params()
        sp.step()
    out["str_unsynced"] = attempt(unsynced_s)
    def unsharded_step():
        model = _net()
        sp = _sparsify(model, "nm", dict(era=(0, 2)))
        _shard(model, sp)
        layers = [model[i] for i in (0, 2, 6)]
        for m in layers:
            m.unshard()
        try:
            sp.step()
        finally:
            for m in layers:
                m.reshard()
    out["unsharded_step"] = attempt(unsharded_step)

    def dead_layer():  # layer 6 far below the others: the global threshold prunes all of it
        model = _net()
        with torch.no_grad():
            model[6].weight.mul_(1e-4)
        sp = sk.sparsify(model, "gmp", schedule=lambda t: 0.5 if t else 0.0, scope="global")  # pruning after sharding
        _shard(model, sp)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sp.step()
        dead = [str(w.message) for w in caught if "100 % pruned" in str(w.message)]
        return None, f"{dead} {sp.sparsity()['dead']}"
    out["dead_layer"] = dead_layer()
    for method, kw in [("gmp", dict(sparsity=0.5)), ("nm", dict(era=(0, 2)))]:
        def nan_on_rank1(method=method, kw=kw):  # both ranks must raise (not one raise, one hang)
            model = _net()
            sp = _sparsify(model, method, kw)
            _shard(model, sp)
            if torch.distributed.get_rank() == 1:
                with torch.no_grad():
                    model[2].weight.to_local()[0, 0, 0, 0] = float("nan")
            sp.step()
        out[f"{method}_nan"] = attempt(nan_on_rank1)
    return out


def _worker(rank, port, outdir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    results = {}

    def collect(key, fn, reference=None):
        t0 = time.perf_counter()
        try:
            mine = fn()
        except Exception:  # noqa: BLE001 - same code on both ranks: both reach the gather below
            mine = dict(error=traceback.format_exc())
        gathered = [None] * WORLD if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank == 0:
            res = dict(ranks=gathered)
            if reference is not None:
                try:
                    res.update(reference(gathered))
                except Exception:  # noqa: BLE001
                    res["error"] = traceback.format_exc()
            res["seconds"] = time.perf_counter() - t0
            results[key] = res

    try:
        x, y = _data(rank)
        data = [_data(r) for r in range(WORLD)]
        for run, method, options, order in RUNS:
            def mine(run=run, method=method, options=options, order=order):
                snap, info = _train(run, method, options, order, x, y)
                return dict(snapshot=snap, info=info)

            def reference(gathered, run=run, method=method, options=options, order=order):
                out = {}
                snap, info = _train(run, method, options, order, [d[0] for d in data], [d[1] for d in data],
                                    sharded=False)
                out["global"], out["global_info"] = snap, info
                g = gathered[0]
                if "error" not in g and g["info"]["scope"] is not None and run != "gmp_freeze":
                    out["expected_thresholds"] = _expected_thresholds(run, g["snapshot"], method, options)
                return out
            collect(run, mine, reference)
        collect("select", lambda: _select_case(rank))
        collect("masks", _masks_case)
        for run in DCP_RUNS:
            method, options = {r[0]: (r[1], r[2]) for r in RUNS}[run]
            collect(f"dcp_{run}", lambda method=method, options=options, run=run:
                    _dcp_case(run, method, options, x, y, outdir))
        collect("refusals", _refusals)
        if rank == 0:
            torch.save(results, os.path.join(outdir, RESULTS + ".tmp"))
            os.replace(os.path.join(outdir, RESULTS + ".tmp"), os.path.join(outdir, RESULTS))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --- the parent: spawn, wait (bounded), load ------------------------------------------------------

@pytest.fixture(scope="module")
def results():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return spawn_ranks(__file__, WORLD, PARENT_TIMEOUT_S, RESULTS, weights_only=False)


def _rel(run, key, a, b):
    a, b = a.double(), b.double()
    if run == "feather" and key.startswith("effective "):
        a, b = a ** FEATHER_P, b ** FEATHER_P  # Lipschitz domain (see tests/test_distributed.py)
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff / scale if scale else diff


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("run", RUN_NAMES)
def test_ranks_bit_identical(results, run):
    res = rank_case(results, run)
    a, b = (g["snapshot"] for g in res["ranks"])
    assert list(a) == list(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{run}: ranks differ in {differ}"
    info = res["ranks"][0]["info"]
    assert info["step"] == STEPS + (run == "gmp_freeze")
    assert not any("_fsdp" in k or "parametriz" in k for k in info["keys"]), info["keys"]
    method = run.split("_")[0]
    if method in ("str", "asl"):  # the learned thresholds trained (identical ranks would prove little otherwise)
        init = {"str": -3.0, "asl": 2 ** 0.5 * float(torch.erfinv(torch.tensor(0.3, dtype=torch.float64)))}[method]
        learned = {k: v for k, v in a.items() if k.startswith("param ") and k.endswith((".s", ".r"))}
        assert len(learned) == 3 and all(float((v.double() - init).abs().min()) > 1e-6 for v in learned.values())
    elif run != "gmp_freeze":
        assert info["sparsity"]["overall"] >= 0.45, info["sparsity"]


@pytest.mark.parametrize("run", [r for r in RUN_NAMES if r.split("_")[0] not in ("str", "asl", "starfire", "nm")
                                 and r != "gmp_freeze"])
def test_thresholds_bit_identical_to_one_process_on_full_weights(results, run):
    res = rank_case(results, run)
    snap = res["ranks"][0]["snapshot"]
    got = [v for k, v in snap.items() if k.startswith("buffer ") and k.endswith(".threshold")]
    expected = res["expected_thresholds"]
    assert len(got) == len(expected) == (2 if run.endswith("_conv1d") else 3)
    for t, e in zip(got, expected):
        assert torch.equal(t.view(torch.int32), e.view(torch.int32)), (run, t, e)
    assert all(float(t) > 0 for t in got)


@pytest.mark.parametrize("run", RUN_NAMES)
def test_matches_one_process_global_batch(results, run):
    """Masks and sparsity() exactly; weights and thresholds within GLOBAL_BATCH_REL of their scale
    (a threshold is an order statistic of weights that differ by float reassociation; its exactness
    on the run's own weights is the test above)."""
    res = rank_case(results, run)
    a, ref = res["ranks"][0]["snapshot"], res["global"]
    assert list(a) == list(ref)
    bad = {}
    for k in a:
        if a[k].dtype == torch.bool:
            if not torch.equal(a[k], ref[k]):
                bad[k] = "differs"
        elif (rel := _rel(run, k, a[k], ref[k])) > GLOBAL_BATCH_REL:
            bad[k] = f"{rel:.3g}"
    assert not bad, f"{run}: FSDP2 vs one process on the global batch: {bad}"
    assert res["ranks"][0]["info"]["sparsity"] == res["global_info"]["sparsity"]
    if run == "gmp_freeze":
        final = res["ranks"][0]["info"]["final"]  # finalize(): no sparse state left, plain keys
        assert not final["tables"] and not any(k.endswith((".mask", ".threshold")) for k in final["keys"]), final
        for k in a:  # the baked weights are the effective ones
            if k.startswith("final "):
                eff = a.get("effective " + k[len("final "):].removesuffix(".weight"))
                assert eff is None or torch.equal(a[k], eff), k
        assert any(k.endswith(".mask") for k in a)


def test_selection_over_shards_bit_identical_to_one_process(results):
    """2 ranks with uneven shards (one empty; ties, inf, ±0, scales, every interpolation) on the
    CPU path with and without the bracket and on the accelerator path; the public functions with
    plain shards + group= and with DTensors (Shard(0), Shard(1)); replicated/mixed inputs refused."""
    import sparsekern as sk
    gathered = rank_case(results, "select")["ranks"]
    ws = _cases()
    scales = [1.0, 3.5, 0.25, 1.0, 2.0]
    expect_g, expect_l = [], []
    for s in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0):
        for interp in ("linear", "lower", "higher", "nearest"):
            expect_g.append(sk.global_magnitude_threshold(ws, s, scales=scales, interpolation=interp))
        expect_l.append(sk.magnitude_thresholds(ws, s))
    for rank, mode in [(r, m) for r in range(2) for m in MODES]:
        got = gathered[rank][mode]
        assert len(got["global"]) == len(expect_g) == 24 and len(got["layer"]) == len(expect_l) == 6
        for a, b in zip(got["global"], expect_g):  # bit-identical (NaN where numpy gives inf − inf)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, a, b)
        for a, b in zip(got["layer"], expect_l):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, a, b)
    finite = ws[:4]
    expect_p = []
    for s in (0.3, 0.9):
        expect_p += [sk.global_magnitude_threshold(finite, s, scales=scales[:4]), sk.magnitude_thresholds(finite, s),
                     sk.global_magnitude_threshold([finite[0], finite[2]], s),
                     sk.magnitude_thresholds([finite[0], finite[2]], s)]
    for rank in range(2):
        res = gathered[rank]
        assert len(res["public"]) == len(expect_p) == 8
        for a, b in zip(res["public"], expect_p):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, a, b)
        replicated, mixed = res["errors"]
        assert replicated.startswith("ValueError: tensors[0] is (Replicate(),)") and "sharded (Shard(d))" in replicated
        assert mixed.startswith("TypeError: tensors mixes DTensors and plain tensors"), mixed


@pytest.mark.parametrize("case", [c for c, _ in MASK_CASES] + ["nm"])
def test_masks_from_shards_equal_whole_weight_masks(results, case):
    res = rank_case(results, "masks")
    for rank, g in enumerate(res["ranks"]):
        pairs = g[case]
        assert len(pairs) >= 2
        for i, (sharded, whole) in enumerate(pairs):
            assert sharded.dtype == torch.bool and sharded.shape == whole.shape
            assert torch.equal(sharded, whole), (case, rank, i, int((sharded != whole).sum()))
            assert 0 < int(whole.sum()) < whole.numel()


@pytest.mark.parametrize("run", DCP_RUNS)
def test_dcp_resume_bit_exact(results, run):
    res = rank_case(results, f"dcp_{run}")
    for rank, g in enumerate(res["ranks"]):
        a, b = g["uninterrupted"], g["resumed"]
        assert list(a) == list(b)
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (run, rank, differ)
        assert g["step"] == 4
        state = {"str": "s", "asl": "r", "starfire": "mask", "nm": "mask"}.get(run, "threshold")
        assert "0.weight" in g["keys"] and f"2.{state}" in g["keys"], g["keys"]
        assert not any("_fsdp" in k or "_orig" in k or "parametriz" in k for k in g["keys"]), g["keys"]


def test_dead_layer_warned_under_fsdp2(results):
    for rank, g in enumerate(rank_case(results, "refusals")["ranks"]):
        exc, msg = g["dead_layer"]
        assert exc is None and re.search(r"1 layer\(s\) are 100 % pruned .*\['6'\].*\] \['6'\]$", msg), (rank, msg)


@pytest.mark.parametrize("case, exc, pattern", [
    ("tp_sparsify", "ValueError", r"weight '6' is a DTensor .* not managed by FSDP2"),
    ("tp_step", "ValueError", r"weight '6' is a DTensor .* not managed by FSDP2"),
    ("str_after_shard", "ValueError", r"already sharded by FSDP2 .* sparsify\(model\) first"),
    ("asl_after_shard", "ValueError", r"already sharded by FSDP2 .* sparsify\(model\) first"),
    ("nm_after_shard", "ValueError", r"already sharded by FSDP2 .* sparsify\(model\) first"),
    ("starfire_after_shard", "ValueError", r"already sharded by FSDP2 .* sparsify\(model\) first"),
    ("unsharded_step", "RuntimeError", r"sparse weights are unsharded .* would not reach the shards"),
    ("gmp_nan", "FloatingPointError", r"tensors\[1\] contains NaN"),
    ("nm_nan", "FloatingPointError", r"weight '2' contains NaN"),
    ("str_unsynced", "RuntimeError", r"learned thresholds of \['0', '2', '6'\] .*sparsifier\.replicated_params\(\)"),
])
def test_refused_with_a_clear_error(results, case, exc, pattern):
    for rank, g in enumerate(rank_case(results, "refusals")["ranks"]):
        got_exc, msg = g[case]
        assert got_exc == exc and re.search(pattern, msg), (rank, case, got_exc, msg)
        if case == "tp_sparsify":
            assert g["tp_untouched"][0], "the refused sparsify changed the model"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
