"""Knowledge distillation (Hinton, Vinyals and Dean 2015): a student learns from the softened output of trained
teachers (an ensemble's mean) as well as from the labels, to keep most of an ensemble's gain at one model's cost.

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teachers_T || student_T)

where `_T` means softmax(logits / T); the T^2 keeps the soft term's gradients on the scale of the hard one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import Dataset, Normalizer
from ..errors import VisrecError
from ..run_store import RunRef


class Teachers:
    """Trained runs in eval mode that give the mean softened probabilities of a batch."""

    def __init__(self, specs: list[str], ds: Dataset, normalizer: Normalizer, device: torch.device,
                 temperature: float, alpha: float):
        if temperature <= 0:
            raise VisrecError(f"distill.temperature={temperature} must be > 0", "typical values are 2 to 8")
        if not 0 <= alpha <= 1:
            raise VisrecError(f"distill.alpha={alpha} must be in [0, 1]", "0.5 weighs soft and hard targets equally")
        self.models, self.temperature, self.alpha = [], temperature, alpha
        for spec in specs:
            ref = RunRef.parse(spec)
            run = ref.run
            lm = run.load_model(ref.which, str(device))
            if lm.classes != ds.classes:
                raise VisrecError(f"teacher {run.path} knows the classes {lm.classes}, but this run's data has "
                                  f"{ds.classes}", "distill on the dataset (and data.classes) the teachers learned")
            theirs = lm.normalizer.to("cpu")
            if not theirs.same_as(normalizer):
                raise VisrecError(f"teacher {run.path} preprocesses images differently ({theirs!r}) from this run "
                                  f"({normalizer!r})", "use the teachers' data.normalize and the same training data "
                                  "(data.subset, data.split_seed)")
            for p in lm.model.parameters():
                p.requires_grad_(False)
            self.models.append(lm.model.eval())

    @torch.no_grad()
    def soft_targets(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(m(x).float() / self.temperature).softmax(1) for m in self.models]).mean(0)

    def loss(self, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The soft-target term for a batch `x` (already preprocessed and augmented, as the student saw it)."""
        t = self.temperature
        log_p = F.log_softmax(student_logits.float() / t, dim=1)
        return F.kl_div(log_p, self.soft_targets(x), reduction="batchmean") * (t * t)
