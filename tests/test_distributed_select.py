"""Distributed exact magnitude quantiles (issue 15, WIP): 2 gloo ranks on 127.0.0.1 holding uneven
shards (one empty) give bit-identical thresholds to one process on the full tensors."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

import sparsekern as sk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _worker(rank, port, out):
    import torch.distributed as dist

    from sparsekern.ops import distributed as D
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ws = _cases()
    local = [_shards(w, rank) for w in ws]
    numels = [w.numel() for w in ws]
    res = {"global": [], "layer": []}
    scales = [1.0, 3.5, 0.25, 1.0, 2.0]
    for s in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0):
        for interp in ("linear", "lower", "higher", "nearest"):
            res["global"].append(D.global_magnitude_threshold(local, sum(numels), s, scales=scales,
                                                              interpolation=interp))
        res["layer"].append(D.magnitude_thresholds(local, numels, s))
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    out = str(tmp_path / "res")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ws = _cases()
    scales = [1.0, 3.5, 0.25, 1.0, 2.0]
    expect_g, expect_l = [], []
    for s in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0):
        for interp in ("linear", "lower", "higher", "nearest"):
            expect_g.append(sk.global_magnitude_threshold(ws, s, scales=scales, interpolation=interp))
        expect_l.append(sk.magnitude_thresholds(ws, s))
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for a, b in zip(got["global"], expect_g):  # bit-identical (NaN where numpy gives inf − inf)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, a, b)
        for a, b in zip(got["layer"], expect_l):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, a, b)


def _fsdp_worker(rank, port, out):
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from sparsekern.ops import distributed as D
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    fully_shard(model)  # parameters become DTensors, Shard(0) over the 2 ranks (uneven: 5 rows, 3 rows)
    ws = [model[0].weight, model[3].weight]
    local = [w.to_local().detach() for w in ws]
    res = [D.global_magnitude_threshold(local, sum(w.numel() for w in ws), s) for s in (0.3, 0.5, 0.9)]
    res.append(D.magnitude_thresholds(local, [w.numel() for w in ws], 0.5))
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_fsdp2_shards_match_the_full_weights(tmp_path):
    out = str(tmp_path / "fsdp")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_fsdp_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(80, 3))
    ws = [model[0].weight.detach(), model[3].weight.detach()]
    expect = [sk.global_magnitude_threshold(ws, s) for s in (0.3, 0.5, 0.9)] + [sk.magnitude_thresholds(ws, 0.5)]
    for rank in range(2):
        for a, b in zip(torch.load(f"{out}.{rank}"), expect):
            assert torch.equal(a, b), (rank, a, b)


def _fsdp_train_worker(rank, port, out, method):
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    model, ref = make(), make()
    sp = sk.sparsify(model, method, schedule=sk.CubicSchedule(0, 3, 0.5))
    spr = sk.sparsify(ref, method, schedule=sk.CubicSchedule(0, 3, 0.5))
    for m in (model[0], model[2]):
        fully_shard(m)
    fully_shard(model)  # sparsify first, then FSDP2 per layer and at the root
    opt, optr = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        xs = [torch.randn(4, 8, generator=g) for _ in range(2)]
        loss = model(xs[rank]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        ref_loss = sum(ref(x).square().mean() for x in xs) / 2  # one process, the global batch
        optr.zero_grad()
        ref_loss.backward()
        optr.step()
        spr.step()
    res = {n: (sp.layers[n].threshold.clone(), spr.layers[n].threshold.clone(),
               (sp.layers[n].param.full_tensor() - spr.layers[n].param).abs().max()) for n in sp.layers}
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["gmp", "st3"])
def test_fsdp2_training_thresholds_match_one_process(tmp_path, method):
    out = str(tmp_path / "train")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_fsdp_train_worker, args=(r, port, out, method)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for rank in range(2):
        for name, (t, t_ref, dw) in torch.load(f"{out}.{rank}").items():
            assert torch.equal(t, t_ref), (rank, name, t, t_ref)
            assert dw <= 1e-6, (rank, name, dw)
