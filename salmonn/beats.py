"""BEATs audio encoder (Chen et al. 2022), inference only.

Module and parameter names follow the official checkpoint's `model` keys, so
`Beats(BeatsConfig.from_dict(ckpt["cfg"])).load_state_dict(ckpt["model"])` is strict:

    patch_embedding.weight                       Conv2d(1, 512, 16, stride 16)
    layer_norm.{weight,bias}                     LayerNorm(512) on patch embeddings
    post_extract_proj.{weight,bias}              Linear 512 -> 768
    encoder.pos_conv.0.{weight_g,weight_v,bias}  weight-normed grouped Conv1d (dim=2)
    encoder.layer_norm.{weight,bias}
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*
    encoder.layers.{i}.self_attn.relative_attention_bias.weight   shared from layer 0
    encoder.layers.{i}.self_attn.grep_linear.*, .grep_a            gated relative position
    encoder.layers.{i}.{self_attn_layer_norm,fc1,fc2,final_layer_norm}.*
    predictor.{weight,bias}                      AudioSet head of fine-tuned models (unused)

Tokens: the fbank (B, F, 128) is cut into 16x16 patches -> (B, F//16 * 8) tokens, time-major
(token i = time patch i // 8, mel band i % 8), 50 tokens per second.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import BeatsConfig

logger = logging.getLogger(__name__)


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over every dim except `dim` (official: dim=2).

    Stores `weight_g` and `weight_v` as the checkpoint does (torch's old weight_norm names).
    """

    def __init__(self, channels: int, kernel: int, groups: int, dim: int = 2):
        super().__init__()
        self.groups, self.padding, self.dim = groups, kernel // 2, dim
        g_shape = [1, 1, 1]
        g_shape[dim] = (channels, channels // groups, kernel)[dim]
        self.weight_g = nn.Parameter(torch.ones(g_shape))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel * channels)))

    def weight(self) -> torch.Tensor:
        other = [d for d in range(3) if d != self.dim]
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=other, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C, T + 1 - kernel % 2)
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class TrimLast(nn.Module):
    """fairseq SamePad: an even kernel with padding k//2 yields one extra frame; drop it."""

    def __init__(self, kernel: int):
        super().__init__()
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] - self.trim] if self.trim else x


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bidirectional T5-style buckets (T, T) for relative positions key - query."""
    pos = torch.arange(length, device=device)
    return distance_buckets(pos[None, :] - pos[:, None], num_buckets, max_distance)  # (T, T) memory - context


def distance_buckets(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """The bucket of each relative position (key - query), elementwise."""
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    # log-spaced buckets beyond max_exact (clamped to avoid log(0); those entries use `rel`)
    large = max_exact + (
        torch.log(rel.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class BeatsAttention(nn.Module):
    def __init__(self, cfg: BeatsConfig, has_relative_bias: bool):
        super().__init__()
        c, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.heads, self.head_dim = h, c // h
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, h)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))

    def position_bias(self, length: int) -> torch.Tensor:
        """Raw relative position bias (H, T, T), computed once per forward by layer 0.

        The same values as embedding `relative_position_buckets(T)`, but the buckets and the
        embedding lookup are done once per distance (2T - 1 of them); the (T, T) Toeplitz layout
        is then one contiguous copy, which every layer's (B, H, T, T) bias reads sequentially.
        """
        device = self.q_proj.weight.device
        distances = torch.arange(1 - length, length, device=device)  # (2T - 1,) key - query
        buckets = distance_buckets(distances, self.num_buckets, self.max_distance)
        table = self.relative_attention_bias(buckets).T  # (H, 2T - 1), column j: distance j - (T - 1)
        # windows[h, i, s] = table[h, i + s]; query t needs distance s - t, i.e. i = T - 1 - t
        return table.unfold(-1, length, 1).flip(1)  # (H, T, T); flip copies, contiguous

    def forward(self, x: torch.Tensor, pad_bias: torch.Tensor | None, pos_bias: torch.Tensor | None) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        bias = pad_bias  # (B, 1, 1, T) or None
        if pos_bias is not None:
            gate = None
            if self.gru_rel_pos:
                # gate per query from the unscaled query: sigmoid of two 4-way sums
                gates = torch.sigmoid(self.grep_linear(q).view(b, self.heads, t, 2, 4).sum(-1))  # (B, H, T, 2)
                gate_a, gate_b = gates.chunk(2, dim=-1)  # (B, H, T, 1) each
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # (B, H, T, 1)
            if gate is not None and bias is not None and gate.dtype == pos_bias.dtype == bias.dtype == q.dtype:
                # pad_bias + gate * pos_bias in one pass over (B, H, T, T), not two; exact, as
                # pad_bias is 0 or -inf
                bias = torch.addcmul(bias, gate, pos_bias)  # (B, H, T, T)
            else:
                pos = pos_bias[None] if gate is None else gate * pos_bias  # (B or 1, H, T, T)
                bias = pos.to(q.dtype) if bias is None else pos.to(q.dtype) + bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class BeatsLayer(nn.Module):
    def __init__(self, cfg: BeatsConfig, has_relative_bias: bool):
        super().__init__()
        c = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = BeatsAttention(cfg, has_relative_bias)
        self.self_attn_layer_norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, c)
        self.final_layer_norm = nn.LayerNorm(c)
        # DeepNorm scales the residual branch by (2N)^(1/4); plain post-LN uses 1
        self.residual_scale = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x: torch.Tensor, pad_bias: torch.Tensor | None, pos_bias: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), pad_bias, pos_bias)
            return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x * self.residual_scale + self.self_attn(x, pad_bias, pos_bias))
        return self.final_layer_norm(x * self.residual_scale + self.fc2(F.gelu(self.fc1(x))))


class BeatsEncoder(nn.Module):
    def __init__(self, cfg: BeatsConfig):
        super().__init__()
        c = cfg.encoder_embed_dim
        conv = WeightNormConv1d(c, cfg.conv_pos, cfg.conv_pos_groups)
        self.pos_conv = nn.Sequential(conv, TrimLast(cfg.conv_pos), nn.GELU())
        self.layers = nn.ModuleList(
            BeatsLayer(cfg, has_relative_bias=cfg.relative_position_embedding) for _ in range(cfg.encoder_layers)
        )
        self.relative_position_embedding = cfg.relative_position_embedding
        self.tie_relative_bias()
        self.layer_norm_first = cfg.layer_norm_first
        self.layer_norm = nn.LayerNorm(c)

    def _layers(self) -> list[BeatsLayer]:
        return list(self.layers)  # type: ignore[arg-type]  # an nn.ModuleList of BeatsLayer

    def tie_relative_bias(self) -> None:
        """Every layer uses layer 0's bias table (the official model shares the module)."""
        if self.relative_position_embedding:
            first, *rest = self._layers()
            for layer in rest:
                layer.self_attn.relative_attention_bias = first.self_attn.relative_attention_bias

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, T, C); padding_mask (B, T) True = padding
        pad_bias = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)  # as official: zero pads before pos_conv
            pad_bias = torch.zeros(padding_mask.shape, dtype=x.dtype, device=x.device)
            pad_bias = pad_bias.masked_fill(padding_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, T)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        pos_bias = self._layers()[0].self_attn.position_bias(x.shape[1]) if self.relative_position_embedding else None
        for layer in self.layers:
            x = layer(x, pad_bias, pos_bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class Beats(nn.Module):
    """BEATs: normalised fbank (B, F, 128) -> token features (B, T, C), T = F // 16 * 8."""

    def __init__(self, cfg: BeatsConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = BeatsEncoder(cfg)
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None

    def token_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Valid tokens for each clip's true fbank frame count: (frames // 16) * 8."""
        return (frames // self.cfg.input_patch_size) * self.cfg.freq_patches

    def forward(self, fbank: torch.Tensor, frames: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fbank (B, F, n_mels), frames (B,) true frame counts -> (features (B, T, C), padding (B, T)).

        A clip in a right-padded batch gets exactly the features it gets alone: its padded tokens
        are zeroed before the positional conv and masked as attention keys. Padded rows of the
        output hold garbage; `padding` (True = pad) marks them.
        """
        x = self.patch_embedding(fbank.unsqueeze(1))  # (B, E, F // p, n_mels // p)
        x = x.flatten(2).transpose(1, 2)  # (B, T, E), time-major
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, T, C)
        b, t = x.shape[:2]
        if frames is None:
            padding = torch.zeros(b, t, dtype=torch.bool, device=x.device)
            return self.encoder(x, None), padding
        padding = torch.arange(t, device=x.device)[None, :] >= self.token_lengths(frames.to(x.device))[:, None]
        return self.encoder(x, padding if padding.any() else None), padding
