"""Unit tests of the method building blocks: averages, region masks, pseudo labels, experts, tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from unionseg.artifacts import combine_with_ground_truth
from unionseg.ensemble import ExpertEnsemble, experts_to_groups
from unionseg.labels import merge
from unionseg.methods.cotraining import region_mask
from unionseg.methods.dodnet import task_channels
from unionseg.methods.expert import expert_subspace
from unionseg.training.ema import WeightAverage, decay_from_half_life


# ---------------------------------------------------------------------- weight average
def test_average_update_matches_formula() -> None:
    net = nn.Linear(3, 2)
    avg = WeightAverage(net, decay=0.9)
    expected = [p.detach().clone() for p in net.parameters()]
    for t in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * (t + 1))
        avg.update(net)
        d = min(0.9, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters(), strict=False)]
    for e, p in zip(expected, avg.module.parameters(), strict=False):
        assert torch.allclose(e, p, atol=1e-6)


def test_a_loaded_average_goes_on_with_its_own_update_count() -> None:
    """The count is kept on the host (reading the buffer waited for the GPU at every update): an average
    loaded from a checkpoint must take the checkpoint's count, not the one it had before loading."""
    net = nn.Linear(3, 2)
    trained = WeightAverage(net, decay=0.99)
    for _ in range(30):
        trained.update(net)
    fresh = WeightAverage(net, decay=0.99)
    fresh.update(net)
    assert fresh.current_decay() != trained.current_decay()
    fresh.load_state_dict(trained.state_dict())
    assert fresh.current_decay() == trained.current_decay() == min(0.99, 31 / 40)
    fresh.update(net)
    trained.update(net)
    assert int(fresh.updates) == 31 and fresh.current_decay() == trained.current_decay()


def test_average_forgets_initialisation_in_a_short_run() -> None:
    steps = 200
    avg = WeightAverage(nn.Linear(2, 2), decay=decay_from_half_life(0.05 * steps))
    net = nn.Linear(2, 2)
    for _ in range(steps):
        avg.update(net)
    assert avg.initial_weight() < 0.01
    # twin: a long half-life keeps the initial parameters heavily weighted
    slow = WeightAverage(nn.Linear(2, 2), decay=decay_from_half_life(10 * steps), warmup=False)
    for _ in range(steps):
        slow.update(net)
    assert slow.initial_weight() > 0.9


def test_average_receives_no_gradient() -> None:
    net = nn.Linear(3, 1)
    avg = WeightAverage(net, decay=0.5)
    x = torch.randn(4, 3)
    out = net(x) + avg(x)
    out.sum().backward()
    assert all(p.grad is None for p in avg.module.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_decay_from_half_life() -> None:
    assert math.isclose(decay_from_half_life(10) ** 10, 0.5)
    with pytest.raises(ValueError, match="half_life_steps must be positive"):
        decay_from_half_life(0)


# ---------------------------------------------------------------------- co-training region mask
def test_region_mask_zero_exactly_on_annotated_ground_truth(space) -> None:
    codes = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    codes[0, :2] = space.leaf_id("liver")
    codes[0, 0, 0, 0] = space.leaf_id("liver_tumour")
    annotated = torch.as_tensor(space.annotated_leaf_mask("liver"))[None]
    pseudo = torch.zeros_like(codes)
    mask = region_mask(codes, pseudo, annotated, space.n_leaves, "no_ground_truth")
    assert not mask[codes > 0].any()
    assert mask[codes == 0].all()  # twin: every voxel without ground truth is in the region
    # a fully labelled dataset's sample beside it: its code 0 is known background, outside the region
    full = torch.ones_like(annotated)
    both = region_mask(codes.repeat(2, 1, 1, 1), pseudo.repeat(2, 1, 1, 1), torch.cat([annotated, full]),
                       space.n_leaves, "no_ground_truth")
    assert torch.equal(both[0], mask[0]) and not both[1].any()


def test_region_mask_dilated_pseudo(space) -> None:
    codes = torch.zeros(1, 9, 9, 9, dtype=torch.long)
    codes[0, 0] = space.leaf_id("liver")
    annotated = torch.as_tensor(space.annotated_leaf_mask("liver"))[None]
    pseudo = codes.clone()
    pseudo[0, 6, 6, 6] = space.leaf_id("spleen")  # an unannotated organ from the experts
    mask = region_mask(codes, pseudo, annotated, space.n_leaves, "dilated_pseudo", (1, 1, 1))
    assert mask[0, 6, 6, 6] and mask[0, 5, 5, 5] and mask[0, 7, 7, 7]
    assert not mask[0, 3, 3, 3]  # far from any pseudo-labelled organ
    assert not mask[0, 0].any()  # never on annotated ground truth


# ---------------------------------------------------------------------- pseudo labels
def test_pseudo_labels_keep_every_ground_truth_voxel(space) -> None:
    rng = np.random.default_rng(0)
    codes = rng.choice([0, space.leaf_id("liver"), space.leaf_id("liver_tumour")], size=(6, 6, 6)).astype(np.uint8)
    pseudo = rng.choice([0, space.leaf_id("kidney"), space.leaf_id("spleen"), space.leaf_id("liver")],
                        size=(6, 6, 6)).astype(np.uint8)
    out = combine_with_ground_truth(pseudo, codes, space.annotated_leaf_mask("liver"), space)
    assert np.array_equal(out[codes > 0], codes[codes > 0])
    # a 0 in the liver set means "no liver here": a pseudo liver there is removed
    assert not np.any(out[codes == 0] == space.leaf_id("liver"))
    # twin: unannotated organs from the experts survive where the ground truth is silent
    kept = (codes == 0) & (pseudo == space.leaf_id("spleen"))
    assert kept.any() and np.all(out[kept] == space.leaf_id("spleen"))


def test_pseudo_labels_region_code(space) -> None:
    region_code = space.code("region:liver")
    codes = np.full((2, 2, 2), region_code, dtype=np.uint8)
    pseudo = np.zeros((2, 2, 2), dtype=np.uint8)
    pseudo[0] = space.leaf_id("liver_tumour")
    out = combine_with_ground_truth(pseudo, codes, space.annotated_leaf_mask("liver"), space)
    assert np.all(out[0] == space.leaf_id("liver_tumour"))
    assert np.all(out[1] == space.leaf_id("liver"))


# ---------------------------------------------------------------------- experts
def test_expert_subspace(space) -> None:
    sub, lut, leaf_ids = expert_subspace(space, "liver")
    assert list(sub.names) == ["background", "liver", "liver_tumour"]
    assert leaf_ids == [space.leaf_id("liver"), space.leaf_id("liver_tumour")]
    assert lut[space.leaf_id("liver_tumour")] == 2 and lut[space.leaf_id("kidney")] == 0
    assert lut[space.code("region:liver")] == sub.code("region:liver")


def test_experts_to_groups_and_merge(space) -> None:
    shape = (3, 3, 3)
    liver = torch.zeros(3, *shape)
    liver[0] = 1.0
    liver[:, 0] = torch.tensor([0.1, 0.3, 0.6])[:, None, None]  # tumour wins over liver leaf in slice 0
    spleen = torch.zeros(2, *shape)
    spleen[0] = 1.0
    spleen[:, 2] = torch.tensor([0.2, 0.8])[:, None, None]
    region, parts, organ = experts_to_groups([liver, spleen], [[1, 2], [7]], space)
    labels = merge(region, parts, space, organ_leaf_probs=organ)
    assert torch.all(labels[0] == space.leaf_id("liver_tumour"))
    assert torch.all(labels[2] == space.leaf_id("spleen"))
    assert torch.all(labels[1] == 0)


def test_an_expert_of_a_part_alone_does_not_speak_for_the_organ_region(space) -> None:
    """MOTS's hepatic-vessel expert knows the liver tumour but not the liver: its tumour probability used to
    be averaged in as a second 'liver region', halving the liver expert's, so the liver merged to
    background (individual) and was taught as background in co-training's pseudo labels."""
    shape = (2, 2, 2)
    liver = torch.tensor([0.01, 0.98, 0.01]).view(3, 1, 1, 1).expand(3, *shape)  # bg, liver, liver_tumour
    vessel = torch.tensor([0.98, 0.01, 0.01]).view(3, 1, 1, 1).expand(3, *shape)  # bg, kidney, liver_tumour
    tumour, kidney = space.leaf_id("liver_tumour"), space.leaf_id("kidney")
    region, parts, organ = experts_to_groups([liver, vessel], [[1, tumour], [kidney, tumour]], space)
    liver_group = space.group_of_leaf(1)
    assert torch.allclose(region[liver_group], torch.tensor(0.99))  # the liver expert's alone
    assert torch.allclose(organ[liver_group], torch.tensor(0.98))
    assert torch.allclose(parts[space.part_ids.index(tumour)], torch.tensor(0.01))  # both experts' mean
    assert torch.all(merge(region, parts, space, organ_leaf_probs=organ) == 1)
    # twin: with no expert of the organ (tumour-only data) the part's expert still gives the region
    region, _, _ = experts_to_groups([vessel], [[kidney, tumour]], space)
    assert torch.allclose(region[liver_group], torch.tensor(0.01))


def test_expert_ensemble_channels_decode(space) -> None:
    class Fixed(nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(x.shape[0], *self.logits.shape[1:])

    liver = Fixed(torch.tensor([0.0, 2.0, 1.0]).view(1, 3, 1, 1, 1))
    ens = ExpertEnsemble([liver], [[1, 2]], space)
    assert ens.channels == ["region:liver", "liver_tumour"]
    out = torch.sigmoid(ens(torch.zeros(2, 1, 1, 1, 1)))
    p = torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0)
    assert torch.allclose(out[0, 0, 0, 0, 0], p[1] + p[2], atol=1e-5)
    assert torch.allclose(out[0, 1, 0, 0, 0], p[2] / (p[1] + p[2]), atol=1e-5)


def test_expert_ensemble_decodes_like_the_experts(space) -> None:
    """Sigmoid decoding of the ensemble = the merge of the experts' softmax outputs, voxel for voxel,
    including far from an organ, where both its leaves are tiny but the part is the larger (the twin: the
    uncapped conditional part channel claims those voxels for the organ)."""
    from unionseg.outputs import decode_probs

    class Fixed(nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits

    gen = torch.Generator().manual_seed(0)
    shape = (1, 6, 6, 6)
    kidney = torch.randn(1, 3, *shape[1:], generator=gen) * 3
    kidney[:, 0, 0] = 12.0  # slice 0: background sure, the tumour a little above the organ leaf
    kidney[:, 1, 0], kidney[:, 2, 0] = 0.0, 0.5
    spleen = torch.randn(1, 2, *shape[1:], generator=gen) * 3
    spleen[:, 0, 0] = 12.0
    experts, leaf_ids = [Fixed(kidney), Fixed(spleen)], [[3, 4], [7]]
    ens = ExpertEnsemble(experts, leaf_ids, space)
    got = decode_probs(torch.sigmoid(ens(torch.zeros(shape)))[0], "sigmoid", ens.channels, space)
    region, parts, organ = experts_to_groups([torch.softmax(kidney, 1)[0], torch.softmax(spleen, 1)[0]],
                                             leaf_ids, space)
    want = merge(region, parts, space, organ_leaf_probs=organ)
    assert torch.equal(got, want)
    assert torch.all(got[0] == 0) and (want == space.leaf_id("kidney_tumour")).any()
    uncapped = torch.cat([region[[1, 3]], (parts[1] / region[1]).unsqueeze(0)]).clamp(1e-6, 1 - 1e-6)
    assert (decode_probs(uncapped, "sigmoid", ens.channels, space)[0] == space.leaf_id("kidney_tumour")).all()


# ---------------------------------------------------------------------- tasks
def test_task_channels(space) -> None:
    assert task_channels(space, "liver") == ["region:liver", "liver_tumour"]
    assert task_channels(space, "spleen") == ["region:spleen"]


def test_dodnet_predict_runs_the_backbone_once_per_window(space) -> None:
    """All tasks' heads in one batched call: one backbone pass per window, not one per task."""
    from unionseg.config import PreprocessSpec
    from unionseg.inference.predictor import Predictor
    from unionseg.methods.dodnet import ChannelSelect
    from unionseg.networks import build_network

    keys = [task_channels(space, d) for d in space.datasets]
    n_ch = max(len(k) for k in keys)
    net = build_network({"backbone": {"name": "resunet", "preset": "tiny"},
                         "head": {"name": "dynamic", "n_tasks": len(keys), "out_channels": n_ch}})
    indices = [t * n_ch + c for t, k in enumerate(keys) for c in range(len(k))]
    channels = [key for k in keys for key in k]
    calls = []
    net.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    roi, overlap = (16, 16, 16), 0.5
    predictor = Predictor(ChannelSelect(net, indices).eval(), space, PreprocessSpec(spacing=(1.0, 1.0, 1.0), crop_to_body=False),
                          output_form="sigmoid", channels=channels,
                          inference={"roi_size": list(roi), "overlap": overlap, "sw_batch_size": 1}, device="cpu")
    image = np.full((24, 24, 16), -1000.0, dtype=np.float32)
    image[4:20, 4:20, 2:14] = 50.0
    image[10:12, 10:12, 4:8] = 700.0  # bone: a CT-like range
    labels, _ = predictor.predict(image)
    windows = 1
    for size, r in zip(image.shape, roi, strict=True):
        step = max(1, int(r * (1 - overlap)))
        windows *= len(range(0, max(size - r, 0) + 1, step)) + (1 if (size - r) % step else 0)
    assert len(calls) == windows, (len(calls), windows)
    assert all(b == 1 for b in calls)
    assert labels.shape == image.shape


def test_param_groups_scale_by_the_longest_prefix() -> None:
    from unionseg.errors import ConfigError
    from unionseg.networks import build_network
    from unionseg.training.trainer import param_groups

    net = build_network({"backbone": {"name": "resunet", "preset": "tiny"},
                         "head": {"name": "dynamic", "n_tasks": 3, "out_channels": 2}})
    models = {"net": net}
    plain = param_groups(models, 0.02)
    assert len(plain) == 1 and plain[0]["lr"] == 0.02
    assert len(plain[0]["params"]) == len(list(net.parameters()))
    groups = param_groups(models, 0.02, {"net.head": 0.5, "net.head.controller": 0.1})
    by_scale = {g["lr_scale"]: g for g in groups}
    assert set(by_scale) == {1.0, 0.5, 0.1}
    assert by_scale[0.1]["lr"] == pytest.approx(0.002)
    assert {id(p) for p in by_scale[0.1]["params"]} == {id(p) for p in net.head.controller.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))  # each parameter once
    with pytest.raises(ConfigError, match="matches no trainable parameter"):
        param_groups(models, 0.02, {"net.head.contr": 0.1})  # a prefix is a whole path component
    # a prefix without the network's name (a plugin's first try, helper-91) is told the form and the names
    with pytest.raises(ConfigError, match=r"'<network>.<parameter path>', the networks here: net; e.g. 'net.head'"):
        param_groups(models, 0.02, {"head": 2.0})
    with pytest.raises(ConfigError, match="must be positive"):
        param_groups(models, 0.02, {"net.head.controller": 0.0})


def test_channel_select_follows_the_wrapped_net_device() -> None:
    """deploy() wraps a net that may already sit on the GPU; the index buffer must be on the net's device
    from the start (a CPU index against CUDA features failed validation on an H100). 'meta' stands in for
    the second device here; the CPU twin keeps its CPU index and selects the right channels."""
    from unionseg.methods.dodnet import ChannelSelect

    class AllTasks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 4, 1)

        def forward(self, x: torch.Tensor, task: object) -> torch.Tensor:
            return self.conv(x)

    on_meta = ChannelSelect(AllTasks().to("meta"), [0, 2])
    assert on_meta.indices.device.type == "meta"
    net = AllTasks()
    on_cpu = ChannelSelect(net, [0, 2])
    assert on_cpu.indices.device.type == "cpu"
    x = torch.randn(1, 1, 2, 2, 2)
    assert torch.equal(on_cpu(x), net(x, None)[:, [0, 2]])


def test_mskd_feature_regions_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """How MS-KD's regions shrink to the feature stage: nearest (the default) or max, handed to the feature
    term by the training step; anything else is refused when the options are checked, before a run starts."""
    from types import SimpleNamespace

    import torch

    from unionseg.methods.mskd import MSKDMethod, MSKDOptions

    assert MSKDOptions().feature_regions == "nearest"
    MSKDOptions(feature_regions="max").validate()
    with pytest.raises(ValueError, match=r"feature_regions must be one of \['nearest', 'max'\], got 'bilinear'"):
        MSKDOptions(feature_regions="bilinear").validate()
    seen: list[str] = []

    def feature_term(student, teachers, regions, background, mode="nearest"):  # type: ignore[no-untyped-def]
        seen.append(mode)
        return student.sum() * 0.0

    monkeypatch.setattr("unionseg.losses.ms_kd_feature_loss", feature_term)
    method = object.__new__(MSKDMethod)  # the training step alone: no context, a stand-in network
    logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    features = SimpleNamespace(decoder=[torch.randn(1, 2, 2, 2, 2), torch.randn(1, 2, 4, 4, 4)])
    method.models = {"net": lambda x, return_features=False: (logits, features)}
    method.teachers, method.teacher_leaves, method.teacher_groups = ["a"], [[1, 2]], None
    method._teacher_features = lambda x: [torch.randn(1, 2, 2, 2, 2)]  # type: ignore[method-assign]
    teacher = torch.softmax(torch.randn(1, 3, 4, 4, 4), 1)
    for mode in ("max", "nearest"):
        method.options = MSKDOptions(feature_regions=mode, w_gt=0.0)
        method.training_step({"image": torch.zeros(1, 1, 4, 4, 4), "teacher_0": teacher}, 0)
    assert seen == ["max", "nearest"]
