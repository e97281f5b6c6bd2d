"""Swin Transformer backbone with SeMask semantic layers.

SeMask: Semantically Masked Transformers for Semantic Segmentation (arXiv 2112.12782), built on
Swin Transformer (arXiv 2103.14030) in its original (v1, segmentation-repository) form: blocks pad the
feature map to a multiple of the window BEFORE the cyclic shift, and the shift mask is built on the padded
size. timm's Swin shifts before padding and therefore gives different numbers on sizes that are not
multiples of the window; the released SeMask checkpoints need this order.

Every stage may end with a semantic layer (`semask.model.semantic.SemanticLayer`) that produces the stage's
semantic prior and replaces the stage's features; without it the backbone is the plain Swin baseline.
Module and parameter names follow the released checkpoints (`layers.{i}.blocks.{j}.attn.qkv.weight`,
`layers.{i}.semantic_layer...`, `norm{i}`), so official weights load without renaming.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, trunc_normal_

from semask.errors import UsageError
from semask.model.semantic import SemanticAttentionMap, SemanticLayer
from semask.model.util import LRUCache, is_exporting
from semask.model.windows import pad_to_multiple, window_partition, window_reverse

__all__ = [
    "relative_position_index",
    "shift_window_mask",
    "WindowAttention",
    "SwinBlock",
    "PatchEmbed",
    "PatchMerging",
    "SwinStage",
    "BackboneOutput",
    "SeMaskSwin",
]


# ----------------------------------------------------------------------------------------------- helpers
def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the ((2w-1)^2, heads) bias table for every pair of tokens of a w x w window.

    Returns:
        (w*w, w*w) int64, the standard Swin layout (row offset major, column offset minor).
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # 2, w*w
    rel = coords[:, :, None] - coords[:, None, :]  # 2, w*w, w*w
    rel = rel + (window_size - 1)
    return rel[0] * (2 * window_size - 1) + rel[1]  # w*w, w*w


def shift_window_mask(height: int, width: int, window_size: int, shift: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """Additive attention mask of the shifted windows for a padded feature map of size (height, width).

    Tokens that came from different regions of the cyclically shifted map get -100 (as in the reference),
    tokens of the same region 0. Regions are [0, H-w), [H-w, H-s), [H-s, H) of the padded size, likewise
    for the width.

    Returns:
        (nW, w*w, w*w) float32 with nW = (height/w) * (width/w).
    """
    img = torch.zeros(1, height, width, 1, device=device)
    bounds = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    region = 0
    for hs in bounds:
        for ws in bounds:
            img[:, hs, ws, :] = region
            region += 1
    ids = window_partition(img, window_size).squeeze(-1)  # nW, w*w
    diff = ids[:, None, :] - ids[:, :, None]  # nW, w*w, w*w
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


# ----------------------------------------------------------------------------------------------- blocks
class Mlp(nn.Module):
    """Two-layer MLP with GELU, named `fc1`/`fc2` as in the checkpoints."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learned relative-position bias.

    Uses PyTorch's fused `scaled_dot_product_attention` with the bias (plus, on shifted blocks, the shift
    mask) as one additive float mask of shape (nW, heads, N, N) (bf16/fp16 on the CPU: two batched matmuls,
    which are faster there). In inference (no autograd) that mask is cached per feature size and dtype, and
    rebuilt only when the bias table changes.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._cache = LRUCache(maxsize=8)  # attention masks per (table version, dtype, feature size)

    def relative_position_bias(self) -> torch.Tensor:
        """The bias of every head for every token pair: (heads, w*w, w*w)."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)  # N, N, heads
        return bias.permute(2, 0, 1).contiguous()  # heads, N, N

    def attention_mask(self, shift_mask: Optional[torch.Tensor], dtype: torch.dtype,
                       cache_key: Optional[tuple] = None) -> torch.Tensor:
        """The additive mask for SDPA: (1, heads, N, N) bias, or (nW, heads, N, N) bias + shift mask.

        Args:
            shift_mask: (nW, N, N) shift mask of a shifted block, or None.
            dtype: dtype of the attention logits.
            cache_key: identifies `shift_mask` (the padded feature size); without it a shifted block's mask is
                rebuilt each call. In inference the result is cached per key and dtype (a few sizes at most)
                and rebuilt when the bias table changes.
        """
        table = self.relative_position_bias_table
        caching = (not (torch.is_grad_enabled() and table.requires_grad) and (shift_mask is None or cache_key is not None)
                   and not is_exporting())  # an export traces fake tensors: never cache those
        key = (table._version, table.data_ptr(), table.device, dtype,
               cache_key if shift_mask is not None else None) if caching else None
        if caching and (cached := self._cache.get(key)) is not None:
            return cached
        bias = self.relative_position_bias().unsqueeze(0)  # 1, heads, N, N
        if shift_mask is not None:
            bias = bias + shift_mask.unsqueeze(1)  # nW, heads, N, N
        bias = bias.to(dtype)
        if caching:
            self._cache.put(key, bias)
        return bias

    def _attend_unfused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                        mask_key: Optional[tuple] = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias) v with batched matmuls: (B*nW, heads, N, d) -> same.

        Used for bf16/fp16 on the CPU, where PyTorch's fused kernel is slower than two batched matmuls at
        Swin's small windows and head size (measured: 7.8 vs 11.6 ms for stage 1 of SeMask-T at 512x512).
        """
        Bw = q.shape[0]
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # B*nW, heads, N, N
        bias = self.attention_mask(mask, attn.dtype, mask_key)  # 1 or nW, heads, N, N
        if mask is not None:  # one mask per window, shared by the images of the batch
            attn = (attn.view(Bw // bias.shape[0], *bias.shape) + bias).view(Bw, *bias.shape[1:])  # per image
        else:
            attn = attn + bias
        attn = torch.softmax(attn, dim=-1)
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        return attn.to(v.dtype) @ v  # B*nW, heads, N, d

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                mask_key: Optional[tuple] = None) -> torch.Tensor:
        """Attend inside windows.

        Args:
            x: (B * nW, N, C) window tokens, N = w*w, windows of one image consecutive.
            mask: optional (nW, N, N) additive shift mask shared by every image of the batch.
            mask_key: identifies `mask` for caching (see `attention_mask`).

        Returns:
            (B * nW, N, C).
        """
        Bw, N, C = x.shape
        qkv = self.qkv(x).view(Bw, N, 3, self.num_heads, C // self.num_heads)  # B*nW, N, 3, heads, d
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B*nW, heads, N, d
        if (q.device.type == "cpu" and q.dtype != torch.float32) or is_exporting():
            out = self._attend_unfused(q, k, v, mask, mask_key)
        else:
            attn_mask = self.attention_mask(mask, q.dtype, mask_key)  # 1 or nW, heads, N, N
            if attn_mask.shape[0] not in (1, Bw):
                # the fused kernels take 4-D inputs: repeat the per-window mask for every image of the batch
                attn_mask = attn_mask.expand(Bw // attn_mask.shape[0], *attn_mask.shape).reshape(Bw, *attn_mask.shape[1:])
            drop = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)  # B*nW, heads, N, d
        out = out.transpose(1, 2).reshape(Bw, N, C)  # B*nW, N, C
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """One Swin block: LN -> pad -> (shift) -> window attention -> (unshift) -> crop -> residual -> LN -> MLP."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)

    def forward(self, x: torch.Tensor, shift_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Args:
            x: (B, H, W, C).
            shift_mask: (nW, N, N) mask of the padded map, used when this block is shifted.

        Returns:
            (B, H, W, C).
        """
        B, H, W, C = x.shape
        w, s = self.window_size, self.shift_size
        y = pad_to_multiple(self.norm1(x), w)  # B, Hp, Wp, C
        Hp, Wp = y.shape[1:3]
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, w), shift_mask if s else None, (Hp, Wp) if s else None)  # B*nW, w*w, C
        y = window_reverse(y, w, Hp, Wp)  # B, Hp, Wp, C
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y[:, :H, :W, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """4x4 patches: zero-pad to a multiple of the patch size, strided conv, LayerNorm over channels."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Optional[type[nn.Module]] = nn.LayerNorm):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), C)."""
        H, W = x.shape[2:]
        p = self.patch_size
        pad_h, pad_w = (H + p - 1) // p * p - H, (W + p - 1) // p * p - W
        if is_exporting() or pad_h or pad_w:  # see pad_to_multiple: traced for every size
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x).permute(0, 2, 3, 1)  # B, H/4, W/4, C
        return self.norm(x)


class PatchMerging(nn.Module):
    """Halve the resolution: pad to even size, concatenate the 2x2 phases, LN over 4C, linear 4C -> 2C."""

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        x = pad_to_multiple(x, 2)
        B, H, W, C = x.shape
        # phases in the order (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """A stage: `depth` Swin blocks (every other one shifted), an optional semantic layer, optional merging.

    The shift mask is built once per padded feature size and cached (it is shared by all blocks).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, *, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Sequence[float] = (), num_classes: Optional[int] = None,
                 semantic_window: Optional[int] = None, num_sem_blocks: int = 1,
                 semantic_drop: float = 0.1, downsample: bool = True,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim, self.window_size = dim, window_size
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, shift=(i % 2 == 1), mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      drop=drop, attn_drop=attn_drop, drop_path=drop_path[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        # semantic layer: None for the plain-Swin baseline; semantic_window=None means global attention
        self.semantic_layer = (
            SemanticLayer(dim, num_classes, window_size=semantic_window, num_sem_blocks=num_sem_blocks,
                          proj_drop=semantic_drop, norm_layer=norm_layer)
            if num_classes else None
        )
        self.downsample = PatchMerging(dim, norm_layer) if downsample else None
        self.grad_checkpointing = False
        self._mask_cache = LRUCache(maxsize=8)  # shift masks per padded feature size

    def shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Cached (nW, N, N) shift mask for a feature map of size (height, width) before padding."""
        w = self.window_size
        hp, wp = (height + w - 1) // w * w, (width + w - 1) // w * w
        if is_exporting():  # traced sizes may be symbolic, and traced tensors must not be cached
            return shift_window_mask(hp, wp, w, w // 2, device=device)
        key = (hp, wp, device)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = shift_window_mask(hp, wp, w, w // 2, device=device)
            self._mask_cache.put(key, mask)
        return mask

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                           Optional[SemanticAttentionMap]]:
        """Args:
            x: (B, H, W, C).
            return_attention: also return the semantic layer's attention weights.

        Returns:
            out: (B, H, W, C) stage features (after the semantic layer, before merging);
            down: (B, ceil(H/2), ceil(W/2), 2C) input of the next stage, or None for the last stage;
            prior: (B, K, H, W) semantic prior, or None without a semantic layer;
            attention: the semantic attention weights when requested, else None.
        """
        mask = self.shift_mask(x.shape[1], x.shape[2], x.device) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        prior = attention = None
        if self.semantic_layer is not None:
            x, prior, attention = self.semantic_layer(x, return_attention=return_attention)
        down = self.downsample(x) if self.downsample is not None else None
        return x, down, prior, attention


# ----------------------------------------------------------------------------------------------- model
@dataclass
class BackboneOutput:
    """What the backbone returns.

    Attributes:
        features: per stage (B, C_i, H_i, W_i) at strides 4, 8, 16, 32 (after `norm{i}`).
        priors: per stage (B, K, H_i, W_i) semantic priors; empty for the plain-Swin backbone.
        attentions: per stage semantic attention maps when requested; empty otherwise.
    """

    features: list[torch.Tensor]
    priors: list[torch.Tensor] = field(default_factory=list)
    attentions: list[SemanticAttentionMap] = field(default_factory=list)


class SeMaskSwin(nn.Module):
    """Swin Transformer with a semantic layer after every stage (or none: the plain-Swin baseline).

    Args:
        embed_dim: C, channels of stage 1 (stage i has C * 2^i).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: w of the Swin blocks (and of windowed semantic layers).
        num_classes: K of the semantic layers; None builds the plain Swin backbone.
        semantic_global_stages: indices of stages whose semantic layer attends over the whole map.
        num_sem_blocks: semantic attention blocks per semantic layer.
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate: as in Swin.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        semantic_drop: dropout after the semantic attention's output projection.
        patch_size, in_chans: patch embedding.
        norm_layer: normalisation layer class.
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 num_classes: Optional[int] = 150, semantic_global_stages: Sequence[int] = (),
                 num_sem_blocks: int = 1, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3,
                 semantic_drop: float = 0.1, patch_size: int = 4, in_chans: int = 3,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        if len(depths) != len(num_heads):
            raise UsageError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        bad = [s for s in semantic_global_stages if not 0 <= s < len(depths)]
        if bad:
            raise UsageError(f"semantic_global_stages {tuple(semantic_global_stages)}: stages {bad} do not exist "
                             f"(the backbone has stages 0..{len(depths) - 1})")
        self.num_classes = num_classes
        self.window_size = window_size
        self.global_stages = tuple(sorted(semantic_global_stages)) if num_classes else ()
        self.out_channels = [embed_dim * 2 ** i for i in range(len(depths))]
        self.strides = [patch_size * 2 ** i for i in range(len(depths))]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer)
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            first = sum(depths[:i])
            self.layers.append(SwinStage(
                self.out_channels[i], depth, heads, window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[first:first + depth],
                num_classes=num_classes, semantic_window=None if i in self.global_stages else window_size,
                num_sem_blocks=num_sem_blocks, semantic_drop=semantic_drop,
                downsample=i < len(depths) - 1, norm_layer=norm_layer))
        for i, ch in enumerate(self.out_channels):
            self.add_module(f"norm{i}", norm_layer(ch))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def has_semantic_layers(self) -> bool:
        return self.num_classes is not None

    def set_grad_checkpointing(self, enable: bool = True, stages: Optional[Sequence[int]] = None) -> None:
        """Recompute the blocks of the given stages (default: all) in the backward pass to save memory."""
        for i, stage in enumerate(self.layers):
            if stages is None or i in stages:
                stage.grad_checkpointing = enable

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> BackboneOutput:
        """Args:
            x: (B, 3, H, W) normalised images, any H and W.
            return_attention: also return every semantic layer's attention weights.

        Returns:
            `BackboneOutput` with features at strides 4..32 and (with semantic layers) the stage priors.
        """
        x = self.pos_drop(self.patch_embed(x))  # B, H/4, W/4, C
        out = BackboneOutput(features=[])
        for i, stage in enumerate(self.layers):
            feat, x, prior, attention = stage(x, return_attention=return_attention)
            out.features.append(getattr(self, f"norm{i}")(feat).permute(0, 3, 1, 2))  # B, C_i, H_i, W_i
            if prior is not None:
                out.priors.append(prior)
            if attention is not None:
                out.attentions.append(attention)
        return out
