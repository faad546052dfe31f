"""Networks: backbones (ResUNet, DynUNet), the feature interface, heads and the builder. Tiny sizes only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from unionseg.errors import ConfigError
from unionseg.networks import build_network, count_parameters
from unionseg.networks.blocks import PreActResBlock, WSConv3d, group_count
from unionseg.networks.dynunet import DynUNetBackbone
from unionseg.networks.heads import DynamicHead, head_parameter_count
from unionseg.networks.resunet import RESUNET_PRESETS, ResUNet

SIZE = 16  # divisible by 8 (tiny presets: 4 levels)
N_TASKS = 3
BACKBONES = [{"name": "resunet", "preset": "tiny"}, {"name": "dynunet", "preset": "tiny"}]
TASK_HEADS = [
    {"name": "multihead", "n_tasks": N_TASKS, "out_channels": 2},
    {"name": "conditional", "n_tasks": N_TASKS, "out_channels": 2},
    {"name": "dynamic", "n_tasks": N_TASKS, "out_channels": 2},
]
ALL_HEADS = [{"name": "softmax", "out_channels": 5}, *TASK_HEADS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and OpenMP spin-waits crawl when other processes share the
    2 cores; restored afterwards so other test modules keep their setting."""
    with torch_threads(1):
        yield


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_net(backbone: dict[str, Any], head: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build_network({"backbone": dict(backbone), "head": dict(head)})


def image(batch: int = 2, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, size, size, size, generator=generator)


# ------------------------------------------------------------------ blocks
def test_group_count_adapts_to_narrow_widths() -> None:
    assert [group_count(c) for c in (1, 2, 4, 6, 8, 16, 32, 64, 256)] == [1, 1, 2, 3, 4, 8, 16, 16, 16]
    with pytest.raises(ValueError, match="must be positive"):
        group_count(0)


def test_group_norms_are_valid_in_narrow_networks() -> None:
    net = ResUNet(widths=(4, 8, 16, 16), blocks=(1, 1, 1, 1))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and any(m.num_channels == 4 for m in norms)
    for norm in norms:
        assert norm.num_channels % norm.num_groups == 0
        assert norm.num_channels // norm.num_groups >= 2
        assert norm.num_groups <= 16
    # the standard rule (32 groups) would be invalid for 4 channels; ours runs
    out = net(image(1))
    assert out.last.shape == (1, 4, SIZE, SIZE, SIZE)


def test_weight_standardisation_per_output_channel() -> None:
    torch.manual_seed(0)
    conv = WSConv3d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(torch.arange(5.0).view(5, 1, 1, 1, 1))  # shifted, scaled raw weights
    raw = conv.weight.reshape(5, -1)
    assert raw.mean(dim=1).abs().max() > 0.5  # the raw kernels are NOT standardised ...
    standardized = conv.standardized_weight().reshape(5, -1)
    assert torch.allclose(standardized.mean(dim=1), torch.zeros(5), atol=1e-5)  # ... the used ones are
    assert torch.allclose(standardized.std(dim=1, correction=0), torch.ones(5), atol=1e-3)
    x = torch.randn(1, 3, 6, 6, 6)
    expected = F.conv3d(x, conv.standardized_weight(), None, 1, 1)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    assert not torch.allclose(conv(x), F.conv3d(x, conv.weight, None, 1, 1), atol=1e-2)
    with pytest.raises(ValueError, match="at least 2 weights per output channel"):
        WSConv3d(1, 4, 1)  # one weight per output channel cannot be standardised


def test_weight_standardisation_keeps_the_kernel_layout() -> None:
    # a reshape-based standardisation copied channels-last kernels back to the contiguous layout, and the
    # convolutions lost most of what the layout buys; the standardised kernel must keep the strides
    torch.manual_seed(0)
    conv = WSConv3d(4, 6, 3, padding=1)
    reference = conv.standardized_weight()
    with torch.no_grad():
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    standardized = conv.standardized_weight()
    assert standardized.is_contiguous(memory_format=torch.channels_last_3d) and not standardized.is_contiguous()
    assert torch.allclose(standardized, reference, atol=1e-6)


def test_preact_block_downsamples_with_projection() -> None:
    block = PreActResBlock(4, 8, stride=2)
    assert block(torch.randn(1, 4, 8, 8, 8)).shape == (1, 8, 4, 4, 4)
    assert not isinstance(block.shortcut, torch.nn.Identity)
    assert isinstance(PreActResBlock(4, 4).shortcut, torch.nn.Identity)


# ------------------------------------------------------------------ backbones
@pytest.mark.parametrize("spec", BACKBONES, ids=lambda s: s["name"])
def test_backbone_feature_interface(spec: dict[str, Any]) -> None:
    net = make_net(spec, {"name": "dynamic", "n_tasks": 2, "out_channels": 2}).eval()
    backbone = net.backbone
    with torch.no_grad():
        out = backbone(image())
    assert [t.shape[1] for t in out.decoder] == list(backbone.decoder_channels)
    assert [t.shape[2] for t in out.decoder] == [4, 8, 16]  # coarse -> fine, last at full resolution
    assert out.last.shape == (2, backbone.out_channels, SIZE, SIZE, SIZE)
    assert backbone.out_channels == 4  # widths[0]
    assert out.bottleneck.shape == (2, backbone.bottleneck_channels, 2, 2, 2)
    if spec["name"] == "resunet":
        assert out.bottleneck.min() >= 0 and (out.bottleneck == 0).any()  # after GN-ReLU


@pytest.mark.parametrize("spec", BACKBONES, ids=lambda s: s["name"])
def test_features_upto_matches_full_forward(spec: dict[str, Any]) -> None:
    backbone = make_net(spec, {"name": "softmax", "out_channels": 3}).backbone.eval()
    x = image()
    with torch.no_grad():
        full = backbone(x)
        for stage in range(backbone.n_decoder_stages):
            partial = backbone.features_upto(x, stage)
            assert torch.allclose(partial, full.decoder[stage], atol=1e-6)
        assert torch.allclose(backbone.features_upto(x, -1), full.last, atol=1e-6)
        # a different stage is a different tensor (the check above can fail)
        assert backbone.features_upto(x, 0).shape != full.last.shape
    with pytest.raises(IndexError, match="out of range for"):
        backbone.features_upto(x, backbone.n_decoder_stages)


def test_resunet_bottleneck_is_gn_relu_of_fused_features() -> None:
    torch.manual_seed(0)
    net = ResUNet(widths=(4, 8, 16, 16), blocks=(1, 1, 1, 1)).eval()
    x = image()
    with torch.no_grad():
        skips, fused = net._encode(x)
        expected = net.bottleneck_norm(fused.clone())
        out = net(x)
    assert torch.allclose(out.bottleneck, expected)
    assert (out.bottleneck == 0).any() and (fused < 0).any()  # the ReLU acted


def test_resunet_width_change_at_bottleneck_and_transposed_upsampling() -> None:
    cpu = ResUNet(**RESUNET_PRESETS["cpu"])  # 64-wide bottleneck above a 32-wide level: projected
    assert cpu.decoder_channels == (16, 8, 8)
    assert cpu(image(1)).last.shape == (1, 8, SIZE, SIZE, SIZE)
    transposed = ResUNet(widths=(4, 8, 16), blocks=(1, 1, 1), upsample="transpose")
    out = transposed(image(1))
    assert out.last.shape == (1, 4, SIZE, SIZE, SIZE) and out.bottleneck.shape == (1, 16, 4, 4, 4)
    with pytest.raises(ValueError, match="upsample"):
        ResUNet(widths=(4, 8), blocks=(1, 1), upsample="nearest")


@pytest.mark.parametrize("spec", BACKBONES, ids=lambda s: s["name"])
def test_input_size_must_be_divisible(spec: dict[str, Any]) -> None:
    backbone = make_net(spec, {"name": "softmax", "out_channels": 2}).backbone
    assert backbone.divisor == (8, 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        backbone(torch.randn(1, 1, 12, 16, 16))
    assert backbone(torch.randn(1, 1, 8, 16, 24)).last.shape == (1, 4, 8, 16, 24)


def test_dynunet_anisotropic_strides() -> None:
    backbone = DynUNetBackbone(widths=(4, 8, 16), strides=(1, (1, 2, 2), 2))
    assert backbone.divisor == (2, 4, 4)
    assert backbone(torch.randn(1, 1, 4, 8, 8)).last.shape == (1, 4, 4, 8, 8)


# ------------------------------------------------------------------ heads
@pytest.mark.parametrize("backbone", BACKBONES, ids=lambda s: s["name"])
@pytest.mark.parametrize("head", ALL_HEADS, ids=lambda s: s["name"])
def test_output_shapes(backbone: dict[str, Any], head: dict[str, Any]) -> None:
    net = make_net(backbone, head).eval()
    x = image()
    with torch.no_grad():
        per_task = net(x, torch.tensor([0, 2]))
        all_tasks, features = net(x, return_features=True) if head["name"] != "conditional" else (net(x), None)
    if head["name"] == "softmax":
        assert per_task.shape == all_tasks.shape == (2, 5, SIZE, SIZE, SIZE)
        assert net.output_channels == 5
    else:
        assert per_task.shape == (2, 2, SIZE, SIZE, SIZE)
        assert all_tasks.shape == (2, N_TASKS * 2, SIZE, SIZE, SIZE)
        assert net.output_channels == N_TASKS * 2
    if features is not None:
        assert features.last.shape[1] == net.backbone.out_channels


@pytest.mark.parametrize("head", TASK_HEADS, ids=lambda s: s["name"])
def test_all_task_forward_equals_per_task_forwards(head: dict[str, Any]) -> None:
    net = make_net(BACKBONES[0], head).eval()
    x = image()
    with torch.no_grad():
        all_tasks = net(x)
        for task in range(N_TASKS):
            single = net(x, torch.full((2,), task))
            assert torch.allclose(all_tasks[:, 2 * task : 2 * task + 2], single, atol=1e-5)
        mixed = net(x, torch.tensor([2, 0]))
    assert torch.allclose(mixed[0], all_tasks[0, 4:6], atol=1e-5)
    assert torch.allclose(mixed[1], all_tasks[1, 0:2], atol=1e-5)
    assert not torch.allclose(all_tasks[:, 0:2], all_tasks[:, 2:4], atol=1e-4)  # tasks really differ


@pytest.mark.parametrize("head", ALL_HEADS, ids=lambda s: s["name"])
def test_samples_with_different_tasks_are_independent(head: dict[str, Any]) -> None:
    net = make_net(BACKBONES[0], head).eval()
    x = image()
    changed = x.clone()
    changed[1] = torch.randn(1, SIZE, SIZE, SIZE)
    task_ids = torch.tensor([0, 1])
    with torch.no_grad():
        before, after = net(x, task_ids), net(changed, task_ids)
    assert torch.allclose(before[0], after[0], atol=1e-6)
    assert not torch.allclose(before[1], after[1], atol=1e-4)


def test_dynamic_head_parameters_depend_on_the_image() -> None:
    net = make_net(BACKBONES[0], {"name": "dynamic", "n_tasks": N_TASKS, "out_channels": 2}).eval()
    with torch.no_grad():
        different = net.controller_params(image(), torch.tensor([1, 1]))
        same_image = net.controller_params(image(1).expand(2, -1, -1, -1, -1), torch.tensor([1, 1]))
        other_task = net.controller_params(image(), torch.tensor([1, 2]))
    assert different.shape == (2, 162)
    assert not torch.allclose(different[0], different[1], atol=1e-6)  # same task, different images
    assert torch.allclose(same_image[0], same_image[1], atol=1e-6)
    assert not torch.allclose(other_task[1], different[1], atol=1e-6)  # task code matters


def test_generated_head_biases_start_at_zero() -> None:
    """zero_bias_init: every generated bias is 0 at initialisation, for any image and task, while
    the generated weights still depend on both; the default-init twin generates non-zero biases."""
    spec = {"name": "dynamic", "n_tasks": N_TASKS, "out_channels": 2}
    for zero in (True, False):
        net = make_net(BACKBONES[0], {**spec, "zero_bias_init": zero}).eval()
        with torch.no_grad():
            params = net.controller_params(image(), torch.tensor([0, 2]))
        layers = net.head.split_params(params)
        biases = torch.cat([b for _, b in layers], dim=1)
        weights = torch.cat([w.flatten(1) for w, _ in layers], dim=1)
        assert biases.shape == (2, 8 + 8 + 2)
        assert torch.equal(biases, torch.zeros_like(biases)) == zero
        assert not torch.allclose(weights[0], weights[1], atol=1e-6)
    with pytest.raises(ConfigError, match="true or false"):
        make_net(BACKBONES[0], {**spec, "zero_bias_init": "yes"})


def test_fan_in_init_gives_each_task_its_own_kaiming_head() -> None:
    """fan_in_init: at initialisation the generated biases are 0 and the generated weights do not depend on
    the image (same parameters for two different images of one task) but differ between tasks, with about the
    variance of a fan-in-initialised layer (2 / c_in before a ReLU, 1 / c_in at the output); it keeps the
    image part learnable (non-zero gradient on the pooled-feature columns) and combines with image_gain."""
    torch.manual_seed(0)
    spec = {"name": "dynamic", "n_tasks": N_TASKS, "out_channels": 2, "head_widths": [16, 16],
            "fan_in_init": True}
    for gain in (1.0, 1 / 64):
        net = make_net(BACKBONES[0], {**spec, "image_gain": gain}).eval()
        head = net.head
        params = net.controller_params(image(), torch.tensor([1, 1]))
        assert torch.allclose(params[0], params[1], atol=1e-7)  # no image dependence at the start
        every = head.controller_params(net.backbone(image()).bottleneck, None)[0]  # (T, n_params)
        layers = head.split_params(every)
        for index, ((weight, bias), (c_in, _)) in enumerate(zip(layers, head.layer_dims, strict=True)):
            assert torch.equal(bias, torch.zeros_like(bias))
            expected = (1.0 if index == len(layers) - 1 else 2.0) / c_in
            assert 0.6 * expected < weight.var().item() < 1.5 * expected, (index, weight.var().item())
            assert not torch.allclose(weight[0], weight[1])  # tasks start from different heads
        cb = head.bottleneck_channels
        assert torch.count_nonzero(head.controller.weight[:, :cb]) == 0  # the image part starts at zero...
        assert torch.count_nonzero(head.controller.bias) == 0
        params.sum().backward()
        assert head.controller.weight.grad[:, :cb].abs().sum() > 0  # ...and learns
    default = make_net(BACKBONES[0], {**spec, "fan_in_init": False}).eval()
    params = default.controller_params(image(), torch.tensor([1, 1]))
    assert not torch.allclose(params[0], params[1], atol=1e-6)


def test_leaky_head_passes_negative_inputs() -> None:
    """negative_slope > 0: the hidden layers pass negative inputs scaled by the slope (the head then differs
    from the ReLU twin with the same weights); 0 is DoDNet's ReLU; out-of-range slopes are refused."""
    spec = {"name": "dynamic", "n_tasks": N_TASKS, "out_channels": 2}
    torch.manual_seed(0)
    relu = make_net(BACKBONES[0], spec).eval()
    leaky = make_net(BACKBONES[0], {**spec, "negative_slope": 0.1}).eval()
    leaky.load_state_dict(relu.state_dict())
    h = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(relu.head.activation(h), torch.tensor([0.0, 0.0, 3.0]))
    assert torch.allclose(leaky.head.activation(h), torch.tensor([-0.2, 0.0, 3.0]))
    x, tasks = image(), torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.allclose(relu(x, tasks), leaky(x, tasks), atol=1e-6)
    assert leaky.spec["head"]["negative_slope"] == 0.1 and relu.spec["head"]["negative_slope"] == 0.0
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ConfigError, match="negative_slope"):
            make_net(BACKBONES[0], {**spec, "negative_slope": bad})


def test_equalized_controller_same_start_smaller_adam_step() -> None:
    """Same initial head; one identical Adam step moves the generated parameters much less (the pooled-feature
    columns are scaled by 1/sqrt(Cb); the task-code columns and the bias still move by lr)."""
    spec = {"name": "dynamic", "n_tasks": N_TASKS, "out_channels": 2}
    moves, starts = [], []
    for equalized in (False, True):
        torch.manual_seed(0)
        net = make_net(BACKBONES[0], {**spec, "equalized_controller": equalized}).eval()
        x, tasks = image(), torch.tensor([0, 1])
        with torch.no_grad():
            start = net.controller_params(x, tasks)
        opt = torch.optim.Adam(net.head.controller.parameters(), lr=1e-3)
        net.controller_params(x, tasks).square().sum().backward()
        opt.step()
        with torch.no_grad():
            moves.append((net.controller_params(x, tasks) - start).abs().mean().item())
        starts.append(start)
        if equalized:
            cb = net.head.bottleneck_channels
            assert torch.allclose(net.head._column_gain[:cb], torch.full((cb,), cb ** -0.5))
            assert torch.equal(net.head._column_gain[cb:], torch.ones(N_TASKS))
    assert torch.allclose(starts[0], starts[1], atol=1e-6)
    # the bias moves lr either way; the weight part shrinks by the gain
    assert moves[1] < moves[0] / 2
    with pytest.raises(ConfigError, match="true or false"):
        make_net(BACKBONES[0], {**spec, "equalized_controller": 1})


def test_column_gains_scale_the_adam_step_of_their_part_only() -> None:
    """``image_gain`` g / ``task_gain`` k: same initial head; after one Adam step on the controller (bias
    frozen), the pooled-feature columns' share of the change scales by g and the task-code columns' by k,
    each leaving the other part alone."""
    spec = {"name": "dynamic", "n_tasks": N_TASKS, "out_channels": 2}
    x, tasks = image(), torch.tensor([0, 1])
    starts, image_moves, code_moves = [], [], []
    gains = ((1.0, 1.0), (1 / 64, 1.0), (1.0, 4.0))
    for image_gain, task_gain in gains:
        torch.manual_seed(0)
        net = make_net(BACKBONES[0], {**spec, "image_gain": image_gain, "task_gain": task_gain}).eval()
        head = net.head
        cb = head.bottleneck_channels
        with torch.no_grad():
            start = net.controller_params(x, tasks)
            used_before = head.controller.weight * head._column_gain
        opt = torch.optim.Adam([head.controller.weight], lr=1e-3)
        net.controller_params(x, tasks).square().sum().backward()
        opt.step()
        with torch.no_grad():
            delta = head.controller.weight * head._column_gain - used_before
        starts.append(start)
        image_moves.append(delta[:, :cb].abs().mean().item())
        code_moves.append(delta[:, cb:].abs().mean().item())
        assert head.image_gain == image_gain and net.spec["head"]["image_gain"] == image_gain
        assert head.task_gain == task_gain and net.spec["head"]["task_gain"] == task_gain
    for start in starts[1:]:
        assert torch.allclose(starts[0], start, atol=1e-5)
    assert image_moves[1] == pytest.approx(image_moves[0] / 64, rel=0.05)
    assert code_moves[1] == pytest.approx(code_moves[0], rel=0.05)
    assert code_moves[2] == pytest.approx(code_moves[0] * 4, rel=0.05)
    assert image_moves[2] == pytest.approx(image_moves[0], rel=0.05)
    for key, bads in (("image_gain", (0, 0.0, 1.5, -0.1, True, "0.5")), ("task_gain", (0, -1.0, 65.0, True))):
        for bad in bads:
            with pytest.raises(ConfigError, match=key):
                make_net(BACKBONES[0], {**spec, key: bad})
    with pytest.raises(ConfigError, match="pick one"):
        make_net(BACKBONES[0], {**spec, "image_gain": 0.5, "equalized_controller": True})


@pytest.mark.parametrize(
    ("feature_channels", "head_widths", "out_channels", "expected"),
    [(8, (8, 8), 2, 162), (8, (8, 8), 1, 153), (4, (6,), 3, 4 * 6 + 6 + 6 * 3 + 3), (8, (), 2, 18)],
)
def test_controller_output_size_is_computed(
    feature_channels: int, head_widths: tuple[int, ...], out_channels: int, expected: int
) -> None:
    assert head_parameter_count(feature_channels, head_widths, out_channels) == expected
    spec = {
        "backbone": {"name": "resunet", "preset": "tiny"},
        "head": {
            "name": "dynamic", "n_tasks": N_TASKS, "out_channels": out_channels,
            "feature_channels": feature_channels, "head_widths": list(head_widths),
        },
    }
    net = build_network(spec).eval()
    assert net.head.controller.out_features == expected
    with torch.no_grad():
        assert net.controller_params(image(), torch.tensor([0, 1])).shape == (2, expected)
        assert net.controller_params(image(), None).shape == (2, N_TASKS, expected)
        assert net(image()).shape == (2, N_TASKS * out_channels, SIZE, SIZE, SIZE)


@pytest.mark.parametrize("chunk", [16384, 7])  # one pass, and 10 voxel chunks with a ragged last one
def test_dynamic_head_matches_a_per_sample_reference(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    head = DynamicHead(in_channels=4, bottleneck_channels=6, n_tasks=2, out_channels=3, head_widths=(5,))
    monkeypatch.setattr(head, "VOXEL_CHUNK", chunk)
    features = torch.randn(3, 8, 4, 4, 4)
    params = torch.randn(3, 2, head.n_params)
    got = head.apply_head(features, params)
    for sample in range(3):
        for task in range(2):
            h = features[sample : sample + 1]
            layers = head.split_params(params[sample, task : task + 1])
            for index, (weight, bias) in enumerate(layers):
                h = F.conv3d(h, weight[0][:, :, None, None, None], bias[0])
                h = F.relu(h) if index < len(layers) - 1 else h
            assert torch.allclose(got[sample, 3 * task : 3 * task + 3], h[0], atol=1e-5)


def test_backbone_runs_once_for_all_tasks_except_conditional() -> None:
    counts = {}
    for head in TASK_HEADS:
        net = make_net(BACKBONES[0], head).eval()
        calls: list[int] = []
        net.backbone.register_forward_hook(lambda *_, log=calls: log.append(1))
        with torch.no_grad():
            net(image())
        counts[head["name"]] = len(calls)
    assert counts == {"multihead": 1, "dynamic": 1, "conditional": N_TASKS}


def test_task_ids_are_validated() -> None:
    net = make_net(BACKBONES[0], TASK_HEADS[2]).eval()
    with pytest.raises(ValueError, match="shape"):
        net(image(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        net(image(), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="task_ids"):
        make_net(BACKBONES[0], TASK_HEADS[1])(image(), return_features=True)


@pytest.mark.parametrize("backbone", BACKBONES, ids=lambda s: s["name"])
@pytest.mark.parametrize("head", ALL_HEADS, ids=lambda s: s["name"])
def test_gradients_reach_every_parameter(backbone: dict[str, Any], head: dict[str, Any]) -> None:
    """Every parameter takes part in a mixed-task step (DDP without find_unused_parameters)."""
    net = make_net(backbone, head).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    logits = net(image(), torch.tensor([0, 2]))
    loss = logits.float().square().mean()
    loss.backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    backbone_grads = [p.grad for p in net.backbone.parameters()]
    assert sum(float(g.abs().sum()) for g in backbone_grads if g is not None) > 0
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


def test_multihead_trains_only_the_chosen_tasks_weights() -> None:
    net = make_net(BACKBONES[0], TASK_HEADS[0])
    net(image(size=8), torch.tensor([0, 0])).square().mean().backward()
    grad = net.head.conv.weight.grad.view(N_TASKS, 2, -1)
    assert grad[0].abs().sum() > 0
    assert grad[1:].abs().sum() == 0


def test_amp_and_channels_last() -> None:
    net = make_net(BACKBONES[0], TASK_HEADS[2]).eval()
    x = image()
    with torch.no_grad():
        reference = net(x)
        channels_last = net.to(memory_format=torch.channels_last_3d)(x.to(memory_format=torch.channels_last_3d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert torch.allclose(channels_last, reference, atol=1e-4)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low.float()).all()
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.05


# ------------------------------------------------------------------ builder
def test_build_network_resolves_and_rebuilds_from_its_spec() -> None:
    net = make_net({"name": "resunet", "preset": "tiny", "upsample": "transpose"}, TASK_HEADS[2])
    assert net.spec["backbone"]["widths"] == [4, 8, 16, 16] and net.spec["backbone"]["upsample"] == "transpose"
    assert net.spec["head"]["head_widths"] == [8, 8] and net.spec["head"]["feature_channels"] == 8
    rebuilt = build_network(net.spec)
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(image()), net.eval()(image()))


def test_conditional_backbone_gets_task_code_channels() -> None:
    net = make_net(BACKBONES[0], TASK_HEADS[1])
    assert net.backbone.in_channels == 1 + N_TASKS and net.image_channels == 1
    assert net.spec["backbone"]["in_channels"] == 1


@pytest.mark.parametrize(
    "spec,problem",
    [
        ({"backbone": {"name": "resnet"}, "head": {"name": "softmax", "out_channels": 2}},
         "network.backbone must be one of"),
        ({"backbone": {"name": "resunet", "preset": "huge"}, "head": {"name": "softmax", "out_channels": 2}},
         "network.preset must be one of"),
        ({"backbone": {"name": "resunet", "width": 3}, "head": {"name": "softmax", "out_channels": 2}},
         r"unknown keys \['width'\]"),
        ({"backbone": {"name": "resunet", "widths": [4, 8], "blocks": [1]}, "head": {"name": "softmax", "out_channels": 2}},
         "must have one entry per width"),
        ({"backbone": {"name": "resunet"}, "head": {"name": "dynamic", "out_channels": 2}},
         "n_tasks is required for the dynamic head"),
        ({"backbone": {"name": "resunet"}, "head": {"name": "softmax", "out_channels": 0}},
         "out_channels must be a positive integer"),
        ({"backbone": {"name": "resunet"}, "head": {"name": "softmax", "out_channels": 2, "n_tasks": 2}},
         r"unknown keys \['n_tasks'\] for softmax"),
    ],
)
def test_build_network_rejects_bad_specs(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build_network(spec)


def test_build_network_accepts_explicit_kwargs() -> None:
    net = build_network(
        {"backbone": {"name": "resunet", "widths": [4, 8], "blocks": [1, 1]}, "head": {"name": "softmax", "out_channels": 2}}
    )
    assert net(image(1, size=4)).shape == (1, 2, 4, 4, 4)


def test_preset_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    counts = {}
    for preset in ("tiny", "cpu", "gpu"):
        net = make_net({"name": "resunet", "preset": preset}, {"name": "dynamic", "n_tasks": 7, "out_channels": 2})
        counts[preset] = (count_parameters(net.backbone), count_parameters(net))
    with capsys.disabled():
        print("\nResUNet+dynamic head (7 tasks) parameters (backbone, total):", counts)
    assert counts["tiny"][1] < counts["cpu"][1] < counts["gpu"][1]
    # DoDNet reports 17.3M parameters for its network (paper widths, 7 tasks)
    assert abs(counts["gpu"][1] - 17.3e6) < 0.05e6


# ------------------------------------------------------------------ memory layout
@pytest.mark.parametrize("head", ALL_HEADS, ids=lambda h: h["name"])
@pytest.mark.parametrize("backbone", BACKBONES, ids=lambda b: b["name"])
def test_channels_last_layout_keeps_outputs_and_gradients(backbone: dict[str, Any], head: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``set_layout`` on the CPU stores every 3-D kernel channels-last and changes nothing but rounding."""
    from unionseg.networks import set_layout

    monkeypatch.delenv("UNIONSEG_CHANNELS_LAST", raising=False)
    ref, net = make_net(backbone, head), make_net(backbone, head)
    assert set_layout(net, "cpu") is net
    kernels = [p for p in net.parameters() if p.dim() == 5]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in kernels)
    assert all(p.stride(1) == 1 for p in kernels)  # one-channel kernels too (stem): a real change of layout
    assert any(not p.is_contiguous() for p in kernels)
    x, tasks = image(), torch.tensor([0, N_TASKS - 1])
    x_in = x.expand(-1, net.backbone.in_channels, -1, -1, -1).contiguous()  # conditional: image + task codes
    assert net.backbone.prepare_input(x_in).stride(1) == 1 and ref.backbone.prepare_input(x_in).stride(1) != 1
    out_ref, out = ref(x, tasks), net(x, tasks)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), net.parameters(), strict=True):
        assert p.grad is not None and p_ref.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_resunet_stays_channels_last_to_the_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Converting the kernels once switches the whole ResUNet: every module's 5-D output and the softmax
    logits come out channels-last (no layer re-lays its input). Twin: without ``set_layout`` none does.
    Two threads, as in training: with one, PyTorch runs small-batch 1x1x1 convolutions without oneDNN, and
    those return contiguous outputs (see :mod:`unionseg.networks.layout`)."""
    from unionseg.networks import set_layout

    monkeypatch.delenv("UNIONSEG_CHANNELS_LAST", raising=False)
    net = make_net(BACKBONES[0], ALL_HEADS[0])
    outputs: dict[str, torch.Tensor] = {}
    for name, module in net.named_modules():
        if name:
            module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))

    def channels_last(t: torch.Tensor) -> bool:
        return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()

    def five_d() -> dict[str, torch.Tensor]:
        return {k: t for k, t in outputs.items() if isinstance(t, torch.Tensor) and t.dim() == 5}

    with torch_threads(2), torch.no_grad():
        net(image())
        assert five_d() and not any(channels_last(t) for t in five_d().values())
        set_layout(net, "cpu")
        outputs.clear()
        logits = net(image())
    tensors = five_d()
    assert "head" in tensors and "backbone.stem" in tensors and len(tensors) > 10
    assert channels_last(logits) and all(channels_last(t) for t in tensors.values()), \
        {k: t.stride() for k, t in tensors.items() if not channels_last(t)}


def test_channels_last_choice_per_device_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from unionseg.networks import channels_last_for, set_layout

    monkeypatch.delenv("UNIONSEG_CHANNELS_LAST", raising=False)
    assert channels_last_for("cpu") and not channels_last_for("cuda")
    monkeypatch.setenv("UNIONSEG_CHANNELS_LAST", "0")
    assert not channels_last_for("cpu")
    net = set_layout(set_layout(make_net(BACKBONES[0], ALL_HEADS[0]), "cuda"), "cpu")  # forced off: contiguous
    assert all(p.is_contiguous() for p in net.parameters())
    monkeypatch.setenv("UNIONSEG_CHANNELS_LAST", "1")
    assert channels_last_for("cuda")
    monkeypatch.setenv("UNIONSEG_CHANNELS_LAST", "maybe")
    with pytest.raises(ValueError, match="UNIONSEG_CHANNELS_LAST"):
        channels_last_for("cpu")
