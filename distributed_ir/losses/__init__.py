"""Losses, one per file; they take embeddings, not models, so one loop trains every model type."""

from distributed_ir.losses.cosent import CoSENTLoss
from distributed_ir.losses.infonce import InfoNCELoss
from distributed_ir.losses.triplet import TripletMarginLoss

__all__ = ["CoSENTLoss", "InfoNCELoss", "TripletMarginLoss", "build_loss"]


def build_loss(cfg) -> "InfoNCELoss | TripletMarginLoss | CoSENTLoss":
    """Loss named by ``LossConfig``."""
    if cfg.name == "infonce":
        return InfoNCELoss(temperature=cfg.temperature, gather=cfg.gather_across_workers)
    if cfg.name == "triplet":
        return TripletMarginLoss(margin=cfg.margin)
    return CoSENTLoss(scale=1.0 / cfg.temperature)
