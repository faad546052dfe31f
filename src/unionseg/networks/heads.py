"""Output heads on top of a backbone's :class:`BackboneOutput`.

* :class:`SoftmaxHead`: one 1x1x1 conv over all leaves (naive, oracle, marginal, experts, MS-KD student).
* :class:`MultiHead`: one static 1x1x1 conv per task (dataset).
* :class:`ConditionalHead`: cCNN-like static conditioning; the task's one-hot code enters the BACKBONE as
  extra input channels (the head itself is a single 1x1x1 conv).
* :class:`DynamicHead`: DoDNet's controller + dynamic head (parameters generated per sample and task).

Every head maps (B, in_channels, D, H, W) features to logits. With ``task_ids`` (B,) the task heads
return (B, C, D, H, W) for each sample's own task; with ``task_ids=None`` they return ALL tasks,
(B, T * C, D, H, W), task-major: channels ``t * C .. t * C + C - 1`` belong to task ``t``.

The backbones' pre-activation outputs are raw residual sums, so heads start with GN-ReLU
(``normalize_input=True``, as DoDNet's ``precls_conv``); for backbones whose output is already activated
(DynUNet) the builder passes ``normalize_input=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unionseg.networks.blocks import MAX_GROUPS, BackboneOutput, as_int_tuple, norm_relu


def check_task_ids(task_ids: torch.Tensor, batch: int, n_tasks: int) -> None:
    """Validate per-sample task ids.

    Values are not range-checked here (that would synchronise with the GPU); ``F.one_hot`` and indexing
    reject out-of-range ids.

    Raises:
        ValueError: unless ``task_ids`` is an integer tensor of shape (batch,).
    """
    if task_ids.dim() != 1 or task_ids.shape[0] != batch:
        raise ValueError(f"task_ids must have shape ({batch},), got {tuple(task_ids.shape)}")
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    if n_tasks < 1:
        raise ValueError("this head has no tasks")


def _input_norm(channels: int, normalize_input: bool, max_groups: int) -> nn.Module:
    return norm_relu(channels, max_groups=max_groups) if normalize_input else nn.Identity()


class Head(nn.Module):
    """Base class: logits from backbone features.

    Attributes:
        in_channels: channels of the full-resolution decoder output the head reads.
        n_tasks: number of tasks T (0 for the task-free softmax head).
        out_channels: channels per task C (all leaves for the softmax head).
        conditions_input: True when the task code must be fed to the backbone's input (conditional).
    """

    in_channels: int
    n_tasks: int
    out_channels: int
    conditions_input: bool = False

    @property
    def output_channels(self) -> int:
        """Channels of the all-tasks output: ``T * C`` (``C`` for the softmax head)."""
        return self.out_channels * max(self.n_tasks, 1)

    def forward(self, features: BackboneOutput, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Features -> logits (see the module docstring for shapes)."""
        raise NotImplementedError  # pragma: no cover


class SoftmaxHead(Head):
    """GN-ReLU (optional) + 1x1x1 conv: (B, in_channels, ...) -> (B, out_channels, ...); task ids ignored.

    Args:
        in_channels: feature channels.
        out_channels: number of leaves (including background).
        normalize_input: apply GN-ReLU first (pre-activation backbones).
        max_groups: GroupNorm group bound.
    """

    def __init__(
        self, in_channels: int, out_channels: int, normalize_input: bool = True, max_groups: int = MAX_GROUPS
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")
        self.in_channels, self.n_tasks, self.out_channels = in_channels, 0, out_channels
        self.pre = _input_norm(in_channels, normalize_input, max_groups)
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, features: BackboneOutput, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_channels, D, H, W) features -> (B, out_channels, D, H, W) logits."""
        return self.conv(self.pre(features.last))


class MultiHead(Head):
    """One static 1x1x1 conv per task on shared GN-ReLU features.

    The T per-task convs are stored as ONE (T * C)-channel conv: the all-tasks forward is a single conv,
    and a mixed-task batch picks each sample's (C, in_channels) slice (only the chosen tasks' weights get
    gradients, yet every parameter stays in the graph, which keeps DDP happy).

    Args:
        in_channels: feature channels.
        n_tasks: number of tasks T.
        out_channels: channels per task C.
        normalize_input: apply GN-ReLU first.
        max_groups: GroupNorm group bound.
    """

    def __init__(
        self,
        in_channels: int,
        n_tasks: int,
        out_channels: int,
        normalize_input: bool = True,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        super().__init__()
        if min(in_channels, n_tasks, out_channels) < 1:
            raise ValueError("in_channels, n_tasks and out_channels must be positive")
        self.in_channels, self.n_tasks, self.out_channels = in_channels, n_tasks, out_channels
        self.pre = _input_norm(in_channels, normalize_input, max_groups)
        self.conv = nn.Conv3d(in_channels, n_tasks * out_channels, 1)

    def forward(self, features: BackboneOutput, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, in_channels, D, H, W) -> (B, C, ...) for ``task_ids`` (B,) or (B, T * C, ...)."""
        h = self.pre(features.last)
        if task_ids is None:
            return self.conv(h)
        check_task_ids(task_ids, h.shape[0], self.n_tasks)
        weight = self.conv.weight.view(self.n_tasks, self.out_channels, self.in_channels)[task_ids]
        assert self.conv.bias is not None
        bias = self.conv.bias.view(self.n_tasks, self.out_channels)[task_ids]
        out = torch.einsum("bkdhw,bck->bcdhw", h, weight.to(h.dtype))
        return out + bias.to(out.dtype)[:, :, None, None, None]


class ConditionalHead(Head):
    """Static conditioning (cCNN-like): the task's one-hot code is concatenated to the image as T extra
    input channels (:meth:`condition`), so the backbone's first conv sees ``image_channels + T`` channels;
    the head is one GN-ReLU + 1x1x1 conv to C channels.

    An all-tasks prediction needs one backbone pass PER TASK (T times the cost of one pass), which is what
    the dynamic head avoids; :class:`~unionseg.networks.model.SegmentationNet` runs that loop.

    Args:
        in_channels: feature channels.
        n_tasks: number of tasks T.
        out_channels: channels per task C.
        normalize_input: apply GN-ReLU first.
        max_groups: GroupNorm group bound.
    """

    conditions_input = True

    def __init__(
        self,
        in_channels: int,
        n_tasks: int,
        out_channels: int,
        normalize_input: bool = True,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        super().__init__()
        if min(in_channels, n_tasks, out_channels) < 1:
            raise ValueError("in_channels, n_tasks and out_channels must be positive")
        self.in_channels, self.n_tasks, self.out_channels = in_channels, n_tasks, out_channels
        self.pre = _input_norm(in_channels, normalize_input, max_groups)
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def condition(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Append the one-hot task code as constant channels: (B, C_img, D, H, W) -> (B, C_img + T, ...)."""
        check_task_ids(task_ids, x.shape[0], self.n_tasks)
        code = F.one_hot(task_ids.long(), self.n_tasks).to(x.dtype)
        code = code[:, :, None, None, None].expand(-1, -1, *x.shape[2:])
        return torch.cat([x, code], dim=1)

    def forward(self, features: BackboneOutput, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Features of a conditioned input (B, in_channels, D, H, W) -> (B, C, D, H, W)."""
        return self.conv(self.pre(features.last))


def head_parameter_count(feature_channels: int, head_widths: Sequence[int], out_channels: int) -> int:
    """Number of parameters of a dynamic head: ``sum(c_in * c_out + c_out)`` over its 1x1x1 convs.

    DoDNet: 8 -> 8 -> 8 -> 2 gives (8*8+8) + (8*8+8) + (8*2+2) = 162.
    """
    dims = (feature_channels, *head_widths, out_channels)
    return sum(c_in * c_out + c_out for c_in, c_out in zip(dims[:-1], dims[1:], strict=False))


class DynamicHead(Head):
    """DoDNet's task-conditioned dynamic head (Zhang et al., CVPR 2021).

    * Feature map: GN-ReLU (optional) + 1x1x1 conv of the full-resolution decoder output to
      ``feature_channels`` (DoDNet's ``precls_conv``), (B, F, D, H, W).
    * Controller: global average pooling of the bottleneck (already GN-ReLU'd by the backbone),
      concatenated with the task's one-hot code, -> ONE linear map (= a 1x1x1 conv on the pooled vector)
      producing all :attr:`n_params` head parameters, computed by :func:`head_parameter_count`.
    * Head: 1x1x1 convs F -> head_widths... -> C, ReLU between, applied per (sample, task) pair. DoDNet
      uses grouped convolution; here the same per-voxel products are batched matrix products (the first
      layer emits all of a sample's tasks at once, later layers run one matrix per (sample, task) pair),
      over chunks of :attr:`VOXEL_CHUNK` voxels (:attr:`CUDA_VOXEL_CHUNK` on a GPU). For ``task_ids=None``
      all T tasks of every sample come out of the same calls, (B, T * C, D, H, W).

    Args:
        in_channels: channels of the decoder output.
        bottleneck_channels: channels of the (normalised) bottleneck.
        n_tasks: number of tasks T.
        out_channels: channels per task C.
        feature_channels: F, width of the head's input feature map (DoDNet: 8).
        head_widths: hidden widths of the dynamic head (DoDNet: (8, 8)).
        normalize_input: apply GN-ReLU before the feature conv.
        max_groups: GroupNorm group bound.
        equalized_controller: store the controller's weight COLUMNS THAT READ THE POOLED BOTTLENECK scaled by
            ``sqrt(Cb)`` and multiply them back by ``1 / sqrt(Cb)`` in the forward pass (an "equalised learning
            rate"; the task-code columns are left as they are): the initial head is the same, but an Adam step
            moves the image-dependent, task-SHARED part of the generated head parameters ``sqrt(Cb)`` times
            less. The pooled bottleneck is non-negative (after ReLU), so all Cb weights feeding one head
            parameter get gradients of one sign, and a plain Adam step of ``lr`` on each moves that shared part
            by ``lr * sum(pooled)`` (estimated: 0.02 * 64 * 0.4 = 0.5 if the pooled features average 0.4, the
            mean of a ReLU of unit-variance input), while the task's own column moves
            it by ``lr``: every task's step then rewrites every task's head.
            An option for Adam-type optimisers (DoDNet trains with SGD), off by default and in the DoDNet
            recipe: see docs/dodnet_investigation.md for what it changed on the standard suite.
        zero_bias_init: start the controller rows that generate the head's BIASES at zero (weights and bias of
            those rows), so every generated bias starts at 0. With PyTorch's default init (False, the default
            here, as in the official code) the generated biases are as large as the generated weights while
            the hidden activations shrink layer by layer, so many hidden ReLUs are off for every voxel from
            the start: 23 of the 64 hidden units of the 4-task `cpu` network at initialisation (2 with this
            option). An option, not the default: under AdamW at lr 0.02 training kills units either way
            (44 of 64 after 100 steps with it, 26 without; docs/dodnet_investigation.md).
        negative_slope: slope of the hidden activations below zero; 0 (default) is DoDNet's ReLU, a positive
            value a leaky ReLU, so that a unit that is off everywhere still passes gradient. An option: it
            did not make DoDNet learn faster in a 300-step probe (docs/dodnet_investigation.md).
        image_gain: the general form of ``equalized_controller``: the gain of the pooled-feature columns (1 =
            DoDNet; ``equalized_controller`` is ``Cb ** -0.5``; the two cannot be combined). With Adam each
            stored weight moves by about lr per step, so the image-dependent part of a generated parameter
            moves by about ``lr * gain * sum(pooled)``; ``1 / Cb`` brings that to ``lr * mean(pooled)``, the
            step of a static head's weight. Measured (docs/dodnet_investigation.md, session 12): on one task it does not
            remove the three-layer head's late start, but with a linear head (``head_widths=()``) it removes
            that head's collapse; with four tasks it helps the paper's loss, not the cross-task recipe.
        fan_in_init: start every TASK from its own fan-in-scaled head (our option; False = PyTorch's default
            init, as the official code): the controller's task-code column of each generated weight is drawn
            with the variance a static layer of that fan-in would get (2 / c_in before a ReLU, 1 / c_in for the
            output layer), its pooled-feature columns and bias start at zero, and every generated bias starts at
            zero. The image-dependent part of the head then starts at zero and is learned. With the default init
            the generated weights are about half a fan-in-scaled layer's size and the generated biases as
            large as the weights; 0 to 7 of the 16 second-layer units of a two-sample batch are off at every
            voxel (0 or 1 with this option; the 4-task `cpu` network, eight seeds). It combines with
            ``image_gain`` (the same initial head, a smaller Adam step on the image part), but that
            combination trained worse on the standard phantom (docs/dodnet_investigation.md, session 14).
        task_gain: the gain of the task-code columns, as ``image_gain`` for the pooled features (1 = DoDNet;
            in (0, 64]): with Adam the task-specific part of every generated parameter moves by about
            ``lr * task_gain`` per step, while the controller's bias, shared by all tasks, keeps ``lr``.
    """

    VOXEL_CHUNK = 16384  # voxels per head pass (see apply_head)
    CUDA_VOXEL_CHUNK = 2**20  # on a GPU: small chunks only add kernel launches; this bounds the no-grad peak
    _column_gain: torch.Tensor  # buffer: per controller input column, 1/sqrt(Cb) on pooled features, else 1

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        n_tasks: int,
        out_channels: int,
        feature_channels: int = 8,
        head_widths: Sequence[int] = (8, 8),
        normalize_input: bool = True,
        max_groups: int = MAX_GROUPS,
        equalized_controller: bool = False,
        zero_bias_init: bool = False,
        negative_slope: float = 0.0,
        image_gain: float = 1.0,
        fan_in_init: bool = False,
        task_gain: float = 1.0,
    ) -> None:
        super().__init__()
        if min(in_channels, bottleneck_channels, n_tasks, out_channels, feature_channels) < 1:
            raise ValueError("channel counts and n_tasks must be positive")
        widths = as_int_tuple(head_widths, "head_widths") if len(head_widths) else ()
        self.in_channels, self.n_tasks, self.out_channels = in_channels, n_tasks, out_channels
        self.bottleneck_channels = bottleneck_channels
        self.feature_channels = feature_channels
        self.head_widths = widths
        dims = (feature_channels, *widths, out_channels)
        self.layer_dims: tuple[tuple[int, int], ...] = tuple(zip(dims[:-1], dims[1:], strict=False))
        self.n_params = head_parameter_count(feature_channels, widths, out_channels)
        # how split_params cuts the generated vector: every layer's weights, then every layer's biases
        self._split_sizes = [c_in * c_out for c_in, c_out in self.layer_dims] + [c for _, c in self.layer_dims]
        self.feature = nn.Sequential(
            _input_norm(in_channels, normalize_input, max_groups), nn.Conv3d(in_channels, feature_channels, 1)
        )
        self.controller = nn.Linear(bottleneck_channels + n_tasks, self.n_params)
        if zero_bias_init:
            first_bias = sum(self._split_sizes[: len(self.layer_dims)])
            with torch.no_grad():
                self.controller.weight[first_bias:].zero_()
                self.controller.bias[first_bias:].zero_()
        self.fan_in_init = bool(fan_in_init)
        if fan_in_init:
            self._init_fan_in(bottleneck_channels)
        if not 0.0 <= negative_slope < 1.0:
            raise ValueError(f"negative_slope must be in [0, 1), got {negative_slope}")
        self.negative_slope = float(negative_slope)
        if not 0.0 < image_gain <= 1.0:
            raise ValueError(f"image_gain must be in (0, 1], got {image_gain}")
        if equalized_controller and image_gain != 1.0:
            raise ValueError("equalized_controller and image_gain < 1 both set the pooled-feature gain; pick one")
        self.equalized_controller = bool(equalized_controller)
        self.image_gain = bottleneck_channels ** -0.5 if equalized_controller else float(image_gain)
        if not 0.0 < task_gain <= 64.0:
            raise ValueError(f"task_gain must be in (0, 64], got {task_gain}")
        self.task_gain = float(task_gain)
        gain = torch.ones(bottleneck_channels + n_tasks)
        gain[:bottleneck_channels] = self.image_gain
        gain[bottleneck_channels:] = self.task_gain
        self._scaled = self.image_gain != 1.0 or self.task_gain != 1.0
        if self._scaled:
            with torch.no_grad():  # same initial function: stored weight / gain, used as weight * gain
                self.controller.weight.div_(gain)
        self.register_buffer("_column_gain", gain, persistent=False)

    def _init_fan_in(self, bottleneck_channels: int) -> None:
        """See ``fan_in_init``: per task a fan-in-scaled head, no image dependence and zero biases at start."""
        weight, bias = self.controller.weight, self.controller.bias
        n_layers = len(self.layer_dims)
        with torch.no_grad():
            weight.zero_()
            bias.zero_()
            # the rows generating each layer's weights, in split_params' order (views: filled in place)
            layer_rows = weight.split(self._split_sizes)[:n_layers]
            for index, ((c_in, _), rows) in enumerate(zip(self.layer_dims, layer_rows, strict=True)):
                gain = 1.0 if index == n_layers - 1 else 2.0 ** 0.5  # Kaiming before a ReLU
                rows[:, bottleneck_channels:].normal_(0.0, gain / c_in ** 0.5)

    def controller_params(self, bottleneck: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Dynamic-head parameters from the bottleneck and the task code.

        Args:
            bottleneck: (B, bottleneck_channels, d, h, w), normalised and activated.
            task_ids: (B,) task per sample, or None for every task.

        Returns:
            (B, n_params) for ``task_ids``, (B, T, n_params) for None.
        """
        pooled = bottleneck.mean(dim=(2, 3, 4))  # (B, Cb)
        batch = pooled.shape[0]
        if task_ids is None:
            codes = torch.eye(self.n_tasks, dtype=pooled.dtype, device=pooled.device)
            codes = codes.unsqueeze(0).expand(batch, -1, -1)  # (B, T, T)
            pooled_t = pooled.unsqueeze(1).expand(-1, self.n_tasks, -1)  # (B, T, Cb)
            return self._controller(torch.cat([pooled_t, codes], dim=2))
        check_task_ids(task_ids, batch, self.n_tasks)
        code = F.one_hot(task_ids.long(), self.n_tasks).to(pooled.dtype)
        return self._controller(torch.cat([pooled, code], dim=1))

    def _controller(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = self.controller.weight
        if self._scaled:
            weight = weight * self._column_gain
        return F.linear(inputs, weight, self.controller.bias)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden layers' activation: ReLU (DoDNet), or leaky ReLU with ``negative_slope`` > 0."""
        return F.leaky_relu(h, self.negative_slope) if self.negative_slope else F.relu(h)

    def split_params(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(N, n_params) -> per layer (weight (N, c_out, c_in), bias (N, c_out)), in DoDNet's order
        (all weights first, then all biases, as in the official ``parse_dynamic_params``).

        Raises:
            ValueError: if the last dimension is not ``n_params``.
        """
        if params.dim() != 2 or params.shape[1] != self.n_params:
            raise ValueError(f"expected (N, {self.n_params}) parameters, got {tuple(params.shape)}")
        n = params.shape[0]
        chunks = torch.split(params, self._split_sizes, dim=1)
        n_layers = len(self.layer_dims)
        layers = []
        for index, (c_in, c_out) in enumerate(self.layer_dims):
            weight = chunks[index].reshape(n, c_out, c_in)
            layers.append((weight, chunks[n_layers + index]))
        return layers

    def apply_head(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Run the dynamic head for every (sample, task) pair in one grouped call per layer.

        Args:
            features: (B, F, D, H, W) head input features.
            params: (B, T', n_params) parameters, T' tasks per sample (1 for per-sample tasks).

        Returns:
            (B, T' * C, D, H, W) logits, task-major per sample.
        """
        batch, n_pairs = params.shape[0], params.shape[1]
        spatial = features.shape[2:]
        # 1x1x1 convolutions are per-voxel matrix products: batched matmuls (one BLAS call per layer) do the
        # work of DoDNet's grouped convolution, much faster on CPUs and equal on GPUs
        flat = features.reshape(batch, self.feature_channels, -1)
        layers = []
        for index, (weight, bias) in enumerate(self.split_params(params.reshape(batch * n_pairs, self.n_params))):
            # layer 0 reads one feature map per sample (T' * c_out outputs each); later layers read one map
            # per (sample, task) pair
            rows = batch if index == 0 else batch * n_pairs
            layers.append((weight.reshape(rows, -1, weight.shape[2]).to(flat.dtype),
                           bias.reshape(rows, -1, 1).to(flat.dtype)))
        # voxel chunks keep the (T' * width, chunk) intermediates in cache: for all 7 tasks of a 64^3 window
        # this is ~10x faster on a CPU than one pass over the whole window (memory-bound elementwise work); a
        # GPU takes a 96^3 window in one pass (small chunks there only add kernel launches, ~5 per chunk)
        chunk = self.CUDA_VOXEL_CHUNK if flat.device.type == "cuda" else self.VOXEL_CHUNK
        chunks = []
        for start in range(0, flat.shape[-1], chunk):
            h = flat[:, :, start:start + chunk]
            for index, (w, b) in enumerate(layers):
                h = torch.baddbmm(b, w, h.reshape(w.shape[0], w.shape[2], -1))
                if index < len(layers) - 1:
                    h = self.activation(h)
            chunks.append(h.reshape(batch, n_pairs * self.out_channels, -1))
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
        return out.reshape(batch, n_pairs * self.out_channels, *spatial)

    def forward(self, features: BackboneOutput, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Features -> (B, C, D, H, W) for ``task_ids`` (B,), or (B, T * C, D, H, W) for all tasks."""
        head_input = self.feature(features.last)
        params = self.controller_params(features.bottleneck, task_ids)
        if task_ids is not None:
            params = params.unsqueeze(1)
        return self.apply_head(head_input, params)
