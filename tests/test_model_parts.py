"""Parts against independent references: the Q-Former against transformers' BLIP-2 Q-Former."""

from __future__ import annotations

import torch

from salmonn import QformerDims
from salmonn.beats import relative_position_buckets
from salmonn.model import split_windows
from salmonn.qformer import WindowQformer


def test_qformer_matches_transformers_blip2():
    """transformers' Blip2QFormerModel is a port of the LAVIS Q-Former SALMONN uses."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    dims = QformerDims(layers=2, hidden=128, heads=2, ffn_dim=256, encoder_width=112, num_queries=1)
    torch.manual_seed(0)
    ours = WindowQformer(dims).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = Blip2QFormerModel(
        Blip2QFormerConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=256,
            cross_attention_frequency=1,
            encoder_hidden_size=112,
        )
    ).eval()
    renamed = {
        k.replace("bert.embeddings.LayerNorm", "layernorm").replace("bert.", "").replace(".self.", ".attention."): v
        for k, v in ours.state_dict().items()
        if not k.endswith("position_ids")
    }
    ref.load_state_dict(renamed, strict=True)
    query = torch.randn(24, 1, 128)  # (N, Q, C)
    frames = torch.randn(24, 17, 112)  # (N, K, E)
    with torch.no_grad():
        expected = ref(query_embeds=query, encoder_hidden_states=frames).last_hidden_state
        torch.testing.assert_close(ours(query, frames), expected, rtol=1e-5, atol=1e-5)


def test_windows_equal_official_unfold():
    """x[:, :W*K].reshape(B*W, K, C) is the official F.unfold / view / permute sequence."""
    b, t, c, k = 2, 1500, 6, 17
    x = torch.randn(b, t, c)
    unfolded = torch.nn.functional.unfold(x.transpose(1, 2).unsqueeze(2), kernel_size=(1, k), stride=(1, k))
    w = unfolded.shape[-1]
    official = unfolded.view(b, -1, k, w).permute(0, 3, 2, 1).reshape(-1, k, c)
    assert w == 88
    assert torch.equal(split_windows(x, k), official)


def test_relative_position_buckets():
    buckets = relative_position_buckets(1500, num_buckets=320, max_distance=800, device=torch.device("cpu"))
    assert buckets.shape == (1500, 1500)
    assert buckets[0, 0] == 0 and buckets[5, 5] == 0
    assert buckets[0, 1] == 161 and buckets[1, 0] == 1  # keys after the query use the upper half
    assert buckets[0, 79] == 160 + 79 and buckets[79, 0] == 79  # exact up to 80
    assert buckets.max() == 319 and buckets[1499, 0] == 159  # far distances share the last bucket
