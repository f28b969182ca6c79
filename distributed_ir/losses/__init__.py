"""Losses, one per file; they take embeddings or scores, not models, so one loop trains every model type."""

from distributed_ir.losses.cosent import CoSENTLoss
from distributed_ir.losses.distill import KLDistillationLoss
from distributed_ir.losses.infonce import InfoNCELoss
from distributed_ir.losses.listwise import ListwiseSoftmaxLoss
from distributed_ir.losses.pointwise import PointwiseBCELoss
from distributed_ir.losses.triplet import TripletMarginLoss

__all__ = ["CoSENTLoss", "InfoNCELoss", "KLDistillationLoss", "ListwiseSoftmaxLoss", "PointwiseBCELoss",
           "TripletMarginLoss", "build_distillation", "build_loss"]


def build_loss(cfg):
    """Loss named by ``LossConfig`` (for an embedder, the contrastive term; see ``build_distillation``)."""
    if cfg.name == "infonce":
        return InfoNCELoss(temperature=cfg.temperature, gather=cfg.gather_across_workers)
    if cfg.name == "triplet":
        return TripletMarginLoss(margin=cfg.margin)
    if cfg.name == "bce":
        return PointwiseBCELoss()
    if cfg.name == "listwise":
        return ListwiseSoftmaxLoss(temperature=cfg.temperature)
    if cfg.name == "cosent":
        return CoSENTLoss(scale=1.0 / cfg.temperature)
    if cfg.name == "distill":
        return None  # the distillation term alone: build_distillation
    raise ValueError(f"unknown loss {cfg.name!r}")


def build_distillation(cfg) -> KLDistillationLoss | None:
    """The distillation term of ``LossConfig`` (``name: distill`` or ``distill_weight > 0``), else None."""
    if cfg.name != "distill" and not cfg.distill_weight:
        return None
    return KLDistillationLoss(student_temperature=cfg.temperature, teacher_temperature=cfg.teacher_temperature)
