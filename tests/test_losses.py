"""The SeMask training loss: decoder CE + 0.4 x prior CE, the reference's averaging, OHEM."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semask.engine.losses import SeMaskLoss, ohem_weights, pixel_cross_entropy, semask_loss
from semask.model.segmentor import SegmentationOutput


def _output(k: int = 4, b: int = 2, h: int = 6, w: int = 8, seed: int = 0, grad: bool = False
            ) -> SegmentationOutput:
    """Like a model's output: `logits` are the decoder logits resized x4 (to the labels' size below)."""
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(b, k, h, w, generator=g).requires_grad_(grad)
    prior = torch.randn(b, k, h, w, generator=g)
    return SegmentationOutput(logits=F.interpolate(dec, scale_factor=4, mode="bilinear"), prior_logits=prior,
                              decoder_logits=dec)


def _labels(b: int = 2, h: int = 24, w: int = 32, k: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b, h, w), generator=g)
    y[:, :5] = 255
    return y


def _pixel_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
    logp = up.log_softmax(1)
    valid = y != 255
    picked = logp.gather(1, y.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]
    return torch.where(valid, -picked, torch.zeros_like(picked))


def test_decode_plus_weighted_prior_averaged_over_all_pixels() -> None:
    out, y = _output(), _labels()
    loss = semask_loss(out, y)
    decode = _pixel_ce(out.decoder_logits, y).mean()  # ignored pixels count in the denominator
    prior = _pixel_ce(out.prior_logits, y).mean() * 0.4
    torch.testing.assert_close(loss.decode, decode)
    torch.testing.assert_close(loss.prior, prior)
    torch.testing.assert_close(loss.total, decode + prior)
    # this is not the "mean over valid pixels" of a plain F.cross_entropy
    up = F.interpolate(out.decoder_logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
    assert abs(F.cross_entropy(up, y, ignore_index=255).item() - loss.decode.item()) > 1e-3
    assert set(loss.as_dict()) == {"loss", "loss_decode", "loss_prior"}


def test_labels_of_another_size_resize_the_decoder_logits() -> None:
    out = _output()
    y = _labels(h=20, w=30)
    torch.testing.assert_close(semask_loss(out, y).decode, _pixel_ce(out.decoder_logits, y).mean())


@pytest.mark.parametrize("channels_last", [False, True])
def test_pixel_cross_entropy_values_and_gradients_equal_torch(channels_last: bool) -> None:
    out, y = _output(), _labels()
    logits = out.logits.detach()
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    weights = torch.rand(y.shape, generator=torch.Generator().manual_seed(3))  # a non-uniform upstream gradient
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    ours = pixel_cross_entropy(ours_in, y)
    ref = F.cross_entropy(ref_in, y, ignore_index=255, reduction="none")
    torch.testing.assert_close(ours, ref)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad)
    assert (ours[y == 255] == 0).all()


def test_without_prior_branch_only_the_decoder_loss() -> None:
    out = _output()
    out.prior_logits = None
    loss = semask_loss(out, _labels())
    assert loss.prior is None and torch.equal(loss.total, loss.decode)


def test_ohem_keeps_the_hardest_pixels_of_the_batch() -> None:
    out, y = _output(), _labels()
    pix = _pixel_ce(out.decoder_logits, y)
    kept = 50
    loss = semask_loss(out, y, ohem_min_kept=kept)
    valid_losses = pix[y != 255]
    top = valid_losses.topk(kept * y.shape[0]).values
    torch.testing.assert_close(loss.decode, top.sum() / y.numel())
    w = ohem_weights(pix, y, kept)
    assert w.sum() == kept * 2 and (w[y == 255] == 0).all()
    # more pixels requested than valid ones: every valid pixel is kept
    torch.testing.assert_close(semask_loss(out, y, ohem_min_kept=10**6).decode, semask_loss(out, y).decode)
    # the prior loss is not mined
    torch.testing.assert_close(loss.prior, semask_loss(out, y).prior)


def test_loss_module_and_gradients() -> None:
    out, y = _output(grad=True), _labels()
    crit = SeMaskLoss(prior_weight=0.4, ohem_min_kept=20)
    crit(out, y).total.backward()
    assert out.decoder_logits.grad is not None and out.decoder_logits.grad.abs().sum() > 0


def test_bad_labels_are_explained() -> None:
    out = _output()
    y = _labels()
    y[0, 10, 10] = 7
    with pytest.raises(ValueError, match=r"values \[7\] outside 0..3.*reduce_zero_label"):
        semask_loss(out, y)
    with pytest.raises(ValueError, match=r"\(B, H, W\) with B=2"):
        semask_loss(out, y[0])
    with pytest.raises(ValueError, match="integer"):
        semask_loss(out, y.float())


def test_class_weights_scale_each_pixel_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    out = SegmentationOutput(logits=logits, prior_logits=torch.randn(2, 3, 2, 2), decoder_logits=logits)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, 0, :4] = 255
    weights = (1.0, 3.0, 0.5)
    got = semask_loss(out, labels, class_weight=weights)
    table = torch.tensor(weights)
    w = torch.where(labels == 255, torch.zeros(()), table[labels.clamp(max=2)])
    ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert torch.allclose(got.decode, (ce * w).mean())  # mmseg: weighted, averaged over all label pixels
    prior = F.interpolate(out.prior_logits, size=(8, 8), mode="bilinear", align_corners=False)
    prior_ce = F.cross_entropy(prior, labels, ignore_index=255, reduction="none")
    assert torch.allclose(got.prior, 0.4 * (prior_ce * w).mean())
    same = semask_loss(out, labels, class_weight=(1.0, 1.0, 1.0))
    assert torch.allclose(same.total, semask_loss(out, labels).total)
    with pytest.raises(ValueError, match="class_weight has 2 values for 3 classes"):
        semask_loss(out, labels, class_weight=(1.0, 2.0))


def test_balanced_class_weights() -> None:
    from semask.engine.losses import balanced_class_weights

    counts = [900, 90, 9, 0]
    w = balanced_class_weights(counts)
    freq = torch.tensor(counts[:3], dtype=torch.float64) / 999
    assert sum(f * x for f, x in zip(freq.tolist(), w)) == pytest.approx(1.0)  # mean weight over pixels is 1
    assert w[0] < w[1] < w[2] and w[1] / w[0] == pytest.approx(10 ** 0.5) and w[3] == 1.0
    assert balanced_class_weights(counts, power=0) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="non-negative counts"):
        balanced_class_weights([0, 0])
