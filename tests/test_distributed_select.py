"""Distributed exact magnitude quantiles (``sparsekern.ops.distributed``): 2 gloo ranks on 127.0.0.1
holding uneven shards (one empty) give bit-identical thresholds to one process on the full tensors,
on the CPU path and on the accelerator path (no host sync). FSDP2 training: test_distributed_fsdp.py."""
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
    res = {}
    scales = [1.0, 3.5, 0.25, 1.0, 2.0]
    for shrink in (True, False):  # False: the accelerator path (no host sync, nothing dropped)
        D._SHRINK_ON_CPU = shrink
        got = res[shrink] = {"global": [], "layer": []}
        for s in (0.0, 0.1, 0.5, 0.9, 0.97, 1.0):
            for interp in ("linear", "lower", "higher", "nearest"):
                got["global"].append(D.global_magnitude_threshold(local, sum(numels), s, scales=scales,
                                                                  interpolation=interp))
            got["layer"].append(D.magnitude_thresholds(local, numels, s))
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
    for rank, shrink in [(r, k) for r in range(2) for k in (True, False)]:
        got = torch.load(f"{out}.{rank}")[shrink]
        assert len(got["global"]) == len(expect_g) == 24 and len(got["layer"]) == len(expect_l) == 6
        for a, b in zip(got["global"], expect_g):  # bit-identical (NaN where numpy gives inf − inf)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, a, b)
        for a, b in zip(got["layer"], expect_l):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, a, b)
