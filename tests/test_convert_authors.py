"""The authors' checkpoint and timm ViT converters against a timm-style forward written here from the raw tensors."""

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracles import lpt_oracle, vpt_deep
from peft import PeftModel
from transformers import ViTModel

import lpt_peft  # noqa: F401  (registers LPT with peft)
from lpt_peft.interop.authors import convert_authors_checkpoint, load_authors_checkpoint, read_labels_file
from lpt_peft.interop.timm import timm_vit_to_hf

# Small dimensions with the authors' layout: D=32, L=4, 2 heads, P=3, m=5, Pg=2, K=2, C=7, 32 px, patch 8.
D, L, HEADS, P, M, PG, K, C, IMAGE, PATCH, MLP = 32, 4, 2, 3, 5, 2, 2, 7, 32, 8, 64
EPS = 1e-5
REPO = Path(__file__).resolve().parents[1]


def timm_vit_state_dict(seed=0):
    """A random timm-style ViT state dict (the keys of timm's VisionTransformer), LayerNorms away from 1/0."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, offset=0.0):
        return torch.randn(*shape, generator=gen) * scale + offset

    grid = IMAGE // PATCH
    sd = {
        "cls_token": rand(1, 1, D),
        "pos_embed": rand(1, 1 + grid * grid, D),
        "patch_embed.proj.weight": rand(D, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rand(D),
        "norm.weight": rand(D, offset=1.0),
        "norm.bias": rand(D),
    }
    for i in range(L):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": rand(D, offset=1.0),
                b + "norm1.bias": rand(D),
                b + "attn.qkv.weight": rand(3 * D, D),
                b + "attn.qkv.bias": rand(3 * D),
                b + "attn.proj.weight": rand(D, D),
                b + "attn.proj.bias": rand(D),
                b + "norm2.weight": rand(D, offset=1.0),
                b + "norm2.bias": rand(D),
                b + "mlp.fc1.weight": rand(MLP, D),
                b + "mlp.fc1.bias": rand(MLP),
                b + "mlp.fc2.weight": rand(D, MLP),
                b + "mlp.fc2.bias": rand(D),
            }
        )
    return sd


def add_prompt_learner(sd, seed=1):
    gen = torch.Generator().manual_seed(seed)
    sd = dict(sd)
    sd["prompt_learner.Prompt_Tokens"] = torch.randn(L, P, D, generator=gen)
    sd["prompt_learner.Prompt_Tokens_pool"] = torch.randn(M, L - K, PG, D, generator=gen)
    sd["prompt_learner.Prompt_Keys"] = torch.randn(M, D, generator=gen)
    sd["prompt_learner.head.weight"] = torch.randn(D, C, generator=gen)
    return sd


# ------------------------------------------------------------------ an independent timm-style forward
def timm_block(sd, i, x):
    """One pre-norm block with fused qkv (rows q, k, v), exact GELU, eps 1e-5."""
    b = f"blocks.{i}."
    batch, n, _ = x.shape
    h = F.layer_norm(x, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], EPS)
    qkv = (h @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(batch, n, 3, HEADS, D // HEADS)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) / math.sqrt(D // HEADS)).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, n, D)
    x = x + out @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
    h = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], EPS)
    h = F.gelu(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
    return x + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]


def timm_features(sd, images, prompts_per_layer=None):
    """Patch conv, class token, positions, blocks (prompts as tokens, dropped after each block), final norm.

    `prompts_per_layer[i]` is `(1 or batch, n_i, D)`, or the whole list None for no prompts. Returns the CLS feature.
    """
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(images), -1, -1), x], dim=1) + sd["pos_embed"]
    prompts_per_layer = prompts_per_layer or [torch.zeros(1, 0, D)] * L
    x = vpt_deep(x, [lambda h, i=i: timm_block(sd, i, h) for i in range(L)], prompts_per_layer, num_prefix=1)
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], EPS)[:, 0]


def authors_oracle(sd, images, phase=2, top_k=2):
    """The authors' model from their raw tensors: the shared oracle of tests/oracles.py on the timm forward above.

    Phase 2: query pass with shared prompts; top-k keys by cosine; main pass with shared + mean group prompts;
    cosine head `(D, C)`. Phase 1: shared prompts, cosine head.
    """
    shared = list(sd["prompt_learner.Prompt_Tokens"])
    pool = sd.get("prompt_learner.Prompt_Tokens_pool")
    groups = {i: pool[:, i - (L - pool.shape[1])] for i in range(L - pool.shape[1], L)} if pool is not None else {}
    return lpt_oracle(
        lambda prompts: timm_features(sd, images, prompts),
        shared,
        groups,
        sd.get("prompt_learner.Prompt_Keys"),
        sd["prompt_learner.head.weight"],
        phase=phase,
        top_k=top_k,
        shared_layers=L - pool.shape[1] if pool is not None else L,
    )


def authors_phase2_forward(sd, images, top_k=2):
    """`(logits, chosen groups, query)` of the authors' phase-2 model."""
    out = authors_oracle(sd, images, phase=2, top_k=top_k)
    return out.logits, out.group_indices, out.query


@pytest.fixture(scope="module")
def authors_state():
    sd = add_prompt_learner(timm_vit_state_dict())
    images = torch.randn(6, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    # Keys at the queries of five images, so that the images select different groups.
    with torch.no_grad():
        queries = timm_features(
            sd, images, [sd["prompt_learner.Prompt_Tokens"][i].expand(6, -1, -1) for i in range(L)]
        )
    sd["prompt_learner.Prompt_Keys"] = queries[:M].clone()
    return sd, images


def save_checkpoint(path, state_dict, prefix="", **extra):
    torch.save(
        {"config": {"topk": 2, "lr": 0.02}, "state_dict": {prefix + k: v for k, v in state_dict.items()}, **extra},
        path,
    )


@pytest.mark.parametrize("prefix", ["", "module."])
def test_converted_checkpoint_equals_authors_forward(authors_state, tmp_path, prefix, capsys):
    sd, images = authors_state
    ckpt = tmp_path / "lpt.pth"
    save_checkpoint(ckpt, sd, prefix=prefix, val_acc=0.4321)
    result = convert_authors_checkpoint(
        ckpt, tmp_path / "base", tmp_path / "adapter", num_attention_heads=HEADS, dataset="places_lt"
    )
    assert result.val_acc == pytest.approx(0.4321) and result.stored_config == {"topk": 2, "lr": 0.02}

    base = ViTModel.from_pretrained(tmp_path / "base")  # the brief's loading line, pooler and all
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    config = model.peft_config["default"]
    assert (config.phase, config.shared_layers, config.num_groups, config.top_k) == (2, K, M, 2)
    assert (config.prompt_length, config.group_prompt_length, config.num_labels) == (P, PG, C)
    assert base.config.layer_norm_eps == EPS and base.config.num_attention_heads == HEADS
    assert all(m.eps == EPS for m in base.modules() if isinstance(m, torch.nn.LayerNorm))

    with torch.no_grad():
        expected, chosen, query = authors_phase2_forward(sd, images)
        out = model(pixel_values=images)
    assert torch.equal(out.group_indices, chosen)
    assert len({tuple(sorted(r.tolist())) for r in chosen}) > 1  # per-image groups are exercised
    torch.testing.assert_close(out.query, query, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)

    # Saved files: plain ViT weights in the base folder (no prompts), preprocessing in both, card with the data set.
    from safetensors.torch import load_file

    base_keys = set(load_file(tmp_path / "base" / "model.safetensors"))
    assert len(base_keys) == 4 + 16 * L + 2 and not any("lpt" in k or "prompt" in k for k in base_keys)
    assert config.base_model_name_or_path == str(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["layer_norm_eps"] == EPS
    for folder in ("base", "adapter"):
        pre = json.loads((tmp_path / folder / "preprocessor_config.json").read_text())
        assert pre["size"] == {"height": 37, "width": 37} and pre["crop_size"] == {"height": 32, "width": 32}
        assert pre["image_mean"] == [0.5] * 3 and pre["image_std"] == [0.5] * 3
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "places_lt" in card and "0.4321" in card


def test_phase2_differs_from_shared_prompts_only(authors_state, tmp_path):
    """Guards the test above: the group prompts change the logits, so their mapping is really checked."""
    sd, images = authors_state
    save_checkpoint(tmp_path / "c.pth", sd)
    model = convert_authors_checkpoint(
        tmp_path / "c.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS
    ).model
    with torch.no_grad():
        shuffled = dict(sd)
        shuffled["prompt_learner.Prompt_Tokens_pool"] = sd["prompt_learner.Prompt_Tokens_pool"].flip(1)
        wrong, _, _ = authors_phase2_forward(shuffled, images)
        out = model(pixel_values=images)
    assert (out.logits - wrong).abs().max() > 1e-3


def test_timm_vit_to_hf_matches_timm_forward():
    sd = timm_vit_state_dict(seed=3)
    sd["head.weight"], sd["head.bias"] = torch.randn(11, D), torch.randn(11)  # timm's classifier: dropped
    rng = torch.get_rng_state()
    vit = timm_vit_to_hf(sd, num_attention_heads=HEADS)
    assert torch.equal(torch.get_rng_state(), rng)  # converting never moves the caller's random stream
    assert isinstance(vit, ViTModel) and vit.pooler is None
    assert (vit.config.image_size, vit.config.patch_size, vit.config.intermediate_size) == (IMAGE, PATCH, MLP)
    assert all(m.eps == EPS for m in vit.modules() if isinstance(m, torch.nn.LayerNorm))
    images = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = timm_features(sd, images)
        got = vit(pixel_values=images).last_hidden_state[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # With timm's own eps (1e-6) the features move: the eps is really applied.
    vit6 = timm_vit_to_hf(sd, num_attention_heads=HEADS, layer_norm_eps=1e-6)
    assert all(m.eps == 1e-6 for m in vit6.modules() if isinstance(m, torch.nn.LayerNorm))


def test_heads_default_to_width_over_64():
    sd = timm_vit_state_dict()
    with pytest.raises(ValueError, match="num_attention_heads"):
        timm_vit_to_hf(sd)  # 32 is not a multiple of 64
    big = {k: v for k, v in sd.items()}
    for key in list(big):
        if key.startswith(("blocks.1", "blocks.2", "blocks.3")):
            del big[key]
    # A width-128 one-layer model: 2 heads of 64 inferred.
    widen = {
        k: torch.zeros([128 if s == D else (3 * 128 if s == 3 * D else s) for s in v.shape]) for k, v in big.items()
    }
    assert timm_vit_to_hf(widen).config.num_attention_heads == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("blocks.1.attn.qkv.bias"), "blocks.1.attn.qkv.bias"),
        (lambda sd: sd.pop("prompt_learner.Prompt_Keys"), "prompt_learner.Prompt_Keys"),
        (lambda sd: sd.update({"prompt_learner.Prompt_Keys": torch.zeros(M, D + 1)}), "prompt_learner.Prompt_Keys"),
        (lambda sd: sd.update({"prompt_learner.head.weight": torch.zeros(C, D)}), "prompt_learner.head.weight"),
        (lambda sd: sd.update({"blocks.2.mlp.fc2.weight": torch.zeros(D, MLP + 1)}), "blocks.2.mlp.fc2.weight"),
        (lambda sd: sd.update({"prompt_learner.Prompt_Tokens": torch.zeros(L - 1, P, D)}), "Prompt_Tokens'"),
        (lambda sd: sd.update({"blocks.0.ls1.gamma": torch.zeros(D)}), "blocks.0.ls1.gamma"),
    ],
)
def test_bad_checkpoints_name_the_key(authors_state, tmp_path, change, message):
    sd = dict(authors_state[0])
    change(sd)
    save_checkpoint(tmp_path / "bad.pth", sd)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        convert_authors_checkpoint(tmp_path / "bad.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS)
    assert not (tmp_path / "a").exists()


def test_unknown_keys_can_be_ignored(authors_state, tmp_path):
    sd = dict(authors_state[0])
    sd["prompt_learner.head.bias"] = torch.zeros(C)
    save_checkpoint(tmp_path / "extra.pth", sd)
    with pytest.warns(UserWarning, match="prompt_learner.head.bias"):
        convert_authors_checkpoint(
            tmp_path / "extra.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS, strict=False
        )
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


class Opaque:  # stands for any class a research checkpoint may pickle
    def __init__(self, value):
        self.value = value


def test_pickle_safety(authors_state, tmp_path):
    sd = authors_state[0]
    # argparse options and numpy scalars load with weights_only=True (allow-listed: they run no code).
    torch.save(
        {"config": argparse.Namespace(topk=2), "state_dict": sd, "val_acc": np.float64(0.5)}, tmp_path / "ok.pth"
    )
    state, config, acc = load_authors_checkpoint(tmp_path / "ok.pth")
    assert config == {"topk": 2} and float(acc) == 0.5 and set(state) == set(sd)
    # Any other object needs the explicit opt-in, which warns.
    torch.save({"config": Opaque(1), "state_dict": sd}, tmp_path / "opaque.pth")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_authors_checkpoint(tmp_path / "opaque.pth")
    with pytest.warns(UserWarning, match="executes code"):
        _, config, _ = load_authors_checkpoint(tmp_path / "opaque.pth", trust_pickle=True)
    assert isinstance(config, Opaque)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_authors_checkpoint(tmp_path / "missing.pth")


def test_labels_file_formats(tmp_path):
    (tmp_path / "plain.txt").write_text("cat\ndog\n\nbird\n")
    assert read_labels_file(tmp_path / "plain.txt") == {0: "cat", 1: "dog", 2: "bird"}
    (tmp_path / "places.txt").write_text("/a/airfield 1\n/a/abbey 0\n")
    assert read_labels_file(tmp_path / "places.txt") == {0: "/a/abbey", 1: "/a/airfield"}
    (tmp_path / "split.txt").write_text("train/abbey/1.jpg 0\ntrain/abbey/2.jpg 0\nval/airfield/x.jpg 1\n")
    assert read_labels_file(tmp_path / "split.txt") == {0: "abbey", 1: "airfield"}
    (tmp_path / "gap.txt").write_text("a 0\nb 2\n")
    with pytest.raises(ValueError, match="without gaps"):
        read_labels_file(tmp_path / "gap.txt")


def test_example_script(authors_state, tmp_path, capsys):
    sd, images = authors_state
    save_checkpoint(tmp_path / "c.pth", sd, prefix="module.", val_acc=0.25)
    (tmp_path / "labels.txt").write_text("\n".join(f"class_{i}" for i in range(C)))
    spec = importlib.util.spec_from_file_location(
        "convert_example", REPO / "examples" / "convert_authors_checkpoint.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(
        [
            "--checkpoint", str(tmp_path / "c.pth"),
            "--output_dir", str(tmp_path / "out"),
            "--num_heads", str(HEADS),
            "--labels", str(tmp_path / "labels.txt"),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "val_acc" in printed and "0.25" in printed and "topk" in printed
    model = PeftModel.from_pretrained(
        ViTModel.from_pretrained(tmp_path / "out" / "base", add_pooling_layer=False), tmp_path / "out" / "adapter"
    ).eval()
    assert model.peft_config["default"].id2label[3] == "class_3"
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=images).logits, authors_phase2_forward(sd, images)[0], atol=1e-5, rtol=0
        )


# ------------------------------------------------------------------ the authors' phase-1 model (no group pool)
def authors_phase1_forward(sd, images):
    """Shared prompts in every layer, final norm, CLS, cosine head: the authors' phase-1 PromptModels."""
    return authors_oracle(sd, images, phase=1).logits


def phase1_state(authors_state):
    sd, images = authors_state
    return {
        k: v for k, v in sd.items() if k not in ("prompt_learner.Prompt_Tokens_pool", "prompt_learner.Prompt_Keys")
    }


def test_phase1_checkpoint_becomes_a_phase1_adapter(authors_state, tmp_path):
    sd1, images = phase1_state(authors_state), authors_state[1]
    save_checkpoint(tmp_path / "p1.pth", sd1)
    result = convert_authors_checkpoint(
        tmp_path / "p1.pth", tmp_path / "base", tmp_path / "adapter", num_attention_heads=HEADS
    )
    assert result.phase == 1
    base = ViTModel.from_pretrained(tmp_path / "base", add_pooling_layer=False)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    config = model.peft_config["default"]
    # The pool is the paper's for phase-2 training (K = L // 2, 20 groups x 10), not read from the file.
    assert (config.phase, config.prompt_length, config.num_labels) == (1, P, C)
    assert (config.shared_layers, config.num_groups, config.group_prompt_length) == (L // 2, 20, 10)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=images).logits, authors_phase1_forward(sd1, images), atol=1e-5, rtol=0
        )
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "- Phase 1: shared prompts" in card and "not trained" in card
    # Converting twice gives identical files (the untrained pool is seeded).
    convert_authors_checkpoint(tmp_path / "p1.pth", tmp_path / "b2", tmp_path / "a2", num_attention_heads=HEADS)
    assert (tmp_path / "a2" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_phase1_pool_options_and_their_checks(authors_state, tmp_path):
    save_checkpoint(tmp_path / "p1.pth", phase1_state(authors_state))
    model = convert_authors_checkpoint(
        tmp_path / "p1.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS,
        shared_layers=1, num_groups=6, group_prompt_length=4,
    ).model  # fmt: skip
    config = model.peft_config["default"]
    assert (config.shared_layers, config.num_groups, config.group_prompt_length) == (1, 6, 4)
    # A phase-2 file fixes the pool: options for it are refused, before anything is written.
    save_checkpoint(tmp_path / "p2.pth", authors_state[0])
    with pytest.raises(ValueError, match="phase-2 model.*num_groups="):
        convert_authors_checkpoint(
            tmp_path / "p2.pth", tmp_path / "b2", tmp_path / "a2", num_attention_heads=HEADS, num_groups=6
        )
    # K must leave a layer for the group prompts.
    with pytest.raises(ValueError, match="shared_layers"):
        convert_authors_checkpoint(
            tmp_path / "p1.pth", tmp_path / "b3", tmp_path / "a3", num_attention_heads=HEADS, shared_layers=L
        )
    assert not any((tmp_path / name).exists() for name in ("b2", "a2", "b3", "a3"))


def test_half_a_pool_names_the_prompt_learner_not_the_vit(authors_state, tmp_path):
    sd = dict(authors_state[0])
    del sd["prompt_learner.Prompt_Tokens_pool"]
    save_checkpoint(tmp_path / "half.pth", sd)
    with pytest.raises(ValueError, match="prompt learner's key 'prompt_learner.Prompt_Tokens_pool'") as err:
        convert_authors_checkpoint(tmp_path / "half.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS)
    assert "timm-style" not in str(err.value)


# ------------------------------------------------------------------ nothing written unless all of it converts
def test_a_late_error_leaves_no_folder(authors_state, tmp_path):
    """top_k larger than the pool is only known once the prompts are read: still nothing is written."""
    save_checkpoint(tmp_path / "c.pth", authors_state[0])
    with pytest.raises(ValueError, match="top_k"):
        convert_authors_checkpoint(
            tmp_path / "c.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS, top_k=M + 1
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]


def test_existing_output_is_kept_unless_overwrite(authors_state, tmp_path):
    save_checkpoint(tmp_path / "c.pth", authors_state[0])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*overwrite="):
        convert_authors_checkpoint(tmp_path / "c.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS)
    assert not (tmp_path / "b").exists() and (tmp_path / "a" / "mine.txt").read_text() == "keep me"
    convert_authors_checkpoint(
        tmp_path / "c.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS, overwrite=True
    )
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and not (tmp_path / "a" / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c.pth"]  # no staging folders left


def test_relative_output_records_an_absolute_base_and_layers_are_counted_alike(
    authors_state, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "c.pth", authors_state[0])
    script = importlib.util.module_from_spec(
        spec := importlib.util.spec_from_file_location(
            "convert_example2", REPO / "examples" / "convert_authors_checkpoint.py"
        )
    )
    spec.loader.exec_module(script)
    script.main(["--checkpoint", "c.pth", "--output_dir", "converted", "--num_heads", str(HEADS)])
    config = json.loads((tmp_path / "converted" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "converted" / "base")
    printed = capsys.readouterr().out
    card = (tmp_path / "converted" / "adapter" / "README.md").read_text()
    layers = f"layers {K + 1}..{L}"  # 1-based, in the script's output and in the card alike
    assert layers in printed and layers in card


def test_old_module_path_re_exports_both_converters():
    """`lpt_peft.interop.convert_authors` (the module before the split) still names the same functions."""
    from lpt_peft.interop import authors, convert_authors, timm

    for name in convert_authors.__all__:
        assert getattr(convert_authors, name) is getattr(authors if hasattr(authors, name) else timm, name), name
    assert set(convert_authors.__all__) == set(authors.__all__) | set(timm.__all__)


# ------------------------------------------------------------- output folders that would destroy each other/the input
def tree(root):
    """Every path under `root` with its bytes (files), its target (links) or None (folders)."""
    return {
        str(p.relative_to(root)): (
            ("link", str(p.readlink())) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        )
        for p in sorted(root.rglob("*"))
    }


# (checkpoint, base folder, adapter folder, what the refusal says); the reviewer's cases and their mirror images.
OVERLAPS = {
    "adapter-inside-base": ("c.pth", "conv", "conv/adapter", "adapter folder .* is inside the base folder"),
    "base-inside-adapter": ("c.pth", "conv2/base", "conv2", "base folder .* is inside the adapter folder"),
    "deeply-nested": ("c.pth", "x", "x/y/z/adapter", "adapter folder .* is inside the base folder"),
    "same-folder": ("c.pth", "same", "same/.", "are the same"),
    "adapter-holds-input": ("out/adapter/c.pth", "out/base", "out/adapter", "holds the checkpoint being converted"),
    "base-holds-input-deeper": ("b/sub/c.pth", "b", "a", "holds the checkpoint being converted"),
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", list(OVERLAPS))
def test_overlapping_outputs_are_refused_before_anything_is_written(authors_state, tmp_path, case, overwrite):
    """Before: 'conv'/'conv/adapter' wrote the base, then failed on a rename with no adapter and conv/ emptied;
    'conv2/base'/'conv2' reported OK with the base deleted; --overwrite with the .pth inside deleted the input."""
    checkpoint, base, adapter, message = OVERLAPS[case]
    (tmp_path / checkpoint).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(tmp_path / checkpoint, authors_state[0])
    for folder in (base, adapter):  # earlier contents the user keeps
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / f"notes-{Path(folder).name}.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        convert_authors_checkpoint(
            tmp_path / checkpoint, tmp_path / base, tmp_path / adapter, num_attention_heads=HEADS, overwrite=overwrite
        )
    assert "nothing was written" in str(err.value) or case == "same-folder"
    assert tree(tmp_path) == before


def test_a_symlinked_output_inside_the_other_is_refused(authors_state, tmp_path):
    save_checkpoint(tmp_path / "c.pth", authors_state[0])
    (tmp_path / "conv").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "conv")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="is inside the base folder"):
        convert_authors_checkpoint(tmp_path / "c.pth", tmp_path / "conv", tmp_path / "alias" / "adapter",
                                   num_attention_heads=HEADS)  # fmt: skip
    assert tree(tmp_path) == before


def test_folders_named_like_the_staging_folders_are_not_touched(authors_state, tmp_path):
    """The converter stages beside its targets; a user's `adapter.old` or `base.partial` is not its to delete, and a
    base folder named like the adapter's backup (`y.old` next to `y`) survives the adapter's replacement."""
    save_checkpoint(tmp_path / "c.pth", authors_state[0])
    for name in ("a.partial", "a.old", "b.partial", "b.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "old.txt").write_text("replaced")
    kept = {k: v for k, v in tree(tmp_path).items() if k.split("/")[0] in ("a.partial", "a.old", "b.partial", "b.old")}
    convert_authors_checkpoint(
        tmp_path / "c.pth", tmp_path / "b", tmp_path / "a", num_attention_heads=HEADS, overwrite=True
    )
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k in kept} == kept
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and not (tmp_path / "a" / "old.txt").exists()
    expected = ["a", "a.old", "a.partial", "b", "b.old", "b.partial", "c.pth"]  # no staging folder left either
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    # A base folder named like the adapter's backup folder.
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "old.txt").write_text("replaced")
    convert_authors_checkpoint(
        tmp_path / "c.pth", tmp_path / "y.old", tmp_path / "y", num_attention_heads=HEADS, overwrite=True
    )
    assert (tmp_path / "y.old" / "model.safetensors").is_file() and (tmp_path / "y" / "adapter_config.json").is_file()
    assert oct((tmp_path / "y").stat().st_mode & 0o777) == oct((tmp_path / "a.old").stat().st_mode & 0o777)


def test_a_write_failure_leaves_no_new_folders(authors_state, tmp_path, monkeypatch):
    """A failure while writing (here: the adapter's save, after the base was staged) leaves the tree as it was."""
    save_checkpoint(tmp_path / "c.pth", authors_state[0])

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_authors_checkpoint(tmp_path / "c.pth", tmp_path / "new" / "deep" / "base",
                                   tmp_path / "new" / "adapter", num_attention_heads=HEADS)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]


# -------------------------------------------------------------------------- damaged files are not "unsafe" files
def damaged_files(folder, state_dict):
    """Files that are not a complete torch.save file, each as torch 2.x fails on it (in the comment)."""
    torch.save({"state_dict": state_dict}, folder / "full.pth")
    data = (folder / "full.pth").read_bytes()
    torch.save({"state_dict": state_dict}, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = (folder / "legacy.pth").read_bytes()
    files = {
        "truncated.pth": data[: len(data) // 2],  # OSError [Errno 22] Invalid argument (no file name)
        "head-only.pth": data[:100],  # RuntimeError: failed finding central directory
        "legacy-truncated.pth": legacy[: len(legacy) // 2],  # RuntimeError: unexpected EOF
        "config.yaml": b"lr: 0.02\\ntopk: 2\\n",  # UnpicklingError: Unsupported operand (a text file)
        "empty.pth": b"",  # EOFError
        "noise.pth": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return list(files)


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_a_damaged_or_foreign_file_is_named_as_such(authors_state, tmp_path, trust_pickle):
    """Before: "holds Python objects beyond tensors ... pass trust_pickle" (wrong cause, steering to an unsafe load);
    with trust_pickle "[Errno 22] Invalid argument" without the file name, or a raw UnpicklingError."""
    for name in damaged_files(tmp_path, authors_state[0]):
        path = tmp_path / name
        with pytest.raises(ValueError) as err:
            load_authors_checkpoint(path, trust_pickle=trust_pickle)
        message = str(err.value)
        assert f"damaged or not a PyTorch checkpoint: {path}" in message, (name, message)
        assert "trust_pickle" not in message and "Python objects" not in message, (name, message)


def test_convert_script_says_damaged_with_and_without_trust_pickle(authors_state, tmp_path, monkeypatch, capsys):
    damaged_files(tmp_path, authors_state[0])
    monkeypatch.chdir(tmp_path)
    script = load_convert_script()
    for name, extra in (("truncated.pth", []), ("config.yaml", ["--trust_pickle"])):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--checkpoint", name, "--output_dir", "out", *extra])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith("error: "), error
        assert f"The file is damaged or not a PyTorch checkpoint: {name}" in error
        assert "--trust_pickle" not in error and not (tmp_path / "out").exists()


def test_the_pickle_advice_names_its_real_reason(authors_state, tmp_path):
    """Only a complete torch.save file that the safe loader refuses for its objects (or its pickle protocol) gets
    the trust_pickle advice, and the message says which."""
    sd = authors_state[0]
    torch.save({"config": Opaque(1), "state_dict": sd}, tmp_path / "opaque.pth")
    with pytest.raises(ValueError, match=r"holds Python objects beyond tensors \(.*Opaque\).*trust_pickle=True"):
        load_authors_checkpoint(tmp_path / "opaque.pth")
    # A checkpoint pickled with protocol 4 (torch.save(..., pickle_protocol=4)): plain tensors, yet the safe loader
    # cannot read it; a full load can.
    torch.save({"config": {"topk": 2}, "state_dict": sd}, tmp_path / "p4.pth", pickle_protocol=4)
    with pytest.raises(ValueError, match=r"pickled with protocol 4, which torch's safe loader does not read"):
        load_authors_checkpoint(tmp_path / "p4.pth")
    with pytest.warns(UserWarning, match="executes code"):
        state, config, _ = load_authors_checkpoint(tmp_path / "p4.pth", trust_pickle=True)
    assert config == {"topk": 2} and all(torch.equal(state[k], sd[k]) for k in sd)
    # Objects of a class that is not importable here: said so, not "damaged".
    torch.save({"config": Opaque(1), "state_dict": sd}, tmp_path / "moved.pth", _use_new_zipfile_serialization=False)
    module = Opaque.__module__.encode()
    gone = (b"gone_" + b"x" * len(module))[: len(module)]  # same length: the pickle stays well-formed
    (tmp_path / "moved.pth").write_bytes((tmp_path / "moved.pth").read_bytes().replace(module, gone))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="objects whose code is not installed here"):
        load_authors_checkpoint(tmp_path / "moved.pth", trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_authors_checkpoint(tmp_path)


def load_convert_script():
    path = REPO / "examples" / "convert_authors_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_example3", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
