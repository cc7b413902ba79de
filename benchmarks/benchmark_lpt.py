"""Speed and memory of LPT side by side: frozen ViT, VPT-deep, LPT as the authors compute it, and lpt_peft.

All configurations run in one process on the same backbone (random weights), the same batch and the same machine:

1. `frozen`: the frozen ViT alone with a cosine head (the floor; its "training step" is a linear probe).
2. `vpt_deep`: VPT-deep written here, prompts as real tokens after CLS in every block, outputs dropped per layer.
3. `lpt_reference`: LPT as the authors compute it, with prompts as tokens: a query pass and a main pass, both from
   the input (2L layer passes); shared prompts in every layer, shared + per-image mean group prompts after layer K.
4. `lpt_phase1` / `lpt_phase2`: this project's PEFT model (prompts as extra keys/values; phase 2 runs layers 1..K
   once, L + (L - K) layer passes).

Timing runs the configurations round-robin: one call of each per round, the order reversed every other round and
chosen so that the configurations a target compares run back to back. Warm-up rounds are dropped; per configuration
the median, minimum and maximum are reported, and each ratio is the median over rounds of the ratio of two calls made
back to back, which cancels most of the drift in machine speed when other jobs share the cores (a matmul probe
timed every round shows how much the speed drifted).
A training step is forward + backward + SGD step on the dual-sampling batch: the class-balanced and the
instance-balanced batch (B images each) concatenated into one forward of 2B images, random labels, loss =
CE(20 * logits) of each half (the instance-balanced half weighted by beta = 0.5) - 0.5 * matching score per half
(phase 2 and the reference only).

Compiled configurations (`--compile both`): `frozen+compile`, `lpt_phase1+compile` and `lpt_phase2+compile` are
`torch.compile(system)` (default mode) of the eager modules, timed for inference beside them in the same rounds (their
training step is not timed; `--compile replace` times compiled training steps). The floor of each round is the faster
of the eager and the compiled frozen ViT, and each LPT configuration, eager and compiled, gets its ratio to that floor
(paired per round like the other ratios), with issue 11's GPU targets at B = 128 and 32; the compiled over the eager
frozen ViT shows whether compiling the floor pays at all. The equivalence checks compare every compiled copy with its
eager module (fp32, the whole inference batch, max |diff| <= 1e-5).

Peak training memory is measured for each configuration in a fresh subprocess that builds only that configuration:
on CUDA, `torch.cuda.max_memory_allocated()` after a reset, minus what was allocated before the step; on CPU, the
growth of the peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the resident set just before
the step, with glibc told to serve every allocation >= 64 KiB by mmap so that freed tensors leave the resident set.

Usage:

```bash
python benchmarks/benchmark_lpt.py --preset cpu                      # ~3-4 min on a quiet 2-core machine
python benchmarks/benchmark_lpt.py --preset cpu --threads 1          # steadier when other jobs share the cores
python benchmarks/benchmark_lpt.py --preset gpu                      # ViT-B/16 at 224, bf16 autocast, SDPA
python benchmarks/benchmark_lpt.py --preset gpu --device cpu --batch-size 2 --repeats 1 --warmup 1   # smoke test
python benchmarks/benchmark_lpt.py --preset cpu --json-out results.json --markdown-out results.md
python benchmarks/benchmark_lpt.py --preset cpu --profile lpt_phase2:infer   # torch.profiler table of one config
python benchmarks/benchmark_lpt.py --preset gpu --batch-size 32 --compile   # = --compile replace: all compiled
python benchmarks/benchmark_lpt.py --preset gpu --batch_sizes 128,32 --compile both --configs frozen lpt_phase1 \
    lpt_phase2 --no-memory                  # eager and compiled side by side, ratios to the eager/compiled floor
```
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CONFIGS: dict[str, str] = {
    "frozen": "frozen ViT (floor)",
    "vpt_deep": "VPT-deep, prompts as tokens",
    "lpt_reference": "LPT as the authors compute it (tokens, 2L passes)",
    "lpt_phase1": "lpt_peft phase 1",
    "lpt_phase2": "lpt_peft phase 2",
}
# `--compile both`: these configurations get a compiled copy named `<name>+compile` (inference timing only).
COMPILED_SUFFIX = "+compile"
COMPILE_BESIDE = ("frozen", "lpt_phase1", "lpt_phase2")
# Tolerance of a compiled copy against its eager module (fp32 logits and matching scores, max |diff|).
COMPILED_TOLERANCE = 1e-5
LOGIT_SCALE = 20.0
MATCH_WEIGHT = 0.5
BETA = 0.5  # weight of the instance-balanced half (beta(e) = 0.5 * (E - e) / E at epoch 0)
MEMORY_RESULT_TAG = "LPT_BENCH_MEMORY "


@dataclass
class Settings:
    """Everything that defines a benchmark run (a preset, then command-line overrides)."""

    preset: str
    device: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    shared_layers: int
    num_labels: int
    batch_size: int
    repeats: int
    warmup: int
    threads: int | None
    amp: str
    prompt_length: int = 10
    num_groups: int = 20
    top_k: int = 2
    memory_repeats: int = 3
    infer_repeats: int | None = None  # None: 3 x repeats (an inference round is several times cheaper)
    seed: int = 0


PRESETS: dict[str, dict] = {
    # A ViT with ViT-B's depth and LPT's K = 6 of 12, narrow enough for a 2-core machine.
    "cpu": {
        "device": "cpu",
        "hidden_size": 192,
        "num_layers": 12,
        "num_heads": 3,
        "intermediate_size": 768,
        "patch_size": 16,
        "image_size": 112,
        "shared_layers": 6,
        "num_labels": 100,
        "batch_size": 32,
        "repeats": 9,
        "warmup": 2,
        "threads": 2,
        "amp": "none",
    },
    # ViT-B/16 at 224 px, as in the paper; Places-LT's 365 classes.
    "gpu": {
        "device": "cuda",
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 16,
        "image_size": 224,
        "shared_layers": 6,
        "num_labels": 365,
        "batch_size": 128,
        "repeats": 20,
        "warmup": 5,
        "threads": None,
        "amp": "bf16",
    },
}


# ---------------------------------------------------------------------------------------------------- models
def cosine_logits(features: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1) @ F.normalize(class_weight.float(), dim=0)


def build_backbone(settings: Settings, device: torch.device) -> nn.Module:
    """A frozen random ViT (SDPA attention, LayerNorm eps 1e-5, no dropout, no pooler), reproducible from the seed."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(settings.seed)
    vit = ViTModel(config, add_pooling_layer=False)
    return vit.requires_grad_(False).to(device).eval()


def make_adapter_tensors(settings: Settings) -> dict[str, torch.Tensor]:
    """Prompts, group pool, keys and head shared by every configuration, so that they compute the same function."""
    gen = torch.Generator().manual_seed(settings.seed + 1)
    std = 0.02

    def trunc_normal(*shape: int) -> torch.Tensor:
        return nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std, generator=gen)

    d, layers, k = settings.hidden_size, settings.num_layers, settings.shared_layers
    head = torch.randn(d, settings.num_labels, generator=gen)
    return {
        "shared": trunc_normal(layers, settings.prompt_length, d),
        "pool": trunc_normal(layers - k, settings.num_groups, settings.prompt_length, d),
        # Keys spread as widely as the features, so that images do not all pick the same two groups.
        "keys": torch.randn(settings.num_groups, d, generator=gen),
        "head": head / head.norm(dim=0, keepdim=True),
    }


class FrozenViT(nn.Module):
    """The floor: the frozen ViT's CLS feature and a cosine head (training updates only the head)."""

    def __init__(self, vit: nn.Module, tensors: dict[str, torch.Tensor], dropout: float = 0.1) -> None:
        super().__init__()
        self.vit = vit
        self.head = nn.Parameter(tensors["head"].clone())
        self.dropout = dropout

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, None]:
        features = self.vit(pixel_values=pixel_values).last_hidden_state[:, 0]
        features = F.dropout(features, self.dropout, self.training)
        return cosine_logits(features, self.head), None


class TokenPromptViT(nn.Module):
    """Prompts as real tokens, the way VPT-deep and the authors' LPT code run them.

    With `groups=False` this is VPT-deep (shared prompts train). With `groups=True` it is LPT phase 2 as the authors
    compute it: a query pass through all layers with the shared prompts, then a main pass that starts again from the
    input, with shared prompts in every layer and the per-image mean of the top-k group prompts after layer K.
    """

    def __init__(
        self,
        vit: nn.Module,
        tensors: dict[str, torch.Tensor],
        shared_layers: int,
        top_k: int,
        groups: bool,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.shared_layers = shared_layers
        self.top_k = top_k
        self.groups = groups
        self.dropout = dropout
        self.shared = nn.Parameter(tensors["shared"].clone(), requires_grad=not groups)
        self.head = nn.Parameter(tensors["head"].clone())
        if groups:
            self.pool = nn.Parameter(tensors["pool"].clone())
            self.keys = nn.Parameter(tensors["keys"].clone())

    def _run_layers(self, hidden: torch.Tensor, prompts: Callable[[int], torch.Tensor], start: int) -> torch.Tensor:
        batch = hidden.shape[0]
        for i in range(start, len(self.vit.layers)):
            p = prompts(i).to(hidden.dtype).expand(batch, -1, -1)
            x = torch.cat([hidden[:, :1], p, hidden[:, 1:]], dim=1)
            x = self.vit.layers[i](x, None)
            hidden = torch.cat([x[:, :1], x[:, 1 + p.shape[1] :]], dim=1)
        return self.vit.layernorm(hidden)[:, 0]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixel_values = pixel_values.to(self.vit.embeddings.patch_embeddings.projection.weight.dtype)
        shared = self.shared.unsqueeze(1)  # (L, 1, P, D)
        match = None
        if not self.groups:
            features = self._run_layers(self.vit.embeddings(pixel_values), lambda i: shared[i], 0)
        else:
            with torch.no_grad():
                query = self._run_layers(self.vit.embeddings(pixel_values), lambda i: shared[i], 0)
            similarity = F.normalize(query.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).T
            indices = similarity.detach().topk(self.top_k, dim=-1).indices
            match = similarity.gather(1, indices).sum(dim=1)
            k = self.shared_layers

            def prompts(i: int) -> torch.Tensor:
                if i < k:
                    return shared[i]
                group = self.pool[i - k][indices].mean(dim=1)  # (B, P, D)
                return torch.cat([shared[i].expand(group.shape[0], -1, -1), group], dim=1)

            features = self._run_layers(self.vit.embeddings(pixel_values), prompts, 0)
        features = F.dropout(features, self.dropout, self.training)
        return cosine_logits(features, self.head), match


class PeftLPT(nn.Module):
    """This project's model, returning the same `(logits, per-image matching score)` pair as the references."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.peft_model(pixel_values=pixel_values)
        match = None
        if out.key_similarity is not None:
            match = out.key_similarity.gather(1, out.group_indices).sum(dim=1)
        return out.logits, match


def build_peft(backbone: nn.Module, settings: Settings, tensors: dict[str, torch.Tensor], phase: int) -> PeftLPT:
    from peft import get_peft_model

    import lpt_peft

    config = lpt_peft.LPTConfig(
        num_labels=settings.num_labels,
        shared_layers=settings.shared_layers,
        prompt_length=settings.prompt_length,
        num_groups=settings.num_groups,
        group_prompt_length=settings.prompt_length,
        top_k=settings.top_k,
    )
    model = get_peft_model(copy.deepcopy(backbone), config)
    tuner = model.base_model
    with torch.no_grad():
        for i, layer in enumerate(tuner.model.layers):
            layer.attention.lpt_shared_prompt["default"].copy_(tensors["shared"][i])
            if i >= settings.shared_layers:
                layer.attention.lpt_group_prompt["default"].copy_(tensors["pool"][i - settings.shared_layers])
        tuner.lpt_keys["default"].copy_(tensors["keys"])
        tuner.lpt_head["default"].copy_(tensors["head"])
    if phase == 2:
        tuner.set_phase(2)
    return PeftLPT(model)


def build_systems(
    names: list[str], settings: Settings, device: torch.device, backbone: nn.Module | None = None
) -> dict[str, nn.Module]:
    backbone = backbone if backbone is not None else build_backbone(settings, device)
    tensors = {k: v.to(device) for k, v in make_adapter_tensors(settings).items()}
    k, top_k = settings.shared_layers, settings.top_k
    builders: dict[str, Callable[[], nn.Module]] = {
        # The references share the plain backbone (they do not modify it); each PEFT model gets its own copy.
        "frozen": lambda: FrozenViT(backbone, tensors),
        "vpt_deep": lambda: TokenPromptViT(backbone, tensors, k, top_k, groups=False),
        "lpt_reference": lambda: TokenPromptViT(backbone, tensors, k, top_k, groups=True),
        "lpt_phase1": lambda: build_peft(backbone, settings, tensors, phase=1),
        "lpt_phase2": lambda: build_peft(backbone, settings, tensors, phase=2),
    }
    return {name: builders[name]().to(device) for name in names}


def eager_name(name: str) -> str:
    """The eager configuration a name stands for: `lpt_phase1+compile` -> `lpt_phase1`."""
    return name.removesuffix(COMPILED_SUFFIX)


def describe(name: str) -> str:
    return CONFIGS[eager_name(name)] + (", torch.compile" if name.endswith(COMPILED_SUFFIX) else "")


def compiled_copies(systems: dict[str, nn.Module], backend: str = "inductor") -> dict[str, nn.Module]:
    """`torch.compile(system)` (default mode) of each `COMPILE_BESIDE` configuration present, as `<name>+compile`.

    A copy shares its eager module (compiling neither copies nor changes it), so eager and compiled compute with the
    same weights; the first call of a copy pays the compilation (equivalence check or warm-up round).
    """
    names = [name for name in COMPILE_BESIDE if name in systems]
    return {name + COMPILED_SUFFIX: torch.compile(systems[name], backend=backend) for name in names}


def layer_passes(name: str, settings: Settings) -> int:
    depth, k = settings.num_layers, settings.shared_layers
    return {"lpt_reference": 2 * depth, "lpt_phase2": 2 * depth - k}.get(eager_name(name), depth)


# ---------------------------------------------------------------------------------------------------- steps
def autocast(settings: Settings, device: torch.device) -> contextlib.AbstractContextManager:
    if settings.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def dual_loss(logits: torch.Tensor, labels: torch.Tensor, match: torch.Tensor | None) -> torch.Tensor:
    """A-GCL stand-in with LPT's structure: CE(cb) - 0.5 s(cb) + beta * [CE(ib) - 0.5 s(ib)], halves of one batch."""
    half = logits.shape[0] // 2
    losses = []
    for part in (slice(0, half), slice(half, None)):
        loss = F.cross_entropy(LOGIT_SCALE * logits[part].float(), labels[part])
        if match is not None:
            loss = loss - MATCH_WEIGHT * match[part].mean()
        losses.append(loss)
    return losses[0] + BETA * losses[1]


def make_optimizer(system: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in system.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=0.01)


def trainable_count(system: nn.Module) -> int:
    return sum(p.numel() for p in system.parameters() if p.requires_grad)


def make_inputs(settings: Settings, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(settings.seed + 2)
    b, s = settings.batch_size, settings.image_size
    return {
        "infer": torch.randn(b, 3, s, s, generator=gen).to(device),
        "train": torch.randn(2 * b, 3, s, s, generator=gen).to(device),
        "labels": torch.randint(settings.num_labels, (2 * b,), generator=gen).to(device),
    }


def infer_call(system: nn.Module, x: torch.Tensor, settings: Settings, device: torch.device) -> torch.Tensor:
    with torch.no_grad(), autocast(settings, device):
        return system(x)[0]


def train_call(
    system: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    settings: Settings,
    device: torch.device,
) -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast(settings, device):
        logits, match = system(x)
        loss = dual_loss(logits, labels, match)
    loss.backward()
    optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# Timing order: the configurations compared by a target run next to each other (phase 1 | frozen | phase 2 |
# reference), so that a paired ratio compares calls made within a second or two of each other.
# With `--compile both` the two frozen ViTs (the per-round floor) sit next to each other and to both phase-1 paths.
TIMING_ORDER = (
    "vpt_deep", "lpt_phase1+compile", "lpt_phase1", "frozen", "frozen+compile", "lpt_phase2", "lpt_phase2+compile",
    "lpt_reference",
)  # fmt: skip


def speed_probe(device: torch.device) -> float:
    """GFLOP/s of a fixed matmul: how fast the machine is right now (it drifts when other jobs share the cores)."""
    a = torch.ones(512, 512, device=device)
    seconds = timed(lambda: [a @ a for _ in range(8)], device)
    return 8 * 2 * 512**3 / seconds / 1e9


def round_robin(
    calls: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per call for each name, one call of each per round; warm-up rounds dropped.

    The order alternates forwards and backwards every round, so that neighbours in `TIMING_ORDER` always run back
    to back and each runs first as often as second. Also returns the speed probe of every measured round.
    """
    names = sorted(calls, key=lambda n: TIMING_ORDER.index(n) if n in TIMING_ORDER else len(TIMING_ORDER))
    times: dict[str, list[float]] = {name: [] for name in names}
    probes = []
    for r in range(warmup + repeats):
        probe = speed_probe(device)
        for name in names if r % 2 == 0 else names[::-1]:
            seconds = timed(calls[name], device)
            if r >= warmup:
                times[name].append(seconds)
        if r >= warmup:
            probes.append(probe)
    return times, probes


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ---------------------------------------------------------------------------------------------------- checks
def _max_diff(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    """Max |diff| of the logits and, where there is one, the per-image matching score of two systems (eval)."""
    ours.eval()
    ref.eval()
    with torch.no_grad():
        a, match_a = ours(x)
        b, match_b = ref(x)
    diff = (a - b).abs().max().item()
    if match_a is not None:
        diff = max(diff, (match_a - match_b).abs().max().item())
    return diff


@contextlib.contextmanager
def _strict_fp32():
    """No TF32 in CUDA matmuls and cuDNN convolutions (cuDNN allows it by default): fp32 checks mean fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def equivalence_check(systems: dict[str, nn.Module], inputs: dict, device: torch.device) -> dict[str, dict]:
    """Our phase 1 / phase 2 must compute what VPT-deep / the authors' two-pass LPT compute (fp32, eval, 4 images);
    each compiled copy what its eager module computes (fp32, the whole inference batch, `COMPILED_TOLERANCE`).

    The compiled copies see the inference batch itself, so they compile for the batch size they are then timed at.
    On CUDA, TF32 is off during the checks.
    """
    pairs = [("lpt_phase1", "vpt_deep", 4), ("lpt_phase2", "lpt_reference", 4)]
    pairs += [(name, eager_name(name), None) for name in systems if name.endswith(COMPILED_SUFFIX)]
    results = {}
    for ours, ref, count in pairs:
        if ours not in systems or ref not in systems:
            continue
        with _strict_fp32():
            diff = _max_diff(systems[ours], systems[ref], inputs["infer"][:count])
        if ours.endswith(COMPILED_SUFFIX):
            tol = COMPILED_TOLERANCE
        else:
            tol = 1e-4 if device.type == "cpu" else 2e-3
        results[f"{ours}_vs_{ref}"] = {"max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol}
    return results


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def sdpa_kernel_check(
    systems: dict[str, nn.Module], inputs: dict, settings: Settings, device: torch.device
) -> dict[str, dict]:
    """Does attention with LPT's extra keys stay on fused SDPA kernels?

    Two views: (1) which `aten::_scaled_dot_product_*` op the default dispatch picks (torch.profiler), and (2)
    whether the configuration runs at all when SDPA is restricted to one fused backend (it raises if that backend
    cannot take the shapes/dtypes) and whether its output matches the default dispatch.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    x = inputs["infer"][: min(8, settings.batch_size)]
    labels = inputs["labels"][: 2 * x.shape[0]]
    x_train = inputs["train"][: 2 * x.shape[0]]
    cases = [(n, "infer") for n in ("frozen", "lpt_phase1", "lpt_phase2") if n in systems]
    cases += [("lpt_phase2", "train")] if "lpt_phase2" in systems else []
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if device.type == "cuda":
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION

    def run(name: str, mode: str) -> torch.Tensor:
        system = systems[name]
        torch.manual_seed(settings.seed)  # same dropout mask under every backend
        if mode == "infer":
            system.eval()
            return infer_call(system, x, settings, device).float()
        system.train()
        system.zero_grad(set_to_none=True)
        with autocast(settings, device):
            logits, match = system(x_train)
            loss = dual_loss(logits, labels, match)
        loss.backward()
        return logits.detach().float()

    results: dict[str, dict] = {}
    for name, mode in cases:
        case = f"{name}:{mode}"
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            reference = run(name, mode)
        ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key})
        results[case] = {"default_dispatch_ops": ops}
        for label, backend in backends.items():
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with sdpa_kernel([backend]):
                        out = run(name, mode)
                diff = (out - reference).abs().max().item()
                results[case][label] = {"runs": True, "max_abs_diff_vs_default": diff}
            except RuntimeError as err:
                reasons = [str(w.message).splitlines()[0][:200] for w in caught]
                results[case][label] = {"runs": False, "error": _first_line(err), "reasons": reasons[:4]}
    return results


# ---------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status; CPU memory needs Linux procfs.")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def memory_worker(name: str, settings: Settings) -> dict:
    """Runs in a fresh process: peak memory of one training step of one configuration, over the idle baseline."""
    device = torch.device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    system = build_systems([name], settings, device)[name].train()
    optimizer = make_optimizer(system)
    inputs = make_inputs(settings, device)

    def step() -> None:
        train_call(system, optimizer, inputs["train"], inputs["labels"], settings, device)

    step()  # warm-up: gradients, momentum buffers and library workspaces exist before the baseline
    result: dict = {"config": name}
    growths, peaks = [], []
    if device.type == "cuda":
        for _ in range(settings.memory_repeats):
            gc.collect()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            growths.append((peak - base) / 2**20)
            peaks.append(peak / 2**20)
        result["method"] = "cuda max_memory_allocated after reset_peak_memory_stats, minus allocated before the step"
    else:
        if not _reset_peak_rss():
            raise RuntimeError("Cannot reset the peak RSS (/proc/self/clear_refs not writable); CPU memory unknown.")
        # Calibration: a tensor of known size must show up as that much growth.
        gc.collect()
        base = _proc_status_kib("VmRSS")
        _reset_peak_rss()
        probe = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB
        del probe
        result["calibration_64mib_measured_mib"] = (_proc_status_kib("VmHWM") - base) / 1024
        for _ in range(settings.memory_repeats):
            gc.collect()
            base = _proc_status_kib("VmRSS")
            _reset_peak_rss()
            step()
            peak = _proc_status_kib("VmHWM")
            growths.append((peak - base) / 1024)
            peaks.append(peak / 1024)
        result["method"] = (
            "CPU: peak RSS (VmHWM after clear_refs) minus RSS just before the step; glibc MALLOC_MMAP_THRESHOLD_=65536"
        )
    result["growth_mib"] = summary(growths)
    result["peak_mib"] = summary(peaks)
    return result


def measure_memory(names: list[str], settings: Settings) -> dict[str, dict]:
    results = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO_ROOT))
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", name]
        cmd += ["--_settings", json.dumps(asdict(settings))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MEMORY_RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            results[name] = {"error": f"memory worker failed (exit {proc.returncode}): " + " | ".join(tail)}
        else:
            results[name] = json.loads(lines[-1][len(MEMORY_RESULT_TAG) :])
        print(f"  memory {name}: {_fmt_memory(results[name])}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict:
    import peft
    import transformers

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


TARGETS = [
    # key, numerator, denominator, what, comparison, target (cpu, gpu)
    ("phase1_infer_over_frozen", "lpt_phase1", "frozen", "infer", "<=", (1.05, 1.05)),
    ("phase2_infer_over_frozen", "lpt_phase2", "frozen", "infer", "<=", (1.55, 1.55)),
    ("reference_train_over_phase2_train", "lpt_reference", "lpt_phase2", "train", ">=", (1.3, 1.2)),
    ("phase2_memory_over_phase1_memory", "lpt_phase2", "lpt_phase1", "memory", "<=", (0.6, 0.6)),
    ("phase2_memory_over_reference_memory", "lpt_phase2", "lpt_reference", "memory", "<=", (1.0, 1.0)),
]
INFO_RATIOS = [
    ("phase1_infer_over_vpt_deep", "lpt_phase1", "vpt_deep", "infer"),
    ("reference_infer_over_phase2_infer", "lpt_reference", "lpt_phase2", "infer"),
    ("phase1_train_over_vpt_deep_train", "lpt_phase1", "vpt_deep", "train"),
    ("phase2_train_over_phase1_train", "lpt_phase2", "lpt_phase1", "train"),
    ("phase2_infer_over_phase1_infer", "lpt_phase2", "lpt_phase1", "infer"),
    # > 1: the compiled frozen ViT is slower than the eager one (issue 11 saw 25.1 vs 15.4 ms on an H200).
    ("frozen_compiled_infer_over_frozen_infer", "frozen+compile", "frozen", "infer"),
]
# `--compile both`: inference of each LPT path over the per-round floor min(eager frozen, compiled frozen), with
# issue 11's GPU targets by batch size (elsewhere informational).
FLOOR_RATIOS = [
    ("phase1_compiled_infer_over_floor", "lpt_phase1+compile", {128: 1.03, 32: 1.10}),
    ("phase2_compiled_infer_over_floor", "lpt_phase2+compile", {128: 1.50, 32: 1.60}),
    ("phase1_infer_over_floor", "lpt_phase1", {128: 1.03, 32: 1.10}),
    ("phase2_infer_over_floor", "lpt_phase2", {128: 1.50, 32: 1.60}),
]


def _ratio(results: dict, num: str, den: str, what: str) -> dict | None:
    if num not in results["configs"] or den not in results["configs"]:
        return None
    if what == "memory":
        a = results["memory"].get(num, {}).get("growth_mib")
        b = results["memory"].get(den, {}).get("growth_mib")
        if not a or not b:
            return None
        return {"value": a["median"] / b["median"]}
    a, b = results["times"].get(what, {}).get(num), results["times"].get(what, {}).get(den)
    if not a or not b:
        return None
    return _paired_ratio(a, b)


def _paired_ratio(a: list[float], b: list[float]) -> dict:
    """Ratio of two per-round timing lists (same rounds, same order)."""
    paired = [x / y for x, y in zip(a, b)]
    # Headline: the median over rounds of the ratio of two calls made back to back, which cancels most of the drift
    # in machine speed; the ratio of medians and of minima are given alongside.
    return {
        "value": statistics.median(paired),
        "paired_round_min": min(paired),
        "paired_round_max": max(paired),
        "ratio_of_medians": statistics.median(a) / statistics.median(b),
        "ratio_of_minima": min(a) / min(b),
    }


def compute_ratios(results: dict, device: torch.device) -> dict:
    ratios = {}
    for key, num, den, what, op, targets in TARGETS:
        ratio = _ratio(results, num, den, what)
        if ratio is None:
            continue
        target = targets[1] if device.type == "cuda" else targets[0]
        met = ratio["value"] <= target if op == "<=" else ratio["value"] >= target
        ratios[key] = {**ratio, "target": f"{op} {target}", "met": met, "numerator": num, "denominator": den}
    for key, num, den, what in INFO_RATIOS:
        ratio = _ratio(results, num, den, what)
        if ratio is not None:
            ratios[key] = {**ratio, "numerator": num, "denominator": den}
    ratios.update(floor_ratios(results, device))
    return ratios


def inference_floor(results: dict) -> list[float] | None:
    """Per measured round, the faster of the eager and the compiled frozen ViT's inference (seconds); None unless
    both were timed."""
    infer = results["times"].get("infer", {})
    eager, compiled = infer.get("frozen"), infer.get("frozen" + COMPILED_SUFFIX)
    if not eager or not compiled:
        return None
    return [min(x, y) for x, y in zip(eager, compiled)]


def floor_ratios(results: dict, device: torch.device) -> dict:
    """`FLOOR_RATIOS` of the configurations timed; stores the per-round floor in `results["floor"]`."""
    floor = inference_floor(results)
    if floor is None:
        return {}
    infer = results["times"]["infer"]
    compiled_faster = sum(c < e for e, c in zip(infer["frozen"], infer["frozen" + COMPILED_SUFFIX]))
    results["floor"] = {"infer": floor, "rounds_compiled_frozen_faster": compiled_faster}
    batch = results["settings"]["batch_size"]
    ratios = {}
    for key, num, targets in FLOOR_RATIOS:
        times = infer.get(num)
        if not times:
            continue
        ratio = {**_paired_ratio(times, floor), "numerator": num, "denominator": "floor"}
        if device.type == "cuda" and batch in targets:
            ratio.update(target=f"<= {targets[batch]}", met=ratio["value"] <= targets[batch])
        ratios[key] = ratio
    return ratios


def _fmt_memory(entry: dict | None) -> str:
    if not entry:
        return "not measured"
    if "error" in entry:
        return entry["error"]
    g = entry["growth_mib"]
    return f"{g['median']:.1f} [{g['min']:.1f}, {g['max']:.1f}]"


def markdown_report(results: dict) -> str:
    s = results["settings"]
    b = s["batch_size"]
    lines = [
        "| config | layer passes | trainable params | inference ms/batch, median [min, max] | inference img/s | "
        f"train step ms (2B = {2 * b} img), median [min, max] | train img/s | "
        "train step memory MiB, median [min, max] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def timing(what: str, name: str, images: int) -> str:
        values = results["times"].get(what, {}).get(name)
        if not values:
            return "not timed | -"
        t = summary(values)
        ms = f"{1e3 * t['median']:.1f} [{1e3 * t['min']:.1f}, {1e3 * t['max']:.1f}]"
        return f"{ms} | {images / t['median']:.1f}"

    for name in results["configs"]:
        lines.append(
            f"| {name}: {describe(name)} | {results['layer_passes'][name]} | {results['trainable'][name]:,} | "
            f"{timing('infer', name, b)} | {timing('train', name, 2 * b)} | "
            f"{_fmt_memory(results['memory'].get(name))} |"
        )
    lines += [
        "",
        "| ratio | measured | paired-round range | ratio of medians | ratio of minima | target | met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in results["ratios"].items():
        rng = f"{r['paired_round_min']:.3f} .. {r['paired_round_max']:.3f}" if "paired_round_min" in r else "-"
        extra = [f"{r[k]:.3f}" if k in r else "-" for k in ("ratio_of_medians", "ratio_of_minima")]
        met = ("yes" if r["met"] else "**no**") if "met" in r else "(info)"
        lines.append(f"| {key} | {r['value']:.3f} | {rng} | {' | '.join(extra)} | {r.get('target', '-')} | {met} |")
    return "\n".join(lines) + "\n"


def print_report(results: dict) -> None:
    print("\n=== machine ===")
    for key, value in results["machine"].items():
        print(f"  {key}: {value}")
    print("=== settings ===\n  " + json.dumps(results["settings"]))
    print("\n=== results ===")
    print(markdown_report(results))
    for what, probes in results.get("speed_probe_gflops", {}).items():
        if probes:
            print(
                f"machine speed during {what} timing (512x512 matmul probe, GFLOP/s): median "
                f"{statistics.median(probes):.0f}, min {min(probes):.0f}, max {max(probes):.0f}"
            )
    if results.get("compile"):
        c = results["compile"]
        print(f"--compile {c['mode']} (backend {c['backend']}): {c.get('graphs', '?')} graph(s) compiled by Dynamo")
    floor = results.get("floor")
    if floor:
        print(
            f"floor (inference) = min(eager, compiled frozen ViT) per round: the compiled one was the faster in "
            f"{floor['rounds_compiled_frozen_faster']} of {len(floor['infer'])} rounds"
        )
    if results.get("noisy"):
        print(
            f"WARNING: machine speed varied {results['noisy']:.1f}x during timing (other jobs on these cores?); "
            "treat the timings as unreliable and rerun on a quiet machine (on a shared CPU, --threads 1 is steadier)."
        )
    if results.get("equivalence"):
        print("=== equivalence (ours vs token-prompt references, 4 images; compiled vs eager; fp32) ===")
        for key, value in results["equivalence"].items():
            print(f"  {key}: max |diff| = {value['max_abs_diff']:.2e} ({'ok' if value['ok'] else 'MISMATCH'})")
    if results.get("sdpa_kernels"):
        print("=== SDPA kernels (default dispatch; forced single backend) ===")
        for case, value in results["sdpa_kernels"].items():
            parts = [f"default: {', '.join(value['default_dispatch_ops']) or 'none'}"]
            for label, res in value.items():
                if label == "default_dispatch_ops":
                    continue
                parts.append(
                    f"{label}: runs (max diff {res['max_abs_diff_vs_default']:.1e})"
                    if res["runs"]
                    else f"{label}: FAILS ({res['error']}; {' / '.join(res['reasons'])})"
                )
            print(f"  {case}: " + "; ".join(parts))
    mem_methods = {m.get("method") for m in results["memory"].values() if isinstance(m, dict) and "method" in m}
    for method in mem_methods:
        print(f"memory method: {method}")
    calib = [m.get("calibration_64mib_measured_mib") for m in results["memory"].values() if isinstance(m, dict)]
    calib = [c for c in calib if c is not None]
    if calib:
        print(f"memory calibration: a 64 MiB tensor measured as {min(calib):.1f} .. {max(calib):.1f} MiB")


def profile_config(spec: str, systems: dict, inputs: dict, settings: Settings, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    name, _, mode = spec.partition(":")
    mode = mode or "infer"
    if name not in systems or mode not in ("infer", "train"):
        raise ValueError(f"--profile expects CONFIG[:infer|train] with CONFIG in {list(systems)}, got {spec!r}.")
    system = systems[name]
    optimizer = make_optimizer(system)

    def call() -> None:
        if mode == "infer":
            system.eval()
            infer_call(system, inputs["infer"], settings, device)
        else:
            system.train()
            train_call(system, optimizer, inputs["train"], inputs["labels"], settings, device)

    call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            call()
            synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n=== torch.profiler: {spec}, 3 calls, sorted by {sort} ===")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


# ---------------------------------------------------------------------------------------------------- main
def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 1,32,128, got {text!r}") from err
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", help="Override the preset's device (cpu, cuda, cuda:1, ...).")
    parser.add_argument("--batch-size", type=int, help="B: inference batch; a training step uses 2B (dual sampling).")
    parser.add_argument(
        "--batch_sizes",
        "--batch-sizes",
        dest="batch_sizes",
        type=_batch_sizes,
        help="Sweep: run the whole benchmark once per B, e.g. 1,32,128 (overrides --batch-size); one report per B.",
    )
    parser.add_argument("--image-size", type=int)
    # The backbone's size (a preset's ViT by default); small values make quick smoke runs.
    parser.add_argument("--hidden-size", type=int, help="Override the preset's ViT width.")
    parser.add_argument("--num-layers", type=int, help="Override the preset's ViT depth (L).")
    parser.add_argument("--num-heads", type=int, help="Override the preset's attention heads.")
    parser.add_argument("--intermediate-size", type=int, help="Override the preset's MLP width.")
    parser.add_argument("--patch-size", type=int, help="Override the preset's patch size.")
    parser.add_argument("--repeats", type=int, help="Measured training rounds (each runs every configuration once).")
    parser.add_argument("--infer-repeats", type=int, help="Measured inference rounds (default: 3 x --repeats).")
    parser.add_argument("--warmup", type=int, help="Rounds run first and not measured.")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (cpu preset: 2).")
    parser.add_argument("--amp", choices=["none", "bf16"], help="Autocast dtype (gpu preset: bf16).")
    parser.add_argument("--shared-layers", type=int, help="K, the layers before the group prompts.")
    parser.add_argument("--num-labels", type=int)
    parser.add_argument("--memory-repeats", type=int, help="Measured training steps per memory worker.")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument(
        "--compile",
        nargs="?",
        const="replace",
        choices=["replace", "both"],
        help="replace (also plain --compile): time every configuration as torch.compile(system) (default mode); "
        "memory is then skipped.\nboth: add compiled copies of frozen, lpt_phase1 and lpt_phase2 (inference "
        "only) beside the eager configurations, with ratios to the floor min(eager, compiled frozen); needs frozen.",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of --compile (default inductor; eager or aot_eager only trace: quick smoke runs).",
    )
    parser.add_argument("--no-memory", action="store_true", help="Skip the per-configuration memory subprocesses.")
    parser.add_argument("--no-timing", action="store_true", help="Skip the timing rounds (memory and checks only).")
    parser.add_argument("--no-checks", action="store_true", help="Skip the equivalence and SDPA kernel checks.")
    parser.add_argument("--profile", action="append", default=[], metavar="CONFIG[:infer|train]")
    parser.add_argument("--json-out", type=Path, help="Write machine-readable results here.")
    parser.add_argument("--markdown-out", type=Path, help="Write the tables as markdown here.")
    parser.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_settings", dest="settings_json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.settings_json:
        return args, Settings(**json.loads(args.settings_json))
    values = {"preset": args.preset, **PRESETS[args.preset]}
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings) if f.name != "preset"}
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    _check_settings(parser, args, settings)
    return args, settings


def _check_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Settings) -> None:
    """`parser.error` (exit 2, one line) for settings the benchmark cannot run."""
    for name in (
        "batch_size", "image_size", "repeats", "memory_repeats", "infer_repeats", "hidden_size", "num_layers",
        "num_heads", "intermediate_size", "patch_size",
    ):  # fmt: skip
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}.")
    if settings.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {settings.warmup}.")
    if settings.hidden_size % settings.num_heads:
        parser.error(f"--hidden-size {settings.hidden_size} must be a multiple of --num-heads {settings.num_heads}.")
    if settings.image_size % settings.patch_size:
        parser.error(f"--image-size must be a multiple of the patch size {settings.patch_size}.")
    if not 0 <= settings.shared_layers < settings.num_layers:
        parser.error(f"--shared-layers must be in 0..{settings.num_layers - 1}, got {settings.shared_layers}.")
    if args.compile == "both" and "frozen" not in args.configs:
        parser.error("--compile both needs frozen in --configs (the floor is the faster of eager and compiled frozen)")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here; run the gpu preset on a GPU machine or add --device cpu (smoke).")


def time_all(
    systems: dict[str, nn.Module], inputs: dict, settings: Settings, device: torch.device
) -> tuple[dict, dict]:
    """Seconds per inference batch and per training step of every configuration (round-robin, warm-up dropped)."""
    x, x_train, labels = inputs["infer"], inputs["train"], inputs["labels"]
    infer_repeats = settings.infer_repeats or 3 * settings.repeats
    print(f"timing inference: {settings.warmup} warm-up + {infer_repeats} rounds ...", flush=True)
    for system in systems.values():
        system.eval()
    infer = {n: (lambda s=s: infer_call(s, x, settings, device)) for n, s in systems.items()}
    times, probes = {}, {}
    times["infer"], probes["infer"] = round_robin(infer, settings.warmup, infer_repeats, device)

    print(f"timing training steps: {settings.warmup} warm-up + {settings.repeats} rounds ...", flush=True)
    # The `+compile` copies of `--compile both` are timed for inference only (a compiled training step would compile
    # the backward too; `--compile replace` times those).
    trained = {n: s for n, s in systems.items() if not n.endswith(COMPILED_SUFFIX)}
    for system in trained.values():
        system.train()
    optimizers = {n: make_optimizer(s) for n, s in trained.items()}
    train = {
        n: (lambda s=s, o=optimizers[n]: train_call(s, o, x_train, labels, settings, device))
        for n, s in trained.items()
    }
    times["train"], probes["train"] = round_robin(train, settings.warmup, settings.repeats, device)
    return times, probes


def run_benchmark(args: argparse.Namespace, settings: Settings) -> dict:
    device = torch.device(settings.device)
    names = [n for n in CONFIGS if n in args.configs]
    results: dict = {"settings": asdict(settings), "machine": machine_info(device), "configs": names}
    load = results["machine"]["load_average_start"]
    threads = torch.get_num_threads()
    if device.type == "cpu" and load and load[0] >= 1.0 and threads >= (os.cpu_count() or 1):
        # With every core claimed by torch, an OpenMP thread that gets preempted stalls the others at each barrier.
        print(
            f"NOTE: load average {load[0]:.1f} before the run and {threads} torch threads on {os.cpu_count()} cores: "
            "if other jobs are running, timings will swing widely; --threads 1 is steadier on a shared machine.",
            flush=True,
        )
    print(f"building {names} on {device} ...", flush=True)
    systems = build_systems(names, settings, device)
    if args.compile:
        # Each run (each B of a sweep) compiles afresh: graphs of another batch size would count against the
        # recompile limit and make Dynamo treat the batch dimension as dynamic.
        torch._dynamo.reset()
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if args.compile == "replace":
        # Compiled in place of the eager modules: the equivalence checks below then also cover the compiled path.
        # The first calls (checks or warm-up rounds) pay the compilation.
        systems = {n: torch.compile(s, backend=args.compile_backend) for n, s in systems.items()}
        results["compiled"] = True
    elif args.compile == "both":
        systems.update(compiled_copies(systems, args.compile_backend))
        results["configs"] = list(systems)
    results["compile"] = args.compile and {"mode": args.compile, "backend": args.compile_backend}
    inputs = make_inputs(settings, device)
    results["trainable"] = {n: trainable_count(s) for n, s in systems.items()}
    results["layer_passes"] = {n: layer_passes(n, settings) for n in systems}

    if not args.no_checks:
        results["equivalence"] = equivalence_check(systems, inputs, device)
        results["sdpa_kernels"] = sdpa_kernel_check(systems, inputs, settings, device)

    results["times"], results["speed_probe_gflops"] = {}, {}
    if not args.no_timing:
        results["times"], results["speed_probe_gflops"] = time_all(systems, inputs, settings, device)
    if args.compile:
        # Graphs Dynamo compiled for the checks and timing: more than one per compiled system and precision means
        # graph breaks or recompilations (e.g. on phase 2's per-image group choice).
        results["compile"]["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    for spec in args.profile:
        profile_config(spec, systems, inputs, settings, device)

    del systems, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["memory"] = {}
    if not args.no_memory and args.compile != "replace":
        print("measuring training-step memory, one fresh subprocess per config ...", flush=True)
        results["memory"] = measure_memory(names, settings)
    results["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["ratios"] = compute_ratios(results, device)
    spreads = [max(p) / min(p) for p in results["speed_probe_gflops"].values() if p]
    results["noisy"] = max(spreads) if spreads and max(spreads) > 1.5 else None
    return results


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    # peft asks transformers a deprecated question on every get_peft_model; it says nothing about this benchmark.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if args.memory_worker:
        print(MEMORY_RESULT_TAG + json.dumps(memory_worker(args.memory_worker, settings)), flush=True)
        return 0
    sweep = args.batch_sizes or [settings.batch_size]
    runs = {}
    for batch_size in sweep:
        start = time.perf_counter()
        results = run_benchmark(args, replace(settings, batch_size=batch_size))
        results["wall_seconds"] = time.perf_counter() - start
        if len(sweep) > 1:
            print(f"\n==== batch size B = {batch_size}")
        print_report(results)
        print(f"\ntotal wall time: {results['wall_seconds']:.0f} s")
        runs[batch_size] = results
    # One batch size: the results as before; a sweep: {B: results} and one markdown section per B.
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = runs[sweep[0]] if len(sweep) == 1 else {str(b): r for b, r in runs.items()}
        args.json_out.write_text(json.dumps(payload, indent=2, default=str))
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        sections = [
            markdown_report(r) if len(sweep) == 1 else f"## B = {b}\n\n{markdown_report(r)}" for b, r in runs.items()
        ]
        args.markdown_out.write_text("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
