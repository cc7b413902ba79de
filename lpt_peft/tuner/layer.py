"""The LPT tuner layer: an attention module that also attends to prompts given as extra keys and values."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lpt_peft.tuner.architectures import AttentionSpec
from lpt_peft.tuner.config import LPTConfig

_SUPPORTED_ATTENTION = ("eager", "sdpa")


def _trunc_normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    tensor = torch.empty(shape)
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)
    return tensor


class LPTLayer(BaseTunerLayer):
    """Bookkeeping shared by LPT tuner layers: which attributes hold adapter weights."""

    adapter_layer_names = ("lpt_shared_prompt", "lpt_group_prompt")
    other_param_names = ()
    # Keyword arguments the tuner sent through the enclosing layer for the current call (checked on arrival).
    _lpt_expected: set[str] | None = None


class LPTAttention(nn.Module, LPTLayer):
    """Wraps one attention module of a ViT so that prompts join its keys and values.

    A prompt token that enters a pre-norm layer and whose output is dropped afterwards (VPT-deep) changes the other
    tokens only through attention, as one more key `k_proj(LN(p))` and value `v_proj(LN(p))`, where LN is the layer's
    pre-attention norm. Computing just those is exact and cheaper than running the prompts through the whole block.
    Whatever the layer does with the attention output afterwards (residual, DINOv2's LayerScale, drop-path) only
    touches image tokens, so it needs no change.

    Per adapter, the layer holds its shared prompts `lpt_shared_prompt[name]` of shape `(prompt_length, hidden)` and,
    for layers after `shared_layers`, its slice of the group pool `lpt_group_prompt[name]` of shape
    `(num_groups, group_prompt_length, hidden)`. Which groups an image uses is decided by [`LPTModel`], which passes
    `lpt_group_indices` of shape `(batch, top_k)` through the layer call. `in_features` / `out_features` are the widths
    the wrapped attention maps between (both `hidden`), as peft's tuner layers expose them.

    Args:
        base_layer: The attention module being wrapped (e.g. `ViTAttention`, `CLIPAttention`).
        norm: The pre-attention norm of the enclosing transformer layer. Kept as a reference only, so that it is
            neither saved with the adapter nor counted twice.
        layer_idx: 0-based index of the transformer layer.
        adapter_name: Name of the first adapter.
        config: Its [`LPTConfig`].
        attention_spec: Names of the projections, scaling, dropout and head width on `base_layer`
            ([`~lpt_peft.tuner.architectures.AttentionSpec`]); the default is the ViT layout (`q_proj`, `k_proj`,
            `v_proj`, `o_proj`, `scaling`, `attention_dropout`, `head_dim`).

    Example:

    ```python
    >>> import lpt_peft
    >>> from peft import get_peft_model
    >>> from transformers import CLIPVisionConfig, CLIPVisionModel

    >>> clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                         num_attention_heads=4, image_size=16, patch_size=4))
    >>> model = get_peft_model(clip, lpt_peft.LPTConfig(num_labels=3, shared_layers=1, num_groups=4))
    >>> type(model.base_model.model.encoder.layers[0].self_attn).__name__
    'LPTAttention'
    ```
    """

    def __init__(
        self,
        base_layer: nn.Module,
        norm: nn.Module,
        layer_idx: int,
        adapter_name: str,
        config: LPTConfig,
        attention_spec: AttentionSpec | None = None,
    ) -> None:
        super().__init__()
        spec = attention_spec if attention_spec is not None else AttentionSpec()
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"attention_spec must be an AttentionSpec, got {type(spec).__name__}.")
        spec.validate(base_layer)
        self.base_layer = base_layer
        self._norm = (norm,)
        self.layer_idx = layer_idx
        self.attention_spec = spec
        # peft's tuner-layer contract (used e.g. by `get_layer_status`): the widths the wrapped module maps between.
        # An attention block maps `hidden` features to `hidden` features; None if a projection is not Linear-like.
        self.in_features = getattr(spec.projection(base_layer, "query"), "in_features", None)
        self.out_features = getattr(spec.projection(base_layer, "output"), "out_features", None)
        self.lpt_shared_prompt = nn.ParameterDict()
        self.lpt_group_prompt = nn.ParameterDict()
        self.frozen_peft_weight_names = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def norm(self) -> nn.Module:
        return self._norm[0]

    def update_layer(self, adapter_name: str, config: LPTConfig) -> None:
        """Create the prompts of `adapter_name` for this layer."""
        hidden = config.hidden_size
        device, dtype = self._base_device_and_dtype()
        self.lpt_shared_prompt[adapter_name] = nn.Parameter(
            _trunc_normal((config.prompt_length, hidden), config.prompt_init_std).to(device=device, dtype=dtype)
        )
        if self.layer_idx >= config.shared_layers:
            shape = (config.num_groups, config.group_prompt_length, hidden)
            self.lpt_group_prompt[adapter_name] = nn.Parameter(
                _trunc_normal(shape, config.prompt_init_std).to(device=device, dtype=dtype)
            )
        self.set_phase(adapter_name, config.phase)

    def _base_device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = self.attention_spec.projection(self.base_layer, "key").weight
        # peft's contract: adapter weights take the base layer's dtype; `PeftModel` then calls the tuner's
        # `_cast_adapter_dtype`, which upcasts half precision to float32 unless `autocast_adapter_dtype=False`.
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        return weight.device, dtype

    def set_phase(self, adapter_name: str, phase: int) -> None:
        """Declare which prompts of `adapter_name` train: the shared ones in phase 1, the group pool in phase 2."""
        frozen = "lpt_group_prompt" if phase == 1 else "lpt_shared_prompt"
        self.frozen_peft_weight_names[adapter_name] = (frozen,)

    def _active_prompt_adapter(self) -> str | None:
        return single_active_adapter(self.active_adapters, self.lpt_shared_prompt)

    def _prompt_key_value(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of prompts `(P, D)` or `(batch, P, D)` as rows `(1 or batch, P, D)`."""
        normed = self.norm(prompts)
        if normed.dim() == 2:
            normed = normed.unsqueeze(0)
        spec = self.attention_spec
        return spec.projection(self.base_layer, "key")(normed), spec.projection(self.base_layer, "value")(normed)

    def group_prompts(self, adapter_name: str, group_indices: torch.Tensor) -> torch.Tensor:
        """Per-image group prompts `(batch, group_prompt_length, hidden)`: the mean of the selected groups."""
        return self.lpt_group_prompt[adapter_name][group_indices].mean(dim=1)

    def _prompts_and_tokens(self, which: str, context: torch.Tensor, prompt_rows: list[torch.Tensor]) -> torch.Tensor:
        """`[prompt rows; projection(context)]` as one `(batch, P + N, hidden)` tensor, without concatenating.

        The token keys/values are projected straight into the rows of a buffer whose first P rows hold the prompts'
        (see [`_ProjectAfterPrompts`]): concatenating them afterwards would copy every token key and value once more
        per layer, which the GPU profile showed as 17% of phase-1 inference. A projection that is not a plain
        `nn.Linear` (a wrapped or quantised one) is called as it is and its output concatenated. So is every
        projection under `torch.compile`: Dynamo cannot trace an `out=` into a view (it would break the graph in
        every layer), and Inductor already writes the inputs of a concatenation straight into its output.
        """
        projection = self.attention_spec.projection(self.base_layer, which)
        batch = context.shape[0]
        if type(projection) is not nn.Linear or torch.compiler.is_compiling():
            tokens = projection(context)
            return torch.cat([rows.expand(batch, -1, -1).to(tokens.dtype) for rows in prompt_rows] + [tokens], dim=1)
        weight, bias = projection.weight, projection.bias
        dtype = _compute_dtype(context)
        # `out=` matmuls are exempt from autocast, so cast to the dtype autocast would have given F.linear.
        if weight.dtype != dtype:
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        prompt_rows = [rows if rows.dtype == dtype else rows.to(dtype) for rows in prompt_rows]
        return _ProjectAfterPrompts.apply(context.to(dtype), weight, bias, *prompt_rows)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        lpt_group_indices: torch.Tensor | None = None,
        lpt_context: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor:
        base = self.base_layer
        adapter = None if self.disable_adapters else self._active_prompt_adapter()
        if adapter is None:
            return base(hidden_states, attention_mask, **kwargs)
        expected = getattr(self, "_lpt_expected", None)
        received = {"lpt_context": lpt_context, "lpt_group_indices": lpt_group_indices}
        if expected and any(received[name] is None for name in expected):
            raise ValueError(
                f"The layer around {type(base).__name__} does not pass keyword arguments on to its attention module, "
                "so LPT's group prompts and class-token-only last layer cannot reach it. Make the layer forward "
                "`**kwargs` to the attention call (as transformers' ViT layers do); for phase 1 alone, "
                "`cls_only_last_layer=False` in its LPTArchitecture also works."
            )

        attn_impl = base.config._attn_implementation
        if attn_impl not in _SUPPORTED_ATTENTION and not attn_impl.startswith("flash"):
            raise NotImplementedError(
                f"LPT does not support attn_implementation={attn_impl!r}: its prompts lengthen the key/value "
                "sequence, which a flex_attention BlockMask built for the image tokens does not cover. Load the "
                "backbone with attn_implementation='sdpa' (fast, fused) or 'eager'."
            )

        spec = self.attention_spec
        input_shape = hidden_states.shape[:-1]
        head_dim = spec.get_head_dim(base)
        hidden_shape = (*input_shape, -1, head_dim)
        query = spec.projection(base, "query")(hidden_states).view(hidden_shape).transpose(1, 2)
        # `lpt_context`: the layer runs for a few query rows only (the class token in the last layer of a pass),
        # while every token still serves as key and value, normalised by this layer's own pre-attention norm.
        context = hidden_states if lpt_context is None else self.norm(lpt_context)

        dtype = hidden_states.dtype
        shared = self.lpt_shared_prompt[adapter]
        prompts = [self._prompt_key_value(shared if shared.dtype == dtype else shared.to(dtype))]
        if lpt_group_indices is not None and adapter in self.lpt_group_prompt:
            prompts.append(self._prompt_key_value(self.group_prompts(adapter, lpt_group_indices).to(dtype)))
        num_prompts = sum(key.shape[1] for key, _ in prompts)
        dropout = spec.get_dropout(base)
        num_null = _num_null_keys(attn_impl, context, num_prompts, dropout)
        if num_null:
            null = prompts[0][0].new_zeros(1, num_null, prompts[0][0].shape[-1])
            prompts.insert(0, (null, null))
        # Keys and values as (batch, [null keys;] prompts + tokens, hidden) rows, prompts first; then split into heads.
        key = self._prompts_and_tokens("key", context, [key for key, _ in prompts])
        value = self._prompts_and_tokens("value", context, [value for _, value in prompts])
        key_shape = (*key.shape[:-1], -1, head_dim)
        key = key.view(key_shape).transpose(1, 2)
        value = value.view(key_shape).transpose(1, 2)
        if attention_mask is None and num_null:
            attention_mask = torch.ones(1, 1, 1, context.shape[1], dtype=torch.bool, device=context.device)
        attention_mask = _pad_attention_mask(attention_mask, num_prompts, num_null)

        eager = spec.eager_attention or _eager_attention_of(base)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(attn_impl, eager)
        # Image encoders attend both ways. Said explicitly because sdpa treats a module without `is_causal` as causal,
        # and with prompts the key sequence is longer than the query sequence, so a causal mask would also misalign.
        kwargs["is_causal"] = False
        attn_output, attn_weights = attention_interface(
            base,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=spec.get_scaling(base),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = spec.projection(base, "output")(attn_output)
        return (attn_output, attn_weights) if spec.returns_weights else attn_output

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "LPT prompts cannot be merged into the backbone weights: they are extra keys/values chosen per image, not "
            "a weight update. Keep the PeftModel for inference, or use `unload()` to get the plain backbone back."
        )

    def unmerge(self) -> None:
        warnings.warn("LPT adapters are never merged; nothing to unmerge.", stacklevel=2)

    def __repr__(self) -> str:
        return "lpt." + super().__repr__()


def single_active_adapter(active_adapters, available) -> str | None:
    """The one active LPT adapter among `available`, None if there is none, a clear error if there are several."""
    active = [name for name in active_adapters if name in available]
    if len(active) > 1:
        raise ValueError(
            f"LPT runs one adapter at a time, but {active} are active. Call `model.set_adapter(name)` with a "
            "single adapter name."
        )
    return active[0] if active else None


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` would compute in for `tensor`: the autocast dtype inside an autocast region."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


# Devices whose batched matmul into the buffer's strided rows is slower than one matmul and a copy. On CPU, `baddbmm`
# with such an `out=` broadcasts the bias into it and then runs one small GEMM per image: B = 32, 50 tokens, width
# 192, 1 thread: 1.44 ms per projection against 1.28 ms for `F.linear` + copy (the frozen ViT's `F.linear`: 1.07 ms).
# cuBLAS' strided-batched GEMM writes the strided rows directly, so accelerators keep the copy-free path.
_PROJECT_THEN_COPY_DEVICES = ("cpu",)


class _ProjectAfterPrompts(torch.autograd.Function):
    """`cat([*prompt_rows, tokens @ weight.T + bias], dim=1)`, with the projection written in place into the buffer.

    Forward: one `(batch, P + N, out)` buffer; the prompt rows `(1 or batch, P_i, out)` are copied in (P is 10-20
    rows), and the tokens `(batch, N, in)` are projected by one batched matmul whose `out=` is the buffer's last N
    rows, so the token keys/values are written once (on CPU, where that is slower, by one `F.linear` and a copy into
    those rows: see `_PROJECT_THEN_COPY_DEVICES`). `out=` ops do not record autograd history, hence this Function
    and its backward, which is that of the linear layer and of the concatenation: the tokens get `grad @ weight`,
    the weight `grad^T @ tokens`, the bias the summed rows, each prompt its rows (summed over the batch if broadcast).
    """

    @staticmethod
    def forward(ctx, tokens, weight, bias, *prompt_rows):
        batch, num_tokens, _ = tokens.shape
        sizes = [rows.shape[1] for rows in prompt_rows]
        num_prompts = sum(sizes)
        out = tokens.new_empty(batch, num_prompts + num_tokens, weight.shape[0])
        start = 0
        for rows, size in zip(prompt_rows, sizes):
            out[:, start : start + size] = rows
            start += size
        token_rows = out[:, num_prompts:]
        if out.device.type in _PROJECT_THEN_COPY_DEVICES:
            token_rows.copy_(nn.functional.linear(tokens, weight, bias))
        elif bias is None:
            torch.bmm(tokens, weight.t().expand(batch, -1, -1), out=token_rows)
        else:
            torch.baddbmm(bias, tokens, weight.t().expand(batch, -1, -1), out=token_rows)
        # Like F.linear's own backward, keep only what a needed gradient uses: the tokens for the weight's gradient,
        # the weight for the tokens'. With a frozen projection (every LPT phase) the tokens are then not kept alive
        # until the backward, which otherwise held one (batch, tokens, hidden) tensor per layer (+9% peak memory).
        needs_tokens, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(tokens if needs_weight else None, weight if needs_tokens else None)
        ctx.sizes = sizes
        ctx.prompt_batches = [rows.shape[0] for rows in prompt_rows]
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        tokens, weight = ctx.saved_tensors
        num_prompts = sum(ctx.sizes)
        grad_tokens_out = grad[:, num_prompts:]
        grad_tokens = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_tokens = grad_tokens_out @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = grad_tokens_out.flatten(0, 1).t() @ tokens.flatten(0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_tokens_out.sum(dim=(0, 1))
        grad_prompts, start = [], 0
        for size, prompt_batch, needed in zip(ctx.sizes, ctx.prompt_batches, ctx.needs_input_grad[3:]):
            rows = grad[:, start : start + size]
            start += size
            grad_prompts.append((rows.sum(0, keepdim=True) if prompt_batch == 1 else rows) if needed else None)
        return grad_tokens, grad_weight, grad_bias, *grad_prompts


# PyTorch's CPU SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`) runs a key sequence whose length is a
# multiple of 16 markedly faster than one with a ragged tail (measured on a 2-core AVX-512 Intel VM, torch 2.13; other
# CPUs unmeasured): B = 32, 3 heads, 50 queries, 1 thread: 60 keys 1979 us, the same 60 plus 4 masked null keys
# 1595 us; 70 keys 2097 us, 70 + 10 masked 1752 us; in bf16 the whole phase-1 forward is 25% faster. LPT's prompts
# make ViT key lengths ragged (10 + 50, 10 + 10 + 50), so on CPU the key sequence is rounded up with masked zero keys,
# which add exactly 0 to every softmax sum. Not where they would not help or would change something: accelerator
# kernels take any length (and a mask would keep them off flash attention); a graph being exported or traced is meant
# to run anywhere (ONNX Runtime measured 3-5% slower with them); attention dropout would draw a different random
# stream and measured slower; float64 measured no faster.
_CPU_SDPA_KEY_MULTIPLE = 16
_NULL_KEY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _num_null_keys(attn_impl: str, context: torch.Tensor, num_prompts: int, dropout: float = 0.0) -> int:
    """How many masked zero keys round `num_prompts + tokens` up to `_CPU_SDPA_KEY_MULTIPLE` (0 where none help)."""
    if (
        attn_impl != "sdpa"
        or context.device.type != "cpu"
        or not _CPU_SDPA_KEY_MULTIPLE
        or dropout > 0
        or _compute_dtype(context) not in _NULL_KEY_DTYPES
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
    ):
        return 0
    return -(num_prompts + context.shape[1]) % _CPU_SDPA_KEY_MULTIPLE


def _pad_attention_mask(attention_mask, num_prompts: int, num_null: int = 0):
    """Let every query attend to the prompts prepended to the keys, and to none of the null keys before them.

    Args:
        attention_mask: The layer's mask `(..., queries, tokens)`, boolean (True: attend) or additive, or None.
        num_prompts: Prompt keys prepended to the tokens.
        num_null: Masked zero keys prepended before the prompts (see `_num_null_keys`); they need a mask to exclude
            them, so `attention_mask` must then be given (all True for a layer without one).

    Returns:
        The mask over `(null keys, prompts, tokens)`, or None if `attention_mask` is None.
    """
    if attention_mask is None:
        if num_null:
            raise ValueError("Null keys need an attention mask that excludes them; pass an all-True mask.")
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f"LPT cannot extend an attention mask of type {type(attention_mask).__name__} with its prompts. Use "
            "attn_implementation='sdpa' or 'eager'."
        )
    # Prompt columns: True for a boolean mask, 0 for an additive one; null columns: False, or the dtype's minimum
    # (as transformers' additive masks), whose exp underflows to exactly 0 next to the prompts' and tokens' scores.
    boolean = attention_mask.dtype == torch.bool
    shape = (*attention_mask.shape[:-1], num_null + num_prompts + attention_mask.shape[-1])
    padded = attention_mask.new_full(shape, True if boolean else 0)
    padded[..., :num_null] = False if boolean else torch.finfo(attention_mask.dtype).min
    padded[..., num_null + num_prompts :] = attention_mask
    return padded


def _eager_attention_of(module: nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file, so each architecture keeps its semantics."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        from transformers.models.vit.modeling_vit import eager_attention_forward as eager
    return eager
