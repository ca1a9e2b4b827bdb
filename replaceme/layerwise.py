"""A model run one decoder layer at a time, exactly as its own ``forward`` would run it.

Hugging Face builds masks, rotary embeddings and other per-layer arguments inside the base
model's ``forward``, differently for each family (sliding windows, per-type rope, embedding
scales). Rather than re-implementing that, we build the model on the meta device and swap its
decoder layers for :class:`_Probe` modules that record what each layer is called with and stop
the forward there. The real layers are materialised one at a time from the checkpoint shards and
called with those recorded arguments, so hidden states match ``model(...)`` to float round-off.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from replaceme.checkpoint import Checkpoint
from replaceme.errors import ReplaceMeError
from replaceme.families import Family, family_for

log = logging.getLogger("replaceme")


class _StopForward(Exception):
    pass


class _Probe(nn.Module):
    """Stands in for decoder layer ``index``: records its inputs when it is the target."""

    def __init__(self, index: int, recorder: dict[str, Any], attention_type: str | None) -> None:
        super().__init__()
        self.index = index
        self.recorder = recorder
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.index == self.recorder["target"]:
            self.recorder["hidden_states"] = hidden_states
            self.recorder["kwargs"] = kwargs
            raise _StopForward
        return hidden_states


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ReplaceMeError("device: cuda was requested but no CUDA device is visible; use device: auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """float32 on CPU; the checkpoint's own (half) dtype on CUDA, unless set explicitly."""
    if name != "auto":
        return getattr(torch, name)
    return checkpoint_dtype if device.type == "cuda" else torch.float32


class LayerwiseModel:
    """One checkpoint, run layer by layer on one device."""

    def __init__(self, checkpoint: Checkpoint, *, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.checkpoint = checkpoint
        self.family: Family = family_for(checkpoint.config, checkpoint.field)
        self.device = device
        self.dtype = dtype or checkpoint.dtype
        self.hf_config = AutoConfig.for_model(**checkpoint.config)
        with init_empty_weights(include_buffers=False):  # parameters on meta, rotary buffers real
            self._model = AutoModelForCausalLM.from_config(self.hf_config)
        self._model.eval()
        self._base = self._model.get_decoder()
        self._meta_layers = list(self._base.layers)
        self._recorder: dict[str, Any] = {"target": -1}
        self._base.layers = nn.ModuleList(
            _Probe(i, self._recorder, getattr(layer, "attention_type", None))
            for i, layer in enumerate(self._meta_layers)
        )
        self._first_of_type = self._first_layer_of_each_type()
        _move_buffers(self._base, device)
        self._embeddings_loaded = False

    @property
    def num_layers(self) -> int:
        return len(self._meta_layers)

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def layer_prefix(self) -> str:
        return self.family.layer_prefix

    def layer_bytes(self, index: int) -> int:
        """Decoder layer ``index``'s weights at the compute dtype (read off the meta build)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(p.numel() for p in self._meta_layers[index].parameters()) * itemsize

    def embedding_bytes(self) -> int:
        """The input embeddings at the compute dtype (loaded by :meth:`embed` and kept)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self._base.embed_tokens.weight.numel() * itemsize

    @property
    def intermediate_size(self) -> int:
        return int(getattr(self.hf_config, "intermediate_size", None) or 4 * self.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(getattr(self.hf_config, "num_attention_heads", 1))

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    # --- inputs of each layer ----------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer 0 (embedding output, with any family-specific scale)."""
        if not self._embeddings_loaded:
            prefix = self.layer_prefix.removesuffix("layers.") + "embed_tokens."
            self._materialise(self._base.embed_tokens, prefix)
            self._embeddings_loaded = True
        hidden, _ = self._probe(0, input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return hidden

    def layer_kwargs(self, index: int, attention_mask: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments the model's forward passes to decoder layer ``index``."""
        batch, length = attention_mask.shape
        placeholder = torch.zeros((), dtype=self.dtype, device=self.device).expand(batch, length, self.hidden_size)
        _, kwargs = self._probe(self._first_of_type[index], inputs_embeds=placeholder,
                                attention_mask=attention_mask.to(self.device))
        return kwargs

    def kwargs_key(self, index: int) -> int:
        """Layers with the same key receive identical arguments for the same batch."""
        return self._first_of_type[index]

    def _probe(self, index: int, **inputs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        self._recorder["target"] = index
        try:
            with torch.no_grad():
                self._base(**inputs, use_cache=False)
        except _StopForward:
            return self._recorder.pop("hidden_states"), self._recorder.pop("kwargs")
        raise RuntimeError(f"decoder layer {index} was never called by the model's forward")

    def _first_layer_of_each_type(self) -> list[int]:
        """Layers of the same attention type get identical arguments; probe the first of each."""
        types = getattr(self.hf_config, "layer_types", None) or ["all"] * self.num_layers
        first: dict[str, int] = {}
        return [first.setdefault(t, i) for i, t in enumerate(types)]

    # --- weights -----------------------------------------------------------------------------

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its weights read from the shards."""
        module = copy.deepcopy(self._meta_layers[index])
        self._materialise(module, f"{self.layer_prefix}{index}.")
        return module

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index``, loaded for the duration of the ``with`` block and then freed."""
        module = self.load_layer(index)
        try:
            yield module
        finally:
            del module

    def head(self) -> tuple[nn.Module, nn.Module]:
        """Final norm and LM head, loaded (the head falls back to tied embeddings)."""
        norm = copy.deepcopy(self._base.norm)
        self._materialise(norm, self.layer_prefix.removesuffix("layers.") + "norm.")
        lm_head = copy.deepcopy(self._model.get_output_embeddings())
        names = self.checkpoint.weight_map
        source = "lm_head." if "lm_head.weight" in names else self.layer_prefix.removesuffix("layers.") + "embed_tokens."
        self._materialise(lm_head, source)
        return norm, lm_head

    def logits(self, hidden: torch.Tensor, norm: nn.Module, lm_head: nn.Module) -> torch.Tensor:
        logits = lm_head(norm(hidden)).float()
        cap = getattr(self.hf_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _materialise(self, module: nn.Module, prefix: str) -> None:
        tensors = self.checkpoint.load_prefix(prefix)
        try:
            module.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise ReplaceMeError(
                f"{self.checkpoint.field}: tensors under {prefix!r} in {self.checkpoint.uri} do not match "
                f"the {self.family.name} architecture in its config.json ({exc})"
            ) from None
        module.to(device=self.device, dtype=self.dtype)
        module.eval()
        module.requires_grad_(False)


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    """Move real buffers (rotary tables, embedding scales); meta parameters cannot move."""
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and not buffer.is_meta:
                sub._buffers[name] = buffer.to(device)
