"""What a worker needs from an analysis pipeline: the :class:`Pipeline` protocol and its :class:`AnalysisOutcome`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from pipeline.errors import PermanentError
from vocabulary import Priority


@dataclass(frozen=True)
class AnalysisOutcome:
    """What any pipeline concluded about a study, and the DICOM objects to send back, as a worker records it.

    The MONAI pipeline builds it from the richer :class:`pipeline.runner.PipelineResult`.
    """

    priority: Priority
    summary: str
    datasets: tuple[Dataset, ...] = field(default_factory=tuple)
    # Seconds per stage of the run (pipeline.runner.STAGES), recorded with the job's success.
    stage_seconds: Mapping[str, float] = field(default_factory=dict)


class Pipeline(Protocol):
    """An analysis pipeline as a worker sees it. Loaded once per worker process, run per job."""

    name: str
    version: str

    def run(self, study_files: Sequence[Path], *, input_fingerprint: str) -> AnalysisOutcome:
        """Analyse one study. Raise ``pipeline.errors.PermanentError`` when this input can never work."""
        ...


class UnknownPipeline(PermanentError):
    """A routing rule names a pipeline this installation does not have."""
