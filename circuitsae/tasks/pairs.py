"""Prompt pairs: base prompts with their counterfactual targets, aligned position by position.

Feature patching (:mod:`circuitsae.interventions.patching`) and ACDC (:mod:`circuitsae.circuits.acdc`) run the
target prompts, keep their codes at a site and patch them into the base run at the same positions, so each
base prompt and its target must have the same real length; metrics are read at each prompt's last real
position. :class:`PromptPairs` holds what they read; a task with known answers (IOI's
:class:`~circuitsae.tasks.ioi.IOIDataset`) extends it and names the answer tokens of its logit difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Self

import torch


@dataclass(frozen=True, eq=False)
class PromptPairs:
    """Base prompts and their targets, tokenised and right-padded to one width.

    Position 0 of every row is the start token; ``lengths`` counts it. Row n of ``target`` is the
    counterfactual of row n of ``base``, with the same real length.
    """

    base: torch.Tensor
    """Base prompts' token ids, LongTensor [N, T]."""
    target: torch.Tensor
    """Target (counterfactual) prompts' token ids, LongTensor [N, T]."""
    lengths: torch.Tensor
    """Real (unpadded) length of each base prompt and of its target, start token included, LongTensor [N]."""

    @property
    def answer_tokens(self) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """``(right, wrong)``: token ids [N] each whose logit difference right − wrong measures the task at
        ``end_position``; None for pairs without known answers."""
        return None

    @property
    def end_position(self) -> torch.Tensor:
        """The last real position of each prompt, whose next-token prediction is measured, LongTensor [N]."""
        return self.lengths - 1

    def __len__(self) -> int:
        return int(self.base.shape[0])

    def subset(self, indices: "Sequence[int] | torch.Tensor") -> Self:
        """The pairs at ``indices`` (in that order), of the same class, padding trimmed to fit.

        Every field is cut: tensors and lists per prompt (2-D tensors to the new width), others kept.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        width = int(self.lengths[idx].max()) if len(idx) else 0
        values: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[idx]
                values[f.name] = v[:, :width] if v.dim() == 2 else v
            elif isinstance(v, list):
                values[f.name] = [v[i] for i in idx.tolist()]
            else:
                values[f.name] = v
        return type(self)(**values)
