import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from worker.lora import LORA_TARGETS, add_lora, lora_target_modules
from worker.toy.model import ToyModelConfig, build_unet

_TINY = Path(__file__).resolve().parents[1] / "tiny_pipelines.py"
_spec = importlib.util.spec_from_file_location("tiny_pipelines", _TINY)
assert _spec is not None and _spec.loader is not None
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(scope="module")
def unets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    root = tmp_path_factory.mktemp("unets")
    return {
        "toy": build_unet(ToyModelConfig()),
        "sd": UNet2DConditionModel.from_pretrained(tiny.build_tiny_sd(root / "sd") / "unet"),
        "sdxl": UNet2DConditionModel.from_pretrained(tiny.build_tiny_sdxl(root / "xl") / "unet"),
    }


def test_toy_unet_targets_counted_by_hand(unets):
    unet = unets["toy"]
    attention = lora_target_modules(unet, "attention")
    # 7 transformer blocks (down 2, mid 1, up 2 × 2) × 2 attentions × (q, k, v, out)
    assert len(attention) == 7 * 2 * 4
    conv = set(lora_target_modules(unet, "attention+conv")) - set(attention)
    # conv_in/out 2; resnet conv1+conv2: down 2, mid 2, up 4 → 16; shortcuts where channels
    # change: down 1 + up 4; one downsampler, one upsampler
    assert len(conv) == 2 + 16 + 5 + 2
    assert {"conv_in", "conv_out", "down_blocks.0.resnets.0.conv1"} <= conv
    assert "down_blocks.0.downsamplers.0.conv" in conv and "up_blocks.0.upsamplers.0.conv" in conv
    everything = {n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and n}
    assert set(lora_target_modules(unet, "all")) == everything


@pytest.mark.parametrize("kind", ["toy", "sd", "sdxl"])
def test_target_sets_nest_and_name_what_they_say(unets, kind):
    unet = unets[kind]
    attention, conv, every = (set(lora_target_modules(unet, t)) for t in LORA_TARGETS)
    assert attention < conv < every
    leaves = ("to_q", "to_k", "to_v", "to_out.0")
    assert all(name.endswith(leaves) for name in attention)
    modules = dict(unet.named_modules())
    assert all(isinstance(modules[name], nn.Conv2d) for name in conv - attention)
    # transformer projections, feed-forward and time embedding only under "all"
    extra = every - conv
    assert any(".ff." in n for n in extra) and any("time_embedding" in n for n in extra)
    assert any(n.endswith("proj_in") for n in extra)


def test_unknown_targets_are_refused(unets):
    with pytest.raises(ValueError, match="unknown LoRA targets 'convs'"):
        lora_target_modules(unets["toy"], "convs")


def test_fresh_adapter_leaves_the_unet_unchanged():
    torch.manual_seed(0)
    unet = build_unet(ToyModelConfig())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 5, ToyModelConfig().text_hidden)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=text).sample
    adapted = add_lora(unet, "all", rank=4)
    with torch.no_grad():
        after = unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(before, after)
    trainable = {n.split(".lora_")[0] for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == set(adapted)
