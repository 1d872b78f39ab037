"""Axolotl sample packing feeds document boundaries to the hybrid: packed == one by one (KL and CE)."""

import pytest
import torch

from tests.testing import assert_close

from .helpers import collate
from .helpers import make_trainer


@pytest.fixture(scope="module")
def trainer(axolotl_setup, tmp_path_factory):
    cfg, _ = axolotl_setup
    trainer, _ = make_trainer(cfg, tmp_path_factory.mktemp("packing"))
    trainer.setup_distillation(cfg)
    trainer.model.eval()  # same numbers, no dropout either way
    return trainer


def _mask_labels(batch, keep_doc: int):
    """Labels of every packed document except ``keep_doc`` (0-based) set to -100."""
    pos = batch["position_ids"][0]
    doc = torch.cumsum((pos == 0).long(), 0) - 1
    out = dict(batch)
    out["labels"] = batch["labels"].clone()
    out["labels"][0, doc != keep_doc] = -100
    return out


@pytest.mark.parametrize("drop_mask", [True, False], ids=["position_ids", "segment_mask"])
@pytest.mark.parametrize("loss", ["distill", "sft"])
def test_packed_documents_equal_one_by_one(axolotl_setup, trainer, drop_mask, loss):
    """Docs A, B, C packed into one row (plus padding) give each document the loss it has alone:
    nothing leaks through the SSM state, the conv window or attention."""
    _, ds = axolotl_setup
    tok = trainer.processing_class
    rows = [ds[4], ds[5], ds[6]]
    packed = collate(tok, rows, packed=True, drop_mask=drop_mask, pad_to_multiple_of=64)
    assert packed["input_ids"].shape[0] == 1 and (packed["position_ids"][0] == 0).sum() > 3  # docs + pads

    def value(batch):
        with torch.no_grad():
            if loss == "distill":
                return trainer.compute_loss(trainer.model, batch)
            return trainer.model(**batch).loss

    whole = value(dict(packed))
    per_doc, counts = [], []
    for i, row in enumerate(rows):
        alone = collate(tok, [row], packed=False, drop_mask=False)
        ref = value(alone)
        got = value(_mask_labels(packed, i))
        assert_close(f"{loss} doc {i}", ref, got, atol=2e-5, rtol=2e-5)
        per_doc.append(ref)
        counts.append(int((torch.tensor(row["labels"][1:]) != -100).sum()))
    mean = sum(c * v for c, v in zip(counts, per_doc)) / sum(counts)
    assert_close(f"{loss} packed mean", mean, whole, atol=2e-5, rtol=2e-5)
