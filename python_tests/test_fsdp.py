"""Models that do not fit one GPU: DTensor parameters of FSDP2's ``fully_shard`` (each rank
exchanges its local shards over the replicate dimension), DDP inside a node with EASGD across
nodes, and the averager's state through ``torch.distributed.checkpoint``.

Real Gloo ranks on CPU: 4 processes = 2 replica groups x 2 shards (``init_device_mesh("cpu",
(2, 2), mesh_dim_names=("replicate", "shard"))``, ``fully_shard(..., mesh=mesh["shard"])``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import easgd_ext
from easgd_ext.data import DigitsCNN
from easgd_ext.methods import method
from conftest import cuda_usable
from dist_harness import Processes, run_ranks, values
from easgd_ext.centers.wires import HEADER
from easgd_ext.stats import ring_allreduce_bytes
from easgd_ext.settings import kernel_path

TAU = 2
EPS32 = torch.finfo(torch.float32).eps


# ---- the models, the mesh and the data ----------------------------------------------------------
def make_mesh(shape=(2, 2), names=("replicate", "shard")):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def plain_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "cnn":
        return DigitsCNN()
    from easgd_ext.lm import ByteTransformer

    return ByteTransformer(d_model=32, layers=1, heads=2, seq_len=16)


def sharded_model(name: str, mesh, seed: int, shard_mesh=None) -> nn.Module:
    """``name``'s model, ``fully_shard``-ed unit by unit and at the root over the shard
    dimension (the layers' parameters: DTensors with ``Shard(0)``)."""
    from torch.distributed.fsdp import fully_shard

    model = plain_model(name, seed)
    where = mesh["shard"] if shard_mesh is None else shard_mesh
    if name == "cnn":
        units = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    else:
        units = list(model.blocks)
    for unit in units:
        fully_shard(unit, mesh=where)
    fully_shard(model, mesh=where)
    return model


def batch(name: str, replica: int, shard: int, step: int):
    g = torch.Generator().manual_seed(10007 * step + 101 * replica + shard)
    if name == "cnn":
        return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    tokens = torch.randint(0, 256, (4, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def local_step(name: str, model: nn.Module, opt, coordinate, step: int) -> None:
    """One optimizer step on this rank's own minibatch (FSDP averages the gradients over the
    shard dimension: a replica trains on its ranks' batches together)."""
    x, y = batch(name, *coordinate, step)
    out = model(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    opt.step()
    opt.zero_grad()


def local_offset(p) -> tuple[int, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1]


def local_part(full: torch.Tensor, p) -> torch.Tensor:
    """The elements of the full tensor ``full`` that ``p``'s local shard holds."""
    local = p.to_local()
    start = local_offset(p)[0] if full.dim() else 0
    return full[start:start + local.shape[0]] if full.dim() else full


def peak(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def gather(group, value):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def center_of(avg, i: int) -> torch.Tensor:
    """The center's shard of parameter ``i`` (one flat group: float32 parameters)."""
    (g,) = avg._groups
    return g.member_view(avg.center_state()[0], i)


# ---- against a float64 reference on the full tensors -------------------------------------------------
def reference_run(rank: int, world: int, name: str, steps: int) -> dict:
    mesh = make_mesh()
    replica, shard = mesh.get_coordinate()
    rep = mesh.get_group("replicate")
    model = sharded_model(name, mesh, seed=replica)  # the replicas start apart: the averager
    params = list(model.parameters())                # broadcasts replica 0's shards
    opt = torch.optim.SGD(params, lr=0.05)
    avg = easgd_ext.ElasticAverager(params, tau=TAU, process_group=mesh["replicate"])

    def full() -> list[torch.Tensor]:
        return [p.full_tensor().double() for p in params]

    start = gather(rep, full())
    same_start = all(torch.equal(a, b) for a, b in zip(start[0], start[1]))
    c = [t.clone() for t in start[0]]  # the center in float64, from the same start
    alpha, worst_x, worst_c, exchanges = avg.alpha, 0.0, 0.0, 0
    for t in range(1, steps + 1):
        local_step(name, model, opt, (replica, shard), t)
        if t % TAU:
            assert not avg.step()
            continue
        xs = gather(rep, full())       # both replicas' full tensors before the exchange
        assert avg.step()
        exchanges += 1
        for i, p in enumerate(params):
            d = [alpha * (xs[r][i] - c[i]) for r in range(len(xs))]
            scale = xs[replica][i].abs() + c[i].abs() + 1e-3
            c[i] = c[i] + sum(d)
            x_ref = xs[replica][i] - d[replica]
            got_x, got_c = p.to_local().detach().double(), center_of(avg, i).double()
            worst_x = max(worst_x, peak((got_x - local_part(x_ref, p)).abs() / local_part(scale, p)))
            worst_c = max(worst_c, peak((got_c - local_part(c[i], p)).abs() / local_part(scale, p)))
    centers = gather(rep, avg.center_state()[0].clone())
    # Memory: the same model unsharded, averaged over the same group.
    plain = plain_model(name, seed=0)
    whole = easgd_ext.ElasticAverager(plain.parameters(), tau=TAU, process_group=mesh["replicate"])
    (g,) = avg._groups
    return {"worst_x": worst_x, "worst_c": worst_c, "exchanges": exchanges, "same_start": same_start,
            "centers_equal": all(torch.equal(centers[0], other) for other in centers[1:]),
            "center_bytes": sum(t.nbytes for t in avg.center_state()),
            "replicated_center_bytes": sum(t.nbytes for t in whole.center_state()),
            "local_bytes": sum(p.to_local().nbytes for p in params),
            "full_bytes": sum(p.numel() * p.element_size() for p in params),
            "layout_numel": g.numel, "bytes_sent": avg.stats.bytes_sent,
            "bytes_per_step": avg.bytes_per_step(), "replicated_bytes_sent": sum(whole.bytes_per_step()),
            "prepared_runs": [len(w._prepare) for w in avg._center.wires],
            "apply_runs": [len(w._apply) for w in avg._center.wires],
            "tensors": len(params)}


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_sharded_easgd_matches_a_float64_reference_on_the_full_tensors(name):
    outs = values(run_ranks(4, reference_run, name, 4 * TAU))
    for out in outs:
        assert out["same_start"]                     # construction broadcast replica 0's shards
        assert out["exchanges"] == 4
        assert out["worst_x"] < 4 * EPS32, out      # float32 rounding of one exchange
        assert out["worst_c"] < 4 * out["exchanges"] * EPS32, out
        assert out["centers_equal"]                  # bit-identical across replica groups
        # Per-rank center memory: half of the replicated case (plus each shard's alignment).
        ratio = out["center_bytes"] / out["replicated_center_bytes"]
        assert out["local_bytes"] * 2 <= out["full_bytes"] + 64 * out["tensors"]
        assert 0.45 < ratio < 0.5 + 64 * 4 * out["tensors"] / out["replicated_center_bytes"], ratio
        # Bytes on the network: the local shard's, not the model's (ring model, p = 2), and the
        # non-finite flag shared with the replica's other shard (one float32, 2 ranks).
        one = ring_allreduce_bytes((HEADER + out["layout_numel"]) * 4, 2) + ring_allreduce_bytes(4, 2)
        assert out["bytes_sent"] == out["exchanges"] * one
        assert sum(out["bytes_per_step"]) == one and out["bytes_per_step"][TAU - 1] == one
        assert one < 0.5 * out["replicated_bytes_sent"] + 4 * 64 * out["tensors"]
        # The whole model is one prepared native run per step of the exchange (the torch-level
        # path, EASGD_EXT_KERNELS=torch, runs a Python step per segment instead).
        if kernel_path() == "fused":
            assert out["prepared_runs"] == [1] and out["apply_runs"] == [1]


# ---- bit for bit the same as the unsharded averager on the same values --------------------------------
AVERAGERS = {name: method(name).averager for name in ("easgd", "downpour", "average", "diloco")}
SHADOW_CASES = [("easgd", {}), ("easgd", {"delay": 1, "comm_dtype": "bfloat16"}),
                ("easgd", {"outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}),
                ("downpour", {}), ("average", {}), ("diloco", {"outer_lr": 0.7})]


def shadow_run(rank: int, world: int, steps: int) -> list[dict]:
    """Each case: the sharded averager and, beside it, the same averager on plain full tensors
    given the same values before every step (over the same group): the local shards and the
    center's shards must equal the plain one's slices bit for bit."""
    mesh = make_mesh()
    replica, shard = mesh.get_coordinate()
    out = []
    for kind, kwargs in SHADOW_CASES:
        model = sharded_model("cnn", mesh, seed=replica)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.05)
        shadow = [nn.Parameter(p.full_tensor().detach().clone()) for p in params]
        avg = AVERAGERS[kind](params, tau=TAU, process_group=mesh["replicate"], **kwargs)
        ref = AVERAGERS[kind](shadow, tau=TAU, process_group=mesh["replicate"], **kwargs)
        equal = True
        for t in range(1, steps + 1):
            local_step("cnn", model, opt, (replica, shard), t)
            with torch.no_grad():
                for s, p in zip(shadow, params):
                    s.copy_(p.full_tensor())
            avg.step()
            ref.step()
            for i, (p, s) in enumerate(zip(params, shadow)):
                equal &= torch.equal(p.to_local(), local_part(s.detach(), p))
                if ref.center_state():
                    g = ref._groups[0]
                    full_c = ref.center_state()[0].as_strided(s.shape, g.strides[i], g.offsets[i])
                    equal &= torch.equal(center_of(avg, i), local_part(full_c, p))
        out.append({"case": f"{kind} {kwargs}", "equal": bool(equal), "stats": avg.stats,
                    "ref_stats": ref.stats})
    return out


def test_the_sharded_exchange_equals_the_unsharded_one_bit_for_bit():
    for rank_out in values(run_ranks(4, shadow_run, 3 * TAU)):
        for case in rank_out:
            assert case["equal"], case["case"]
            # 3 exchanges (with delay 1, the last one's sum is still in flight)
            assert case["stats"].exchanges == case["ref_stats"].exchanges >= 2, case


# ---- fragments and delay, against a float64 simulation of the schedule --------------------------------
def fragments_run(rank: int, world: int, fragments: int, delay: int, steps: int) -> dict:
    tau = 4
    mesh = make_mesh()
    replica, shard = mesh.get_coordinate()
    rep = mesh.get_group("replicate")
    model = sharded_model("cnn", mesh, seed=0)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    avg = easgd_ext.ElasticAverager(params, tau=tau, process_group=mesh["replicate"],
                                    fragments=fragments, delay=delay)
    plans = [(p.offset, [(q.start, q.end) for q in p.pieces]) for p in avg._center.plans]
    c = avg.center_state()[0].double().clone()
    pending: list[tuple[int, list, list]] = []
    worst, in_flight_seen = 0.0, 0
    for t in range(1, steps + 1):
        local_step("cnn", model, opt, (replica, shard), t)
        xs = [x.double() for x in gather(rep, avg.flat_parameters()[0].clone())]
        expected = xs[replica].clone()
        for offset, ranges in plans:
            if (t - offset) % tau == 0:
                ds = [[avg.alpha * (x[a:b] - c[a:b]) for a, b in ranges] for x in xs]
                pending.append((t + delay, ranges, ds))
        for item in [p for p in pending if p[0] == t]:
            _, ranges, ds = item
            for k, (a, b) in enumerate(ranges):
                expected[a:b] -= ds[replica][k]
                c[a:b] += sum(d[k] for d in ds)
            pending.remove(item)
        avg.step()
        in_flight_seen = max(in_flight_seen, avg.in_flight)
        scale = xs[replica].abs() + c.abs() + 1e-3
        worst = max(worst, float(((avg.flat_parameters()[0].double() - expected).abs() / scale).max()),
                    float(((avg.center_state()[0].double() - c).abs() / scale).max()))
    return {"worst": worst, "in_flight_seen": in_flight_seen, "plans": len(plans)}


@pytest.mark.parametrize("fragments,delay", [(3, 0), (2, 1)])
def test_sharded_fragments_and_delay_match_a_float64_simulation(fragments, delay):
    for out in values(run_ranks(4, fragments_run, fragments, delay, 11)):
        assert out["plans"] == fragments
        assert out["worst"] < 40 * EPS32, out
        assert out["in_flight_seen"] == (1 if delay else 0)


# ---- a diverged replica is decided as a whole -------------------------------------------------------
def nonfinite_run(rank: int, world: int, policy: str) -> dict:
    """Replica 1's shard 0 (rank 2) alone gets a NaN: the verdict is shared with its other
    shard (rank 3), so the whole replica is reset (or the exchange skipped or raised on, on
    every rank)."""
    mesh = make_mesh()
    replica, shard = mesh.get_coordinate()
    model = sharded_model("cnn", mesh, seed=0)
    params = list(model.parameters())
    avg = easgd_ext.ElasticAverager(params, tau=1, process_group=mesh["replicate"],
                                    on_nonfinite=policy)
    with torch.no_grad():
        for p in params:
            p.to_local().add_(0.01 * (1 + replica))  # the replicas apart from the center
        if rank == 2:
            params[0].to_local().view(-1)[0] = float("nan")
    centers_before = [center_of(avg, i).clone() for i in range(len(params))]
    try:
        avg.exchange()
        error = None
    except easgd_ext.NonFiniteError as exc:
        error = str(exc)
    reset = all(torch.equal(p.to_local(), center_of(avg, i)) for i, p in enumerate(params))
    return {"error": error, "reset_to_center": reset, "stats": avg.stats,
            "center_moved": any(not torch.equal(a, center_of(avg, i))
                                for i, a in enumerate(centers_before))}


@pytest.mark.parametrize("policy", ["reset", "raise"])
def test_a_nan_in_one_shard_decides_for_the_whole_replica(policy):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = values(run_ranks(4, nonfinite_run, policy))
    if policy == "reset":
        assert [o["reset_to_center"] for o in outs] == [False, False, True, True]  # replica 1
        assert all(o["stats"].resets == 0 for o in outs[:2]) and all(o["center_moved"] for o in outs)
        assert [o["error"] for o in outs] == [None] * 4
    else:
        assert all(o["error"] is not None and "skipped" in o["error"] for o in outs)
        assert not any(o["center_moved"] for o in outs)


# ---- distributed checkpoints -------------------------------------------------------------------------
DCP_KW = {"tau": 4, "fragments": 2, "delay": 1}
DCP_STEPS, DCP_CUT = 13, 6       # fragment 1 (sent at step 6) is in flight at the cut


def _dcp_job(seed: int):
    mesh = make_mesh()
    replica, shard = mesh.get_coordinate()
    model = sharded_model("transformer", mesh, seed=seed)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    avg = easgd_ext.ElasticAverager(params, process_group=mesh["replicate"], **DCP_KW)
    return mesh, (replica, shard), model, params, opt, avg


def _final(params, avg) -> dict:
    return {"x": [p.to_local().clone() for p in params], "center": avg.center_state()[0].clone(),
            "clock": avg.clock, "exchanges": avg.stats.exchanges}


def dcp_straight(rank: int, world: int, path: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    mesh, coord, model, params, opt, avg = _dcp_job(seed=coord_seed(rank))
    in_flight = None
    for t in range(1, DCP_STEPS + 1):
        local_step("transformer", model, opt, coord, t)
        avg.step()
        if t == DCP_CUT:
            in_flight = avg.in_flight
            msd, osd = get_state_dict(model, opt)
            # the replicas' models differ: one entry each (DCP keeps one copy of equal keys)
            dcp.save({f"replica{avg.replica}": {"model": msd, "optim": osd},
                      "averager": avg.dcp_state()}, checkpoint_id=path)
    return {**_final(params, avg), "in_flight_at_cut": in_flight}


def coord_seed(rank: int) -> int:
    return rank // 2  # the replica's index: the replicas start apart


def dcp_resume(rank: int, world: int, path: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh, coord, model, params, opt, avg = _dcp_job(seed=100 + rank)  # nothing from the old start
    msd, osd = get_state_dict(model, opt)
    mine = {"model": msd, "optim": osd}
    dcp.load({f"replica{avg.replica}": mine, "averager": avg.dcp_state()}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=mine["model"], optim_state_dict=mine["optim"])
    resumed = {"clock": avg.clock, "in_flight": avg.in_flight}
    for t in range(DCP_CUT + 1, DCP_STEPS + 1):
        local_step("transformer", model, opt, coord, t)
        avg.step()
    out = {**_final(params, avg), "resumed": resumed}
    # Another topology: the same 4 ranks as 4 replicas of an unsharded model.
    other = make_mesh((4, 1))
    model4 = sharded_model("transformer", other, seed=0)
    avg4 = easgd_ext.ElasticAverager(model4.parameters(), process_group=other["replicate"], **DCP_KW)
    try:
        dcp.load({"averager": avg4.dcp_state()}, checkpoint_id=path)
        out["other_topology"] = None
    except Exception as exc:  # noqa: BLE001 -- the test reads it
        out["other_topology"] = (type(exc).__name__, str(exc))
    return out


def test_dcp_save_tear_down_load_resumes_bit_for_bit(tmp_path):
    path = str(tmp_path / "ckpt")
    straight = values(run_ranks(4, dcp_straight, path))
    resumed = values(run_ranks(4, dcp_resume, path))   # fresh processes: nothing survives
    for s, r in zip(straight, resumed):
        assert s["in_flight_at_cut"] == 1
        assert r["resumed"] == {"clock": DCP_CUT, "in_flight": 1}
        assert all(torch.equal(a, b) for a, b in zip(s["x"], r["x"]))
        assert torch.equal(s["center"], r["center"])
        assert s["clock"] == r["clock"] == DCP_STEPS
        kind, message = r["other_topology"]
        assert kind == "ValueError" and "replicate degree" in message and "same topology" in message
    # The center's shards are written once (the replicas' copies are the same DTensor chunks).
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    center = [k for k in meta if k.startswith("averager.center.center.")]
    assert center and all(hasattr(meta[k], "chunks") and len(meta[k].chunks) == 2 for k in center
                          if meta[k].size[0] > 1)
    assert {k.split(".")[1] for k in meta if k.startswith("averager.rank")} == {f"rank{r}" for r in range(4)}


def dcp_plain(rank: int, world: int, path: str, kind: str, kwargs: dict) -> dict:
    """Plain (unsharded) parameters, 2 ranks: 12 steps straight, and the same with a DCP
    checkpoint after 6 loaded into a new model and averager (the 8-bit wire's residuals, a
    DOWNPOUR x_last, fragments in flight): bit for bit the same."""
    import torch.distributed.checkpoint as dcp

    def params_(seed):
        g = torch.Generator().manual_seed(seed)
        return [nn.Parameter(torch.randn(s, generator=g)) for s in [(300,), (17, 33), (2000,)]]

    def step(params, t):
        g = torch.Generator().manual_seed(1000 * t + rank)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g), alpha=0.05)

    def run(stop, load=None):
        params = params_(0 if load is None else 7)
        avg = AVERAGERS[kind](params, tau=4, **kwargs)
        first = 1
        if load is not None:
            model = {f"p{i}": p.detach() for i, p in enumerate(params)}
            dcp.load({f"replica{avg.replica}": model, "averager": avg.dcp_state()}, checkpoint_id=load)
            first = avg.clock + 1
        for t in range(first, stop + 1):
            step(params, t)
            avg.step()
        return params, avg

    straight, avg = run(12)
    params, cut = run(6)
    in_flight = cut.in_flight
    model = {f"p{i}": p.detach() for i, p in enumerate(params)}
    dcp.save({f"replica{cut.replica}": model, "averager": cut.dcp_state()}, checkpoint_id=path)
    resumed, again = run(12, load=path)
    return {"same_x": all(torch.equal(a, b) for a, b in zip(straight, resumed)),
            "same_c": torch.equal(avg.center_state()[0], again.center_state()[0]),
            "in_flight": in_flight}


@pytest.mark.parametrize("kind,kwargs", [("easgd", {"comm_dtype": "int8", "fragments": 2, "delay": 1}),
                                         ("downpour", {"comm_dtype": "int8"})])
def test_dcp_resume_of_plain_averagers_is_exact(tmp_path, kind, kwargs):
    for out in values(run_ranks(2, dcp_plain, str(tmp_path / "ckpt"), kind, kwargs)):
        assert out["same_x"] and out["same_c"], out
        assert out["in_flight"] == (1 if kwargs.get("delay") else 0)


# ---- bad input: the same clear error on every rank ------------------------------------------------------
def bad_inputs(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = make_mesh()
    cases = {}

    def attempt(case, make):
        try:
            make()
            cases[case] = None
        except Exception as exc:  # noqa: BLE001 -- the test reads it
            cases[case] = (type(exc).__name__, str(exc))

    params = list(sharded_model("cnn", mesh, seed=0).parameters())
    rep = mesh["replicate"]
    E = easgd_ext.ElasticAverager
    attempt("no_group", lambda: E(params))
    attempt("mixed", lambda: E(params + [nn.Parameter(torch.zeros(3))], process_group=rep))
    odd = nn.Parameter(distribute_tensor(torch.zeros(4, 6), mesh["shard"], [Shard(1)]))
    attempt("placement", lambda: E(params[:2] + [odd], process_group=rep))
    attempt("shard_group", lambda: E(params, process_group=mesh["shard"]))
    attempt("world", lambda: E(params, process_group=dist.group.WORLD))
    attempt("mesh_2d", lambda: E(params, process_group=mesh))
    attempt("async", lambda: E(params, mode="async", process_group=rep))
    attempt("int8", lambda: E(params, comm_dtype=torch.int8, process_group=rep))
    hsdp = DigitsCNN()
    fully_shard(hsdp, mesh=mesh)  # HSDP: Replicate() over the replicate dimension, Shard(0) inside
    attempt("hsdp", lambda: E(hsdp.parameters(), process_group=rep))
    # One rank of a group passes plain tensors, its peer a sharded model.
    plain = list(plain_model("cnn", 0).parameters())
    attempt("plain_on_one_rank", lambda: E(plain if rank == 0 else params, process_group=rep))
    attempt("fine_after_all_that", lambda: E(params, process_group=rep))

    def replaced():  # FSDP gives the parameters new storage after the averager was built
        model = sharded_model("cnn", mesh, seed=0)
        avg = E(model.parameters(), process_group=rep)
        model.to(torch.float64)   # FSDP's _apply: new local shards in the same parameters
        avg.exchange()

    attempt("replaced", replaced)
    return cases


EXPECTED = {"no_group": ("ValueError", "need process_group="),
            "mixed": ("TypeError", "mixes DTensor parameters"),
            "placement": ("ValueError", "placements (Shard(dim=1),)"),
            "shard_group": ("ValueError", "process_group does not match the parameters' mesh"),
            "world": ("ValueError", "process_group does not match the parameters' mesh"),
            "mesh_2d": ("ValueError", "2-dimensional DeviceMesh"),
            "async": ("ValueError", "mode='async' with DTensor parameters"),
            "int8": ("ValueError", "comm_dtype=torch.int8 with DTensor parameters"),
            "hsdp": ("ValueError", "process_group does not match the parameters' mesh"),
            "replaced": ("RuntimeError", "is no longer the storage the averager exchanges")}


def test_bad_input_is_a_clear_error_on_every_rank():
    outs = values(run_ranks(4, bad_inputs))
    for rank, cases in enumerate(outs):
        for case, (kind, text) in EXPECTED.items():
            assert cases[case] is not None and cases[case][0] == kind and text in cases[case][1], (
                rank, case, cases[case])
        assert cases["fine_after_all_that"] is None
        # ranks 0 and 2 (one group) disagree; the other group's ranks hold the same shards
        if rank in (0, 2):
            kind, text = cases["plain_on_one_rank"]
            assert kind in ("ValueError", "AgreementError") and "same local shards" in text, text
        else:
            assert cases["plain_on_one_rank"] is None
    # the same message on every rank of a group
    groups = {"shard_group": [(0, 1), (2, 3)], "world": [(0, 1, 2, 3)]}
    for case in EXPECTED:
        for ranks in groups.get(case, [(0, 2), (1, 3)]):
            assert all(outs[r][case] == outs[ranks[0]][case] for r in ranks), case


# ---- DDP inside a node, EASGD across nodes -----------------------------------------------------------
def hierarchical_run(rank: int, world: int, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = make_mesh((2, 2), ("node", "local"))
    node, local = mesh.get_coordinate()
    model = plain_model("cnn", seed=node)             # the nodes start apart
    ddp = DDP(model, process_group=mesh.get_group("local"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Each rank exchanges the whole model with the ranks of its local rank on the other nodes.
    avg = easgd_ext.ElasticAverager(model.parameters(), tau=TAU, process_group=mesh["node"])
    for t in range(1, steps + 1):
        x, y = batch("cnn", node, local, t)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        avg.step()
    return {"x": avg.flat_parameters()[0].clone(), "center": avg.center_state()[0].clone(),
            "exchanges": avg.stats.exchanges}


def test_ddp_inside_nodes_easgd_across_them():
    a0, a1, b0, b1 = values(run_ranks(4, hierarchical_run, 4 * TAU))
    assert a0["exchanges"] == 4
    assert torch.equal(a0["x"], a1["x"]) and torch.equal(b0["x"], b1["x"])   # replicas of a node
    assert not torch.equal(a0["x"], b0["x"])                                  # nodes differ
    for other in (a1, b0, b1):
        assert torch.equal(a0["center"], other["center"])                    # one center


# ---- GPU: FSDP2 on one GPU, NCCL world 1 --------------------------------------------------------------
def one_gpu(store: str) -> dict:
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.cuda.set_device(0)
        mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("replicate", "shard"))
        torch.manual_seed(0)
        model = DigitsCNN().cuda()
        fully_shard(model, mesh=mesh["shard"])
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.05)
        avg = easgd_ext.ElasticAverager(params, tau=1, process_group=mesh["replicate"])
        start = [p.to_local().clone() for p in params]
        for t in range(3):
            x = torch.randn(8, 1, 8, 8, device="cuda")
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            before = [p.to_local().double().clone() for p in params]
            center = [center_of(avg, i).double().clone() for i in range(len(params))]
            avg.step()
            ok = all(torch.allclose(p.to_local().double(), b - avg.alpha * (b - c), atol=1e-6)
                     for p, b, c in zip(params, before, center))
            if not ok:
                return {"ok": False, "step": t}
        torch.cuda.synchronize()
        moved = any(not torch.equal(p.to_local(), s) for p, s in zip(params, start))
        return {"ok": True, "moved": moved, "exchanges": avg.stats.exchanges}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")
def test_sharded_exchange_on_one_gpu(tmp_path):
    with Processes() as procs:
        procs.start(one_gpu, os.path.join(str(tmp_path), "store"))
        (out,) = values(procs.results(timeout=240))
    assert out["ok"] and out["moved"] and out["exchanges"] == 3


# ---- python -m easgd_ext.train --fsdp ----------------------------------------------------------------
def test_train_fsdp_runs_the_main_job_on_a_2x2_mesh(tmp_path, capfd):
    from easgd_ext import train

    out, png = tmp_path / "run.json", tmp_path / "run.png"
    assert train.main(["--fsdp", "--steps", "40", "--eval-every", "20", "--lr", "0.1",
                       "--algo", "eamsgd,sync-sgd", "--plot", str(png), "--json", str(out)]) == 0
    text, err = capfd.readouterr()
    assert "FSDP2: 2 replicas x 2 shards" in text and "eamsgd" in text
    assert "a 2 x 2 mesh" in err
    report = json.loads(out.read_text())
    by_algo = {r["algo"]: r for r in report["results"]}
    assert by_algo["eamsgd"]["exchanges"] == 10 and by_algo["eamsgd"]["steps"] == [20, 40]
    assert by_algo["eamsgd"]["test_error"][-1] < 0.8  # chance: 0.9
    # what crosses the replicate dimension: every tau steps (EASGD) against every step (HSDP)
    assert by_algo["eamsgd"]["bytes_sent"][-1] < by_algo["sync-sgd"]["bytes_sent"][-1] / 2
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    (["--workers", "3"], "--fsdp needs an even number of at least 4 workers"),
    (["--mode", "async"], "--fsdp runs --mode sync"),
    (["--comm-dtype", "int8", "--algo", "easgd"], "use bfloat16"),
])
def test_train_fsdp_bad_arguments(argv, message, capsys):
    from easgd_ext import train

    with pytest.raises(SystemExit) as exc:
        train.main(["--fsdp", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


# ---- the README's example -----------------------------------------------------------------------------
def test_the_readme_sharded_example_runs(tmp_path):
    """The "Sharded models" example, verbatim, under torchrun with 4 CPU processes: it trains,
    saves through DCP, loads into a fresh build and evaluates the center."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Sharded models", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "sharded.py").write_text(code)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "4", "sharded.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"clock 100, test error of the center (\S+)", proc.stdout)
    assert match and float(match.group(1)) < 0.5, proc.stdout


# ---- python -m easgd_ext.bench fsdp --------------------------------------------------------------------
def test_bench_fsdp_reports_half_the_bytes_and_memory(tmp_path, capsys):
    from easgd_ext.bench.__main__ import main as bench

    with pytest.raises(SystemExit) as exit_:
        bench(["fsdp", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m easgd_ext.bench fsdp ")
    out = tmp_path / "fsdp.json"
    assert bench(["fsdp", "--sizes", "1e5", "--reps", "2", "--json", str(out)]) == 0
    sharded, replicated = json.loads(out.read_text())
    assert (sharded["name"], replicated["name"]) == ("sharded", "replicated")
    assert 0.5 <= sharded["bytes_vs_replicated"] < 0.53 and 0.5 <= sharded["center_vs_replicated"] < 0.53
    assert sharded["launch_seconds"] > 0 and sharded["ratios"]["vs_replicated"] > 0
    assert bench(["fsdp", "--hierarchy", "--sizes", "1e5", "--reps", "2", "--json", str(out)]) == 0
    ways = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(ways) == {"leaders", "every_rank", "shares"}
    assert ways["every_rank"]["inter_node_bytes_per_node"] == 2 * ways["leaders"]["inter_node_bytes_per_node"]
    assert ways["shares"]["center_bytes_per_rank"] * 2 == ways["every_rank"]["center_bytes_per_rank"]
