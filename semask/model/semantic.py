"""The SeMask semantic layer (arXiv 2112.12782, Sec. 3.2).

After the Swin blocks of each stage, a semantic layer normalises the features and runs a single-head
"semantic attention" whose queries and keys live in class space:

    q = Linear(C -> K)(x)      the stage's semantic prior (supervised by the decoder, shown by the viewers)
    k = Linear(C -> K)(x)
    v = Linear(C -> C)(x)
    a = softmax(q k^T)         over the tokens of a window, or of the whole map (no 1/sqrt(d) scaling)
    f = Linear(C -> C)(a v)
    out = gamma * f + x        gamma is one learned scalar initialised to 0; x is the NORMALISED input

The output replaces the stage's features (there is no residual to the un-normalised features).
Parameter names follow the released checkpoints (`norm1`, `class_injection.{i}.mlp_cls_q`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from semask.errors import UsageError
from semask.model.windows import pad_to_multiple, window_partition, window_reverse

__all__ = ["SemanticAttention", "SemanticLayer", "SemanticAttentionMap"]


@dataclass
class SemanticAttentionMap:
    """Attention weights of one semantic layer, kept in their window layout.

    Attributes:
        weights: (B, nH, nW, N, N) softmax weights: for each of the nH x nW windows, row i holds how much
            token i attends to every token j of the same window (N = w*w). A global layer has nH = nW = 1
            and N = H*W.
        window_size: w, or None for a global layer.
        height, width: the stage's feature size (before padding).
    """

    weights: torch.Tensor
    window_size: Optional[int]
    height: int
    width: int

    def query_map(self, batch_index: int, row: int, col: int) -> torch.Tensor:
        """Where the token at (row, col) of the stage's feature map looks.

        Args:
            batch_index: image of the batch.
            row, col: query position in feature-map coordinates.

        Returns:
            (H, W) attention weights over the feature map (zero outside the query's window).
        """
        if not (0 <= row < self.height and 0 <= col < self.width):
            raise IndexError(f"query ({row}, {col}) outside the {self.height}x{self.width} feature map")
        if self.window_size is None:
            return self.weights[batch_index, 0, 0, row * self.width + col].view(self.height, self.width)
        w = self.window_size
        wr, wc = row // w, col // w
        window = self.weights[batch_index, wr, wc, (row % w) * w + (col % w)].view(w, w)
        nh, nw = self.weights.shape[1:3]
        full = window.new_zeros(nh * w, nw * w)
        full[wr * w:(wr + 1) * w, wc * w:(wc + 1) * w] = window
        return full[: self.height, : self.width]


class SemanticAttention(nn.Module):
    """One semantic attention block (`class_injection.{i}` in the checkpoints).

    Args:
        dim: C, channels of the stage.
        num_classes: K, channels of the semantic prior.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_classes: int, proj_drop: float = 0.1):
        super().__init__()
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Args:
            x: (G, N, C) tokens of G groups (windows, or whole images), normalised.
            return_attention: also compute the (G, N, N) attention weights explicitly.

        Returns:
            out: (G, N, C); prior: (G, N, K) the queries; attention: (G, N, N) or None.
        """
        q = self.mlp_cls_q(x)  # G, N, K
        k = self.mlp_cls_k(x)  # G, N, K
        v = self.mlp_v(x)  # G, N, C
        if return_attention or not x.is_cuda:
            # explicit on the CPU too: there PyTorch's SDPA has no fused kernel for a value width (C) that
            # differs from the query width (K) and falls back to a slower unfused path
            attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # G, N, N
            f = attn @ v  # G, N, C
            attn = attn if return_attention else None
        else:
            attn = None
            f = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0)
            f = f.squeeze(1)  # G, N, C
        f = self.proj_drop(self.mlp_res(f))
        return self.gamma * f + x, q, attn


class SemanticLayer(nn.Module):
    """LayerNorm + semantic attention blocks over windows (or over the whole map).

    Args:
        dim: C.
        num_classes: K.
        window_size: w for windowed attention (the map is zero-padded to a multiple of w, padded tokens take
            part in the softmax, no shift), or None for attention over the whole feature map.
        num_sem_blocks: number of chained semantic attention blocks (1 in every released model).
        proj_drop: dropout of each block's output projection.
        norm_layer: normalisation layer class.
    """

    def __init__(self, dim: int, num_classes: int, window_size: Optional[int] = 7, num_sem_blocks: int = 1,
                 proj_drop: float = 0.1, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        if num_sem_blocks < 1:
            raise UsageError(f"num_sem_blocks must be at least 1, got {num_sem_blocks}")
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.class_injection = nn.ModuleList(
            [SemanticAttention(dim, num_classes, proj_drop) for _ in range(num_sem_blocks)])

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[SemanticAttentionMap]]:
        """Args:
            x: (B, H, W, C) stage features.
            return_attention: also return the last block's attention weights.

        Returns:
            out: (B, H, W, C) features that replace the stage's; prior: (B, K, H, W) the last block's queries;
            attention: `SemanticAttentionMap` or None.
        """
        B, H, W, C = x.shape
        x = self.norm1(x)
        w = self.window_size
        if w is None:
            tokens = x.reshape(B, H * W, C)  # B, H*W, C
        else:
            x = pad_to_multiple(x, w)  # B, Hp, Wp, C
            Hp, Wp = x.shape[1:3]
            tokens = window_partition(x, w)  # B*nW, w*w, C
        attn = None
        for blk in self.class_injection:
            tokens, prior, attn = blk(tokens, return_attention=return_attention)
        if w is None:
            out = tokens.view(B, H, W, C)
            prior = prior.view(B, H, W, -1)  # B, H, W, K
        else:
            out = window_reverse(tokens, w, Hp, Wp)[:, :H, :W]  # B, H, W, C
            prior = window_reverse(prior, w, Hp, Wp)[:, :H, :W]  # B, H, W, K
        amap = None
        if attn is not None:
            if w is None:
                weights = attn.view(B, 1, 1, H * W, H * W)  # B, 1, 1, N, N
            else:
                weights = attn.view(B, Hp // w, Wp // w, w * w, w * w)  # B, nH, nW, N, N
            amap = SemanticAttentionMap(weights, w, H, W)
        return out, prior.permute(0, 3, 1, 2), amap  # prior: B, K, H, W
