"""The architectures: exact parameter counts, MACs against the papers, torchvision key layout,
shortcut options, and a forward pass of every registered architecture at small size."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from models.blocks import ProjectionShortcut, Shortcut, ZeroPadShortcut
from models.registry import PAPER_SET, complexity, get_spec, list_specs

from .support.service import run_module

# torchvision's published figures (ResNet*_Weights.IMAGENET1K_V1 meta: num_params, GFLOPS).
TORCHVISION = {
    18: (11_689_512, 1.814),
    34: (21_797_672, 3.664),
    50: (25_557_032, 4.089),
    101: (44_549_160, 7.801),
    152: (60_192_808, 11.514),
}
# He et al. 2016, Table 1: "FLOPs" (multiply-adds) with the paper's stride placement.
PAPER_TABLE1_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}
# CIFAR option A (He et al. Sec. 4.2; the published checkpoints: 0.27M, 0.46M, ...).
CIFAR_PARAMS = {
    20: 269_722,
    32: 464_154,
    44: 658_586,
    56: 853_018,
    110: 1_727_962,
    1202: 19_421_274,
}
HUGE = {"cifar_resnet1202", "cifar_preact_resnet1001"}


@pytest.mark.parametrize("depth", sorted(TORCHVISION))
def test_imagenet_params_and_macs_match_torchvision(depth: int) -> None:
    params, macs = complexity(get_spec(f"resnet{depth}"))
    assert params == TORCHVISION[depth][0]
    assert round(macs / 1e9, 3) == TORCHVISION[depth][1]


@pytest.mark.parametrize("depth", sorted(PAPER_TABLE1_GMACS))
def test_macs_match_paper_table1_with_paper_stride_placement(depth: int) -> None:
    """Table 1 rounds to 0.1 G and puts a bottleneck's stride on its first 1x1 conv ("v1")."""
    name = f"resnet{depth}_v1" if depth >= 50 else f"resnet{depth}"
    _, macs = complexity(get_spec(name))
    assert macs / 1e9 == pytest.approx(PAPER_TABLE1_GMACS[depth], rel=0.025)


def test_v15_costs_more_than_v1_for_the_same_parameters() -> None:
    v15, v1 = get_spec("resnet50"), get_spec("resnet50_v1")
    assert complexity(v15)[0] == complexity(v1)[0]
    assert round(complexity(v15)[1] / 1e9, 2) == 4.09
    assert round(complexity(v1)[1] / 1e9, 2) == 3.86


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS))
def test_cifar_option_a_params(depth: int) -> None:
    spec = get_spec(f"cifar_resnet{depth}")
    assert spec.depth == depth
    assert complexity(spec)[0] == CIFAR_PARAMS[depth]


def _projection_params(spec_name: str) -> int:
    """Conv 1x1 + BN (weight, bias) for every projection the spec should have."""
    spec = get_spec(spec_name)
    total, in_planes = 0, 16
    for stage, planes in enumerate((16, 32, 64)):
        for block in range(spec.layers[stage]):
            changes = block == 0 and (stage > 0)
            if spec.shortcut is Shortcut.C or (spec.shortcut is Shortcut.B and changes):
                total += in_planes * planes + 2 * planes
            in_planes = planes
    return total


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_shortcut_options_parameter_cost(depth: int) -> None:
    base = complexity(get_spec(f"cifar_resnet{depth}"))[0]
    plain = complexity(get_spec(f"cifar_plain{depth}"))[0] if depth <= 56 else base
    assert plain == base, "option A adds no parameters over the plain net"
    for option in ("b", "c"):
        name = f"cifar_resnet{depth}_{option}"
        assert complexity(get_spec(name))[0] == base + _projection_params(name)


def test_shortcut_modules_per_option() -> None:
    def kinds(name: str) -> list[str]:
        model = get_spec(name).build()
        return [type(b.downsample).__name__ for s in (1, 2, 3) for b in getattr(model, f"layer{s}")]

    assert (
        kinds("cifar_resnet20")
        == ["NoneType"] * 3
        + ["ZeroPadShortcut"]
        + ["NoneType"] * 2
        + ["ZeroPadShortcut"]
        + ["NoneType"] * 2
    )
    assert kinds("cifar_resnet20_b").count("ProjectionShortcut") == 2
    assert kinds("cifar_resnet20_c") == ["ProjectionShortcut"] * 9
    plain = get_spec("cifar_plain20").build()
    assert not any(isinstance(m, ZeroPadShortcut | ProjectionShortcut) for m in plain.modules())
    assert not any(getattr(m, "residual", False) for m in plain.modules())


def test_plain_block_has_no_identity_path() -> None:
    """Zero the residual branch: a ResNet block passes its input through, a plain block does not."""
    for name, expect_identity in (("cifar_resnet20", True), ("cifar_plain20", False)):
        block = get_spec(name).build().layer1[0].eval()
        nn.init.zeros_(block.bn2.weight)
        nn.init.zeros_(block.bn2.bias)
        x = torch.rand(1, 16, 8, 8)
        out = block(x)
        assert torch.equal(out, x) is expect_identity


def test_zero_pad_shortcut_subsamples_and_pads_evenly() -> None:
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).reshape(2, 16, 4, 4)
    out = ZeroPadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert "16 -> 32, stride=2" in repr(ZeroPadShortcut(16, 32, 2))


def test_shortcut_parse_rejects_unknown_option() -> None:
    assert Shortcut.parse("b") is Shortcut.B
    with pytest.raises(ValueError, match="unknown shortcut option 'D'"):
        Shortcut.parse("D")


def torchvision_expected_state(depth: int) -> dict[str, tuple[int, ...]]:
    """torchvision's resnet{depth} state-dict keys and shapes, written out from its layout:
    conv1/bn1, layer1..4 of BasicBlock (conv1, bn1, conv2, bn2) or Bottleneck (conv1..3,
    bn1..3, expansion 4), `downsample.0` (1x1 conv) + `downsample.1` (BN) on a stage's first
    block where the shape changes, then fc."""
    kind, layers = {
        18: ("basic", (2, 2, 2, 2)),
        34: ("basic", (3, 4, 6, 3)),
        50: ("bottleneck", (3, 4, 6, 3)),
        101: ("bottleneck", (3, 4, 23, 3)),
        152: ("bottleneck", (3, 8, 36, 3)),
    }[depth]
    state: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            state[f"{prefix}.{leaf}"] = (c,)
        state[f"{prefix}.num_batches_tracked"] = ()

    state["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        for b in range(blocks):
            p = f"layer{i + 1}.{b}"
            if kind == "basic":
                state[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                state[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                out = planes
            else:
                state[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                state[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                state[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
                out = planes * 4
            stride = 2 if (b == 0 and i > 0) else 1
            if b == 0 and (stride != 1 or inplanes != out):
                state[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    state["fc.weight"] = (1000, inplanes)
    state["fc.bias"] = (1000,)
    return state


@pytest.mark.parametrize("depth", sorted(TORCHVISION))
def test_state_dict_layout_is_torchvisions(depth: int) -> None:
    with torch.device("meta"):
        model = get_spec(f"resnet{depth}").build()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = torchvision_expected_state(depth)
    assert list(ours) == list(expected), "same keys in the same order"
    assert ours == expected
    assert sum(v.numel() for k, v in model.state_dict().items() if "running" not in k and
               "num_batches" not in k) == TORCHVISION[depth][0]  # fmt: skip


@pytest.mark.parametrize(("name", "conv1", "conv2"), [("resnet50", 1, 2), ("resnet50_v1", 2, 1)])
def test_bottleneck_stride_placement(name: str, conv1: int, conv2: int) -> None:
    with torch.device("meta"):
        block = get_spec(name).build().layer2[0]
    assert block.conv1.stride == (conv1, conv1)
    assert block.conv2.stride == (conv2, conv2)


@pytest.mark.parametrize(
    "spec", [s for s in list_specs() if s.name not in HUGE], ids=lambda s: s.name
)
def test_every_architecture_runs_and_exposes_embedding(spec) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = spec.build().eval()
    size = 64 if spec.family == "imagenet" else 32  # small input: adaptive pooling allows it
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, embedding = model.forward_with_embedding(x)
        assert torch.equal(model(x), logits)
    assert logits.shape == (2, spec.num_classes)
    assert embedding.shape == (2, spec.embedding_dim)
    torch.testing.assert_close(model.fc(embedding), logits)
    assert spec.preact == any("PreAct" in type(m).__name__ for m in model.modules())


def test_huge_depths_are_counted_without_building_weights() -> None:
    for name in HUGE:
        params, macs = complexity(get_spec(name))
        assert params > 10_000_000 and macs > 1e9


def test_preact_paper_nets() -> None:
    """Identity Mappings [2]: ResNet-164 1.7M and ResNet-1001 10.2M parameters (rounded)."""
    assert get_spec("cifar_preact_resnet164").depth == 164
    assert get_spec("cifar_preact_resnet1001").depth == 1001
    assert round(complexity(get_spec("cifar_preact_resnet164"))[0] / 1e6, 1) == 1.7
    assert round(complexity(get_spec("cifar_preact_resnet1001"))[0] / 1e6, 1) == 10.3


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    from models.registry import register

    with pytest.raises(ValueError, match="already registered"):
        register(get_spec("resnet18"))
    with pytest.raises(KeyError, match="unknown architecture 'resnet19'"):
        get_spec("resnet19")


def test_models_list_cli(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module("models", "list", "--json", timeout_s=120)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(PAPER_SET) <= set(rows)
    assert len(rows) == len(list_specs())
    r = rows["cifar_resnet20"]
    assert r == r | {
        "family": "cifar",
        "depth": 20,
        "block": "basic",
        "preact": False,
        "plain": False,
        "shortcut": "A",
        "params": 269_722,
        "input_size": [3, 32, 32],
        "embedding_dim": 64,
        "num_classes": 10,
    }
    assert rows["resnet50"]["macs"] == complexity(get_spec("resnet50"))[1]
    from models.__main__ import main

    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert "resnet152" in table and "60,192,808" in table
