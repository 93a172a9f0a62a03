"""Vision Transformer for DINOv2 training.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
``norm``) so that an exported teacher loads into timm with ``strict=True``. What timm lacks and
training needs lives here: iBOT's ``mask_token``, stochastic depth that skips the computation of
dropped residual branches, a switch that forces the unfused (math) SDPA kernel, and packing of
crops of different resolutions into one forward pass whose attention stays within each crop
through fused kernels (no dense mask; the block-diagonal mask survives only as a test reference).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon; needed for identical outputs after export


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, D


# -- packed crop groups --------------------------------------------------------------------------
# A "group" is a dense (n_crops, n_tokens, D) tensor of crops of one size (the global crops, the
# local crops). Blocks take a list of groups: token-wise layers (norms, qkv, proj, MLP) run once on
# all groups' tokens concatenated ("packed"), attention runs within each crop.
Layout = tuple[tuple[int, int], ...]  # (n_crops, n_tokens) per group


def layout_of(groups: Sequence[torch.Tensor]) -> Layout:
    return tuple((g.shape[0], g.shape[1]) for g in groups)


def pack(groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """(total tokens, D): every group's tokens, crop after crop."""
    if len(groups) == 1:
        return groups[0].reshape(-1, groups[0].shape[-1])
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in groups])


def unpack(tokens: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    parts = tokens.split([n * t for n, t in layout]) if len(layout) > 1 else [tokens]
    return [p.view(n, t, -1) for p, (n, t) in zip(parts, layout)]


class Attention(nn.Module):
    """Multi-head self-attention over packed crops, each crop attending only to its own tokens.

    ``kernel`` picks how: ``"by_size"`` calls SDPA once per crop size on a dense
    (crops, heads, tokens, dim) batch without a mask, so the fused kernels stay eligible (flash on
    CUDA and on CPU); ``"jagged"`` makes one SDPA call on nested jagged tensors (one sequence per
    crop), which CUDA runs with the variable-length flash / memory-efficient kernels and CPU with
    an unfused per-crop loop. ``attn_mask`` (one group only) is for the dense-mask reference.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, layout: Layout, kernel: str = "by_size", attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.qkv(tokens)
        if kernel == "jagged":
            out = self._jagged(qkv, layout)
        else:
            out = pack([self._dense(part, attn_mask) for part in unpack(qkv, layout)])
        return self.proj(out)

    def _dense(self, qkv: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        n, t, d3 = qkv.shape
        q, k, v = qkv.view(n, t, 3, self.num_heads, d3 // (3 * self.num_heads)).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return x.transpose(1, 2).reshape(n, t, d3 // 3)

    def _jagged(self, qkv: torch.Tensor, layout: Layout) -> torch.Tensor:
        total, d3 = qkv.shape
        lengths = [t for n, t in layout for _ in range(n)]
        offsets = jagged_offsets(layout, qkv.device)
        qkv = qkv.view(total, 3, self.num_heads, d3 // (3 * self.num_heads))
        q, k, v = (
            torch.nested.nested_tensor_from_jagged(
                qkv[:, i].contiguous(), offsets, min_seqlen=min(lengths), max_seqlen=max(lengths)
            ).transpose(1, 2)
            for i in range(3)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (crops, heads, jagged tokens, dim)
        return out.transpose(1, 2).values().reshape(total, d3 // 3)


@functools.lru_cache(maxsize=16)
def jagged_offsets(layout: Layout, device: torch.device) -> torch.Tensor:
    """Start of every crop in the packed tokens, made once per layout (not per block and call)."""
    lengths = [t for n, t in layout for _ in range(n)]
    return torch.tensor([0] + list(itertools.accumulate(lengths)), device=device)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


Groups = list[torch.Tensor]


def drop_add_residual(xs: Groups, residual_fn: Callable[[Groups], Groups], drop_ratio: float) -> Groups:
    """Stochastic depth that computes the branch only for the kept samples (DINOv2's).

    In every group a random subset of ``b * (1 - drop_ratio)`` samples goes through
    ``residual_fn`` (all groups' subsets in one call, so a packed branch stays one pass); their
    residual is scaled by ``b / subset`` (its expectation is unchanged) and added back in place;
    dropped samples pass through untouched.
    """
    idx = []
    for x in xs:
        b = x.shape[0]
        idx.append(torch.randperm(b, device=x.device)[: max(int(b * (1 - drop_ratio)), 1)])
    residuals = residual_fn([x[i] for x, i in zip(xs, idx)])
    out = []
    for x, i, r in zip(xs, idx, residuals):
        added = torch.index_add(x.flatten(1), 0, i, r.flatten(1).to(x.dtype), alpha=x.shape[0] / len(i))
        out.append(added.view_as(x))
    return out


def drop_path_mask(residual: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """Classic stochastic depth: compute every sample's branch, then zero dropped ones."""
    keep = 1.0 - drop_ratio
    mask = residual.new_empty((residual.shape[0],) + (1,) * (residual.ndim - 1)).bernoulli_(keep)
    return residual * mask / keep


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layerscale: float | None, drop_path: float, skip_drop_compute: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = drop_path
        self.skip_drop_compute = skip_drop_compute

    def forward(self, xs: Groups, kernel: str = "by_size", attn_mask: torch.Tensor | None = None) -> Groups:
        """One block over a list of crop groups; every token-wise layer runs once on all of them."""

        def attn_residual(ts: Groups) -> Groups:
            layout = layout_of(ts)
            return unpack(self.ls1(self.attn(self.norm1(pack(ts)), layout, kernel, attn_mask)), layout)

        def mlp_residual(ts: Groups) -> Groups:
            return unpack(self.ls2(self.mlp(self.norm2(pack(ts)))), layout_of(ts))

        if not (self.training and self.drop_path > 0):
            xs = [x + r for x, r in zip(xs, attn_residual(xs))]
            return [x + r for x, r in zip(xs, mlp_residual(xs))]
        if self.skip_drop_compute:
            xs = drop_add_residual(xs, attn_residual, self.drop_path)
            return drop_add_residual(xs, mlp_residual, self.drop_path)
        xs = [x + drop_path_mask(r, self.drop_path) for x, r in zip(xs, attn_residual(xs))]
        return [x + drop_path_mask(r, self.drop_path) for x, r in zip(xs, mlp_residual(xs))]


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        layerscale: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        skip_drop_compute: bool = True,
        attention: str = "default",
        packing: bool = False,
        packed_attention: str = "by_size",
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.depth, self.num_heads, self.mlp_ratio, self.layerscale = depth, num_heads, mlp_ratio, layerscale
        self.attention, self.packing, self.packed_attention = attention, packing, packed_attention
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # DINOv2 uses a uniform drop rate across blocks.
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, layerscale, drop_path_rate, skip_drop_compute) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # -- tokens ----------------------------------------------------------------------------------
    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid (bicubic resize of the trained grid)."""
        grid = self.img_size // self.patch_size
        if (h, w) == (grid, grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=h < grid)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        _, _, hh, ww = x.shape
        if hh % self.patch_size or ww % self.patch_size:
            raise ValueError(f"input {hh}x{ww} is not a multiple of patch size {self.patch_size}")
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.interpolate_pos_embed(hh // self.patch_size, ww // self.patch_size)

    def _attention_context(self):
        return sdpa_kernel([SDPBackend.MATH]) if self.attention == "math" else contextlib.nullcontext()

    def _run_blocks(self, groups: Groups, kernel: str | None = None, attn_mask: torch.Tensor | None = None) -> Groups:
        with self._attention_context():
            for blk in self.blocks:
                groups = blk(groups, kernel or self.packed_attention, attn_mask)
        return unpack(self.norm(pack(groups)), layout_of(groups))

    # -- forward ---------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Normalised class token ``cls`` (B, D) and patch tokens ``patches`` (B, N, D)."""
        (out,) = self._run_blocks([self.prepare_tokens(x, masks)])
        return {"cls": out[:, 0], "patches": out[:, 1:]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]

    def forward_features_list(self, xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> list[dict[str, torch.Tensor]]:
        """Several crop groups (e.g. global and local crops) in one call.

        With ``packing`` the groups go through each block together (one pass of every token-wise
        layer, attention per crop with ``packed_attention``); otherwise each group runs the whole
        network on its own. Both give the same result (up to float rounding).
        """
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks)]
        outs = self._run_blocks(tokens) if self.packing else [self._run_blocks([t])[0] for t in tokens]
        return [{"cls": o[:, 0], "patches": o[:, 1:]} for o in outs]


def dense_mask_features(
    vit: VisionTransformer, xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], group_sizes: Sequence[int]
) -> list[dict[str, torch.Tensor]]:
    """Reference for tests and the speed benchmark, not for training: every image's crops
    concatenated into one sequence, with a dense block-diagonal mask keeping each crop to itself.

    ``xs[g]`` holds ``group_sizes[g]`` crops of each of B images, crop-major: (k_g * B, C, H, W).
    A dense mask rules out the flash kernel; this is what the packed paths replace.
    """
    b = xs[0].shape[0] // group_sizes[0]
    seqs, seg_lens = [], []
    for x, m, k in zip(xs, masks, group_sizes):
        t = vit.prepare_tokens(x, m)  # (k*B, T, D), crop-major
        n_tok = t.shape[1]
        seqs.append(t.view(k, b, n_tok, -1).transpose(0, 1).reshape(b, k * n_tok, -1))
        seg_lens += [n_tok] * k
    packed = torch.cat(seqs, dim=1)
    (out,) = vit._run_blocks([packed], "by_size", block_diagonal_mask(seg_lens, packed.device))  # one masked group
    results, start = [], 0
    for x, k in zip(xs, group_sizes):
        n_tok = (x.shape[-2] // vit.patch_size) * (x.shape[-1] // vit.patch_size) + 1
        part = out[:, start : start + k * n_tok].reshape(b, k, n_tok, -1).transpose(0, 1).reshape(k * b, n_tok, -1)
        start += k * n_tok
        results.append({"cls": part[:, 0], "patches": part[:, 1:]})
    return results


def block_diagonal_mask(segment_lengths: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (L, L) mask, True inside each segment: tokens attend only within their crop."""
    ids = torch.repeat_interleave(torch.arange(len(segment_lengths)), torch.tensor(list(segment_lengths)))
    ids = ids.to(device)
    return ids[:, None] == ids[None, :]


def build_vit(model_cfg, img_size: int) -> VisionTransformer:
    """A ViT from a :class:`curation.train.config.ModelConfig`."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=model_cfg.patch_size,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        layerscale=model_cfg.layerscale,
        drop_path_rate=model_cfg.drop_path_rate,
        skip_drop_compute=model_cfg.skip_drop_compute,
        attention=model_cfg.attention,
        packing=model_cfg.packing,
        packed_attention=model_cfg.packed_attention,
    )


def num_patches(img_size: int, patch_size: int) -> int:
    return (img_size // patch_size) ** 2


def check_crop_size(size: int, patch_size: int, what: str) -> None:
    if size % patch_size:
        lo = size // patch_size * patch_size
        raise ValueError(f"{what} {size} is not a multiple of patch size {patch_size}; use {lo} or {lo + patch_size}")


__all__ = [
    "VisionTransformer",
    "Block",
    "drop_add_residual",
    "block_diagonal_mask",
    "dense_mask_features",
    "build_vit",
    "num_patches",
    "check_crop_size",
]
