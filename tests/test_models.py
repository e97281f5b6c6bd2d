"""The registry, the architecture's published sizes, and forward/backward of every variant."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import semask
from semask.model.config import released_global_stages
from semask.model.semantic import SemanticAttention, SemanticLayer
from semask.model.swin import SeMaskSwin, WindowAttention, relative_position_index, shift_window_mask
from semask.model.windows import window_partition, window_reverse

from semask.engine.losses import semask_loss

from helpers import randomize_gammas

# docs/recipes.md §1: exact parameter counts (millions, two decimals) for 150 / 19 / 171 classes
PUBLISHED = {
    "tiny": (34.66, 34.24, 34.72),
    "small": (55.97, 55.56, 56.04),
    "base": (96.49, 95.95, 96.57),
    "large": (210.79, 210.00, 210.92),
}


@pytest.mark.parametrize("size", list(PUBLISHED))
@pytest.mark.parametrize("column,num_classes", [(0, 150), (1, 19), (2, 171)])
def test_parameter_counts_match_the_paper(size: str, column: int, num_classes: int) -> None:
    with torch.device("meta"):
        model = semask.create_model(f"semask_{size}_fpn", num_classes=num_classes)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 2) == PUBLISHED[size][column], f"{size}/{num_classes}: {count} parameters"


def test_plain_swin_baseline_has_no_semantic_parts() -> None:
    with torch.device("meta"):
        semask_t = semask.create_model("semask_tiny_fpn", num_classes=150)
        swin_t = semask.create_model("swin_tiny_fpn", num_classes=150)
    names = [n for n, _ in swin_t.named_parameters()]
    assert not any("semantic_layer" in n for n in names)
    assert not swin_t.decode_head.prior_branch
    semantic = sum(p.numel() for n, p in semask_t.named_parameters() if "semantic_layer" in n)
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert total(semask_t) - total(swin_t) == semantic


def test_segmentors_refuse_parts_that_do_not_fit_with_the_same_error_type() -> None:
    from semask.errors import UsageError
    from semask.model.segmentor import ExternalSegmentor, SeMaskFPN

    with torch.device("meta"):
        semask_t = semask.create_model("semask_toy_fpn", num_classes=5)
        swin_t = semask.create_model("swin_toy_fpn", num_classes=5)
    with pytest.raises(UsageError, match="prior branch needs a backbone with semantic layers"):
        SeMaskFPN(swin_t.backbone, semask_t.decode_head)
    with pytest.raises(UsageError, match="size_divisor must be a positive integer"):
        ExternalSegmentor(torch.nn.Identity(), 5, size_divisor=0)


def test_list_models_and_unknown_name() -> None:
    names = semask.list_models()
    for size in ("tiny", "small", "base", "large", "toy"):
        assert f"semask_{size}_fpn" in names and f"swin_{size}_fpn" in names
    assert semask.list_models("swin_*") == [n for n in names if n.startswith("swin_")]
    with pytest.raises(KeyError) as err:
        semask.create_model("semask_huge_fpn", num_classes=3)
    assert "semask_tiny_fpn" in str(err.value) and "semask_huge_fpn" in str(err.value)
    with pytest.raises(TypeError, match="window_sise"):
        semask.create_model("semask_toy_fpn", num_classes=3, window_sise=5)


@pytest.mark.parametrize("size,classes,expected", [
    ("tiny", 150, (2, 3)), ("small", 171, (2, 3)), ("large", 150, (2, 3)),
    ("tiny", 19, ()), ("large", 19, ()), ("base", 150, ()), ("base", 171, ()),
])
def test_semantic_layer_regions_follow_the_released_models(size: str, classes: int, expected: tuple) -> None:
    with torch.device("meta"):
        model = semask.create_model(f"semask_{size}_fpn", num_classes=classes)
    assert model.backbone.global_stages == expected
    for i, stage in enumerate(model.backbone.layers):
        assert stage.semantic_layer.window_size == (None if i in expected else model.backbone.window_size)
    assert released_global_stages(96, 150) == (2, 3) and released_global_stages(128, 150) == ()


def test_drop_path_rises_linearly_to_0_3() -> None:
    with torch.device("meta"):
        model = semask.create_model("semask_small_fpn", num_classes=150)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.backbone.layers for b in s.blocks]
    assert len(rates) == 24
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert all(b - a == pytest.approx(0.3 / 23, abs=1e-6) for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("name", semask.list_models())
def test_every_variant_trains_on_a_tiny_input(name: str) -> None:
    """Forward + backward on an odd-sized input: output sizes, finite values, a gradient for every parameter."""
    torch.manual_seed(0)
    model = semask.create_model(name, num_classes=7, drop_path_rate=0.0)
    randomize_gammas(model)
    model.train()
    x = torch.randn(2, 3, 45, 61)
    labels = torch.randint(0, 7, (2, 45, 61))
    labels[:, :3] = 255
    out = model(x)
    assert out.logits.shape == (2, 7, 45, 61)
    assert out.decoder_logits.shape == (2, 7, 12, 16)
    loss = semask_loss(out, labels)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (28, 28), (33, 47), (64, 96), (130, 70)])
def test_any_input_size(toy_model, hw: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        out = toy_model(x, return_attention=True)
    h4, w4 = math.ceil(hw[0] / 4), math.ceil(hw[1] / 4)
    assert out.logits.shape == (1, 5, *hw)
    assert out.prior_logits.shape == (1, 5, h4, w4)
    sizes = [(h4, w4)]
    for _ in range(3):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    assert [tuple(p.shape[2:]) for p in out.stage_priors] == sizes
    assert len(out.attentions) == 4
    assert torch.isfinite(out.logits).all()


def test_attention_maps_are_distributions_and_locate_queries(toy_model) -> None:
    randomize_gammas(toy_model)
    x = torch.randn(2, 3, 100, 76)
    with torch.no_grad():
        out = toy_model(x, return_attention=True)
        plain = toy_model(x)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-4, atol=1e-4)  # explicit == fused attention
    stage0 = out.attentions[0]  # windowed, 25x19 map, window 7
    assert stage0.window_size == 7 and (stage0.height, stage0.width) == (25, 19)
    torch.testing.assert_close(stage0.weights.sum(-1), torch.ones(stage0.weights.shape[:-1]))
    m = stage0.query_map(1, 9, 15)
    assert m.shape == (25, 19)
    assert m[7:14, 14:19].sum() > 0.0 and m[:7].sum() == 0 and m[:, :14].sum() == 0  # inside its window only
    stage2 = out.attentions[2]  # global in the toy model
    assert stage2.window_size is None
    g = stage2.query_map(0, 3, 2)
    assert g.shape == (stage2.height, stage2.width)
    assert g.sum().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(IndexError):
        stage0.query_map(0, 25, 0)


def test_prior_logits_are_the_summed_stage_priors(toy_model) -> None:
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        out = toy_model(x)
    p = out.stage_priors
    total = p[0].clone()
    for i in range(1, 4):
        up = p[i]
        for _ in range(i):
            up = F.interpolate(up, scale_factor=2, mode="bilinear", align_corners=False)
        total += F.interpolate(up, size=p[0].shape[2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.prior_logits, total)


def test_window_helpers_round_trip() -> None:
    x = torch.randn(2, 14, 21, 5)
    w = window_partition(x, 7)
    assert w.shape == (2 * 2 * 3, 49, 5)
    torch.testing.assert_close(window_reverse(w, 7, 14, 21), x)


def test_shift_mask_regions() -> None:
    mask = shift_window_mask(14, 14, 7, 3)  # 4 windows of 49 tokens
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()  # the top-left window lies inside one region
    # bottom-right window: tokens split into 4 regions by rows/cols at 4 (= 7 - 3)
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    region = ((rows >= 4).int() * 2 + (cols >= 4).int()).flatten()
    expected = torch.where(region[:, None] == region[None, :], 0.0, -100.0)
    torch.testing.assert_close(mask[3], expected)


def test_relative_position_index_layout() -> None:
    idx = relative_position_index(7)
    assert idx.shape == (49, 49) and idx.min() == 0 and idx.max() == 168
    assert (idx.diagonal() == 84).all()  # zero offset sits at the table's centre (6 * 13 + 6)
    assert idx[0, 48] == 0  # (0,0) -> (6,6): offset (-6, -6)


def _explicit_window_attention(attn: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    Bw, N, C = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).view(Bw, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    logits = (q * (C // h) ** -0.5) @ k.transpose(-2, -1) + attn.relative_position_bias()
    if mask is not None:
        logits = logits.view(-1, mask.shape[0], h, N, N) + mask[None, :, None]
        logits = logits.view(Bw, h, N, N)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, C)
    return attn.proj(out)


@pytest.mark.parametrize("shifted", [False, True])
def test_fused_window_attention_equals_the_explicit_formula(shifted: bool) -> None:
    torch.manual_seed(0)
    attn = WindowAttention(32, 4, 7).eval()
    x = torch.randn(2 * 4, 49, 32)
    mask = shift_window_mask(14, 14, 7, 3) if shifted else None
    torch.testing.assert_close(attn(x, mask), _explicit_window_attention(attn, x, mask), rtol=1e-5, atol=1e-5)


def test_semantic_attention_formula() -> None:
    torch.manual_seed(0)
    block = SemanticAttention(16, 6, proj_drop=0.0)
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(3, 10, 16)
    out, prior, _ = block(x)
    q, k, v = block.mlp_cls_q(x), block.mlp_cls_k(x), block.mlp_v(x)
    expected = 0.7 * block.mlp_res(torch.softmax(q @ k.transpose(1, 2), -1) @ v) + x  # no 1/sqrt(d) scaling
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prior, q)


def test_semantic_layer_output_replaces_features_with_normalised_input() -> None:
    """With gamma = 0 the semantic layer returns LN(x): the un-normalised features do not come back."""
    layer = SemanticLayer(16, 4, window_size=7).eval()
    x = torch.randn(1, 9, 11, 16) * 5 + 3
    out, prior, _ = layer(x)
    torch.testing.assert_close(out, layer.norm1(x))
    assert prior.shape == (1, 4, 9, 11)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", num_classes=4, drop_path_rate=0.0, decoder_dropout=0.0,
                                semantic_drop=0.0)
    randomize_gammas(model)
    x, y = torch.randn(2, 3, 40, 56), torch.randint(0, 4, (2, 40, 56))
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        semask_loss(model(x), y).total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(s.grad_checkpointing for s in model.backbone.layers)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_attention_mask_cache_follows_parameter_updates() -> None:
    attn = WindowAttention(8, 2, 3).eval()
    shift = shift_window_mask(6, 6, 3, 1)  # 4 windows
    with torch.no_grad():
        first = attn.attention_mask(shift, torch.float32, (6, 6))
        assert first.shape == (4, 2, 9, 9)
        assert attn.attention_mask(shift, torch.float32, (6, 6)) is first  # cached in inference
        assert attn.attention_mask(shift, torch.float32) is not first  # no key: not cached
        torch.testing.assert_close(first, attn.relative_position_bias()[None] + shift[:, None])
        attn.relative_position_bias_table.add_(1.0)
        second = attn.attention_mask(shift, torch.float32, (6, 6))
        assert attn.attention_mask(None, torch.float32).shape == (1, 2, 9, 9)
    torch.testing.assert_close(second, first + 1.0)
    # with autograd the mask is rebuilt every time (the table is being trained)
    assert attn.attention_mask(shift, torch.float32, (6, 6)) is not attn.attention_mask(shift, torch.float32, (6, 6))


def test_mask_caches_stay_small_and_sizes_never_collide(toy_model) -> None:
    """Many input sizes (as in an evaluation over real images) keep bounded caches and correct outputs."""
    randomize_gammas(toy_model)
    stage = toy_model.backbone.layers[0]
    sizes = [(28 + 4 * i, 56 - 4 * i) for i in range(10)] * 2  # hits, misses and evictions
    inputs = [torch.randn(1, 3, 4 * h, 4 * w, generator=torch.Generator().manual_seed(i))
              for i, (h, w) in enumerate(sizes)]

    def reset_caches() -> None:
        for m in toy_model.modules():
            if isinstance(m, WindowAttention):
                m._cache = type(m._cache)(maxsize=8)
            elif hasattr(m, "_mask_cache"):
                m._mask_cache = type(m._mask_cache)(maxsize=8)

    with torch.no_grad():
        reset_caches()
        with_caches = [toy_model(x).logits for x in inputs]
        assert len(stage._mask_cache) == 8
        assert all(len(m._cache) <= 8 for m in toy_model.modules() if isinstance(m, WindowAttention))
        for x, expected in zip(inputs, with_caches):
            reset_caches()
            torch.testing.assert_close(toy_model(x).logits, expected)


def test_window_attention_batches_share_the_shift_mask() -> None:
    torch.manual_seed(0)
    attn = WindowAttention(16, 2, 7).eval()
    shift = shift_window_mask(14, 21, 7, 3)  # 6 windows
    x = torch.randn(3 * 6, 49, 16)
    with torch.no_grad():
        batched = attn(x, shift)
        single = torch.cat([attn(x[i * 6:(i + 1) * 6], shift) for i in range(3)])
    torch.testing.assert_close(batched, single)


def test_bad_inputs_get_clear_errors(toy_model) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*add a batch dimension"):
        toy_model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        toy_model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(1, 4, 32, 32\)"):
        toy_model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="stages"):
        SeMaskSwin(semantic_global_stages=(4,))


def test_sync_bn_variant_shares_the_checkpoint_layout() -> None:
    torch.manual_seed(0)
    plain = semask.create_model("semask_toy_fpn", num_classes=3).eval()
    synced = semask.create_model("semask_toy_fpn", num_classes=3, sync_bn=True).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())
    synced.load_state_dict(plain.state_dict())  # same keys and shapes
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(synced(x).logits, plain(x).logits)


def test_create_model_carries_class_names_and_palette() -> None:
    model = semask.create_model("semask_toy_fpn", class_names=("a", "b", "c"), palette=[[1, 2, 3]] * 3)
    assert model.num_classes == 3 and model.class_names == ("a", "b", "c") and model.palette == [[1, 2, 3]] * 3
    assert semask.create_model("semask_toy_fpn").num_classes == 11  # the toy set's classes
    with pytest.raises(ValueError, match="2 class names given for num_classes=3"):
        semask.create_model("semask_toy_fpn", num_classes=3, class_names=("a", "b"))
    with pytest.raises(ValueError, match="palette has 1 colours for 3 classes"):
        semask.create_model("semask_toy_fpn", num_classes=3, palette=[[0, 0, 0]])


@pytest.mark.parametrize("shifted", [False, True])
def test_unfused_cpu_attention_path_equals_the_fused_one(shifted: bool) -> None:
    """The batched-matmul path (bf16/fp16 on the CPU) computes the same attention as SDPA."""
    torch.manual_seed(0)
    attn = WindowAttention(32, 4, 7).eval()
    shift = shift_window_mask(14, 21, 7, 3) if shifted else None
    x = torch.randn(2 * 6, 49, 32)
    with torch.no_grad():
        q, k, v = attn.qkv(x).view(12, 49, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        fused = attn(x, shift)
        unfused = attn.proj(attn._attend_unfused(q, k, v, shift).transpose(1, 2).reshape(12, 49, 32))
        torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x, shift)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), fused, rtol=0.05, atol=0.05)
