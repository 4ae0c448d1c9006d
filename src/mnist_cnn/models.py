"""Model builders, registered by name so the CLI, tests and benchmarks can enumerate them.

Every model takes a batch of 28x28 single-channel images `[N,1,28,28]` (floats in [0,1])
and returns logits `[N,K]`; softmax turns them into probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.errors import UserError
from mnist_cnn.pool import (
    MaxPool2x2,
    first_stage,
    first_stage_applies,
    norm_pool_relu,
    norm_pool_relu_applies,
    pool_relu,
    pool_relu_applies,
)

ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make a builder available as `build_model(name)`."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder

    return add


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model (seed torch's RNG first for a reproducible init)."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}': use one of {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_like_flux(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases: Flux's defaults for Conv and Dense.

    PyTorch's own default (Kaiming-uniform with a=sqrt(5)) would train the same network
    slightly differently; the notebook's numbers come from Flux's initialisation.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _conv_block(c_in: int, c_out: int, batch_norm: bool = False) -> list[nn.Module]:
    """Conv 3x3 (padding 1), [BatchNorm], then 2x2 max pooling and ReLU.

    ReLU comes after the pooling: max and ReLU commute (ReLU is monotonic), so the block
    computes exactly Conv -> ReLU -> MaxPool, values and gradients alike, while ReLU
    touches a quarter of the values (1.90 -> 1.73 s per seed epoch on 2 cores,
    benchmarks/step_time.py). The pooling trains through a C kernel where it can
    (`mnist_cnn.pool`), with the same values and gradients as `nn.MaxPool2d(2)`.
    """
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers += [MaxPool2x2(), nn.ReLU(inplace=True)]
    return layers


class ConvNet(nn.Sequential):
    """`nn.Sequential` (the same layers, state-dict keys and function) that runs some
    layers together through the C kernels of `mnist_cnn.pool`, where they apply:

    - a first stage of Conv2d(1, C, 3, padding=1), `MaxPool2x2` and ReLU as one pass
      (`first_stage`, in training and evaluation), which never writes the 28x28 maps: a
      training step of the seed network 0.84-0.88x the time in float32, 0.91-0.93x in
      bf16; evaluation 0.74x;
    - BatchNorm2d, `MaxPool2x2` and ReLU as one pass (`norm_pool_relu`, in training and
      evaluation), which never writes the normalised maps;
    - `MaxPool2x2` then ReLU as one pass (`pool_relu`, in training and evaluation), bit
      for bit the two layers' values and gradients.

    Hooks (forward or backward) on any of those layers, and hooks registered for every
    module, turn their fusion off, so hooks see every layer called (the feature maps of
    `explain` and of the exported page hook the layer before each pooling). Timings:
    benchmarks/step_time.py.
    """

    def group(self, i: int, x: torch.Tensor) -> int:
        """How many layers from the i-th on run as one kernel on the input `x` they get
        (1: the i-th alone)."""
        return _fused(list(self._modules.values()), i, x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            width, run = _fused(layers, i, x)
            x = layers[i](x) if run is None else run(layers[i], x)
            i += width
        return x


def _fused(layers: list[nn.Module], i: int, x: torch.Tensor) -> tuple[int, Callable | None]:
    """(how many of `layers` from the i-th on run as one kernel on the input `x`, the
    function that runs them given the first of them and `x`), or (1, None): the i-th alone."""
    rest = layers[i:]
    if len(rest) >= 3 and first_stage_applies(*rest[:3], x):
        return 3, first_stage
    if len(rest) >= 3 and norm_pool_relu_applies(*rest[:3], x):
        return 3, norm_pool_relu
    if len(rest) >= 2 and pool_relu_applies(*rest[:2], x):
        return 2, _pool_relu
    return 1, None


def _pool_relu(_pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return pool_relu(x)


class CenterCrop(nn.Module):
    """The middle of each image: `rows` pixels dropped at the top and at the bottom, `cols`
    at the left and at the right (28x28 -> 24x24 for 2 and 2), copied into one block
    (channels-last, as the first-stage kernel of `mnist_cnn.pool` takes it); gradients flow
    back to the pixels kept."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self.rows, self.cols
        return x[..., r : x.shape[-2] - r, c : x.shape[-1] - c].contiguous(
            memory_format=torch.channels_last
        )

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}"


def _three_stage_cnn(
    widths: tuple[int, int, int],
    num_classes: int,
    batch_norm: tuple[bool, bool, bool],
    crop: tuple[int, int] = (0, 0),
) -> nn.Sequential:
    """Three conv stages (each halving the image: 28 -> 14 -> 7 -> 3), then one dense layer;
    with a `crop` (rows, cols), a `CenterCrop` first (24 -> 12 -> 6 -> 3 for 2 rows)."""
    c1, c2, c3 = widths
    h, w = 28 - 2 * crop[0], 28 - 2 * crop[1]
    for _ in range(3):
        h, w = h // 2, w // 2
    model = ConvNet(
        *([CenterCrop(*crop)] if any(crop) else []),
        *_conv_block(1, c1, batch_norm[0]),
        *_conv_block(c1, c2, batch_norm[1]),
        *_conv_block(c2, c3, batch_norm[2]),
        nn.Flatten(),
        nn.Linear(c3 * h * w, num_classes),
    )
    return init_like_flux(model)


@register("seed")
def seed_cnn(num_classes: int = 10) -> nn.Module:
    """The notebook's network, layer for layer (16,938 parameters for 10 classes).

    Conv 3x3 1->16 (pad 1) + ReLU, MaxPool 2 -> 14x14; Conv 3x3 16->32 + ReLU, MaxPool 2
    -> 7x7; Conv 3x3 32->32 + ReLU, MaxPool 2 -> 3x3; flatten to 288; Dense 288->K.
    (Each ReLU is applied after its pooling, which is the same function, computed faster.)
    The notebook ends in softmax; here the model returns logits and the loss applies
    log-softmax itself, which is the same function computed stably. Initialised as Flux
    does by default: Glorot-uniform weights, zero biases.
    """
    return _three_stage_cnn((16, 32, 32), num_classes, (False, False, False))


@register("fast")
def fast_cnn(num_classes: int = 10) -> nn.Module:
    """The seed network with BatchNorm after its second and third convolutions only.

    BatchNorm lets a much larger learning rate train stably; leaving it out of the first
    stage, whose 28x28 maps are four times the size of the second's, keeps most of that
    benefit at a fraction of its cost (seconds per epoch: seed 2.29, BatchNorm on every
    stage 3.24, on stages 2 and 3 only 2.48).
    """
    return _three_stage_cnn((16, 32, 32), num_classes, (False, True, True))


@register("fast-24x24")
def fast_24x24_cnn(num_classes: int = 10) -> nn.Module:
    """`fast` on the middle 24x24 of each 28x28 image (17,002 parameters, as `fast`).

    MNIST's digits were scaled to fit a 20x20 box and centred by their centre of mass in
    the 28x28 frame: the outer two rows and columns hold 0.23% of the ink of the training
    images (12% of them have any there). Every map is (24/28)^2 = 0.73 of its size, 24 ->
    12 -> 6 -> 3, and the dense layer is the same 288 -> K; a training step takes about
    0.75x the time. Not for clothes, whose top and bottom rows hold 6% of their ink.
    """
    return _three_stage_cnn((16, 32, 32), num_classes, (False, True, True), crop=(2, 2))


@register("fast-28x24")
def fast_28x24_cnn(num_classes: int = 10) -> nn.Module:
    """`fast` on the middle 24 columns of each 28x28 image, every row (17,002 parameters).

    Fashion-MNIST's garments fill their frame from top to bottom but not from side to side:
    the outer two columns hold 2.0% of the ink, the outer two rows 6.3%. Maps of 28x24, 14x12,
    7x6 and 3x3 (the same dense layer); a training step takes about 0.8x the time.
    """
    return _three_stage_cnn((16, 32, 32), num_classes, (False, True, True), crop=(0, 2))


def _deep_stage(c_in: int, widths: tuple[int, ...]) -> list[nn.Module]:
    """Convolutions at one resolution, each with BatchNorm and ReLU, the last one a
    `_conv_block` (so pooling comes before its ReLU)."""
    layers: list[nn.Module] = []
    for c_out in widths[:-1]:
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        c_in = c_out
    return layers + _conv_block(c_in, widths[-1], batch_norm=True)


@register("deep-bn")
def deep_bn_cnn(num_classes: int = 10) -> nn.Module:
    """Four 3x3 convolutions with BatchNorm: 32 | 64, 64 | 128 channels (28 -> 14 -> 7 -> 3).

    The second convolution of stage 2 works at 14x14, where it costs a quarter of what it
    would at 28x28. 141,418 parameters; an epoch takes about 11.5 s on 2 CPU cores in
    bf16, against 2.1 s for the seed network.
    """
    model = ConvNet(
        *_deep_stage(1, (32,)),
        *_deep_stage(32, (64, 64)),
        *_deep_stage(64, (128,)),
        nn.Flatten(),
        nn.Linear(128 * 9, num_classes),
    )
    return init_like_flux(model)


def shifted(x: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """Images `x` [N,C,H,W] moved `down` and `right` by one pixel at most (-1, 0 or 1; -1 is
    up or left), the pixels that come in 0 (the background)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[..., 1 - down : 1 - down + h, 1 - right : 1 - right + w]


# The other views of an image a `ViewAveraged` network looks at in eval mode.
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mirror": lambda x: x.flip(-1),
    "up": lambda x: shifted(x, -1, 0),
    "down": lambda x: shifted(x, 1, 0),
    "left": lambda x: shifted(x, 0, -1),
    "right": lambda x: shifted(x, 0, 1),
}


class ViewAveraged(nn.Module):
    """A network that, once trained, also looks at other views of its input.

    In eval mode it returns the mean of the logits for each image as given and for each of
    its `views` (names in `VIEWS`): test-time augmentation, where a view keeps an image's
    class (a mirrored coat, a digit one pixel off centre). In training mode it is `net`
    alone, so training costs what `net`'s does.
    """

    def __init__(self, net: nn.Module, views: tuple[str, ...]):
        super().__init__()
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not views:
            raise ValueError(f"views must be some of {', '.join(VIEWS)}: got {views}")
        self.net = net
        self.views = tuple(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.net(x)
        total = self.net(x)
        for view in self.views:
            total = total + self.net(VIEWS[view](x))
        return total / (len(self.views) + 1)

    def extra_repr(self) -> str:
        return f"views={self.views}"


@register("deep-bn-mirror")
def deep_bn_mirror_cnn(num_classes: int = 10) -> nn.Module:
    """`deep-bn` that averages its logits over the image and its mirror at test time."""
    return ViewAveraged(deep_bn_cnn(num_classes), ("mirror",))


@register("fast-24x24-shifts")
def fast_24x24_shifts_cnn(num_classes: int = 10) -> nn.Module:
    """`fast-24x24` that, at test time, averages its logits over the image and the image
    moved one pixel up, down, left and right (four more 24x24 windows of the 28x28 frame).

    After 1.0 epoch of `fast` on MNIST, seeds 0-19, float32: 0.9929 mean and 0.9923 lowest
    with the shifted views, 0.9923 and 0.9914 without (benchmarks/RESULTS.md). Training
    costs what `fast-24x24`'s does; evaluation five times as much.
    """
    return ViewAveraged(fast_24x24_cnn(num_classes), ("up", "down", "left", "right"))
