"""Top-k mixture-of-experts feed-forward layer with GLM-style SwiGLU experts.

Follows the sparsely-gated MoE of Shazeer et al. 2017 (https://arxiv.org/abs/1701.06538: top-k
softmax gating, the importance CV^2 loss), GShard (Lepikhin et al. 2020,
https://arxiv.org/abs/2006.16668: expert capacity, first choices served before second ones),
the Switch Transformer (Fedus et al. 2021, https://arxiv.org/abs/2101.03961: the load-balancing
loss, dropped tokens riding the residual) and ST-MoE (Zoph et al. 2022,
https://arxiv.org/abs/2202.08906: the router z-loss, a float32 router).

Each expert is GLM-4's fused SwiGLU (``glm.SwiGLU``); the experts' weights are stacked as
``gate_up_proj`` ``(E, C, 2F)`` and ``down_proj`` ``(E, F, C)`` (``in, out`` order, the transpose
of an ``nn.Linear`` weight) so all experts run as two batched matmuls. Tokens reach their experts
in queue order: each assignment is numbered within its expert by a running count (what a stable sort
by expert would give, without the sort, so the layer exports) and scattered into an
``(E, capacity, C)`` buffer. With a capacity factor
the buffer has a static shape (``torch.export`` traces it, no host sync); with
``capacity_factor <= 0`` (dropless) one ``.item()`` sizes the buffer to the busiest expert.
That is the ``static`` dispatch, which export and compilation use. In eager mode on CPU the
``sorted`` dispatch runs instead: one stable sort by expert, one host sync for the counts, and
one matmul per expert on exactly its kept rows (no padding, no buffer), the same numbers.
See docs/MOE.md for the formulas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn

from autoglm_phone.config import MoEConfig

DISPATCHES = ("auto", "static", "sorted")


def expert_capacity(
    num_tokens: int | torch.Tensor, num_experts: int, top_k: int, capacity_factor: float
) -> int | torch.Tensor:
    """``ceil(capacity_factor * top_k * num_tokens / num_experts)``, for an int or a count tensor.

    Both branches evaluate the same float64 expression in the same order, so a count tensor gives
    the same capacity as the equal Python int.
    """
    if isinstance(num_tokens, torch.Tensor):
        return torch.ceil(capacity_factor * top_k * num_tokens.double() / num_experts).long()
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def switch_balance_loss(
    probs: torch.Tensor, expert_idx: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_i f_i * P_i`` over the valid tokens.

    ``probs`` ``(N, E)`` router probabilities, ``expert_idx`` ``(N, K)`` chosen experts, ``valid``
    ``(N,)`` 0/1 weights. ``f_i`` is the fraction of the ``K * n_valid`` top-k assignments that go
    to expert ``i`` (so ``sum_i f_i = 1``; no gradient) and ``P_i`` the mean router probability.
    A uniform router (``P_i = 1/E``) gives exactly 1 whatever the routing.
    """
    num_experts = probs.shape[1]
    fraction = assignment_fraction(expert_idx, valid, num_experts)  # (E,)
    mean_prob = (probs * valid[:, None]).sum(0) / valid.sum().clamp(min=1.0)  # (E,)
    return num_experts * (fraction * mean_prob).sum()


def importance_cv2_loss(
    gates: torch.Tensor, expert_idx: torch.Tensor, valid: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Shazeer et al.'s importance loss: ``CV^2 = Var(I) / mean(I)^2`` with ``I_i`` the sum of
    the (renormalised top-k) gate values routed to expert ``i``; population variance."""
    dense_gates = torch.zeros(
        gates.shape[0], num_experts, dtype=gates.dtype, device=gates.device
    ).scatter(1, expert_idx, gates)  # (N, E), zero off the top-k
    importance = (dense_gates * valid[:, None]).sum(0)  # (E,)
    return importance.var(correction=0) / (importance.mean() ** 2 + 1e-10)


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of ``logsumexp(logits)^2``."""
    z = torch.logsumexp(logits, dim=-1)  # (N,)
    return (z.square() * valid).sum() / valid.sum().clamp(min=1.0)


def assignment_fraction(
    expert_idx: torch.Tensor, valid: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Fraction ``(E,)`` of the valid tokens' top-k assignments that each expert receives."""
    n, k = expert_idx.shape
    chosen = torch.zeros(n, num_experts, dtype=valid.dtype, device=valid.device)
    chosen = chosen.scatter(1, expert_idx, 1.0)  # (N, E), one per chosen expert
    return (chosen * valid[:, None]).sum(0) / (k * valid.sum()).clamp(min=1.0)


class MoEFeedForward(nn.Module):
    """Top-k routed mixture of SwiGLU experts; a drop-in for ``glm.SwiGLU``.

    ``forward(x, mask)`` maps ``(..., C)`` to ``(..., C)``. It sets ``self.aux_loss`` (the weighted
    sum of the router losses, a scalar with gradient) and ``self.stats`` (detached tensors:
    ``load``, ``dropped``, ``dropped_fraction``, ``capacity`` and the unweighted losses). Tokens
    that lose their expert to the capacity limit get no contribution from it, so they pass through
    on the block's residual; masked (padding) tokens are not routed at all and return zeros.

    ``dispatch`` picks how tokens reach their experts (the same outputs either way):
    ``"static"`` scatters into an ``(E, capacity, C)`` buffer without sorting (exportable, no host
    sync with a capacity factor); ``"sorted"`` sorts the assignments by expert and runs each expert
    on its own rows (one host sync, no padding: faster in eager on CPU); ``"auto"`` (default) uses
    ``sorted`` in eager mode on CPU and ``static`` when exporting, compiling, tracing or off CPU.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, cfg: MoEConfig, dispatch: str = "auto"
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"MoE dispatch={dispatch!r} must be one of {DISPATCHES}")
        self.dispatch = dispatch
        if cfg.num_experts < 1:
            raise ValueError(f"moe.num_experts={cfg.num_experts} must be >= 1 for an MoE layer")
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(
                f"moe.top_k={cfg.top_k} must be in [1, moe.num_experts={cfg.num_experts}]"
            )
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        # With top-1, renormalised gates are identically 1 and the task loss gives the router no
        # gradient; False keeps the raw probabilities (Switch's top-1 gate). Not yet in MoEConfig.
        self.renormalize_gates = bool(cfg.renormalize_gates)
        self.balance_loss_weight = cfg.balance_loss_weight
        self.importance_loss_weight = cfg.importance_loss_weight
        self.z_loss_weight = cfg.z_loss_weight
        e, c, f = cfg.num_experts, hidden_size, intermediate_size
        self.router = nn.Linear(c, e, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(e, c, 2 * f))  # per expert: [gate | up]
        self.down_proj = nn.Parameter(torch.empty(e, f, c))
        self.reset_parameters()
        self.aux_loss = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}

    def reset_parameters(self, std: float | None = None) -> None:
        """``nn.Linear``'s default init per expert, or ``normal(0, std)`` everywhere if given."""
        if std is not None:
            for p in (self.router.weight, self.gate_up_proj, self.down_proj):
                nn.init.normal_(p, std=std)
            return
        self.router.reset_parameters()
        for p in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(p.shape[1])  # fan_in
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, dispatch={self.dispatch!r}"
        )

    # -- routing -----------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``(N, E)`` (float32), top-k experts ``(N, K)`` and their gates ``(N, K)``,
        renormalised to sum to 1 per token unless ``renormalize_gates`` is off."""
        x, weight = x.float(), self.router.weight.float()
        if torch.is_autocast_enabled(x.device.type):  # keep the router in float32 (ST-MoE)
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x, weight)  # (N, E)
        else:  # no autocast region in the graph, so export stays plain aten ops
            logits = F.linear(x, weight)
        probs = logits.softmax(dim=-1)
        gates, expert_idx = probs.topk(self.top_k, dim=-1)  # (N, K)
        if self.renormalize_gates:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, expert_idx, gates

    def experts(self, h: torch.Tensor) -> torch.Tensor:
        """Every expert's SwiGLU on its own rows: ``(E, M, C) -> (E, M, C)``."""
        return torch.bmm(_swiglu(torch.bmm(h, self.gate_up_proj)), self.down_proj)

    def expert_segments(self, h: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The experts on rows grouped by expert: ``(M, C) -> (M, C)``, expert ``e`` on the
        ``sizes[e]`` rows after those of experts ``< e``; one ``mm`` pair per non-empty expert."""
        # unbind, not gate_up_proj[e]: one backward node stacks the E weight gradients, where
        # E selects would each fill and add a whole (E, C, 2F) zero gradient
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        out = [
            _swiglu(rows @ gate_up[e]) @ down[e]
            for e, rows in enumerate(h.split(sizes))
            if rows.shape[0]
        ]
        return torch.cat(out) if out else h.new_zeros(0, self.hidden_size)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(..., C)``; ``mask`` ``(...)`` (e.g. ``(B, T)``), True on real tokens."""
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)  # (N, C)
        valid = _valid(x, mask)  # (N,)
        logits, expert_idx, gates = self.route(x)
        dispatch = self._dispatch_sorted if self.sorts(x) else self._dispatch
        out, dropped, capacity = dispatch(x, expert_idx, gates, valid, mask is None)
        if not torch.compiler.is_exporting():  # the exported program is the pure function
            self._set_losses(logits, expert_idx, gates, valid, dropped, capacity)
        return out.reshape(shape)

    def _dispatch(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor,
        gates: torch.Tensor,
        valid: torch.Tensor,
        all_valid: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Number assignments per expert, run the experts on an ``(E, capacity, C)`` buffer, combine.

        Returns the output ``(N, C)``, the number of dropped assignments and the buffer capacity.
        """
        n, c = x.shape
        e, k = self.num_experts, self.top_k
        expert = self._queue(expert_idx, valid)  # (K*N,)
        pos, counts = queue_positions(expert, e + 1)  # (K*N,) place in queue, (E + 1,)
        if self.capacity_factor > 0:
            capacity, limit = self._capacity(n, valid, all_valid)
        else:
            capacity = limit = max(int(counts[:e].max().item()), 1)  # dropless: the one host sync
        real = expert < e
        keep = real & (pos < limit)
        dropped = (real & ~keep).sum()

        # Scatter into (E * capacity + 1, C); the last row collects dropped/padding assignments.
        slot = torch.where(keep, expert * capacity + pos, e * capacity)  # (K*N,)
        tokens = repeat(x, "n c -> (k n) c", k=k)  # (K*N, C)
        index = repeat(slot, "m -> m c", c=c)  # scatter_add: index_add does not export
        buffer = x.new_zeros(e * capacity + 1, c).scatter_add(0, index, tokens)
        buffer = rearrange(buffer[:-1], "(e m) c -> e m c", e=e)  # (E, capacity, C)
        y = rearrange(self.experts(buffer), "e m c -> (e m) c")
        y = torch.cat((y, y.new_zeros(1, c)))  # (E * capacity + 1, C), zero row for the dropped
        weight = rearrange(gates, "n k -> (k n)")[:, None].to(y.dtype)  # (K*N, 1)
        out = rearrange(y[slot] * weight, "(k n) c -> k n c", k=k).sum(0)  # (N, C)
        return out, dropped, capacity

    def _dispatch_sorted(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor,
        gates: torch.Tensor,
        valid: torch.Tensor,
        all_valid: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``_dispatch``'s result from a stable sort by expert: each expert's queue is a
        contiguous segment in queue order, its first ``min(count, limit)`` assignments are kept,
        and the experts run on exactly those rows. One host sync (the segment sizes)."""
        n, c = x.shape
        e, k = self.num_experts, self.top_k
        expert = self._queue(expert_idx, valid)  # (K*N,)
        order = torch.argsort(expert, stable=True)  # (K*N,) expert by expert, each in queue order
        counts = torch.bincount(expert, minlength=e + 1)[:e]  # (E,) padding (expert E) left out
        if self.capacity_factor > 0:
            capacity, limit = self._capacity(n, valid, all_valid)
            kept = counts.clamp(max=limit)  # (E,)
        else:
            kept = counts
        counts_host, sizes = torch.stack((counts, kept)).tolist()  # the one host sync
        if self.capacity_factor <= 0:
            capacity = max(max(counts_host), 1)
        dropped = counts.sum() - kept.sum()

        if sizes == counts_host:  # nothing dropped: the real assignments lead the sorted order
            take = order[: sum(sizes)]
        else:  # the head of each expert's segment
            starts = [sum(counts_host[:i]) for i in range(e)]
            take = torch.cat([order[s : s + m] for s, m in zip(starts, sizes, strict=True)])
        # take (M,): kept assignments in (k n) numbering, grouped by expert
        y = self.expert_segments(x[take % n], sizes)  # (M, C)
        weight = rearrange(gates, "n k -> (k n)")[take, None].to(y.dtype)  # (M, 1)
        out = y.new_zeros(k * n, c).index_copy(0, take, y * weight)  # (K*N, C), 0 where dropped
        return rearrange(out, "(k n) c -> k n c", k=k).sum(0), dropped, capacity

    def _queue(self, expert_idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The chosen experts flattened slot-major ``(K*N,)``, padding mapped to expert ``E``.

        In ``(k n)`` order every token's first choice queues before any second choice (GShard),
        and within a slot earlier tokens come first."""
        expert = rearrange(expert_idx, "n k -> (k n)")
        return torch.where(repeat(valid, "n -> (k n)", k=self.top_k), expert, self.num_experts)

    def _capacity(
        self, n: int, valid: torch.Tensor, all_valid: bool
    ) -> tuple[int, int | torch.Tensor]:
        """Buffer rows per expert, sized from all ``n`` tokens (static), and the limit on kept
        assignments: the same formula on the real-token count (a tensor) when there is padding.
        An expert never holds more than ``n`` assignments."""
        e, k, factor = self.num_experts, self.top_k, self.capacity_factor
        capacity = min(expert_capacity(n, e, k, factor), n)
        limit = capacity if all_valid else expert_capacity(valid.sum(), e, k, factor)
        return capacity, limit

    def sorts(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` takes the sorted dispatch (see the class docstring)."""
        compiler = torch.compiler
        tracing = compiler.is_compiling() or compiler.is_exporting() or torch.jit.is_tracing()
        if self.dispatch == "sorted" and tracing:
            raise RuntimeError(
                "MoE dispatch='sorted' has data-dependent shapes and cannot be exported, compiled "
                "or traced; use dispatch='static' (or 'auto', which picks it there)"
            )
        if self.dispatch == "auto":
            return not tracing and x.device.type == "cpu"
        return self.dispatch == "sorted"

    def forward_dense(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reference path: every expert on every token, combined with the top-k gates.

        Equals ``forward`` when nothing is dropped; costs ``E / K`` times the expert FLOPs.
        """
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)  # (N, C)
        valid = _valid(x, mask)  # (N,)
        logits, expert_idx, gates = self.route(x)
        y = self.experts(repeat(x, "n c -> e n c", e=self.num_experts))  # (E, N, C)
        combine = torch.zeros_like(logits).scatter(1, expert_idx, gates) * valid[:, None]  # (N, E)
        out = einsum(combine.to(y.dtype), y, "n e, e n c -> n c")
        no_drops = torch.zeros((), dtype=torch.long, device=x.device)
        self._set_losses(logits, expert_idx, gates, valid, no_drops, x.shape[0])
        return out.reshape(shape)

    def _set_losses(
        self,
        logits: torch.Tensor,
        expert_idx: torch.Tensor,
        gates: torch.Tensor,
        valid: torch.Tensor,
        dropped: torch.Tensor,
        capacity: int,
    ) -> None:
        w = valid.float()  # (N,)
        load = assignment_fraction(expert_idx, w, self.num_experts)  # (E,), before dropping
        balance = switch_balance_loss(logits.softmax(-1), expert_idx, w)
        importance = importance_cv2_loss(gates, expert_idx, w, self.num_experts)
        z = router_z_loss(logits, w)
        self.aux_loss = (
            self.balance_loss_weight * balance
            + self.importance_loss_weight * importance
            + self.z_loss_weight * z
        )
        assignments = (self.top_k * w.sum()).clamp(min=1.0)
        self.stats = {
            "load": load,
            "dropped": dropped.detach(),
            "dropped_fraction": (dropped / assignments).detach(),
            "capacity": torch.tensor(capacity),
            "balance_loss": balance.detach(),
            "importance_loss": importance.detach(),
            "z_loss": z.detach(),
        }


def queue_positions(expert: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each assignment's place in its expert's queue ``(M,)`` (how many earlier assignments chose
    the same expert) and the count per expert ``(num_experts,)``, for ``expert`` ``(M,)``.

    What a stable sort by expert numbers; computed as a running count over a one-hot matrix
    ``(M, E)`` instead, because ExecuTorch and ONNX have no stable sort (exact: integer sums)."""
    one_hot = (expert[:, None] == torch.arange(num_experts, device=expert.device)).long()
    pos = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # (M,)
    return pos, one_hot.sum(0)


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    """GLM-4's SwiGLU activation on ``[gate | up]`` rows: ``(..., 2F) -> (..., F)``."""
    gate, up = h.chunk(2, dim=-1)
    return up * F.silu(gate)


def _valid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean ``(N,)`` of the rows of ``x`` ``(N, C)`` to route; all of them without a mask."""
    if mask is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return mask.reshape(x.shape[0]).to(device=x.device, dtype=torch.bool)
