"""The one reference forward of the test suite: LPT with prompts as real tokens (VPT-deep, as the authors run it).

LPT's layers never insert the prompts into the sequence: they add their keys and values to each attention. The oracle
here does the obvious, slow thing instead. In every layer the prompts join the sequence as tokens right after the
family's prefix tokens (CLS; DeiT's distillation token; DINOv2's registers), the unmodified layer runs, and the
prompts' outputs are dropped before the next layer. Phase 2 is the authors' two passes: a query pass with the shared
prompts, top-k keys by cosine, then a main pass from the input with the shared prompts plus the mean of the chosen
groups' prompts. Nothing here uses `lpt_peft.tuner.architectures`: each family's embeddings, layers and final norm
are written out from transformers' own modules (or, for the converters, from raw timm tensors by the caller).

Shapes: `prompts[i]` is `(1 or batch, P_i, hidden)`; features `(batch, hidden)`; logits `(batch, classes)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lpt_peft import LPTAttention


def cosine(a: torch.Tensor, b_columns: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the rows of `a` `(n, d)` with the columns of `b_columns` `(d, m)`: `(n, m)`."""
    return (a / a.norm(dim=-1, keepdim=True)) @ (b_columns / b_columns.norm(dim=0, keepdim=True))


def vpt_deep(
    hidden: torch.Tensor,
    layers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    prompts: Sequence[torch.Tensor],
    num_prefix: int = 1,
) -> torch.Tensor:
    """Run `layers` on `hidden` `(batch, tokens, d)` with `prompts[i]` inserted after the first `num_prefix` tokens.

    Each layer is a callable `(batch, tokens, d) -> (batch, tokens, d)`. The prompts' outputs are dropped after each
    layer, so every layer sees fresh prompts. Returns the final hidden states (without prompts), before any norm.
    """
    batch = hidden.shape[0]
    for layer, layer_prompts in zip(layers, prompts, strict=True):
        p = layer_prompts.expand(batch, -1, -1)
        x = layer(torch.cat([hidden[:, :num_prefix], p, hidden[:, num_prefix:]], dim=1))
        hidden = torch.cat([x[:, :num_prefix], x[:, num_prefix + p.shape[1] :]], dim=1)
    return hidden


def num_prefix_tokens(encoder: nn.Module) -> int:
    """Tokens before the patches: CLS, plus DeiT's distillation token or DINOv2's registers."""
    config = encoder.config
    if config.model_type == "deit":
        return 2
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def token_features(encoder: nn.Module, prompts: Sequence[torch.Tensor], pixel_values: torch.Tensor, token: int = 0):
    """The image feature with prompts as tokens: the final-norm state of `token`, for every built-in family.

    Args:
        encoder: The bare encoder (`ViTModel`, `DeiTModel`, `Dinov2Model`, `Dinov2WithRegistersModel`,
            `CLIPVisionModel`, or a task model's encoder attribute).
        prompts: One `(1 or batch, P_i, hidden)` tensor per layer (`P_i` may be 0).
        pixel_values: `(batch, 3, H, W)`.
        token: Index of the feature token (DeiT's distillation token is 1).
    """
    model_type = encoder.config.model_type
    if model_type == "clip_vision_model":
        # CLIP normalises the embeddings first, and its final norm is applied to the pooled token only.
        hidden = encoder.pre_layrnorm(encoder.embeddings(pixel_values))
        layers, final_norm = encoder.encoder.layers, encoder.post_layernorm
    elif model_type in ("dinov2", "dinov2_with_registers"):
        hidden, layers, final_norm = encoder.embeddings(pixel_values), encoder.encoder.layer, encoder.layernorm
    elif model_type in ("vit", "deit", "vit_msn"):
        hidden, layers, final_norm = encoder.embeddings(pixel_values), encoder.layers, encoder.layernorm
    else:
        raise AssertionError(f"the oracle does not know the {model_type!r} family")
    steps = [lambda x, layer=layer: layer(x, None) for layer in layers]
    hidden = vpt_deep(hidden, steps, prompts, num_prefix_tokens(encoder))
    return final_norm(hidden[:, token])


def adapter_tensors(model, name: str = "default"):
    """`(shared, pool, keys, head)` of one adapter: shared `[(P, d)] * L`, pool `{layer: (m, Pg, d)}`, keys `(m, d)`,
    head `(d, C)`, read from the LPT layers in layer order."""
    layers = sorted((m for m in model.modules() if isinstance(m, LPTAttention)), key=lambda m: m.layer_idx)
    assert [m.layer_idx for m in layers] == list(range(len(layers)))
    shared = [m.lpt_shared_prompt[name].detach() for m in layers]
    pool = {m.layer_idx: m.lpt_group_prompt[name].detach() for m in layers if name in m.lpt_group_prompt}
    tuner = model.base_model
    return shared, pool, tuner.lpt_keys[name].detach(), tuner.lpt_head[name].detach()


@dataclass
class OracleOutput:
    features: torch.Tensor  # (batch, d)
    logits: torch.Tensor  # (batch, C) cosines
    query: torch.Tensor | None = None  # (batch, d), phase 2
    key_similarity: torch.Tensor | None = None  # (batch, m), phase 2
    group_indices: torch.Tensor | None = None  # (batch, top_k), phase 2
    match_score: torch.Tensor | None = None  # scalar, phase 2


def lpt_oracle(features_fn, shared, pool, keys, head, phase: int, top_k: int = 2, shared_layers: int = 2):
    """LPT from its tensors, given `features_fn(prompts) -> (batch, d)` that runs prompts as tokens.

    Phase 1: shared prompts in every layer. Phase 2: a query pass with the shared prompts; the `top_k` keys of
    highest cosine; a main pass with the shared prompts in the first `shared_layers` layers and shared plus the mean
    of the chosen groups' prompts after them; `match_score` is the batch mean of the summed chosen cosines.
    """
    shared_only = [p.unsqueeze(0) if p.dim() == 2 else p for p in shared]
    query = features_fn(shared_only)
    if phase == 1:
        return OracleOutput(query, cosine(query, head))
    sim = cosine(query, keys.T)
    idx = sim.topk(top_k, dim=-1).indices
    batch = query.shape[0]
    prompts = []
    for i, p in enumerate(shared_only):
        if i < shared_layers:
            prompts.append(p)
        else:
            group = torch.stack([pool[i][idx[b]].mean(dim=0) for b in range(batch)])
            prompts.append(torch.cat([p.expand(batch, -1, -1), group], dim=1))
    features = features_fn(prompts)
    match = torch.stack([sim[b, idx[b]].sum() for b in range(batch)]).mean()
    return OracleOutput(features, cosine(features, head), query, sim, idx, match)


def model_oracle(encoder: nn.Module, model, pixel_values: torch.Tensor, token: int = 0, adapter: str = "default"):
    """The oracle of the LPT `PeftModel` `model`, computed on `encoder`, an untouched copy of its base's encoder."""
    config = model.peft_config[adapter]
    shared, pool, keys, head = adapter_tensors(model, adapter)
    return lpt_oracle(
        lambda prompts: token_features(encoder, prompts, pixel_values, token),
        shared,
        pool,
        keys,
        head,
        phase=config.phase,
        top_k=config.top_k,
        shared_layers=config.shared_layers,
    )


def assert_matches_oracle(out, expected: OracleOutput, atol: float = 1e-5) -> None:
    """Every output the oracle defines equals the model's to `atol`; the chosen groups are identical."""
    torch.testing.assert_close(out.features, expected.features, atol=atol, rtol=0)
    torch.testing.assert_close(out.logits, expected.logits, atol=atol, rtol=0)
    if expected.group_indices is None:
        assert out.group_indices is None and out.match_score is None
        return
    assert torch.equal(out.group_indices, expected.group_indices)
    torch.testing.assert_close(out.query, expected.query, atol=atol, rtol=0)
    torch.testing.assert_close(out.key_similarity, expected.key_similarity, atol=atol, rtol=0)
    torch.testing.assert_close(out.match_score, expected.match_score, atol=atol, rtol=0)
