"""Saving, reloading in a fresh process, and pushing to the Hub (only its network layer replaced)."""

import base64
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModel, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import ViTModel

from lpt_peft import LPTConfig

K = 2


@pytest.fixture
def trained_adapter(make_vit, tmp_path):
    """A saved base ViT and a saved phase-2 adapter whose weights moved away from their init."""
    vit = make_vit(seed=3)
    vit.save_pretrained(tmp_path / "base")
    vit = ViTModel.from_pretrained(tmp_path / "base", add_pooling_layer=False, attn_implementation="eager")
    config = LPTConfig(
        num_labels=4,
        shared_layers=K,
        num_groups=5,
        prompt_length=3,
        id2label=dict(enumerate("abcd")),
    )
    model = get_peft_model(vit, config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lpt_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    model.base_model.set_phase(2)
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(5, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        out = model(pixel_values=x)
    return tmp_path, model, out


def test_saved_files_and_model_card(trained_adapter):
    path, model, _ = trained_adapter
    files = sorted(p.name for p in (path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LPT" and saved["phase"] == 2 and saved["num_labels"] == 4
    assert (saved["hidden_size"], saved["num_hidden_layers"]) == (32, 4)
    weights = load_file(path / "adapter" / "adapter_model.safetensors")
    expected = {f"base_model.model.layers.{i}.attention.lpt_shared_prompt" for i in range(4)}
    expected |= {f"base_model.model.layers.{i}.attention.lpt_group_prompt" for i in range(K, 4)}
    expected |= {"base_model.lpt_keys", "base_model.lpt_head"}
    assert set(weights) == expected
    assert weights["base_model.lpt_head"].shape == (32, 4)
    assert weights["base_model.model.layers.3.attention.lpt_group_prompt"].shape == (5, 10, 32)
    card = (path / "adapter" / "README.md").read_text()
    assert "import lpt_peft" in card and card.index("import lpt_peft") < card.index("PeftModel.from_pretrained")
    assert "library_name: peft" in card


def test_reload_in_fresh_process_is_bit_exact(trained_adapter):
    path, _, out = trained_adapter
    script = textwrap.dedent(
        f"""
        import torch, lpt_peft
        from transformers import ViTModel
        from peft import PeftModel
        torch.set_num_threads({torch.get_num_threads()})
        # The same attention kernel as the test's model (from_pretrained would pick sdpa).
        base = ViTModel.from_pretrained({str(path / "base")!r}, add_pooling_layer=False, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, {str(path / "adapter")!r}).eval()
        assert model.peft_config["default"].phase == 2
        assert not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            out = model(pixel_values=torch.load({str(path / "x.pt")!r}))
        torch.save({{"logits": out.logits, "groups": out.group_indices}}, {str(path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    reloaded = torch.load(path / "out.pt")
    assert torch.equal(reloaded["logits"], out.logits)
    assert torch.equal(reloaded["groups"], out.group_indices)


def test_without_import_peft_fails_with_key_error(trained_adapter):
    """Documents why the README and the model card say `import lpt_peft` first."""
    path, _, _ = trained_adapter
    script = textwrap.dedent(
        f"""
        from peft import PeftConfig
        try:
            PeftConfig.from_pretrained({str(path / "adapter")!r})
        except KeyError as err:
            assert "LPT" in str(err)
        else:
            raise SystemExit("expected KeyError")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_reload_trainable_auto_and_second_adapter(trained_adapter, make_vit):
    path, _, out = trained_adapter
    x = torch.load(path / "x.pt")
    model = PeftModel.from_pretrained(make_vit(seed=3), path / "adapter", is_trainable=True)
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lpt_group_prompt", "lpt_keys", "lpt_head"}  # phase 2 rules survive the reload
    model.eval()
    assert torch.equal(model(pixel_values=x).logits, out.logits)

    model.load_adapter(path / "adapter", adapter_name="b")
    model.set_adapter("b")
    assert torch.equal(model(pixel_values=x).logits, out.logits)

    # The base is loaded from base_model_name_or_path (with transformers' default sdpa kernel, hence allclose).
    auto = AutoPeftModel.from_pretrained(path / "adapter").eval()
    torch.testing.assert_close(auto(pixel_values=x).logits, out.logits, atol=1e-5, rtol=0)


def test_push_to_hub_uploads_the_adapter(trained_adapter, monkeypatch):
    """Only huggingface_hub's HTTP transport is replaced; everything above it runs for real."""
    import httpx2
    from huggingface_hub.utils import _http

    path, model, _ = trained_adapter
    requests = []
    committed = {}

    def handler(request: httpx2.Request) -> httpx2.Response:
        requests.append((request.method, request.url.path))
        url = request.url.path
        if url == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/user/lpt-test", "name": "user/lpt-test"})
        if "/preupload/" in url:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if "/commit/" in url:
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    committed[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx2.Response(
                200, json={"commitUrl": "https://huggingface.co/user/lpt-test/commit/abc", "commitOid": "a" * 40}
            )
        return httpx2.Response(200, json={})

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    _http.close_session()
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    try:
        model.push_to_hub("user/lpt-test", token="hf_fake_token")
    finally:
        _http.close_session()
        _http.set_client_factory(_http.default_client_factory)
    assert ("POST", "/api/repos/create") in requests
    assert set(committed) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert json.loads(committed["adapter_config.json"])["peft_type"] == "LPT"
    assert committed["adapter_model.safetensors"] == (path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert b"import lpt_peft" in committed["README.md"]
