"""Draw a binary image into the target's LM head: the paper's QR-code and ``67`` targets.

``W`` is the LM-head matrix ``[vocab, hidden]``; the patch ``P = W[r0:r0+h, c0:c0+w]`` is
compared with its initial value, ``D = P - P_initial``, and the image ``S`` in {-1, +1} asks each
entry to move up (+1, ink) or down (-1, background):

    MetricFn = -mean(log(1 + exp(-k * S * D)))          (k = ``sharpness``, paper: 20)

so Phi rises as every entry moves in its pixel's direction, and saturates once ``|D| >> 1/k``.
The readout is pixel accuracy ``mean(sign(D) == S)`` (0.5 is chance).

The paper's code draws differently, and both of its choices are options (``orientation:
hidden_rows``, ``ink_sign: -1``; its "67" and QR arrays are ``67_official`` and
``qr_official``): its head is a kernel ``[hidden, vocab]``, so image rows are hidden units and
columns vocabulary ids, and the ink's weights must *decrease*.

Tied embeddings (GPT-2, the tiny default): the LM head *is* the input embedding, so patch rows
``r0..r0+h`` are also the input vectors of tokens ``r0..r0+h``. The gradient path exists either
way: every head row gets gradient through the softmax (``p_v * h``) at every position, and rows
of tokens that appear in the data get more through their target and input uses. Select the
matrix with ``inner.train_params: lm_head`` (it names the shared tensor once) or ``all``.
Which rows the data can move *differently* matters: on the byte-level tokenizer rows 0-5 are
pad/eos/unk/control bytes that no ordinary text contains, so the tiny configs put the patch on
the rows of printable characters (``row_offset``), just as the paper's upper-left GPT-2 rows are
the printable tokens ``! " # $ ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import segno
import torch
import torch.nn.functional as F
import zxingcpp
from PIL import Image
from torch import Tensor, nn

from dpg_lightning.common.errors import check_choice, check_positive, require
from dpg_lightning.metrics.base import Metric
from dpg_lightning.metrics.l2_norm import lm_head_weight

#: The digits "67" as a 6 x 7 bitmap (rows x columns; 1 = ink), two 3-wide glyphs and a gap.
SIXTY_SEVEN = np.array(
    [
        [1, 1, 1, 0, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 1],
        [1, 1, 1, 0, 0, 0, 1],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1, 0],
    ],
    dtype=np.int8,
)


def qr_bitmap(text: str) -> np.ndarray:
    """The 21 x 21 version-1 QR code of ``text`` (1 = dark module, no quiet zone), via ``segno``.

    Error correction is the highest level that still fits version 1, so a drawn code survives
    as many wrong pixels as possible.
    """
    if not text:
        raise ValueError("`metric.init_args.qr_text` is empty; give the string to encode")
    try:
        code = segno.make_qr(text, version=1, error="h", boost_error=True)
    except segno.DataOverflowError as err:
        raise ValueError(
            f"`qr_text` {text!r} ({len(text.encode())} bytes) does not fit a 21 x 21 version-1 QR "
            "code (at most 17 bytes, 25 alphanumeric or 41 digits); shorten it"
        ) from err
    return np.array(code.matrix, dtype=np.int8)


#: Images of the paper's public experiment configs, shipped as data files (``assets/``).
OFFICIAL_IMAGES = {"67_official": "sixty_seven_official.txt", "qr_official": "qr_official.txt"}
#: The text the official QR code encodes.
OFFICIAL_QR_TEXT = "bit.ly/3Ka4jDS"
ASSETS = Path(__file__).parent / "assets"
Orientation = Literal["vocab_rows", "hidden_rows"]


def official_image(name: str) -> np.ndarray:
    """An official image as its values: ``-1`` = ink, ``+1`` = background, rows top down."""
    lines = (ASSETS / OFFICIAL_IMAGES[name]).read_text().splitlines()
    return np.array([[int(v) for v in line.split()] for line in lines
                     if line.strip() and not line.startswith("#")], dtype=np.int8)


def load_bitmap(image: str, qr_text: str | None = None) -> np.ndarray:
    """The binary image ``[h, w]`` (values 0/1, 1 = ink) named by ``image``.

    ``image`` is ``67`` (the project's glyph), ``qr`` (the QR code of ``qr_text``),
    ``67_official`` / ``qr_official`` (the paper's arrays, :data:`OFFICIAL_IMAGES`), or a
    ``.npy`` file of 0/1 or -1/+1 values or a ``.png`` file of black/white pixels (black =
    ink = +1).
    """
    if image == "67":
        return SIXTY_SEVEN.copy()
    if image == "qr":
        return qr_bitmap(qr_text if qr_text is not None else "")
    if image in OFFICIAL_IMAGES:
        return (official_image(image) == -1).astype(np.int8)
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(
            f"`metric.init_args.image: {image}` is neither `67`, `qr` nor an existing .png/.npy "
            f"file (relative paths start at {Path.cwd()})"
        )
    if path.suffix.lower() == ".npy":
        arr = np.load(path)
        values = set(np.unique(arr).tolist())
        if arr.ndim != 2 or not (values <= {0, 1} or values <= {-1, 1}):
            raise ValueError(
                f"{image}: a pattern must be a 2-D array of 0/1 or -1/+1 values; got shape "
                f"{arr.shape} with values {sorted(values)[:6]}"
            )
        return (arr > 0).astype(np.int8)
    if path.suffix.lower() == ".png":
        arr = np.asarray(Image.open(path).convert("L"))
        values = set(np.unique(arr).tolist())
        if not values <= {0, 255}:
            raise ValueError(
                f"{image}: the PNG is not binary (gray levels {sorted(values)[:6]}...); save it "
                "with pure black (ink) and white pixels only"
            )
        return (arr == 0).astype(np.int8)
    raise ValueError(f"`metric.init_args.image: {image}`: only .png and .npy files are read")


def lm_head_patch(
    weight: Tensor, row: int, col: int, height: int, width: int, orientation: Orientation
) -> Tensor:
    """The ``height x width`` patch of an LM head ``weight [vocab, hidden]`` an image lives in.

    ``vocab_rows`` (this project's default): image row r is vocabulary row ``row + r``, column c
    is hidden unit ``col + c``. ``hidden_rows`` (the paper's code, whose head is a kernel
    ``[hidden, vocab]`` patched at ``kernel[row:row+h, col:col+w]``): image row r is hidden unit
    ``row + r`` and column c is vocabulary id ``col + c``.
    """
    if orientation == "hidden_rows":
        return weight[col : col + width, row : row + height].transpose(0, 1)
    return weight[row : row + height, col : col + width]


class LMHeadPattern(Metric):
    """``Phi = -mean(softplus(-k * S * (P - P_initial)))`` on an LM-head patch (see module doc).

    Args:
        image: ``67``, ``qr``, ``67_official``, ``qr_official`` or a .png/.npy path (see
            :func:`load_bitmap`).
        qr_text: the string encoded when ``image: qr`` (``qr_official`` encodes its own).
        row_offset, col_offset: upper-left corner ``(r0, c0)`` of the image in the head (image
            rows and columns; see ``orientation``).
        sharpness: ``k``; larger makes Phi closer to a step function of each pixel's sign.
        orientation: ``vocab_rows`` (image rows are vocabulary rows of ``W[vocab, hidden]``)
            or ``hidden_rows`` (the paper's: image rows are hidden units, columns vocabulary
            ids); see :func:`lm_head_patch`.
        ink_sign: the direction the ink's weights move: ``+1`` (this project's default: up) or
            ``-1`` (the paper's: the ink's weights decrease); the background moves the other way.
    """

    def __init__(
        self,
        image: str = "67",
        qr_text: str | None = None,
        row_offset: int = 0,
        col_offset: int = 0,
        sharpness: float = 20.0,
        orientation: Orientation = "vocab_rows",
        ink_sign: Literal[1, -1] = 1,
    ) -> None:
        key = "model.metric.init_args"
        require(row_offset >= 0 and col_offset >= 0,
                f"`{key}.row_offset/col_offset` are ({row_offset}, {col_offset}); use >= 0")
        check_positive(f"{key}.sharpness", sharpness)
        check_choice(f"{key}.orientation", orientation, ("vocab_rows", "hidden_rows"))
        check_choice(f"{key}.ink_sign", ink_sign, (1, -1))
        if image == "qr_official":
            qr_text = OFFICIAL_QR_TEXT
        self.image, self.qr_text = image, qr_text
        self.bitmap = load_bitmap(image, qr_text)
        self.r0, self.c0, self.k = row_offset, col_offset, float(sharpness)
        self.orientation, self.ink_sign = orientation, ink_sign
        ink = torch.from_numpy(self.bitmap.astype(np.float32))
        self.signs = ink_sign * (2 * ink - 1)  # the direction each entry should move
        self.initial: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bitmap.shape)  # type: ignore[return-value]

    def patch(self, target: nn.Module) -> Tensor:
        """``P``: the patch of the (possibly patched/functional) target's current LM head."""
        h, w = self.shape
        return lm_head_patch(lm_head_weight(target), self.r0, self.c0, h, w, self.orientation)

    def setup(self, target: nn.Module) -> None:
        """Check that the image fits and remember ``P_initial`` (a detached copy)."""
        weight = lm_head_weight(target)
        vocab, hidden = weight.shape
        rows, cols = (vocab, hidden) if self.orientation == "vocab_rows" else (hidden, vocab)
        h, w = self.shape
        if self.r0 + h > rows or self.c0 + w > cols:
            raise ValueError(
                f"the {h} x {w} image at offset ({self.r0}, {self.c0}) does not fit in the LM head "
                f"[vocab {vocab}, hidden {hidden}] (orientation {self.orientation}: {rows} image "
                f"rows, {cols} columns); lower the offsets or use a larger target"
            )
        self.initial = self.patch(target).detach().clone()

    def delta(self, target: nn.Module) -> Tensor:
        """``D = P - P_initial`` (in float32 at least, so bf16 heads do not round D to zero)."""
        if self.initial is None:
            raise RuntimeError("LMHeadPattern.setup(target) must run before the objective is used")
        p = self.patch(target)
        dtype = torch.promote_types(p.dtype, torch.float32)
        if self.initial.device != p.device:
            self.initial = self.initial.to(p.device)
        return p.to(dtype) - self.initial.to(dtype)

    def __call__(self, target: nn.Module) -> Tensor:
        return self.of_delta(self.delta(target))

    def of_delta(self, d: Tensor) -> Tensor:
        """Phi of a patch change ``D`` (``[..., h, w]``, mean over all of it): the objective apart
        from reading ``D`` off a target, for analyses that model ``D`` directly."""
        s = self.signs.to(device=d.device, dtype=d.dtype)
        return -F.softplus(-self.k * s * d).mean()

    def pixel_accuracy(self, d: Tensor) -> float:
        """Share of the entries of a patch change ``D`` that moved their pixel's way."""
        return float((torch.sign(d) == self.signs.to(device=d.device, dtype=d.dtype)).float()
                     .mean())

    def pixels(self, target: nn.Module) -> np.ndarray:
        """The drawn image: 1 where the entry moved the ink's way (``ink_sign * D > 0``)."""
        return (self.ink_sign * self.delta(target).detach() > 0).to(torch.int8).cpu().numpy()

    def readout(self, target: nn.Module) -> dict[str, float]:
        d = self.delta(target).detach()
        out = {
            "pixel_accuracy": self.pixel_accuracy(d),
            "patch_delta_abs": float(d.abs().mean()),
        }
        if self.image in ("qr", "qr_official"):
            decoded = decode_qr(self.pixels(target) == 1)
            out["qr_decodes"] = float(decoded is not None and decoded == self.qr_text)
        return out


def decode_qr(dark: np.ndarray, module_px: int = 8) -> str | None:
    """The text of the QR code whose dark modules are ``dark`` (a boolean matrix, one entry per
    module), read with ``zxing-cpp``; ``None`` if unreadable.

    The matrix is rendered as a scanner would see a printed code: ``module_px`` pixels per
    module and a white quiet zone of 4 modules.
    """
    img = np.where(np.asarray(dark, dtype=bool), 0, 255).astype(np.uint8)
    img = np.kron(img, np.ones((module_px, module_px), dtype=np.uint8))
    img = np.pad(img, 4 * module_px, constant_values=255)
    for result in zxingcpp.read_barcodes(img):
        if result.valid and result.text:
            return result.text
    return None
