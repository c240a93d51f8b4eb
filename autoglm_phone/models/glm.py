"""GLM-4-style decoder: embeddings, the blocks of ``layers.py``, final norm and LM head.

The layers follow transformers' ``Glm4ForCausalLM`` with the same parameter names (``layers.py``;
``convert.py`` loads GLM-4 checkpoints). ``GLMDecoder.generate`` / ``stream`` decode with a
key/value cache (``generation.py``): the prompt (token ids or ready-made embeddings, e.g.
image/audio tokens + text) is encoded once, in prefix mode bidirectionally, then each new token
attends causally. With ``cfg.memory.enabled`` the blocks carry a recurrent memory and long inputs
run segment by segment (``memory.py``), in training and in generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from autoglm_phone.config import DecoderConfig
from autoglm_phone.models.generation import (
    KV_BLOCK,
    KVCache,
    check_generation_args,
    sample_next_token,
)
from autoglm_phone.models.layers import (  # noqa: F401  (re-exported: the layers' old home)
    Attention,
    AttentionMode,
    Block,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    build_attention_mask,
    make_ffn,
    positions_from_padding,
    rope_frequencies,
)
from autoglm_phone.models.memory import MemoryBlock, MemoryGate, MemoryState, SegmentRunner

MEMORY_STREAM = 0x6D656D  # the memory weights' seed: torch.initial_seed() + this


class GLMDecoder(nn.Module):
    """Token embeddings, ``num_layers`` blocks, final norm and LM head.

    Used as the text tower (bidirectional, pooled: ``forward_features`` + ``forward_head``), as
    the language model (``forward`` returns logits) and to decode (``generate`` / ``stream``).
    With ``cfg.memory.enabled`` the blocks are ``memory.MemoryBlock`` and a sequence longer than
    ``memory.segment_len`` (or one continuing a ``memory`` state) runs segment by segment with a
    recurrent memory (``memory.py``): the same arguments, any length; shorter ones run exactly as
    without memory.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("text.vocab_size must be set (normally taken from the tokenizer)")
        self.cfg = cfg
        self.embed_dim = cfg.hidden_size
        block = MemoryBlock if cfg.memory.enabled else Block
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        self.reset_memory_parameters()
        # recompute each memory segment in backward: a grad-enabled forward then keeps only the
        # segment inputs and outputs, not every segment's activations (gradients are unchanged)
        self.checkpoint_segments = cfg.memory.checkpoint_segments

    def reset_memory_parameters(self) -> None:
        """Initialise the memory weights as documented (docs/MEMORY.md); nothing without memory.
        A GLM-4 checkpoint loaded into a memory decoder keeps these. They draw from their own
        stream, seeded by ``torch.initial_seed()``: the global one is not advanced, so the other
        weights of a model (and the modules built after it) are those it has without memory."""
        generator = torch.Generator().manual_seed((torch.initial_seed() + MEMORY_STREAM) % 2**63)
        for layer in self.layers:
            if isinstance(layer, MemoryBlock):
                layer.reset_memory_parameters(generator)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, MemoryGate):
            return  # reset_memory_parameters, from the memory's own stream
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, nn.Parameter):
            module.reset_parameters(std=0.02)  # MoE experts: stacked weights, same init as dense

    def _embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)

    def forward_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        mode: AttentionMode | str = AttentionMode.CAUSAL,
        prefix_lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory: MemoryState | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``(B, T, C)``; ``attention_mask`` ``(B, T)`` is True on tokens.

        With a ``cache`` the ``T`` new tokens also attend to the cached ones, ``attention_mask``
        covers both (``(B, cache.length + T)``, as in transformers) and the cache grows in place.
        Position ids default to :func:`positions_from_padding` over that whole mask. With memory
        on, longer inputs (or a ``memory`` to continue) go segment by segment
        (:meth:`forward_with_memory`).
        """
        x = self._embed(input_ids, inputs_embeds)
        b, t = x.shape[:2]
        if self.cfg.memory.enabled and (t > self.cfg.memory.segment_len or memory is not None):
            if cache is not None or position_ids is not None:
                raise ValueError(
                    "with text.memory on, inputs longer than memory.segment_len take no cache or "
                    "position_ids: positions restart in every segment (use generate to decode)"
                )
            return self._segments().forward(
                x, self._padding(attention_mask, x), mode, prefix_lengths, memory
            )[0]
        past = 0 if cache is None else cache.length
        if past + t > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {past + t} exceeds text.max_seq_len={self.cfg.max_seq_len}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.bool, device=x.device)
        attention_mask = attention_mask.bool()
        if attention_mask.shape != (b, past + t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"{(b, past + t)} (cached + new tokens)"
            )
        if position_ids is None:
            position_ids = positions_from_padding(attention_mask)[:, past:]  # (B, T)
        cos, sin = self.rotary(position_ids)
        mask = build_attention_mask(attention_mask, mode, prefix_lengths, num_queries=t)
        token_mask = attention_mask[:, past:]  # (B, T) the new tokens
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], token_mask)
        return self.norm(x)

    def _segments(self) -> SegmentRunner:
        if not self.cfg.memory.enabled:
            raise ValueError("this needs text.memory.enabled=true")
        return SegmentRunner(self)

    @staticmethod
    def _padding(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if attention_mask.shape != x.shape[:2]:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"{tuple(x.shape[:2])}"
            )
        return attention_mask.bool()

    def init_memory(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState:
        """The empty memory a sequence starts from (the learned slot inits, not yet readable)."""
        return self._segments().init_memory(batch_size, device, dtype)

    def forward_with_memory(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: AttentionMode | str = AttentionMode.CAUSAL,
        prefix_lengths: torch.Tensor | None = None,
        memory: MemoryState | None = None,
    ) -> tuple[torch.Tensor, MemoryState]:
        """Logits ``(B, T, V)`` of any length, segment by segment, and the memory after the last
        segment, to continue a stream (pass it back as ``memory``; a partial last segment is
        written too). A written memory is detached before every ``bptt_segments``-th segment."""
        x = self._embed(input_ids, inputs_embeds)
        hidden, memory = self._segments().forward(
            x, self._padding(attention_mask, x), mode, prefix_lengths, memory
        )
        return self.lm_head(hidden), memory

    def forward_head(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, pool: str = "mean"
    ) -> torch.Tensor:
        """Pool hidden states ``(B, T, C)`` over real tokens into ``(B, C)``."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        if pool == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if pool == "last":
            last = attention_mask.long().cumsum(-1).argmax(-1)  # index of the last real token
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        raise ValueError(f"unknown pool {pool!r}")

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Next-token logits ``(B, T, vocab_size)``."""
        return self.lm_head(self.forward_features(input_ids, **kwargs))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary losses (MoE load balancing, ...) that layers set in the last
        forward, as a scalar; zero for a dense model."""
        losses = [
            m.aux_loss
            for m in self.layers.modules()
            if isinstance(getattr(m, "aux_loss", None), torch.Tensor)
        ]
        return sum(losses, self.embed_tokens.weight.new_zeros(()))

    def moe_stats(self) -> dict[int, dict]:
        """Layer index -> the ``stats`` dict its MoE FFN recorded in the last forward."""
        return {
            i: layer.mlp.stats
            for i, layer in enumerate(self.layers)
            if isinstance(getattr(layer.mlp, "stats", None), dict)
        }

    def memory_stats(self, reset: bool = True) -> dict[int, dict[str, torch.Tensor]]:
        """Layer index -> its memory gate statistics (``MemoryBlock.gate_stats``); empty without
        memory. ``reset``: the write averages start again from here."""
        return {
            i: layer.gate_stats(reset)
            for i, layer in enumerate(self.layers)
            if isinstance(layer, MemoryBlock)
        }

    def stream(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        mode: AttentionMode | str = AttentionMode.PREFIX,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Decode with a KV cache, yielding each step's ``(B,)`` new tokens.

        The prompt (``input_ids`` ``(B, T)`` or ``inputs_embeds`` ``(B, T, C)``, left-padded as
        ``attention_mask`` says) is encoded once: in ``"prefix"`` mode bidirectionally (GLM), in
        ``"causal"`` mode causally. Each generated token then attends causally to everything
        before it. A row that emits one of ``stop_token_ids`` emits ``cfg.pad_token_id`` after it;
        decoding ends after ``max_new_tokens`` steps or once every row has stopped. Arguments are
        checked here, before the first step is asked for.
        """
        check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
        return self._decode(
            input_ids,
            inputs_embeds,
            attention_mask,
            max_new_tokens,
            dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p),
            stop_token_ids,
            mode,
            generator,
        )

    @torch.no_grad()
    def _decode(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        sampling: dict,
        stop_token_ids: Sequence[int],
        mode: AttentionMode | str,
        generator: torch.Generator | None,
    ) -> Iterator[torch.Tensor]:
        """:meth:`stream`'s loop, on checked arguments."""
        hidden, step = self.begin_decode(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            max_new_tokens=max_new_tokens, mode=mode,
        )  # fmt: skip
        stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=hidden.device)
        done = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        for _ in range(max_new_tokens):
            token = sample_next_token(self.lm_head(hidden), **sampling, generator=generator)  # (B,)
            token = token.masked_fill(done, self.cfg.pad_token_id)
            done = done | torch.isin(token, stop)
            yield token
            if done.all():
                return
            hidden = step(self.embed_tokens(token[:, None]))  # (B, 1, C) -> (B, C)

    @torch.no_grad()
    def begin_decode(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        mode: AttentionMode | str = AttentionMode.PREFIX,
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Encode a left-padded prompt for a caller-driven decoding loop (a server's, which
        samples each row its own way and stops rows one by one): the last position's hidden
        state ``(B, C)`` (``lm_head`` gives the first logits) and ``step``, which takes the next
        tokens' embeddings ``(B, 1, C)`` to their hidden states ``(B, C)``. :meth:`stream` is this
        loop with one sampler for every row."""
        mode = AttentionMode(mode)
        if mode is AttentionMode.BIDIRECTIONAL:
            raise ValueError("generation needs mode 'prefix' or 'causal', not 'bidirectional'")
        x = self._embed(input_ids, inputs_embeds)  # (B, T, C)
        t = x.shape[1]
        if t + max_new_tokens > self.cfg.max_seq_len and not self.cfg.memory.enabled:
            raise ValueError(
                f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"text.max_seq_len={self.cfg.max_seq_len}"
            )
        padding = self._padding(attention_mask, x)  # (B, T)
        if (padding.long().cummax(-1).values != padding.long()).any():
            raise ValueError("generation needs left-padded prompts (no padding after a real token)")
        prefix_lengths = padding.sum(-1) if mode is AttentionMode.PREFIX else None  # whole prompt
        return self._prefill(x, padding, mode, prefix_lengths, max_new_tokens)

    def _prefill(
        self,
        x: torch.Tensor,
        padding: torch.Tensor,
        mode: AttentionMode,
        prefix_lengths: torch.Tensor | None,
        max_new_tokens: int,
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Encode the prompt: the last token's hidden state ``(B, C)`` and the step function that
        takes the next token's embedding ``(B, 1, C)`` to its hidden state. Without memory a KV
        cache of the prompt and what follows; with memory the prompt goes segment by segment and
        the cache holds one segment (``memory.SegmentRunner``)."""
        if self.cfg.memory.enabled:
            runner = self._segments()
            hidden, memory, cache = runner.prefill(x, padding, mode, prefix_lengths)

            def step_memory(new: torch.Tensor) -> torch.Tensor:
                nonlocal memory
                out, memory = runner.decode_step(new, memory, cache)
                return out

            return hidden, step_memory
        b, t = x.shape[:2]
        kv = KVCache.from_config(
            self.cfg, b, t + max_new_tokens, capacity=t + KV_BLOCK, dtype=x.dtype, device=x.device
        )  # grows as tokens come, up to t + max_new_tokens
        state = {"padding": padding}  # grows by one column per step

        def features(new: torch.Tensor) -> torch.Tensor:
            return self.forward_features(
                inputs_embeds=new,
                attention_mask=state["padding"],
                mode=mode,
                prefix_lengths=prefix_lengths,
                cache=kv,
            )[:, -1]  # (B, C)

        def step_cached(new: torch.Tensor) -> torch.Tensor:
            ones = state["padding"].new_ones(b, 1)
            state["padding"] = torch.cat([state["padding"], ones], dim=1)
            return features(new)

        return features(x), step_cached

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        mode: AttentionMode | str = AttentionMode.PREFIX,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The new tokens ``(B, N)``, ``N <= max_new_tokens``; same arguments as :meth:`stream`."""
        steps = list(
            self.stream(
                input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop_token_ids=stop_token_ids,
                mode=mode,
                generator=generator,
            )
        )
        return torch.stack(steps, dim=1)  # (B, N), N >= 1
