"""Distributed exact magnitude quantiles (``sparsekern.ops.distributed``): 2 gloo ranks on 127.0.0.1
holding uneven shards (one empty) give bit-identical thresholds to one process on the full tensors,
on the CPU path and on the accelerator path (no host sync). FSDP2 training: test_distributed_fsdp.py."""
import socket

import torch
import torch.multiprocessing as mp

import sparsekern as sk


#: ops.distributed's paths: CPU with the local-quantile bracket, CPU radix alone, accelerator (no host sync)
MODES = {"cpu": (True, True), "cpu_radix": (True, False), "accelerator": (False, False)}


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
    for rank, mode in [(r, m) for r in range(2) for m in MODES]:
        got = torch.load(f"{out}.{rank}")[mode]
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
        res = torch.load(f"{out}.{rank}")
        assert len(res["public"]) == len(expect_p) == 8
        for a, b in zip(res["public"], expect_p):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (rank, a, b)
        replicated, mixed = res["errors"]
        assert replicated.startswith("ValueError: tensors[0] is (Replicate(),)") and "sharded (Shard(d))" in replicated
        assert mixed.startswith("TypeError: tensors mixes DTensors and plain tensors"), mixed
