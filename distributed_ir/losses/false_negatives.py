"""In-batch false negatives: batch documents that are also positives of the row's query.

In-batch contrastive losses treat every document of the (gathered) batch as a negative for
every query.  When two queries share a positive (SciFact train: 248 documents are positives of
more than one query), or a hard negative of one query is a positive of another, that column
pushes a relevant document away.  Such columns are masked to -inf for the rows whose query they
are a positive of, and a document that appears twice counts once; a row's own label column is
never masked.

Documents are identified by a stable 64-bit key of their text (computed by the batcher), so
duplicates of the same text are recognised on every worker without shipping strings.
"""

from __future__ import annotations

import torch

from distributed_ir.losses.gather import gather_no_grad


def shared_positive_mask(doc_keys: torch.Tensor, positive_keys: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool, True = leave column j out of row i's softmax: j is one of row i's
    positives other than its label column, or a repeat of an earlier column's document (so each
    row sees each distinct document once, as if the batch held it once).

    ``doc_keys`` [N] key of each score column; ``positive_keys`` [B, P] keys of every positive of
    row i's query (pad with any of them, e.g. repeat the first); ``targets`` [B] label columns.
    """
    hits = (doc_keys[None, :, None] == positive_keys[:, None, :]).any(-1)
    repeat = (doc_keys[:, None] == doc_keys[None, :]).tril(diagonal=-1).any(dim=1)
    own = torch.zeros_like(hits)
    own[torch.arange(hits.shape[0], device=hits.device), targets] = True
    return (hits | repeat[None, :]) & ~own


def gathered_keys(doc_keys: torch.Tensor, num_positives: int, gather: bool) -> torch.Tensor:
    """Column keys in the order of a gathered score matrix: every rank's positives, then every
    rank's negatives (the layout :class:`~distributed_ir.losses.infonce.InfoNCELoss` builds)."""
    if not gather:
        return doc_keys
    pos, neg = doc_keys[:num_positives], doc_keys[num_positives:]
    return torch.cat([gather_no_grad(pos), gather_no_grad(neg)]) if neg.numel() else gather_no_grad(pos)
