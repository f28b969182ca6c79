"""Losses, one per file; they take embeddings or scores, not models, so one loop trains every model type."""

from distributed_ir.losses.cosent import CoSENTLoss
from distributed_ir.losses.infonce import InfoNCELoss
from distributed_ir.losses.listwise import ListwiseSoftmaxLoss
from distributed_ir.losses.pointwise import PointwiseBCELoss
from distributed_ir.losses.triplet import TripletMarginLoss

__all__ = ["CoSENTLoss", "InfoNCELoss", "ListwiseSoftmaxLoss", "PointwiseBCELoss", "TripletMarginLoss", "build_loss"]


def build_loss(cfg):
    """Loss named by ``LossConfig``."""
    if cfg.name == "infonce":
        return InfoNCELoss(temperature=cfg.temperature, gather=cfg.gather_across_workers)
    if cfg.name == "triplet":
        return TripletMarginLoss(margin=cfg.margin)
    if cfg.name == "bce":
        return PointwiseBCELoss()
    if cfg.name == "listwise":
        return ListwiseSoftmaxLoss(temperature=cfg.temperature)
    return CoSENTLoss(scale=1.0 / cfg.temperature)
