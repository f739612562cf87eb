"""The training doctor: pre-flight experiments, training monitors, and a written diagnosis.

    diagnosis = visrec.doctor.examine("fashion-mnist")   # what `visrec doctor fashion-mnist` runs
    diagnosis.print(console); diagnosis.to_json()

    visrec.train("fashion-mnist", callbacks=[visrec.doctor.TrainingMonitor()])   # `visrec train --monitor`
"""

from .exam import CHECKS, Exam, ExamOptions, examine, reconcile
from .findings import FINDINGS, SEVERITIES, Diagnosis, Finding
from .gradcheck import gradient_check
from .lr_finder import LRFinderResult, lr_range_test
from .monitor import TrainingMonitor

__all__ = [
    "CHECKS", "Diagnosis", "Exam", "ExamOptions", "FINDINGS", "Finding", "LRFinderResult", "SEVERITIES",
    "TrainingMonitor", "examine", "gradient_check", "lr_range_test", "reconcile",
]
