"""Model-family adapters: where a family's decoder layers live and how a map is folded into them.

ReplaceMe estimates a linear map ``T`` on the vector each layer adds to the residual stream
after its MLP (``X``) and folds it into the layer before the cut. For pre-norm blocks (Llama,
Mistral, Qwen2/3, Phi-3) ``X`` is the MLP's ``down_proj`` output, so ``down_proj.weight`` becomes
``Tᵀ·W`` and the fold is exact.

Gemma 2/3 normalise the MLP output (``post_feedforward_layernorm``) before adding it, so
``norm(x·W'ᵀ)`` can never equal ``norm(x·Wᵀ)·T`` for a general ``T``: a full map is refused.
A *diagonal* map commutes with that RMSNorm's per-channel scale, so with ``diag: true`` it is
folded exactly into the norm weight (Gemma scales by ``1 + w``: ``w' = (1 + w)·t − 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from replaceme.errors import ReplaceMeError

FOLD_SLAB_ELEMENTS = 1 << 22  # 32 MiB of float64 per slab of the fold


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    residual_mlp_module: str = "mlp"  # its output is X, the vector added to the residual
    fold_tensor: str = "mlp.down_proj.weight"
    fold_kind: str = "down_proj"  # or "norm_scale": diagonal map into a (1 + w) RMSNorm weight
    layer_prefix: str = "model.layers."

    @property
    def full_map_foldable(self) -> bool:
        return self.fold_kind == "down_proj"

    def fold(self, weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
        """Return the fold tensor of layer ``s-1`` with ``transform`` ([hidden, hidden]) applied."""
        t = transform.to(torch.float64)
        if self.fold_kind == "norm_scale":
            return ((1.0 + weight.to(torch.float64)) * torch.diagonal(t) - 1.0).to(weight.dtype)
        # Tᵀ·W in float64, a slab of columns at a time: the float64 working set stays bounded
        # (a 70B down_proj is 1.9 GB in float64) while the result keeps the checkpoint's dtype.
        folded = torch.empty_like(weight)
        step = max(1, FOLD_SLAB_ELEMENTS // weight.shape[0])
        for start in range(0, weight.shape[1], step):
            slab = weight[:, start:start + step].to(torch.float64)
            folded[:, start:start + step] = (t.T @ slab).to(weight.dtype)
        return folded


PRE_NORM = dict(residual_mlp_module="mlp", fold_tensor="mlp.down_proj.weight", fold_kind="down_proj")
POST_NORM = dict(residual_mlp_module="post_feedforward_layernorm",
                 fold_tensor="post_feedforward_layernorm.weight", fold_kind="norm_scale")

FAMILIES = (
    Family("llama", ("llama",), **PRE_NORM),
    Family("mistral", ("mistral",), **PRE_NORM),
    Family("qwen2", ("qwen2",), **PRE_NORM),
    Family("qwen3", ("qwen3",), **PRE_NORM),
    Family("phi3", ("phi3",), **PRE_NORM),
    Family("gemma2", ("gemma2",), **POST_NORM),
    Family("gemma3", ("gemma3_text",), **POST_NORM),
)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(config: dict[str, Any], field: str = "model_path") -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    hint = ""
    if model_type == "gemma3":
        hint = " (a multimodal Gemma 3 checkpoint: extract its text model, model_type gemma3_text)"
    raise ReplaceMeError(
        f"{field}: model_type {model_type!r}{hint} is not supported; supported: {', '.join(supported_model_types())}"
    )


def check_estimator(family: Family, diag: bool) -> None:
    """Refuse a full map where the fold into the checkpoint could not be exact."""
    if not diag and not family.full_map_foldable:
        raise ReplaceMeError(
            f"diag: {family.name} normalises the MLP output ({family.residual_mlp_module}) before adding it "
            "to the residual stream, so a full linear map cannot be folded into its weights exactly. "
            "Set diag: true: a diagonal map is folded exactly into that norm's weight."
        )


def prune_config(config: dict[str, Any], kept_layers: list[int]) -> dict[str, Any]:
    """The model config after removing layers: layer count and every per-layer list shortened."""
    old_count = config["num_hidden_layers"]
    pruned = dict(config)
    pruned["num_hidden_layers"] = len(kept_layers)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == old_count:
            pruned[key] = [value[i] for i in kept_layers]
    if "max_window_layers" in config and config["max_window_layers"] is not None:
        # Qwen2/3: the first max_window_layers layers use full attention
        pruned["max_window_layers"] = sum(1 for i in kept_layers if i < config["max_window_layers"])
    return pruned
