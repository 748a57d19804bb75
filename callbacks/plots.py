"""Pictures of a DPG run: the validation-Phi curve and the LM-head patch the target learns.

Figures are drawn with matplotlib's object API (``Figure``, no ``pyplot``), so no GUI backend or
global figure state is involved on headless cluster nodes. Only global rank zero draws.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from callbacks.files import drop_rows_from, run_dir, writes_files
from dpg_lightning.dpg.step_output import StepOutput
from dpg_lightning.metrics.patterns import Orientation, decode_qr, lm_head_patch, load_bitmap
from dpg_lightning.run.summary import logger_step


def _log_image(trainer: L.Trainer, key: str, path: Path, step: int) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)


class PhiCurvePlot(L.Callback):
    """Plot validation Phi against training steps to ``<run dir>/<filename>``.

    The points are the loggers' (``metrics.csv``'s) rows: the untrained generator's validation
    at step 0, which the module logs itself before training and hands over through
    :func:`dpg_lightning.run.summary.record_validation`, then each validation at the step
    Lightning logs it at (see :func:`dpg_lightning.run.summary.logger_step`), so the figure and
    the CSV can be read side by side.

    The plot is redrawn after every validation (so a crashed run still has one) and at the end
    of fit, when it is also logged as a ``wandb.Image`` if a ``WandbLogger`` is active. The
    dashed line is Phi of the initial target before any SFT (``val/phi_initial``), the level a
    useless synthetic set would not move. A reference run (e.g. the dataset-level reward on the
    same config) can be drawn beside it, to see what DPG adds over it.

    Args:
        monitor: the validation metric to plot.
        filename: PNG file name inside the run directory.
        reference: another run's ``metrics.csv``, drawn as a second line (its ``monitor``
            column); read at each redraw, so it may be a run still going.
        reference_label: the legend label of the reference line.
    """

    def __init__(
        self,
        monitor: str = "val/phi",
        filename: str = "val_phi.png",
        reference: str | None = None,
        reference_label: str = "reference",
    ) -> None:
        super().__init__()
        self.monitor, self.filename = monitor, filename
        self.reference = Path(reference) if reference else None
        self.reference_label = reference_label
        self.output_path: Path | None = None
        self.history: list[tuple[int, float]] = []
        self.reference_points: list[tuple[int, float]] = []
        self._initial: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.reference is not None and not self.reference.is_file():
            raise FileNotFoundError(
                f"PhiCurvePlot(reference={str(self.reference)!r}): no such file; give the "
                "metrics.csv of the run to draw beside this one"
            )
        directory = run_dir(trainer)
        if writes_files(trainer, stage):
            directory.mkdir(parents=True, exist_ok=True)
            self.output_path = directory / self.filename

    def state_dict(self) -> dict[str, Any]:
        """The curve so far, checkpointed: a resumed run's plot shows the whole run."""
        return {"history": list(self.history), "initial": self._initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(point) for point in state_dict.get("history", [])]
        self._initial = state_dict.get("initial")

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Add the validation logged at ``step`` (a resumed run's redone step replaces its
        point) and redraw."""
        if self.monitor not in metrics:
            return
        point = (int(step), float(metrics[self.monitor]))
        self.history = sorted([p for p in self.history if p[0] != point[0]] + [point])
        if "val/phi_initial" in metrics:
            self._initial = float(metrics["val/phi_initial"])
        if self.output_path is not None:
            self.draw()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.record(logger_step(trainer), trainer.callback_metrics)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.output_path is not None and self.history:
            self.draw()
            _log_image(trainer, "val_phi_curve", self.output_path, trainer.global_step)

    def read_reference(self) -> list[tuple[int, float]]:
        """The reference run's ``(step, monitor)`` rows, by step."""
        if self.reference is None or not self.reference.is_file():
            return []
        with self.reference.open(newline="") as f:
            rows = [
                (int(row["step"]), float(row[self.monitor]))
                for row in csv.DictReader(f)
                if row.get(self.monitor) not in (None, "")
            ]
        return sorted(dict(rows).items())  # a resumed reference run's redone step: its last

    def draw(self) -> Figure:
        """Write the PNG from the points collected so far; returns the figure."""
        steps, values = zip(*self.history, strict=True)
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ax.plot(steps, values, marker="o", label=self.monitor)
        self.reference_points = self.read_reference()
        if self.reference_points:
            ref_steps, ref_values = zip(*self.reference_points, strict=True)
            ax.plot(ref_steps, ref_values, marker="s", linestyle=":", label=self.reference_label)
        if self._initial is not None:
            ax.axhline(self._initial, linestyle="--", color="gray", label="initial target (no SFT)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel(self.monitor)
        ax.set_title(f"{self.monitor} (higher is better)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.output_path)
        return fig


def load_image(
    image: str | os.PathLike | np.ndarray | None, qr_text: str | None = None
) -> np.ndarray | None:
    """A 2-D float array from an array, a ``.npy`` file, or a pattern name (``None`` passes).

    Any other string goes to :func:`dpg_lightning.metrics.patterns.load_bitmap` (``67``, ``qr`` with
    ``qr_text``, a black/white ``.png``), so the callback can name the same image as the
    pattern objective in a config.
    """
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.suffix.lower() == ".npy" and path.is_file():
            array = np.load(path)
        else:
            array = load_bitmap(str(image), qr_text)
    else:
        array = np.asarray(image)
    array = np.squeeze(array).astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"target_image must be 2-D (a patch of the LM head); got {array.shape}")
    return array


def read_drawn_qr(sign: np.ndarray) -> str | None:
    """The text of a QR code drawn as a ``{-1, 0, 1}`` patch (one entry per module), else None.

    Which sign is "dark" depends on the objective's convention, so both are tried; unchanged
    entries count as light.
    """
    return decode_qr(sign > 0) or decode_qr(sign < 0)


class LMHeadPatchImage(L.Callback):
    """Render ``sign(P - P_initial)`` of an LM-head patch of the SFT-trained target.

    ``P = target.get_output_embeddings().weight[row:row+height, col:col+width]`` after a plain
    inner SFT (the module's inner settings) of the initial target on the step's rollout, i.e.
    what the current synthetic data teaches the target. Pattern objectives (a QR code, a
    picture) ask DPG to draw an image into that patch; this shows it appear.

    At the first DPG step (the untrained generator's data), every ``every_n_steps`` DPG steps
    and at the end of training it writes, in
    ``<run dir>/<dirname>/``: ``step{N}.png``, the patch at one pixel per weight
    (black +1, gray 0, white -1: a pattern's ink moves up), and ``step{N}_vs_target.png``,
    the patch enlarged beside ``target_image`` (higher = darker; also a ``wandb.Image``).
    It logs ``patch/changed_share``, ``patch/match`` (share of entries whose sign equals the
    target binarized at its mid-range: 1 = drawn, 0 = drawn inverted) and, with ``decode_qr``,
    ``patch/qr_decodes`` (1/0; the decoded text goes to ``decodes.jsonl``). Each render costs
    one plain inner SFT.

    Args:
        row, col: top-left corner of the patch (image row and column; see ``orientation``).
        height, width: patch size.
        orientation: how the image lies in the head ``W[vocab, hidden]``: ``vocab_rows`` (image
            rows are vocabulary rows) or ``hidden_rows`` (the paper's layout), as the pattern
            objective's option (:func:`dpg_lightning.metrics.patterns.lm_head_patch`).
        target_image: the intended picture, ``height x width``: an array, a ``.npy`` path, or
            a pattern name of ``dpg_lightning.metrics.patterns`` (``67``, ``qr``, a ``.png`` path).
        qr_text: the text of ``target_image: qr``.
        every_n_steps: render every N DPG steps (and at the first and the last).
        dirname: output folder inside the run directory.
        decode_qr: try to read the patch as a QR code (either polarity).
    """

    def __init__(
        self,
        row: int,
        col: int,
        height: int,
        width: int,
        target_image: str | os.PathLike | np.ndarray | None = None,
        every_n_steps: int = 20,
        dirname: str = "lm_head_patch",
        decode_qr: bool = False,
        qr_text: str | None = None,
        orientation: Orientation = "vocab_rows",
    ) -> None:
        super().__init__()
        if min(row, col) < 0 or min(height, width) < 1 or every_n_steps < 1:
            raise ValueError("need row, col >= 0, height, width >= 1 and every_n_steps >= 1")
        self.box = (row, col, height, width)
        self.orientation = orientation
        self.target_image = load_image(target_image, qr_text)
        if self.target_image is not None and self.target_image.shape != (height, width):
            raise ValueError(
                f"target_image has shape {self.target_image.shape}, the patch is "
                f"({height}, {width}): they must match"
            )
        self.every_n_steps, self.dirname, self.decode_qr = every_n_steps, dirname, decode_qr
        self.output_path: Path | None = None
        self.last_sign: np.ndarray | None = None
        self._texts: list[str] = []
        self._step = 0
        self._rendered_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        row, col, height, width = self.box
        shape = tuple(pl_module.target.get_output_embeddings().weight.shape)
        rows, cols = shape if self.orientation == "vocab_rows" else shape[::-1]
        if row + height > rows or col + width > cols:
            raise ValueError(
                f"LM-head patch rows {row}:{row + height}, cols {col}:{col + width} does not fit "
                f"the target's LM head of shape {shape} (orientation {self.orientation})"
            )
        directory = run_dir(trainer) / self.dirname
        if writes_files(trainer, stage):
            directory.mkdir(parents=True, exist_ok=True)
            self.output_path = directory

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run drops the QR readings of the steps it redoes (after the
        ``trainer.global_step`` steps its checkpoint holds)."""
        if self.output_path is not None:
            drop_rows_from(self.output_path / "decodes.jsonl", trainer.global_step + 1)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The DPG step of this batch (1 for the first): the step its `train/*` values are
        # logged at and checkpoint names count.
        self._step = trainer.global_step + 1

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        output = StepOutput.of(outputs)
        if self.output_path is None or output is None or not output.texts:
            return
        self._texts = list(output.texts)
        if self._step == 1 or self._step % self.every_n_steps == 0:  # the start, then every N
            self.render(trainer, pl_module, self._texts, self._step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.output_path is not None and self._texts and self._rendered_step != self._step:
            self.render(trainer, pl_module, self._texts, self._step)

    def patch_after_sft(self, pl_module: L.LightningModule, texts: list[str]) -> torch.Tensor:
        """The patch of the target's LM head after the module's plain inner SFT on ``texts``."""
        row, col, height, width = self.box
        captured: dict[str, torch.Tensor] = {}

        def capture(target: torch.nn.Module) -> torch.Tensor:
            weight = target.get_output_embeddings().weight
            patch = lm_head_patch(weight, row, col, height, width, self.orientation)
            captured["patch"] = patch.detach().clone()
            return weight.sum()  # any scalar: only the trained weights are wanted

        pl_module.sft_on_texts(texts, capture)
        return captured["patch"]

    def render(
        self, trainer: L.Trainer, pl_module: L.LightningModule, texts: list[str], step: int
    ) -> Path:
        """Run the SFT, write both PNGs, log the patch metrics; returns the side-by-side PNG."""
        assert self.output_path is not None
        row, col, height, width = self.box
        patch = self.patch_after_sft(pl_module, texts)
        initial = pl_module.target.get_output_embeddings().weight
        initial = lm_head_patch(initial, row, col, height, width, self.orientation).detach()
        sign = torch.sign(patch.float() - initial.float()).cpu().numpy().astype(np.int8)
        self.last_sign, self._rendered_step = sign, step

        exact = self.output_path / f"step{step:06d}.png"
        Image.fromarray(((1 - sign.astype(np.int16)) * 255 // 2).astype(np.uint8)).save(exact)
        side = self.output_path / f"step{step:06d}_vs_target.png"
        self._draw_side_by_side(sign, step, side)

        metrics = {"patch/changed_share": float((sign != 0).mean())}
        if self.target_image is not None and np.ptp(self.target_image) > 0:
            mid = (self.target_image.max() + self.target_image.min()) / 2
            want = np.where(self.target_image > mid, 1, -1)
            metrics["patch/match"] = float((sign == want).mean())
        if self.decode_qr:
            text = read_drawn_qr(sign)
            metrics["patch/qr_decodes"] = float(text is not None)
            row = {"step": step, "decodes": text is not None, "text": text}
            with (self.output_path / "decodes.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        _log_image(trainer, "lm_head_patch", side, step)
        return side

    def _draw_side_by_side(self, sign: np.ndarray, step: int, path: Path) -> None:
        panels = [(f"sign(P - P_initial), step {step}", sign.astype(np.float64), (-1, 1))]
        if self.target_image is not None:
            panels.append(("target", self.target_image, None))
        fig = Figure(figsize=(3.2 * len(panels), 3.4), dpi=100)
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, (title, values, limits) in zip(axes, panels, strict=True):
            vmin, vmax = limits if limits else (values.min(), values.max())
            ax.imshow(values, cmap="gray_r", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path)
