"""Trainer model pieces: ViT, stochastic depth, attention kernels, packing, losses, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from curation.train.heads import DINOHead
from curation.train.losses import Centering, dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from curation.train.schedules import build_schedules, cosine_schedule, linear_warmup_constant, scaled_lr
from curation.train.trainer import SSLNetwork, param_groups
from curation.train.vit import Block, VisionTransformer, block_diagonal_mask, dense_mask_features, drop_add_residual
from tests.test_train_data import tiny_config


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, **kw)


# -- stochastic depth -------------------------------------------------------------------------
def test_dropped_samples_are_not_computed_and_pass_through_unchanged():
    x, y = torch.randn(8, 5, 4), torch.randn(4, 2, 4)  # two crop groups, e.g. global and local
    seen = []

    def branch(ts):
        seen.append([t.shape[0] for t in ts])
        return [torch.ones_like(t) for t in ts]

    out, out_y = drop_add_residual([x, y], branch, drop_ratio=0.25)
    assert seen == [[6, 3]]  # one call, with only the kept 6 of 8 and 3 of 4 samples
    changed = (out != x).flatten(1).any(1)
    assert changed.sum() == 6 and (out_y != y).flatten(1).any(1).sum() == 3
    assert torch.equal(out[~changed], x[~changed])
    # kept samples get the residual scaled by b / kept, as DINOv2 does
    torch.testing.assert_close(out[changed], x[changed] + 8 / 6)


def test_block_in_eval_mode_equals_no_drop():
    torch.manual_seed(0)
    dropped = Block(48, 3, 4.0, 1e-5, drop_path=0.5, skip_drop_compute=True)
    plain = Block(48, 3, 4.0, 1e-5, drop_path=0.0, skip_drop_compute=True)
    plain.load_state_dict(dropped.state_dict())
    x = [torch.randn(4, 10, 48)]
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x), rtol=0, atol=0)
    dropped.train()
    assert not torch.equal(dropped(x)[0], plain(x)[0])


@pytest.mark.parametrize("skip", [True, False])
def test_training_with_stochastic_depth_backpropagates(skip):
    vit = tiny_vit(drop_path_rate=0.3, skip_drop_compute=skip).train()
    vit(torch.randn(4, 3, 32, 32)).sum().backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None


# -- attention kernels and packing ------------------------------------------------------------
def test_math_kernel_switch_gives_the_same_result():
    vit = tiny_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    default = vit(x)
    vit.attention = "math"
    torch.testing.assert_close(vit(x), default, rtol=1e-5, atol=1e-5)


def test_math_switch_forbids_other_kernels():
    vit = tiny_vit(attention="math").eval()
    # Inside a context that allows only flash attention, the math switch must still win
    # (on CPU flash is unavailable, so without the switch this forward would fail).
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        vit(torch.randn(1, 3, 32, 32))


def _crops():
    g, l = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)  # 2 images: 2 global, 3 local crops each
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[1, :5] = True
    return [g, l], [masks, None]


def _assert_same(outs, refs, tol=1e-5):
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a["cls"], b["cls"], rtol=tol, atol=tol)
        torch.testing.assert_close(a["patches"], b["patches"], rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", ["by_size", "jagged"])
def test_packed_forward_equals_separate_passes_and_the_dense_mask_reference(kernel):
    vit = tiny_vit().eval()
    xs, masks = _crops()
    separate = vit.forward_features_list(xs, masks)
    vit.packing, vit.packed_attention = True, kernel
    packed = vit.forward_features_list(xs, masks)
    _assert_same(packed, separate)
    _assert_same(dense_mask_features(vit, xs, masks, [2, 3]), separate)


@pytest.mark.parametrize("kernel", ["by_size", "jagged"])
def test_packed_gradients_equal_separate_passes(kernel):
    xs, masks = _crops()
    grads = []
    for packing in (False, True):
        vit = tiny_vit(packing=packing, packed_attention=kernel).train()  # no drop path: deterministic
        sum(o["cls"].pow(2).sum() + o["patches"].mean() for o in vit.forward_features_list(xs, masks)).backward()
        grads.append({n: p.grad for n, p in vit.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)


def test_packed_attention_calls_sdpa_per_crop_size_without_a_mask(monkeypatch):
    """No mask reaches SDPA, so the fused kernels stay eligible (CUDA's flash kernel takes no
    mask); the dense-mask reference passes one. Every token-wise layer still runs once."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), attn_mask is not None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    vit = tiny_vit(packing=True).eval()
    xs, masks = _crops()
    qkv_rows = []
    vit.blocks[0].attn.qkv.register_forward_hook(lambda m, inp, out: qkv_rows.append(inp[0].shape[0]))
    vit.forward_features_list(xs, masks)
    assert calls == [((4, 3, 17, 16), False), ((6, 3, 5, 16), False)] * 2  # 2 blocks x (global, local)
    assert qkv_rows == [4 * 17 + 6 * 5]  # one qkv projection over all crops' tokens
    calls.clear()
    dense_mask_features(vit, xs, masks, [2, 3])
    assert calls and all(masked for _, masked in calls)


def test_block_diagonal_mask():
    m = block_diagonal_mask([2, 1])
    assert m.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_mask_token_replaces_masked_patches_only():
    vit = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 3] = True
    a, b = vit.prepare_tokens(x), vit.prepare_tokens(x, masks)
    changed = (a != b).any(-1)[0]
    assert changed.tolist() == [False] * 4 + [True] + [False] * 12  # token 0 is the class token


def test_position_embeddings_interpolate_to_other_sizes():
    vit = tiny_vit().eval()
    assert vit.forward_features(torch.randn(2, 3, 16, 16))["patches"].shape == (2, 4, 48)
    with pytest.raises(ValueError, match="multiple"):
        vit(torch.randn(1, 3, 20, 20))


# -- losses -----------------------------------------------------------------------------------
def test_sinkhorn_rows_sum_to_one_and_prototypes_share_the_mass():
    torch.manual_seed(0)
    logits = torch.randn(64, 16) * 0.3  # cosine-like logits, as the prototype layer gives
    q = sinkhorn_knopp(logits, temp=0.05, n_iters=30)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    torch.testing.assert_close(q.sum(0), torch.full((16,), 64 / 16), rtol=0.02, atol=0)
    plain = torch.softmax(logits / 0.05, dim=1).sum(0)
    assert plain.std() > 10 * q.sum(0).std()  # a plain softmax is far from balanced


def test_centering_tracks_the_batch_mean():
    c = Centering(4, momentum=0.5)
    logits = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0]])
    probs = c(logits, temp=1.0)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    torch.testing.assert_close(c.center, torch.tensor([[1.0, 0, 0, 0]]))


def test_dino_loss_skips_same_view_pairs_and_decreases_when_trained():
    torch.manual_seed(0)
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=8)
    x = torch.randn(3, 6, 8)  # 3 views (2 global, 1 local) of 6 images
    teacher = [sinkhorn_knopp(torch.randn(6, 32), 0.05) for _ in range(2)]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = dino_loss([head(v) for v in x], teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    # student view i is never compared with teacher view i
    t = [torch.eye(4)[[0]], torch.eye(4)[[1]]]
    s = [torch.eye(4)[[1]] * 100, torch.eye(4)[[0]] * 100]
    assert dino_loss(s, t, student_temp=1.0) < 0.01


def test_ibot_loss_weighs_images_equally():
    k = 8
    masks = torch.zeros(2, 10, dtype=torch.bool)
    masks[0, :1] = True
    masks[1, :9] = True
    teacher = torch.softmax(torch.randn(10, k), -1)
    good, bad = torch.log(teacher) * 0.1, torch.zeros(10, k)
    only_first_good = torch.cat([good[:1], bad[1:]])
    only_second_good = torch.cat([bad[:1], good[1:]])
    full_bad = ibot_patch_loss(bad, teacher, masks)
    gain_first = full_bad - ibot_patch_loss(only_first_good, teacher, masks)
    gain_second = full_bad - ibot_patch_loss(only_second_good, teacher, masks)
    # one patch of image 0 counts as much as nine of image 1 (up to their different targets)
    assert 0.2 < (gain_first / gain_second).item() < 5
    assert ibot_patch_loss(torch.zeros(0, k), torch.zeros(0, k), torch.zeros(2, 10, dtype=torch.bool)) == 0


def test_koleo_prefers_spread_features_and_pushes_them_apart():
    spread = torch.eye(4)
    clustered = torch.tensor([[1.0, 0.01, 0, 0], [1.0, 0, 0.01, 0], [0, 1.0, 0, 0.01], [0, 1.0, 0.01, 0]])
    assert koleo_loss(spread) < koleo_loss(clustered)
    x = clustered.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=0.01)
    before = koleo_loss(x).item()
    for _ in range(5):
        opt.zero_grad()
        koleo_loss(x).backward()
        opt.step()
    assert koleo_loss(x).item() < before


# -- schedules and optimiser groups -----------------------------------------------------------
def test_cosine_schedule_with_freeze_and_warmup():
    s = cosine_schedule(1.0, 0.0, total_iters=20, warmup_iters=5, start_warmup=0.0, freeze_iters=2)
    assert len(s) == 20 and s[0] == 0 and s[1] == 0
    np.testing.assert_allclose(s[2:7], [0.0, 0.2, 0.4, 0.6, 0.8])
    assert s[7] == 1.0 and s[-1] < 0.02 and np.all(np.diff(s[7:]) < 0)
    np.testing.assert_allclose(linear_warmup_constant(0.04, 0.07, 3, 5), [0.04, 0.05, 0.06, 0.07, 0.07])


def test_training_schedules_follow_dinov2():
    cfg = tiny_config(optim__epochs=10, optim__iters_per_epoch=10, optim__warmup_epochs=1, loss__warmup_teacher_temp_epochs=3)
    s = build_schedules(cfg, iters_per_epoch=10, global_batch=256)
    peak = scaled_lr(cfg.optim.base_lr, 256)
    assert math.isclose(peak, cfg.optim.base_lr / 2)  # sqrt(256 / 1024)
    assert s.at(0)["lr"] == 0 and math.isclose(s.at(10)["lr"], peak) and s.at(99)["lr"] < 0.01 * peak
    assert math.isclose(s.at(0)["momentum"], 0.996) and s.at(99)["momentum"] > 0.9999 and s.at(10_000)["momentum"] == s.at(99)["momentum"]
    assert s.at(0)["teacher_temp"] == 0.04 and s.at(30)["teacher_temp"] == 0.07
    assert math.isclose(s.at(0)["weight_decay"], 0.04) and math.isclose(s.at(99)["weight_decay"], 0.2, rel_tol=1e-3)
    assert all(s.at(i)["last_layer_lr"] == 0 for i in range(10)) and s.at(10)["last_layer_lr"] == s.at(10)["lr"]


def test_param_groups_exempt_norms_biases_and_flag_last_layer():
    cfg = tiny_config()
    net = SSLNetwork(cfg)
    groups = param_groups(net, cfg)
    names = {id(p): n for n, p in net.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(by_name) == sum(1 for _ in net.parameters())
    assert by_name["backbone.blocks.0.norm1.weight"]["wd_multiplier"] == 0
    assert by_name["backbone.blocks.0.attn.qkv.bias"]["wd_multiplier"] == 0
    assert by_name["backbone.pos_embed"]["wd_multiplier"] == 0
    assert by_name["backbone.blocks.1.attn.qkv.weight"]["wd_multiplier"] == 1
    assert by_name["dino_head.last_layer.weight"]["is_last_layer"]
    # layer-wise decay: earlier blocks learn more slowly, the patch embedding slowest
    lr = {n: by_name[n]["lr_multiplier"] for n in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.mlp.fc1.weight", "backbone.blocks.1.mlp.fc1.weight", "dino_head.mlp.0.weight")}
    assert list(lr.values()) == sorted(lr.values()) and lr["dino_head.mlp.0.weight"] == 1.0
