"""The ViT of DINOv2 (optional registers, LayerScale, SwiGLU for giant) and DINO v1, one class for both.

Parameter names equal the keys of the official checkpoints, so those files load with `strict=True`.
Token layout: [CLS, registers (R, possibly 0), patches (N = H/p * W/p)], T = 1 + R + N.
"""

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from dinov2_patched.layers import AttentionMaps, Block, PatchEmbed
from dinov2_patched.layers.block import LAYER_NORM_EPS
from dinov2_patched.pos_embed import interpolate_pos_embed


class VisionTransformer(nn.Module):
    """A frozen-feature ViT; build real models with `dinov2_patched.build_model(name)`."""

    def __init__(
        self,
        *,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        layer_scale: bool = True,
        num_register_tokens: int = 0,
        pos_grid: int = 37,
        pos_interpolation: str = "offset",
        mask_token: bool = True,
        in_chans: int = 3,
        model_name: str = "custom",
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.n_blocks = depth
        self.num_register_tokens = num_register_tokens
        self.pos_interpolation = pos_interpolation
        self.weights_id = "uninitialised"  # set by build_model once weights are in place

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        # Registers carry no position embedding; DINOv2's masked-image token is unused at inference but in
        # the checkpoints, so it is kept to load them strictly.
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, ffn, layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, T, C): patch embedding, CLS, position embeddings, registers."""
        batch, _, height, width = x.shape
        patches = self.patch_embed(x)  # (B, N, C); raises ValueError on sizes not divisible by the patch
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), patches), dim=1)
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        tokens = tokens + interpolate_pos_embed(self.pos_embed, grid_h, grid_w, self.pos_interpolation)
        if self.register_tokens is not None:  # after the position embeddings: registers get none
            registers = self.register_tokens.expand(batch, -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    def _run_blocks(
        self, tokens: torch.Tensor, keep: Iterable[int] = (), maps_for: Iterable[int] = (), stop_early: bool = False
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, AttentionMaps]]:
        """Runs the blocks on (B, T, C) tokens.

        Returns the last computed tokens, the outputs of the blocks in `keep` and the attention maps of the
        blocks in `maps_for` (those blocks take the explicit-softmax path; all others the fused one). With
        `stop_early`, blocks after the last one in `keep`/`maps_for` are skipped (their output is unused).
        """
        keep, maps_for = set(keep), set(maps_for)
        kept: dict[int, torch.Tensor] = {}
        maps: dict[int, AttentionMaps] = {}
        last = max(keep | maps_for, default=-1) if stop_early else self.n_blocks - 1
        for index, block in enumerate(self.blocks[: last + 1]):
            tokens, block_maps = block(tokens, return_maps=index in maps_for)
            if block_maps is not None:
                maps[index] = block_maps
            if index in keep:
                kept[index] = tokens
        return tokens, kept, maps

    def forward_features(
        self, x: torch.Tensor, return_attention: bool = False, return_qkv: bool = False
    ) -> dict[str, torch.Tensor | list]:
        """Images (B, 3, H, W) -> dict of
        x_norm_clstoken (B, C), x_norm_regtokens (B, R, C), x_norm_patchtokens (B, N, C), x_prenorm (B, T, C),
        plus "attentions" (list per block of (B, heads, T, T)) when `return_attention` and
        "qkv" (list per block of (q, k, v), each (B, heads, T, head_dim), q unscaled) when `return_qkv`.
        """
        want_maps = range(self.n_blocks) if (return_attention or return_qkv) else ()
        prenorm, _, maps = self._run_blocks(self.prepare_tokens(x), maps_for=want_maps)
        normed = self.norm(prenorm)
        first_patch = 1 + self.num_register_tokens
        out: dict[str, torch.Tensor | list] = {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": prenorm,
        }
        if return_attention:
            out["attentions"] = [maps[i].attention for i in range(self.n_blocks)]
        if return_qkv:
            out["qkv"] = [(maps[i].q, maps[i].k, maps[i].v) for i in range(self.n_blocks)]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normed class token (B, C), like the official models with an identity head."""
        return self.forward_features(x)["x_norm_clstoken"]

    def block_indices(self, n: int | Sequence[int]) -> list[int]:
        """The official block selection: the last `n` blocks for an int, else the listed indices.

        Negative indices count from the end (an addition to the official API). Returned in block order.
        """
        if isinstance(n, int):
            if not 1 <= n <= self.n_blocks:
                raise ValueError(
                    f"n={n} blocks requested but {self.model_name} has {self.n_blocks}; pass an n from 1 to "
                    f"{self.n_blocks}, or a list of block indices."
                )
            return list(range(self.n_blocks - n, self.n_blocks))
        indices = set()
        for index in n:
            if not -self.n_blocks <= index < self.n_blocks:
                raise ValueError(
                    f"Block index {index} is out of range for {self.model_name} ({self.n_blocks} blocks); use an "
                    f"index from {-self.n_blocks} to {self.n_blocks - 1} (negative counts from the last block)."
                )
            indices.add(index % self.n_blocks)
        return sorted(indices)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the selected blocks (see `block_indices`), in block order.

        Each output is (B, N, C), or (B, C, H/p, W/p) with `reshape`; with `norm` the final LayerNorm is
        applied first. With `return_class_token` each item is a pair (patch tokens, class token (B, C)).
        """
        indices = self.block_indices(n)
        _, kept, _ = self._run_blocks(self.prepare_tokens(x), keep=indices, stop_early=True)
        outputs = [self.norm(kept[i]) if norm else kept[i] for i in indices]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid_h, grid_w = height // self.patch_size, width // self.patch_size
            patches = [p.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> softmax attention weights of the last block (B, heads, T, T)."""
        last = self.n_blocks - 1
        _, _, maps = self._run_blocks(self.prepare_tokens(x), maps_for=(last,))
        return maps[last].attention

    def get_block_qkv(self, x: torch.Tensor, blocks: Sequence[int]) -> list[AttentionMaps]:
        """Attention maps with q, k, v of the listed blocks (negative indices allowed), in the order listed."""
        self.block_indices(list(blocks))  # validates the indices
        indices = [i % self.n_blocks for i in blocks]
        _, _, maps = self._run_blocks(self.prepare_tokens(x), maps_for=indices, stop_early=True)
        return [maps[i] for i in indices]
