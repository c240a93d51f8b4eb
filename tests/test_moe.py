"""MoEFeedForward against a dense reference built from glm.SwiGLU experts, plus its losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoglm_phone.config import DecoderConfig, MoEConfig
from autoglm_phone.models.glm import SwiGLU
from autoglm_phone.models.moe import MoEFeedForward, importance_cv2_loss, switch_balance_loss

C, FF = 16, 24  # hidden and expert intermediate sizes
DISPATCHES = ("static", "sorted")  # "auto" picks one of these


def _layer(
    num_experts=4, top_k=2, capacity_factor=0.0, seed=0, dispatch="auto", **weights
) -> MoEFeedForward:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor, **weights
    )
    return MoEFeedForward(C, FF, cfg, dispatch=dispatch)


def _inputs(seed=1, b=2, t=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, C, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -5:] = False  # right padding
    mask[1, :3] = False  # left padding
    return x, mask


def _swiglu_experts(layer: MoEFeedForward) -> list[SwiGLU]:
    """The layer's experts as separate glm.SwiGLU modules (nn.Linear stores (out, in))."""
    experts = []
    for e in range(layer.num_experts):
        mlp = SwiGLU(C, FF)
        mlp.gate_up_proj.weight.data.copy_(layer.gate_up_proj.data[e].T)
        mlp.down_proj.weight.data.copy_(layer.down_proj.data[e].T)
        experts.append(mlp)
    return experts


def _routing(layer, x):
    """Independent top-k routing: softmax over router logits, gates renormalised over the top-k."""
    probs = F.linear(x.reshape(-1, C), layer.router.weight).softmax(-1)  # (N, E)
    top, idx = probs.topk(layer.top_k, dim=-1)  # (N, K)
    return idx, top / top.sum(-1, keepdim=True)


@torch.no_grad()
def _dense_reference(layer, x, mask=None, keep=None):
    """Every expert on every token; combine the kept top-k assignments of the real tokens."""
    xf = x.reshape(-1, C)
    idx, gates = _routing(layer, x)
    all_out = torch.stack([mlp(xf) for mlp in _swiglu_experts(layer)], dim=1)  # (N, E, C)
    picked = torch.gather(all_out, 1, idx[..., None].expand(-1, -1, C))  # (N, K, C)
    weight = gates if keep is None else gates * keep
    out = (weight[..., None] * picked).sum(1)
    if mask is not None:
        out = out * mask.reshape(-1, 1)
    return out.reshape(x.shape)


def _reference_keep(idx, valid, capacity):
    """Which assignments fit: first choices of all tokens queue before second choices."""
    n, k = idx.shape
    keep = torch.zeros(n, k)
    used = [0] * int(idx.max() + 1)
    for slot in range(k):
        for token in range(n):
            if valid[token]:
                e = int(idx[token, slot])
                if used[e] < capacity:
                    keep[token, slot] = 1.0
                used[e] += 1
    return keep


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.0, 16.0])  # dropless, and capacity >= tokens
@pytest.mark.parametrize("masked", [False, True])
def test_unlimited_capacity_equals_dense_reference(top_k, capacity_factor, masked, dispatch):
    layer = _layer(top_k=top_k, capacity_factor=capacity_factor, dispatch=dispatch)
    x, mask = _inputs()
    mask = mask if masked else None
    out = layer(x, mask)
    torch.testing.assert_close(out, _dense_reference(layer, x, mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.forward_dense(x, mask), out, rtol=0, atol=1e-5)
    assert layer.stats["dropped"].item() == 0
    # load: the fraction of the real tokens' top-k assignments per expert
    idx, _ = _routing(layer, x)
    valid = torch.ones(idx.shape[0]) if mask is None else mask.reshape(-1).float()
    counts = torch.stack([((idx == e).float().sum(1) * valid).sum() for e in range(4)])
    torch.testing.assert_close(layer.stats["load"], counts / (top_k * valid.sum()))


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_capacity_drops_match_reference_and_contribute_zero(capacity_factor, masked, dispatch):
    layer = _layer(capacity_factor=capacity_factor, seed=3, dispatch=dispatch)
    layer.router.weight.data[0] += 0.5  # crowd one expert so even factor 1.0 drops
    x, mask = _inputs()
    valid = mask.reshape(-1) if masked else torch.ones(x.shape[0] * x.shape[1], dtype=torch.bool)
    capacity = math.ceil(capacity_factor * layer.top_k * int(valid.sum()) / layer.num_experts)
    idx, _ = _routing(layer, x)
    keep = _reference_keep(idx, valid, capacity)
    expected_dropped = int((valid[:, None] * (1 - keep)).sum())
    assert expected_dropped > 0

    out = layer(x, mask if masked else None)
    assert layer.stats["dropped"].item() == expected_dropped
    n_assign = layer.top_k * int(valid.sum())
    assert layer.stats["dropped_fraction"].item() == pytest.approx(expected_dropped / n_assign)
    ref = _dense_reference(layer, x, mask if masked else None, keep=keep)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    fully_dropped = (keep.sum(1) == 0) & valid  # these ride the residual: zero from the layer
    assert fully_dropped.any() or capacity_factor >= 1
    assert (out.reshape(-1, C)[fully_dropped] == 0).all()


def _reference_with_grad(layer, x, keep):
    """``_dense_reference`` on the layer's own parameters, so gradients reach them: every expert
    on every token, the kept top-k assignments combined with their renormalised gates."""
    xf = x.reshape(-1, C)
    probs = F.linear(xf, layer.router.weight).softmax(-1)  # (N, E)
    top, idx = probs.topk(layer.top_k, dim=-1)  # (N, K)
    gates = top / top.sum(-1, keepdim=True)
    all_out = torch.stack(
        [
            F.silu(xf @ layer.gate_up_proj[e][:, :FF])
            * (xf @ layer.gate_up_proj[e][:, FF:])
            @ layer.down_proj[e]
            for e in range(layer.num_experts)
        ],
        dim=1,
    )  # (N, E, C)
    picked = torch.gather(all_out, 1, idx[..., None].expand(-1, -1, C))  # (N, K, C)
    return ((gates * keep)[..., None] * picked).sum(1).reshape(x.shape)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0])
def test_dispatch_gradients_match_dense_reference(dispatch, top_k, capacity_factor):
    """Output and the gradients of input, router and both expert weights, drops included."""
    layer = _layer(top_k=top_k, capacity_factor=capacity_factor, seed=3, dispatch=dispatch)
    layer.router.weight.data[0] += 0.5  # crowd one expert so the limited factors drop
    x, _ = _inputs()
    n = x.shape[0] * x.shape[1]
    idx, _ = _routing(layer, x)
    capacity = math.ceil(capacity_factor * top_k * n / 4) if capacity_factor > 0 else n
    keep = _reference_keep(idx, torch.ones(n, dtype=torch.bool), capacity)
    assert (keep == 0).any() == (capacity_factor > 0)

    params = (layer.router.weight, layer.gate_up_proj, layer.down_proj)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    grads = {}
    for name, fn in (
        ("layer", layer),
        ("reference", lambda t: _reference_with_grad(layer, t, keep)),
    ):
        xg = x.clone().requires_grad_()
        out = fn(xg)
        grads[name] = (out, *torch.autograd.grad((out * probe).sum(), (xg, *params)))
    for got, want in zip(grads["layer"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.stats["dropped"].item() == int((1 - keep).sum())


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.25])
@pytest.mark.parametrize("masked", [False, True])
def test_sorted_dispatch_equals_static(capacity_factor, masked):
    """Same outputs, statistics and gradients from both dispatches (padding included)."""
    x, mask = _inputs()
    mask = mask if masked else None
    results = {}
    for dispatch in DISPATCHES:
        layer = _layer(top_k=2, capacity_factor=capacity_factor, seed=3, dispatch=dispatch)
        layer.router.weight.data[0] += 0.5
        xg = x.clone().requires_grad_()
        out = layer(xg, mask)
        (out.square().sum() + layer.aux_loss).backward()
        grads = [p.grad for p in (layer.router.weight, layer.gate_up_proj, layer.down_proj)]
        results[dispatch] = (out, xg.grad, *grads, layer.stats)
    *static, static_stats = results["static"]
    *ours, sorted_stats = results["sorted"]
    for got, want in zip(ours, static, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sorted_stats.keys() == static_stats.keys()
    for key, value in static_stats.items():
        torch.testing.assert_close(sorted_stats[key], value, msg=key)
    assert (static_stats["dropped"] > 0) == (capacity_factor == 0.5)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_dropless_matches_transformers_mixtral_block(dispatch, implementation):
    """The same weights in transformers' MixtralSparseMoeBlock: outputs and all gradients."""
    from autoglm_phone.models.convert import mixtral_moe_block

    layer = _layer(top_k=2, capacity_factor=0.0, dispatch=dispatch, balance_loss_weight=0.0)
    block = mixtral_moe_block(layer, implementation)
    x, _ = _inputs()
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    results = []
    for fn, params in (
        (layer, (layer.router.weight, layer.gate_up_proj, layer.down_proj)),
        (block, (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)),
    ):
        xg = x.clone().requires_grad_()
        out = fn(xg)
        results.append([out, *torch.autograd.grad((out * probe).sum(), (xg, *params))])
    results[1][3:] = [g.transpose(1, 2) for g in results[1][3:]]  # Mixtral's (out, in)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="renormalize_gates"):
        mixtral_moe_block(_layer(renormalize_gates=False))


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("capacity_factor", [0.0, 1.25])
def test_all_padding_and_no_tokens_give_zeros(dispatch, capacity_factor):
    layer = _layer(capacity_factor=capacity_factor, dispatch=dispatch)
    x, mask = _inputs()
    out = layer(x, torch.zeros_like(mask))
    assert torch.equal(out, torch.zeros_like(x)) and layer.stats["dropped"].item() == 0
    assert layer(x[:, :0]).shape == (2, 0, C)


def test_auto_dispatch_sorts_in_eager_on_cpu_only():
    x, _ = _inputs()
    assert _layer(dispatch="auto").sorts(x)
    assert not _layer(dispatch="static").sorts(x)
    assert _layer(dispatch="sorted").sorts(x)
    assert not _layer(dispatch="auto").sorts(x.to("meta"))  # off CPU: the static path
    with pytest.raises(ValueError, match="dispatch='bucketed'"):
        _layer(dispatch="bucketed")


@pytest.mark.slow
def test_compile_takes_the_static_dispatch_in_one_graph():
    layer = _layer(capacity_factor=1.0)  # "auto": sorted in eager, static under torch.compile
    x, _ = _inputs()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # a sync would break it
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=1e-6)


def test_sorted_dispatch_refuses_export_by_name():
    layer = _layer(capacity_factor=1.0, dispatch="sorted").eval()
    with pytest.raises(Exception, match="dispatch='sorted'"):
        torch.export.export(layer, (_inputs()[0],))


def test_balance_loss_minimum_is_one_for_a_uniform_router():
    # With f_i the fraction of assignments (sum_i f_i = 1) and P_i = 1/E, the loss is
    # E * sum_i f_i / E = 1 for any routing and any k.
    x, mask = _inputs()
    for top_k in (1, 2):
        layer = _layer(top_k=top_k, importance_loss_weight=0.1, z_loss_weight=0.01)
        layer.router.weight.data.zero_()
        layer(x, mask)
        assert layer.stats["balance_loss"].item() == pytest.approx(1.0, abs=1e-6)
        assert layer.stats["z_loss"].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
        terms = (
            0.01 * layer.stats["balance_loss"]
            + 0.1 * layer.stats["importance_loss"]
            + 0.01 * layer.stats["z_loss"]
        )
        torch.testing.assert_close(layer.aux_loss.detach(), terms)


def test_balance_loss_is_larger_for_a_skewed_router():
    x = torch.rand(2, 12, C) + 0.5  # positive inputs: a positive router row wins every token
    for top_k in (1, 2):
        layer = _layer(top_k=top_k)
        layer.router.weight.data.zero_()
        layer.router.weight.data[0] = 0.2  # expert 0 logit ~ 3.2 vs 0: mildly skewed
        layer(x)
        mild = layer.stats["balance_loss"].item()
        layer.router.weight.data[0] = 5.0  # collapsed: P_0 -> 1, f_0 = 1/k
        layer(x)
        collapsed = layer.stats["balance_loss"].item()
        assert 1.0 < mild < collapsed
        assert collapsed == pytest.approx(4 / top_k, rel=1e-3)  # E * f_0 * P_0 = E / k


def test_balance_loss_hand_value():
    # Hard counts make 1 a minimum only in the balanced regime: E=2, k=1, f=(1/3, 2/3),
    # P=(0.66, 0.34) gives 2 * (0.22 + 0.68/3) = 0.8933.
    probs = torch.tensor([[1.0, 0.0], [0.49, 0.51], [0.49, 0.51]])
    idx = probs.argmax(-1, keepdim=True)
    loss = switch_balance_loss(probs, idx, torch.ones(3))
    assert loss.item() == pytest.approx(2 * (0.66 / 3 + 2 / 3 * 0.34))
    masked = switch_balance_loss(probs, idx, torch.tensor([0.0, 1.0, 1.0]))  # only expert 1
    assert masked.item() == pytest.approx(2 * 0.51)


def test_importance_cv2_is_zero_for_equal_importance():
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    gates = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.7, 0.3], [0.6, 0.4]])  # every expert: 1.0
    assert importance_cv2_loss(gates, idx, torch.ones(4), 4).item() == pytest.approx(0, abs=1e-7)
    # importance (1.5, 0.5, 1, 1): mean 1, population variance 0.125
    gates = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    assert importance_cv2_loss(gates, idx, torch.ones(4), 4).item() == pytest.approx(0.125)
    # padding is left out: without token 2 the importance is (1, 0, 1, 1)
    masked = importance_cv2_loss(gates, idx, torch.tensor([1.0, 1.0, 0.0, 1.0]), 4)
    assert masked.item() == pytest.approx((3 * (1 / 4) ** 2 + (3 / 4) ** 2) / 4 / (3 / 4) ** 2)


def test_gradients_reach_router_and_every_used_expert():
    layer = _layer(capacity_factor=1.0, balance_loss_weight=0.0)
    layer.router.weight.data[3] = -5.0  # positive inputs never pick expert 3
    x = torch.rand(2, 12, C) + 0.5
    out = layer(x)
    used = layer.stats["load"] > 0
    assert used.tolist() == [True, True, True, False]
    out.square().sum().backward()  # the task loss alone trains the router through the gates
    assert layer.router.weight.grad.abs().sum() > 0
    for e in range(4):
        for p in (layer.gate_up_proj, layer.down_proj):
            assert (p.grad[e].abs().sum() > 0) == used[e]
    layer.zero_grad()
    aux = _layer(capacity_factor=1.0, importance_loss_weight=0.1, z_loss_weight=0.01)
    aux(x)
    aux.aux_loss.backward()
    assert aux.router.weight.grad.abs().sum() > 0


def test_top1_renormalised_gate_gives_router_no_task_gradient():
    x = torch.randn(2, 12, C)
    grads = {}
    for renormalize in (True, False):
        cfg = MoEConfig(
            num_experts=4,
            top_k=1,
            capacity_factor=0.0,
            balance_loss_weight=0.0,
            renormalize_gates=renormalize,
        )
        torch.manual_seed(0)
        layer = MoEFeedForward(C, FF, cfg)
        layer(x).square().sum().backward()
        grads[renormalize] = layer.router.weight.grad.abs().max().item()
    assert grads[True] < 1e-6 < 1e-2 < grads[False]  # p / p = 1: only rounding noise is left


@pytest.mark.parametrize("masked", [False, True])
def test_export_matches_eager(masked):
    layer = _layer(capacity_factor=1.0).eval()  # "auto": static while exporting, sorted in eager
    x, mask = _inputs()
    args = (x, mask) if masked else (x,)
    program = torch.export.export(layer, args)
    ops = {str(node.target) for node in program.graph.nodes}
    assert not any(op in ("aten.item.default", "aten._local_scalar_dense.default") for op in ops)
    # ExecuTorch has no sort or index_add kernels, ONNX no stable sort (docs/EXPORT.md)
    assert not [op for op in ops if "sort" in op or "index_add" in op]
    torch.testing.assert_close(program.module()(*args), layer(*args), rtol=0, atol=1e-6)
    assert layer.stats["dropped"].item() > 0  # the capacity limit was exercised


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_autocast_keeps_router_in_float32(dispatch):
    layer = _layer(capacity_factor=1.25, dispatch=dispatch)
    x, _ = _inputs()
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, _ = layer.route(x.reshape(-1, C))
        out = layer(x)
    assert logits.dtype == torch.float32
    assert out.shape == x.shape and out.dtype == torch.bfloat16  # the experts' dtype
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05)


def test_bad_configs_raise():
    cfg = MoEConfig(num_experts=4, top_k=2)
    cfg.top_k = 5  # the layer checks by itself, whatever the config did
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(C, FF, cfg)
    cfg.top_k = 0
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(C, FF, cfg)
    with pytest.raises(ValueError, match="num_experts"):
        MoEFeedForward(C, FF, MoEConfig(num_experts=0))
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5)


def test_builds_from_decoder_config_like_make_ffn():
    cfg = DecoderConfig(vocab_size=97, hidden_size=32, moe=MoEConfig(num_experts=4))
    ffn = MoEFeedForward(
        cfg.hidden_size, cfg.moe.expert_intermediate_size or cfg.intermediate_size, cfg.moe
    )
    assert ffn.gate_up_proj.shape == (4, 32, 2 * cfg.intermediate_size)
    assert ffn.down_proj.shape == (4, cfg.intermediate_size, 32)
    x = torch.randn(2, 5, 32)
    assert ffn(x).shape == x.shape and ffn.aux_loss.ndim == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capacity_path_does_not_sync_on_cuda():
    layer = _layer(capacity_factor=1.25).cuda()
    x, mask = (t.cuda() for t in _inputs())
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x, mask).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_queue_positions_number_like_a_stable_sort():
    """The sort-free numbering equals the stable-sort one it replaced, exactly."""
    from autoglm_phone.models.moe import queue_positions

    g = torch.Generator().manual_seed(0)
    for m, e in ((1, 1), (7, 3), (64, 5), (300, 9)):
        expert = torch.randint(0, e, (m,), generator=g)
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=e)
        starts = counts.cumsum(0) - counts
        pos_sorted = torch.arange(m) - starts[expert[order]]
        reference = torch.empty_like(pos_sorted).scatter(0, order, pos_sorted)
        pos, got_counts = queue_positions(expert, e)
        assert torch.equal(pos, reference) and torch.equal(got_counts, counts)
