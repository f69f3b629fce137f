"""Gemma 3 style decoder-only transformer (text only), following Hugging Face's Gemma3ForCausalLM.

Per layer: pre- and post-norms around attention and around the MLP (four RMSNorms, each scaling by
1 + w), grouped-query attention with RMS-normed queries and keys, rotary embeddings whose base is
`rope_local_base` on sliding-window layers and `rope_global_base` on global layers, and a gated
tanh-GELU MLP. Every `global_every`-th layer attends to the whole context; the others to the last
`sliding_window` tokens. Token embeddings are scaled by sqrt(n_embd).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from . import kernels
from .kernels import cross_entropy, gated_gelu


ROPE_POSITIONS = 2048  # rotary tables precomputed for this many positions; longer inputs extend them


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, weight stored as an offset from 1 (initialised to 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope_cache(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim], halves layout (rotate_half)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def is_sliding(cfg: ModelConfig, layer: int) -> bool:
    return (layer + 1) % cfg.global_every != 0


class KVCache:
    """Keys and values of the positions seen so far, one entry per layer (generation only).

    Sliding layers keep every position too and mask the old ones out: simple, and for the short
    contexts these models train on the memory is small.
    """

    def __init__(self, n_layer: int):
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * n_layer
        self.length = 0  # positions already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = cfg.sliding_window if is_sliding(cfg, layer) else None
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.kernel = cfg.attention
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(self.layer, k, v)
        gqa = self.n_kv_head != self.n_head  # grouped-query: SDPA shares each KV head, no copies
        if start == 0 and (self.window is None or T <= self.window):
            # Within the window a sliding layer is plain causal attention: no mask to build.
            if use_matmul_attention(self.kernel, q):
                return self.o_proj(matmul_attention(q, k, v, self.scale))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            mask = attention_mask(start, T, k.shape[2], self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


MATMUL_ATTENTION_MAX_T = 256  # "auto" takes the matmul path on GPU up to this context (BENCHMARKS.md)


def use_matmul_attention(kernel: str, q: torch.Tensor) -> bool:
    if kernel == "auto":
        return q.is_cuda and q.shape[2] <= MATMUL_ATTENTION_MAX_T
    return kernel == "matmul"


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention as two batched matmuls and a float32 softmax; [B, H, T, D] q, [B, KV, T, D] k/v
    -> [B, T, H * D], heads side by side as o_proj takes them.

    At short contexts with wide heads (the recipe: T 128, head dim 256) the fused kernels run far below
    the GPU's matmul rate (cuDNN's backward alone was 10% of a step), while the T x T scores are small:
    plain matmuls that the compiler fuses the mask and softmax around are faster. The query heads that
    share a key/value head are stacked as rows of one matmul (row t * G + g: position t, head g), so the
    shared head is read once and never copied.
    """
    B, H, T, D = q.shape
    KV = k.shape[1]
    G = H // KV
    rows = q.reshape(B, KV, G, T, D).transpose(2, 3).reshape(B, KV, T * G, D)
    scores = torch.matmul(rows, k.transpose(-1, -2)).float() * scale  # [B, KV, T * G, T]
    position = torch.arange(T * G, device=q.device) // G
    future = torch.arange(T, device=q.device)[None, :] > position[:, None]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1).to(v.dtype)
    y = torch.matmul(probs, v)  # [B, KV, T * G, D]
    return y.reshape(B, KV, T, G, D).transpose(1, 2).reshape(B, T, H * D)


def fused_linear(x: torch.Tensor, *projections: nn.Linear) -> tuple[torch.Tensor, ...]:
    """Several bias-free projections of the same input as one matmul over their stacked weights.

    One wider GEMM reads x once and runs closer to peak than three (or two) narrow ones (1.5% of a
    recipe step on an H100); the parameters stay separate, so checkpoints and exports keep their names.
    """
    weight = torch.cat([p.weight for p in projections])
    return F.linear(x, weight).split([p.out_features for p in projections], dim=-1)


def attention_mask(start: int, T: int, S: int, window: Optional[int], device=None) -> torch.Tensor:
    """Boolean [T, S] for queries at positions start..start+T-1 over keys 0..S-1: key j is seen by
    query i when j <= i and, on sliding layers, i - window < j (the window includes i itself)."""
    i = torch.arange(start, start + T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return (j <= i) & (j > i - window) if window is not None else j <= i


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.fused = cfg.fused_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))  # one matmul for both
        return self.down_proj(gated_gelu(gate_up, fused=self.fused))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.sliding = is_sliding(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope_local, rope_global, cache: Optional[KVCache] = None) -> torch.Tensor:
        cos, sin = rope_local if self.sliding else rope_global
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaLM(nn.Module):
    """forward(idx, targets=None) -> (logits, loss), as nanoGPT's GPT and the reference script expect.

    With targets and `model.fused_head`, the loss comes from the fused output head and logits is None:
    the [B, T, vocab] logits are never made whole."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (it is read from the data's meta.json when null)")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # The output matmul runs on a vocabulary padded to a multiple of vocab_pad_multiple: an odd
        # width (GPT-2's 50,257) misaligns the logits' rows and slows every kernel that touches them.
        # Padded rows are zeros plus a -inf bias, so softmax and the loss never see them.
        multiple = cfg.vocab_pad_multiple or 1
        self.padded_vocab = -(-cfg.vocab_size // multiple) * multiple
        pad_bias = torch.zeros(self.padded_vocab)
        pad_bias[cfg.vocab_size:] = float("-inf")
        self.register_buffer("pad_bias", pad_bias, persistent=False)  # not in the state dict
        # Rotary tables computed once, not in every forward: a compiled graph would otherwise fuse
        # cos/sin into the q/k kernels and evaluate them per element of every head (~6% of a step).
        self.extend_rope(ROPE_POSITIONS)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def extend_rope(self, positions: int) -> None:
        device = self.embed_tokens.weight.device
        for name, base in (("local", self.cfg.rope_local_base), ("global", self.cfg.rope_global_base)):
            cos, sin = rope_cache(positions, self.cfg.head_dim, base, device)
            self.register_buffer(f"rope_{name}_cos", cos, persistent=False)
            self.register_buffer(f"rope_{name}_sin", sin, persistent=False)

    def gradient_buckets(self) -> list[list[nn.Module]]:
        """The modules in the order the backward finishes their gradients: the final norm and the head,
        the blocks from the last, the embedding (a tied head's weight is finished there, last). In each
        list some module's forward runs before any of the list's weights is used (the norm before the
        head's matmul, which reads lm_head.weight without calling lm_head): a sharded optimizer's
        forward pre-hooks wait there for the weights' all-gather."""
        return [[self.norm, self.lm_head], *([layer] for layer in reversed(self.layers)), [self.embed_tokens]]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None):
        """With a `cache`, `idx` continues the cached positions and the cache grows by its length."""
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        x = self.embed_tokens(idx)
        x = x * torch.tensor(math.sqrt(self.cfg.n_embd), dtype=x.dtype)
        if start + T > self.rope_local_cos.shape[0]:  # a longer generation than the tables hold
            self.extend_rope(2 * (start + T))
        end = start + T
        rope_local = self.rope_local_cos[start:end], self.rope_local_sin[start:end]
        rope_global = self.rope_global_cos[start:end], self.rope_global_sin[start:end]
        for layer in self.layers:
            x = layer(x, rope_local, rope_global, cache)
        if cache is not None:
            cache.length += T
        h = self.norm(x)
        if targets is not None and self.cfg.fused_head:
            return None, self.head_loss(h, targets)
        logits = self.output_logits(h)
        loss = None
        if targets is not None:  # over the padded width: the -inf columns add nothing
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), fused=self.cfg.fused_kernels)
        if loss is not None:
            # Gradients flow through the loss. Logits returned beside it are for looking at: were they
            # differentiable, the compiled backward would add their (zero) gradient to the loss's,
            # one more pass over the 50k-wide logits per micro-batch (4% of a recipe step on an H100).
            logits = logits.detach()
        return logits[..., :self.cfg.vocab_size], loss

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of the output head on h without its logits (kernels.linear_cross_entropy), in
        autocast's dtype where autocast is on, as F.linear would compute the logits."""
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        weight = F.pad(self.lm_head.weight, (0, 0, 0, self.padded_vocab - self.cfg.vocab_size))
        return kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]).to(dtype), weight.to(dtype),
                                            targets.reshape(-1), self.cfg.vocab_size)

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., padded_vocab] logits; columns from vocab_size on are -inf."""
        pad = self.padded_vocab - self.cfg.vocab_size
        if pad == 0:
            return self.lm_head(h)
        return F.linear(h, F.pad(self.lm_head.weight, (0, 0, 0, pad)), self.pad_bias)


def flops_per_token(cfg: ModelConfig, num_params: int, block_size: int) -> float:
    """Training FLOPs per token, nanoGPT's count: 6N + 12 * layers * heads * head_dim * T."""
    return 6 * num_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * block_size


def matmul_flops_per_token(cfg: ModelConfig, block_size: int) -> float:
    """Training FLOPs per token counted by matmul work: 6 x the weights that multiply (every projection
    and the output head, tied or not; not the input embedding, a lookup, nor the norm gains) plus
    nanoGPT's 12 * layers * heads * head_dim * T for attention."""
    d, q, kv = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * cfg.mlp_hidden  # q, o; k, v; gate, up, down
    return 6 * (cfg.n_layer * per_layer + cfg.vocab_size * d) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * block_size
