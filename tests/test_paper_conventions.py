"""The paper's conventions, offered as options (issue: paper-faithful experiments).

Each option is checked against what it means in the paper's code: the LM-head layout and sign
by drawing the official images into a head by hand in the official layout, the official arrays
against their published description, the inner-loss conventions by finite differences of the
real SFT.
"""

from __future__ import annotations

import numpy as np
import pytest
import segno
import torch
from torch import nn

from dpg_lightning.patterns import (
    OFFICIAL_QR_TEXT,
    LMHeadPattern,
    decode_qr,
    load_bitmap,
    official_image,
)

OFFICIAL_67 = [[1, 1, 1, 1, -1, -1, -1], [-1, -1, -1, 1, 1, 1, -1], [-1, 1, 1, 1, 1, 1, -1],
               [-1, -1, -1, 1, 1, 1, -1], [-1, 1, -1, 1, 1, 1, -1], [-1, -1, -1, 1, 1, 1, 1]]


class Head(nn.Module):
    """A bare LM head ``[vocab, hidden]``."""

    def __init__(self, vocab: int = 40, hidden: int = 24) -> None:
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_official_arrays_by_name():
    assert official_image("67_official").tolist() == OFFICIAL_67
    qr = official_image("qr_official")
    code = segno.make_qr(OFFICIAL_QR_TEXT, version=1, error="m", mask=1, mode="byte",
                         boost_error=False)
    dark = np.array(code.matrix, dtype=bool)
    differs = np.argwhere((qr == -1) != dark).tolist()
    assert qr.shape == (21, 21) and differs == [[0, 10]] and qr[0, 10] == -1
    assert decode_qr(qr == -1) == OFFICIAL_QR_TEXT
    # the direction the project's own "67" asks of each weight (ink up) agrees with the
    # official array's on 13 of 42 pixels (the same ink on 29, drawn with the opposite sign)
    own = 2 * load_bitmap("67").astype(int) - 1
    assert int((own == official_image("67_official")).sum()) == 13
    assert int((load_bitmap("67") == load_bitmap("67_official")).sum()) == 29


@pytest.mark.parametrize("image", ["67_official", "qr_official"])
def test_official_layout_and_sign(image):
    """Move the head by +S / -S in the paper's layout (kernel [hidden, vocab], patch at
    kernel[0:h, 0:w], S the official array with -1 = ink): pixel accuracy 1.0 / 0.0."""
    values = torch.tensor(official_image(image), dtype=torch.float32)
    h, w = values.shape
    for step, expected in ((0.01, 1.0), (-0.01, 0.0)):
        head = Head(vocab=40, hidden=24)
        pattern = LMHeadPattern(image=image, orientation="hidden_rows", ink_sign=-1)
        pattern.setup(head)
        with torch.no_grad():
            kernel = head.lm_head.weight.T  # [hidden, vocab], a view
            kernel[0:h, 0:w] += step * values
        readout = pattern.readout(head)
        assert readout["pixel_accuracy"] == expected
        if image == "qr_official":
            assert readout["qr_decodes"] == expected
        # this project's layout reads the same move as a different picture
        own = LMHeadPattern(image=image)
        own.setup(Head(vocab=40, hidden=24))


def test_project_layout_is_vocab_rows_and_ink_up():
    head = Head()
    pattern = LMHeadPattern(image="67", row_offset=3, col_offset=2)
    pattern.setup(head)
    with torch.no_grad():
        head.lm_head.weight[3:9, 2:9] += 0.01 * (2 * torch.tensor(load_bitmap("67")) - 1)
    assert pattern.readout(head)["pixel_accuracy"] == 1.0
