"""The LPT tuner: injects prompt-aware attention and runs LPT's one- or two-pass forward."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.utils import ModelOutput

from lpt_peft.tuner.architectures import (
    LPTArchitecture,
    _resolve,
    base_fingerprint,
    fingerprint_differences,
    get_architecture,
)
from lpt_peft.tuner.config import LPTConfig
from lpt_peft.tuner.layer import _SUPPORTED_ATTENTION, LPTAttention, LPTLayer, _trunc_normal, single_active_adapter


@dataclass
class LPTOutput(ModelOutput):
    """Output of an LPT model.

    Args:
        loss: Cross-entropy of `logit_scale * logits` when `labels` were passed (training scripts use A-GCL instead).
        logits: `(batch, num_labels)` cosine similarities between the image feature and each class weight, in
            [-1, 1]; their argmax is the prediction.
        features: `(batch, hidden)` CLS feature after the final norm, before dropout and the classifier.
        query: `(batch, hidden)` phase-2 query feature (the phase-1 model's CLS feature; no gradient). None in phase 1.
        key_similarity: `(batch, num_groups)` cosine similarity of the query to each group key. None in phase 1.
        group_indices: `(batch, top_k)` indices of the selected prompt groups. None in phase 1.
        match_score: scalar, the batch mean of the summed similarities of the selected keys (the matching term of
            the phase-2 loss; keys get gradient only from it). None in phase 1.
        hidden_states: hidden states of the main pass (embeddings, then each layer) when `output_hidden_states=True`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key_similarity: torch.Tensor | None = None
    group_indices: torch.Tensor | None = None
    match_score: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def cosine_logits(features: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """Cosine classifier: `normalize(features) @ normalize(class_weight, dim=0)`, class weight `(hidden, classes)`.

    Always float32, also under autocast: the loss scales these cosines by 20, and top-k/argmax see near ties.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.normalize(features.float(), dim=-1) @ F.normalize(class_weight.float(), dim=0)


class LPTModel(BaseTuner):
    """Long-tailed Prompt Tuning (Dong et al., ICLR 2023) for Vision Transformers.

    Created by `peft.get_peft_model` from an [`LPTConfig`]; do not instantiate directly. Each layer's attention is
    wrapped by an [`LPTAttention`] that adds prompts as extra keys and values; the tuner itself holds the group keys
    `lpt_keys[name]` `(num_groups, hidden)` and the cosine classifier `lpt_head[name]` `(hidden, num_labels)`, so both
    are saved with the adapter. The base model's forward is replaced by LPT's forward while the adapter is attached:

    - phase 1: all layers with shared prompts -> final norm -> CLS -> dropout -> cosine classifier;
    - phase 2: layers 1..K once with shared prompts; layers K+1..L without group prompts and without gradient for the
      query; top-k groups by cosine to the keys; layers K+1..L again from the layer-K state with shared + mean group
      prompts -> final norm -> CLS -> dropout -> cosine classifier. Layers 1..K are never recomputed.

    Example:

    ```python
    >>> import torch, lpt_peft
    >>> from peft import get_peft_model
    >>> from transformers import ViTConfig, ViTModel

    >>> vit = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
    ...                          image_size=32, patch_size=8))
    >>> model = get_peft_model(vit, lpt_peft.LPTConfig(num_labels=5, shared_layers=2, num_groups=4))
    >>> model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape
    torch.Size([2, 5])
    >>> model.base_model.set_phase(2)
    >>> model(pixel_values=torch.randn(2, 3, 32, 32)).group_indices.shape
    torch.Size([2, 2])
    ```
    """

    prefix: str = "lpt_"
    tuner_layer_cls = LPTLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state: bool = True
    _lpt_enabled: bool = True

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs: Any) -> None:
        # BaseTuner.__init__ adds the new config to a `peft_config` it finds on the model (the dict of a tuner already
        # attached there) before any hook runs, so a base that already carries adapters is refused before that.
        config = peft_config.get(adapter_name) if isinstance(peft_config, dict) else peft_config
        check_injection(model, config, adapter_name, {})
        super().__init__(model, peft_config, adapter_name, **kwargs)

    # ------------------------------------------------------------------ injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        # Everything is checked before the first change: a failing call leaves the base, the other adapters and this
        # tuner as they were (peft's own checks after this point cannot fail for a module LPT validated).
        architecture = check_injection(model, config, adapter_name, self.peft_config)
        self._complete_config(config, model, architecture)
        self._add_tuner_weights(adapter_name, config, architecture.encoder(model))
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except Exception:
            self._remove_tuner_weights(adapter_name)
            raise
        self._apply_layer_norm_eps(config, architecture.encoder(model))
        self._install_forward(model)
        self._update_requires_grad()

    @staticmethod
    def _complete_config(config: LPTConfig, model: nn.Module, architecture: LPTArchitecture) -> None:
        """Record what the adapter depends on (backbone shape and fingerprint, class names, where the base lives)."""
        encoder = architecture.encoder(model)
        config.hidden_size = int(encoder.config.hidden_size)
        config.num_hidden_layers = len(architecture.layers(model))
        if config.base_fingerprint is None:
            config.base_fingerprint = base_fingerprint(model)
        if config.id2label is None:
            names = _class_names_of(model, config.num_labels)
            if names is not None:
                config.id2label, config.label2id = names, None
                config._check_labels()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
        config.base_model_name_or_path = _portable_base_reference(config.base_model_name_or_path)

    def _apply_layer_norm_eps(self, config: LPTConfig, encoder: nn.Module) -> None:
        if config.layer_norm_eps is None:
            return
        if not hasattr(self, "_original_layer_norm_eps"):
            self._original_layer_norm_eps = (
                [(m, m.eps) for m in encoder.modules() if isinstance(m, nn.LayerNorm)],
                getattr(encoder.config, "layer_norm_eps", None),
            )
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(config.layer_norm_eps)
        encoder.config.layer_norm_eps = float(config.layer_norm_eps)

    def _add_tuner_weights(self, adapter_name: str, config: LPTConfig, encoder: nn.Module) -> None:
        if "lpt_keys" not in self._modules:
            self.lpt_keys = nn.ParameterDict()
            self.lpt_head = nn.ParameterDict()
        weight = next(p for p in encoder.parameters() if p.is_floating_point())
        # The backbone's dtype, as for the prompts (peft's contract); `_cast_adapter_dtype` upcasts half precision.
        device, dtype = weight.device, weight.dtype
        keys = _trunc_normal((config.num_groups, config.hidden_size), config.prompt_init_std)
        head = torch.randn(config.hidden_size, config.num_labels)
        head = head / head.norm(dim=0, keepdim=True)  # every class starts as a random unit vector
        self.lpt_keys[adapter_name] = nn.Parameter(keys.to(device=device, dtype=dtype))
        self.lpt_head[adapter_name] = nn.Parameter(head.to(device=device, dtype=dtype))

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Upcast `adapter_name`'s half-precision weights to float32, unless `autocast_adapter_dtype=False`.

        peft calls this after creating an adapter (`get_peft_model`, `add_adapter`, `load_adapter`, `from_pretrained`).
        Its own cast reaches the prompts (they live in tuner layers); the keys and the head live on the tuner, so they
        are cast here. With `autocast_adapter_dtype=False` every adapter weight keeps the backbone's dtype.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype and "lpt_keys" in self._modules:
            for container in (self.lpt_keys, self.lpt_head):
                param = container[adapter_name] if adapter_name in container else None
                if param is not None and param.is_floating_point() and param.element_size() < 4:
                    container[adapter_name] = nn.Parameter(param.detach().to(torch.float32))
        # peft's cast re-creates the parameters it upcasts (all requiring grad): re-apply the phase rules.
        self._update_requires_grad()

    def _remove_tuner_weights(self, adapter_name: str) -> None:
        for name in ("lpt_keys", "lpt_head"):
            container = self._modules.get(name)
            if container is not None and adapter_name in container:
                del container[adapter_name]

    def _prepare_adapter_config(self, peft_config: LPTConfig, model_config: dict) -> LPTConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = get_architecture(self.model).attention_pattern()
        return peft_config

    def _check_target_module_exists(self, peft_config: LPTConfig, key: str) -> bool:
        return re.fullmatch(peft_config.target_modules, key) is not None

    def _create_and_replace(
        self,
        peft_config: LPTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, LPTAttention):
            target.update_layer(adapter_name, peft_config)
            return
        architecture = get_architecture(self.model)
        layer_idx = int(re.fullmatch(architecture.attention_pattern(), current_key).group(1))
        new_module = LPTAttention(
            target,
            architecture.pre_attention_norm(parent),
            layer_idx,
            adapter_name,
            peft_config,
            attention_spec=architecture.attention,
        )
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # peft's version assumes Linear-like modules with a `.weight`; attention modules have none.
        setattr(parent, child_name, new_module)

    def _install_forward(self, model: nn.Module) -> None:
        """PeftModel calls the base model directly, so LPT's two-pass forward must live on the base model itself.

        A bound method (not a closure) so that `copy.deepcopy` and pickling rebind it to the copied tuner.
        """
        _check_forward(model, self.peft_config)
        model.forward = self._forward

    @staticmethod
    def _restore_forward(model: nn.Module) -> None:
        model.__dict__.pop("forward", None)

    # ------------------------------------------------------------------ adapters and phases
    def _lpt_layers(self) -> list[LPTAttention]:
        return [module for module in self.model.modules() if isinstance(module, LPTAttention)]

    def _active_lpt_adapter(self) -> str | None:
        return single_active_adapter(self.active_adapters, self.peft_config)

    def set_phase(self, phase: int, adapter_name: str | None = None) -> None:
        """Switch an adapter between phase 1 (shared prompts + head train) and phase 2 (group pool, keys + head train).

        The phase is part of the adapter config, so a saved adapter infers in the phase it was saved in.

        Args:
            phase: 1 or 2.
            adapter_name: Adapter to switch; defaults to the active one.
        """
        if isinstance(phase, bool) or phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2, got {phase!r}.")
        if adapter_name is None:
            adapter_name = self._active_lpt_adapter()
            if adapter_name is None:
                raise ValueError(
                    f"No LPT adapter is active, so set_phase does not know which to switch; pass adapter_name= one of "
                    f"{sorted(self.peft_config)} (or activate one with `model.set_adapter(name)`)."
                )
        if adapter_name not in self.peft_config:
            raise ValueError(f"No LPT adapter named {adapter_name!r}; available: {sorted(self.peft_config)}.")
        self.peft_config[adapter_name].phase = phase
        for layer in self._lpt_layers():
            layer.set_phase(adapter_name, phase)
        self._update_requires_grad()

    def _update_requires_grad(self, inference_mode: bool | None = None) -> None:
        """Apply each adapter's trainability under the phase rules.

        Every adapter carries a trainable flag; what it makes trainable depends on its phase: phase 1 trains the shared
        prompts and the head, phase 2 the group prompts, the keys and the head. A new adapter starts trainable if it is
        active and not in inference mode (`is_trainable=False`), frozen otherwise; adding another adapter, switching
        phase or disabling and re-enabling adapters keeps the flags. While adapters are disabled nothing trains.

        Args:
            inference_mode: Given by `set_adapter`: the active adapters become trainable unless it is True, all others
                frozen (peft's rule for `set_adapter`).
        """
        trainable = self.__dict__.setdefault("_lpt_trainable", {})
        for name in list(trainable):
            if name not in self.peft_config:
                del trainable[name]
        # An adapter without a flag is one peft is injecting right now; peft then calls `set_adapter` on the active
        # adapters with the *new* adapter's inference mode, which must not change the existing adapters.
        injecting = any(name not in trainable for name in self.peft_config)
        for name, config in self.peft_config.items():
            active = name in self.active_adapters
            if name not in trainable:
                trainable[name] = active and not config.inference_mode
            elif inference_mode is not None and not injecting:
                trainable[name] = active and not inference_mode
        for name, config in self.peft_config.items():
            self._apply_phase_rules(name, config.phase, self._lpt_enabled and trainable[name])

    def _apply_phase_rules(self, adapter_name: str, phase: int, trainable: bool) -> None:
        """requires_grad of all weights of one adapter: what `phase` trains follows `trainable`, the rest is frozen."""
        for layer in self._lpt_layers():
            if adapter_name in layer.lpt_shared_prompt:
                layer.lpt_shared_prompt[adapter_name].requires_grad_(trainable and phase == 1)
            if adapter_name in layer.lpt_group_prompt:
                layer.lpt_group_prompt[adapter_name].requires_grad_(trainable and phase == 2)
        if "lpt_keys" in self._modules and adapter_name in self.lpt_keys:
            self.lpt_keys[adapter_name].requires_grad_(trainable and phase == 2)
            self.lpt_head[adapter_name].requires_grad_(trainable)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make the given adapter(s) trainable or frozen; reached through `PeftModel.set_requires_grad`.

        peft's version only reaches weights inside tuner layers, which would leave LPT's head and keys (held by the
        tuner) as they were. Here the whole adapter follows, within its phase's rules: enabling a phase-1 adapter
        trains its shared prompts and head, a phase-2 adapter its group prompts, keys and head. The choice is kept
        across `set_phase`, `add_adapter` and `disable_adapter` (while adapters are disabled, nothing trains).

        Args:
            adapter_names: One adapter name or several.
            requires_grad: True to make them trainable, False to freeze them.

        Raises:
            ValueError: If a name is not an adapter of this model (nothing is changed).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"No LPT adapter named {unknown}; available: {sorted(self.peft_config)}.")
        self._update_requires_grad()  # flags for adapters peft has just added
        for name in names:
            self._lpt_trainable[name] = bool(requires_grad)
        self._update_requires_grad()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._update_requires_grad()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate `adapter_name` (a name or, as peft passes it, a list of names).

        Several names are accepted here as peft's tuner contract requires, and refused by the forward (LPT runs one
        adapter at a time); `PeftModel.set_adapter` refuses them at once.

        Raises:
            ValueError: for an unknown name, before anything changes.
        """
        check_adapter_names(adapter_name, self.peft_config, allow_several=True)
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._update_requires_grad(inference_mode=inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._lpt_enabled = enabled
        self._update_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._remove_tuner_weights(adapter_name)
        self._update_requires_grad()

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            raise NotImplementedError(
                "LPT prompts cannot be merged into the backbone: they are extra keys/values (and, in phase 2, chosen "
                "per image), not a weight update. Keep the PeftModel for inference, or call `unload()` to get the "
                "plain backbone back without the prompts."
            )
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LPTAttention):
                parent_name, _, child_name = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child_name, module.base_layer)
        self._restore_forward(self.model)
        if hasattr(self, "_original_layer_norm_eps"):
            norms, config_eps = self._original_layer_norm_eps
            for module, eps in norms:
                module.eps = eps
            if config_eps is not None:
                get_architecture(self.model).encoder(self.model).config.layer_norm_eps = config_eps
            del self._original_layer_norm_eps
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # ------------------------------------------------------------------ forward
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Refuse peft's mixed-adapter batches (`adapter_names=`), which `PeftModel.forward` would otherwise drop.

        Raises:
            ValueError: If `adapter_names` is passed.
        """
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "LPT does not support mixed-adapter batches (`adapter_names=...`): each LPT adapter has its own "
                "classifier and phase-2 group selection, so one forward runs one adapter. Call "
                "`model.set_adapter(name)` and run each adapter's images separately."
            )
        yield

    def _forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        adapter = self._active_lpt_adapter() if self._lpt_enabled else None
        if adapter is None:
            return self._base_forward(pixel_values, labels, attention_mask, output_hidden_states, return_dict, kwargs)
        if pixel_values is None:
            raise ValueError("LPT needs `pixel_values` of shape (batch, channels, height, width).")
        if kwargs.pop("output_attentions", False):
            raise NotImplementedError("output_attentions is not supported by LPT models; use a forward hook instead.")
        config: LPTConfig = self.peft_config[adapter]
        architecture = get_architecture(self.model)
        encoder = architecture.encoder(self.model)
        layers = architecture.layers(self.model)
        final_norm = getattr(encoder, architecture.final_norm_attr)
        embed_kwargs = {k: kwargs.pop(k) for k in ("interpolate_pos_encoding", "bool_masked_pos") if k in kwargs}
        hidden = architecture.embed(encoder, pixel_values, **embed_kwargs)
        passes = _LayerPasses(architecture, architecture.make_mask(encoder, hidden, attention_mask), hidden,
                              output_hidden_states)  # fmt: skip

        query = similarity = group_indices = match_score = None
        if config.phase == 1:
            hidden = passes.run(layers, hidden, **kwargs)
        else:
            num_first = config.shared_layers
            hidden = passes.run(layers[:num_first], hidden, last_of_pass=False, **kwargs)
            with torch.no_grad():
                query_hidden = passes.run(layers[num_first:], hidden, record=False, **kwargs)
                query = final_norm(query_hidden)[:, passes.feature_index]
            similarity = cosine_logits(query, self.lpt_keys[adapter].T)
            group_indices = similarity.detach().topk(config.top_k, dim=-1).indices
            match_score = similarity.gather(1, group_indices).sum(dim=1).mean()
            hidden = passes.run(layers[num_first:], hidden, lpt_group_indices=group_indices, **kwargs)

        features = final_norm(hidden)[:, passes.feature_index]
        dropped = F.dropout(features, p=config.classifier_dropout, training=self.training)
        logits = cosine_logits(dropped, self.lpt_head[adapter])
        loss = None
        if labels is not None:
            check_labels(labels, config.num_labels)
            loss = F.cross_entropy(config.logit_scale * logits, labels.to(logits.device))
        output = LPTOutput(
            loss=loss,
            logits=logits,
            features=features,
            query=query,
            key_similarity=similarity,
            group_indices=group_indices,
            match_score=match_score,
            hidden_states=tuple(passes.states) if passes.states is not None else None,
        )
        return output if return_dict is not False else output.to_tuple()

    def _base_forward(self, pixel_values, labels, attention_mask, output_hidden_states, return_dict, kwargs):
        """The backbone's own forward (adapters disabled or none active), with only the arguments that were given."""
        given = {"labels": labels, "attention_mask": attention_mask}
        given.update(output_hidden_states=output_hidden_states, return_dict=return_dict)
        base_kwargs = {**kwargs, **{key: value for key, value in given.items() if value is not None}}
        return type(self.model).forward(self.model, pixel_values, **base_kwargs)


class _LayerPasses:
    """Runs stacks of transformer layers for one LPT forward: records hidden states if asked, and computes the last
    layer of each pass for the class token only (keys and values still come from every token) when the states are
    not wanted: exact, and about 1/12 of the work of a ViT-B pass saved."""

    def __init__(self, architecture: LPTArchitecture, mask, embeddings: torch.Tensor, output_hidden_states) -> None:
        self.architecture = architecture
        self.mask = mask
        self.states = [embeddings] if output_hidden_states else None
        self.cls_only = architecture.cls_only_last_layer and not output_hidden_states
        self.cls = architecture.cls_index
        self.feature_index = 0 if self.cls_only else self.cls

    def call(self, layer: nn.Module, hidden: torch.Tensor, layer_mask, **layer_kwargs) -> torch.Tensor:
        # LPT's per-call inputs travel as keyword arguments through the layer to its attention; the attention checks
        # that they arrived.
        attention = layer.get_submodule(self.architecture.attention_attr)
        attention._lpt_expected = {k for k in ("lpt_context", "lpt_group_indices") if k in layer_kwargs}
        try:
            if _is_checkpointing(layer):
                return _checkpointed_layer_call(layer, hidden, layer_mask, layer_kwargs)
            return layer(hidden, layer_mask, **layer_kwargs)
        finally:
            attention._lpt_expected = None

    def run(self, stack, hidden: torch.Tensor, last_of_pass: bool = True, record: bool = True, **layer_kwargs):
        if not hidden.requires_grad and _checkpointing_trainable(stack):
            # Reentrant checkpointing gives a layer's output a gradient path only if one of its inputs needs gradient;
            # the frozen embeddings (and, in phase 2, the frozen first layers) give none, which would leave every
            # prompt inside the checkpointed layers without gradient. Anchor the input, as peft's
            # `enable_input_require_grads` does, so this holds without the user having to call it (and without
            # backpropagating through phase 2's frozen first layers, which hold nothing to train).
            hidden = hidden.detach().requires_grad_()
        cls = self.cls
        for i, layer in enumerate(stack):
            if self.cls_only and last_of_pass and i == len(stack) - 1:
                row = hidden[:, cls : cls + 1]
                return self.call(layer, row, _query_rows(self.mask, cls), lpt_context=hidden, **layer_kwargs)
            hidden = self.call(layer, hidden, self.mask, **layer_kwargs)
            if self.states is not None and record:
                self.states.append(hidden)
        return hidden


def _is_checkpointing(layer: nn.Module) -> bool:
    """Whether transformers' `GradientCheckpointingLayer` will checkpoint this call of `layer` (its own condition)."""
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training and torch.is_grad_enabled()


def _checkpointing_trainable(stack) -> bool:
    """Whether some layer of `stack` is checkpointed in this call and some layer holds a weight that trains."""
    return any(_is_checkpointing(layer) for layer in stack) and any(
        param.requires_grad for layer in stack for param in layer.parameters()
    )


@contextmanager
def _own_checkpointing_off(layer: nn.Module):
    previous = layer.gradient_checkpointing
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        layer.gradient_checkpointing = previous


def _checkpointed_layer_call(layer: nn.Module, hidden: torch.Tensor, mask, layer_kwargs: dict[str, Any]):
    """Checkpoint `layer(hidden, mask, **layer_kwargs)` with every tensor that needs gradient as a positional input.

    transformers' `GradientCheckpointingLayer` checkpoints `partial(forward, **kwargs)`, and reentrant checkpointing
    (`use_reentrant=True`) does not track tensors held by that partial: `lpt_context` (the full sequence that the
    class-token-only last layer attends to) would be backpropagated through twice (an error) or not at all. Here the
    layer runs inside the layer's own checkpoint function (same `use_reentrant` and options), those tensors passed
    positionally, with the layer's built-in checkpointing switched off for that call (including the recomputation).
    A layer with nothing to backpropagate runs without checkpointing.
    """
    tracked = [k for k, v in layer_kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if not (hidden.requires_grad or tracked or any(p.requires_grad for p in layer.parameters())):
        # Nothing to backpropagate (phase 2's frozen first layers): no graph is kept, so there is nothing to save by
        # checkpointing, and reentrant checkpointing would warn that no input requires grad.
        with _own_checkpointing_off(layer):
            return layer(hidden, mask, **layer_kwargs)
    if not tracked:
        return layer(hidden, mask, **layer_kwargs)
    fixed = {k: v for k, v in layer_kwargs.items() if k not in tracked}

    def body(hidden, *values):
        with _own_checkpointing_off(layer):
            return layer(hidden, mask, **fixed, **dict(zip(tracked, values)))

    return layer._gradient_checkpointing_func(body, hidden, *(layer_kwargs[k] for k in tracked))


def _query_rows(mask, row: int):
    """The attention mask restricted to one query row (masks are (batch, heads, queries, keys) or None)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return mask[:, :, row : row + 1]
    return mask


def check_labels(labels: torch.Tensor, num_labels: int) -> None:
    """Raise a clear error when a label is outside `[0, num_labels)`.

    On CPU the range is read and a ValueError names the bad label. On an accelerator, reading `labels.min()` would
    make every training step wait for the device (a GPU->CPU sync); there the check is queued on the device with
    `torch._assert_async`, which fails the run at the next synchronisation with the same message in the device
    assertion (CUDA reports it as a device-side assert).
    """
    if labels.numel() == 0:
        return
    message = (
        f"Label out of range for num_labels={num_labels} (valid: 0..{num_labels - 1}). Check that the data set's "
        "label count matches LPTConfig.num_labels."
    )
    if labels.device.type != "cpu":
        torch._assert_async(((labels >= 0) & (labels < num_labels)).all(), message)
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_labels:
        bad = low if low < 0 else high
        raise ValueError(f"Label {bad} is out of range" + message[len("Label out of range") :])


# ---------------------------------------------------------------------- checks before any change
def check_injection(
    model: nn.Module, config: LPTConfig, adapter_name: str, peft_config: dict | None
) -> LPTArchitecture:
    """Check everything injecting the LPT adapter `config` into `model` needs, without changing anything.

    Called by `LPTModel.__init__` (before peft's `BaseTuner.__init__` touches anything) and `LPTModel.inject_adapter`
    (so by `get_peft_model`, `add_adapter`, `load_adapter` and `PeftModel.from_pretrained`) before their first change,
    and by the loading wrappers of `lpt_peft.tuner.registration` before any file is read into the model. (peft's
    `inject_adapter_in_model` refuses LPT itself: its tuner holds the keys and head.)

    Args:
        model: The base model (plain, or already carrying adapters of the tuner that owns `peft_config`).
        config: The new adapter's config.
        adapter_name: Its name.
        peft_config: The adapters of the tuner the new one joins (it may already contain `config`); `{}` or None for
            a new PeftModel.

    Returns:
        The [`LPTArchitecture`] of `model`.

    Raises:
        TypeError: `config` is not an LPTConfig, or `model` is not a supported class.
        ValueError / NotImplementedError: with the cause and the fix, for each check below.
    """
    if not isinstance(config, LPTConfig):
        raise TypeError(f"LPTModel needs an LPTConfig, got {type(config).__name__}.")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"An adapter name must be a non-empty string, got {adapter_name!r}.")
    peft_config = peft_config if peft_config is not None else {}
    _check_not_a_peft_wrapper(model)
    architecture = get_architecture(model)
    _check_not_wrapped_elsewhere(model, peft_config)
    _check_backbone_matches(model, config, architecture)
    num_layers = len(architecture.layers(model))
    if config.shared_layers >= num_layers:
        raise ValueError(
            f"LPTConfig.shared_layers={config.shared_layers} must be < the number of layers of the backbone "
            f"({num_layers}); valid range 0..{num_layers - 1}. The paper uses 6 of 12 for ViT-B/16."
        )
    encoder = architecture.encoder(model)
    attn_impl = getattr(encoder.config, "_attn_implementation", None) or "eager"
    if attn_impl not in _SUPPORTED_ATTENTION and not attn_impl.startswith("flash"):
        raise NotImplementedError(
            f"LPT does not support attn_implementation={attn_impl!r} (a flex_attention BlockMask does not cover "
            "the prompt keys). Load the backbone with attn_implementation='sdpa' or 'eager'."
        )
    _check_layer_norm_eps(config, adapter_name, peft_config, _own_layer_norm_eps(model, encoder))
    for layer in architecture.layers(model):
        attention = _resolve(layer, architecture.attention_attr, "attention (attention_attr)", type(layer).__name__)
        if not isinstance(attention, LPTAttention):  # a layer LPT wrapped earlier was validated then
            architecture.attention.validate(attention)
        architecture.pre_attention_norm(layer)
    _check_forward(model, peft_config)
    return architecture


def _check_not_a_peft_wrapper(model: nn.Module) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner as _BaseTuner

    if isinstance(model, (PeftModel, _BaseTuner)):
        raise ValueError(
            f"LPT was given a {type(model).__name__}, which already wraps a base model. To add an adapter to it, "
            "call its `add_adapter(name, config)` or `load_adapter(path, adapter_name=name)`; to start over, pass "
            "`peft_model.unload()` or a fresh base model."
        )


def _check_not_wrapped_elsewhere(model: nn.Module, peft_config: dict) -> None:
    """Refuse a base that carries adapters of another tuner: injecting again would re-initialise them."""
    attached = model.__dict__.get("peft_config")
    lpt_names = sorted({n for m in model.modules() if isinstance(m, LPTAttention) for n in m.lpt_shared_prompt})
    foreign = attached is not None and attached is not peft_config
    if not foreign and all(name in peft_config for name in lpt_names):
        return
    names = sorted(attached) if isinstance(attached, dict) and attached else lpt_names
    configs = attached.values() if isinstance(attached, dict) else []
    types = sorted({str(getattr(c, "peft_type", "?")) for c in configs})
    kind = "LPT" if lpt_names or types == ["LPT"] else "/".join(types) or "PEFT"
    raise ValueError(
        f"This {type(model).__name__} already has {kind} adapter(s) {names} from an earlier `get_peft_model` / "
        "`PeftModel.from_pretrained`; attaching LPT again would re-initialise them, so nothing was changed. Use the "
        "existing PeftModel: `peft_model.load_adapter(path, adapter_name=...)` or `peft_model.add_adapter(name, "
        "config)`; or get the plain backbone back with `peft_model.unload()`; or start from a fresh base model."
    )


def _check_backbone_matches(model: nn.Module, config: LPTConfig, architecture: LPTArchitecture) -> None:
    """Refuse a base that differs from the one the adapter was built for, naming each field and both values."""
    hidden_size = int(architecture.encoder(model).config.hidden_size)
    num_layers = len(architecture.layers(model))
    differences = [
        f"{name}: adapter {built}, base {actual}"
        for name, built, actual in (
            ("hidden_size", config.hidden_size, hidden_size),
            ("num_hidden_layers", config.num_hidden_layers, num_layers),
        )
        if built is not None and built != actual
    ]
    if config.base_fingerprint is not None:
        differences += fingerprint_differences(config.base_fingerprint, base_fingerprint(model))
    if not differences:
        return
    where = f" ({config.base_model_name_or_path})" if config.base_model_name_or_path else ""
    raise ValueError(
        f"This LPT adapter does not fit the base model ({type(model).__name__}), which differs from the backbone the "
        f"adapter was trained on in: {'; '.join(differences)}. Load it onto the backbone it was trained on{where}, "
        "at the image size it was trained at. (To use it on a backbone you know to be equivalent, load its "
        "LPTConfig, set `base_fingerprint=None` and pass it as `config=`.)"
    )


def _own_layer_norm_eps(model: nn.Module, encoder: nn.Module) -> float | None:
    """The eps the backbone's LayerNorms had before any LPT adapter overrode it."""
    tuner = getattr(model.__dict__.get("forward"), "__self__", None)
    recorded = getattr(tuner, "_original_layer_norm_eps", None)
    if recorded and recorded[0]:
        return recorded[0][0][1]
    return next((m.eps for m in encoder.modules() if isinstance(m, nn.LayerNorm)), None)


def _check_layer_norm_eps(config: LPTConfig, adapter_name: str, peft_config: dict, own_eps: float | None) -> None:
    """All adapters share the backbone's LayerNorms, so they must agree on their eps (None: the backbone's own)."""

    def effective(eps):
        return own_eps if eps is None else float(eps)

    others = {name: c.layer_norm_eps for name, c in peft_config.items() if name != adapter_name and c is not config}
    conflicting = sorted(name for name, eps in others.items() if effective(eps) != effective(config.layer_norm_eps))
    if not conflicting:
        return

    def shown(eps):
        return f"None (the backbone's own eps, {own_eps})" if eps is None else repr(eps)

    raise ValueError(
        f"LPTConfig.layer_norm_eps={shown(config.layer_norm_eps)} of adapter {adapter_name!r} conflicts with "
        + ", ".join(f"{shown(others[name])} of adapter {name!r}" for name in conflicting)
        + ": all adapters on one backbone share its LayerNorms, so one adapter's eps would change the others' "
        "predictions. Give the adapters the same layer_norm_eps, or load this one onto its own copy of the backbone."
    )


def _check_forward(model: nn.Module, peft_config: dict) -> None:
    current = model.__dict__.get("forward")
    owner = getattr(current, "__self__", None)
    if current is None or (isinstance(owner, LPTModel) and owner.peft_config is peft_config):
        return
    if isinstance(owner, LPTModel):
        _check_not_wrapped_elsewhere(model, {})
    raise ValueError(
        f"The {type(model).__name__} given to LPT already has its forward replaced on the instance (e.g. by "
        "accelerate hooks from `device_map` across several devices). LPT needs to run its own forward: load "
        "the backbone on one device (no `device_map` sharding) and attach LPT before any other wrapper."
    )


def check_adapter_names(adapter_name, peft_config: dict, allow_several: bool = False) -> None:
    """Raise a ValueError unless `adapter_name` names known adapters: one, or with `allow_several` a list of them."""
    names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"An adapter name must be a string, got {adapter_name!r}.")
    unknown = [n for n in names if n not in peft_config]
    if unknown:
        raise ValueError(
            f"No LPT adapter named {unknown if len(unknown) > 1 else unknown[0]!r}; available: {sorted(peft_config)}. "
            "Load or add it first (`load_adapter` / `add_adapter`)."
        )
    if len(names) > 1 and not allow_several:
        raise ValueError(
            f"LPT runs one adapter at a time, but {list(names)} were passed. Call `set_adapter(name)` with a single "
            "adapter name."
        )


def _class_names_of(model: nn.Module, num_labels: int) -> dict[int, str] | None:
    """The base model's own class names, if it has real ones (not transformers' `LABEL_i`) for `num_labels` classes."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    try:
        names = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(names) != list(range(num_labels)) or all(v == f"LABEL_{k}" for k, v in names.items()):
        return None
    return names


def _portable_base_reference(name_or_path: str | None) -> str | None:
    """A Hub id as is; a relative path that exists here made absolute, so it means the same from any directory."""
    if not name_or_path:
        return name_or_path
    path = os.path.expanduser(os.fspath(name_or_path))
    if not os.path.isabs(path) and os.path.exists(path):
        return os.path.abspath(path)
    return os.fspath(name_or_path)


def expected_adapter_shapes(model: nn.Module, config: LPTConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the tensors a saved LPT adapter for `model` holds, as peft writes them (no adapter name).

    Computed from `config` and the module names of `model` alone, so it can check a file before anything is loaded.

    Returns:
        `{"base_model.model.<attention>.lpt_shared_prompt": (prompt_length, hidden), ...}`: per layer the shared
        prompts, per layer from `shared_layers` on the group pool `(num_groups, group_prompt_length, hidden)`, and
        `base_model.lpt_keys` `(num_groups, hidden)` and `base_model.lpt_head` `(hidden, num_labels)`.
    """
    architecture = get_architecture(model)
    hidden = config.hidden_size or int(architecture.encoder(model).config.hidden_size)
    pattern = architecture.attention_pattern()
    shapes: dict[str, tuple[int, ...]] = {}
    for name, _ in model.named_modules():
        match = re.fullmatch(pattern, name)
        if match is None:
            continue
        shapes[f"base_model.model.{name}.lpt_shared_prompt"] = (config.prompt_length, hidden)
        if int(match.group(1)) >= config.shared_layers:
            shape = (config.num_groups, config.group_prompt_length, hidden)
            shapes[f"base_model.model.{name}.lpt_group_prompt"] = shape
    shapes["base_model.lpt_keys"] = (config.num_groups, hidden)
    shapes["base_model.lpt_head"] = (hidden, config.num_labels)
    return shapes
