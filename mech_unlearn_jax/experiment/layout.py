"""A run folder's layout, named once.

The main job writes these files and resumes from them (`run.py`), the report rebuilds
from them (`report.py`), `launch.compare_runs` reads their results and the study's plan
reads them to say where a started cell will resume (`study/plan.py`). Keeping the names
here keeps those readers in step with the writer.

  config.json                 the spec (a different spec in the same workdir is refused)
  knowledge.json              p(true) of every fact, the filter's counts
  split.json                  the seeded split
  localization/               mask.npz, localization.json, fact_lookup/ evidence
  checkpoints/                orbax checkpoints of the edit (trained leaves only;
                              round_<r>/ per sequential round)
  evaluation/<model>.json     every format on "unedited", then "edited" (with KL on
                              held-out retain text) or "round_<r>"
  robustness/<model>/         each robustness stage's output, per model
  results.json|md|png         the report
"""

from __future__ import annotations

import dataclasses
import pathlib


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """The paths of one run folder (`root`); nothing is created or read here."""

  root: pathlib.Path

  def __post_init__(self):
    object.__setattr__(self, "root", pathlib.Path(self.root))

  @property
  def config(self) -> pathlib.Path:
    return self.root / "config.json"

  @property
  def knowledge(self) -> pathlib.Path:
    return self.root / "knowledge.json"

  @property
  def split(self) -> pathlib.Path:
    return self.root / "split.json"

  @property
  def localization(self) -> pathlib.Path:
    return self.root / "localization"

  @property
  def results_json(self) -> pathlib.Path:
    return self.root / "results.json"

  @property
  def results_md(self) -> pathlib.Path:
    return self.root / "results.md"

  @property
  def results_png(self) -> pathlib.Path:
    return self.root / "results.png"

  def checkpoints(self, round_index: int | None = None) -> pathlib.Path:
    """The edit's checkpoints; a sequential edit keeps one folder per round."""
    base = self.root / "checkpoints"
    return base if round_index is None else base / f"round_{round_index}"

  def evaluation(self, model: str) -> pathlib.Path:
    """Every format's scores on `model`: "unedited", "edited" or "round_<r>"."""
    return self.root / "evaluation" / f"{model}.json"

  def robustness(self, model: str) -> pathlib.Path:
    """The robustness stages' outputs on `model` ("unedited" or "edited")."""
    return self.root / "robustness" / model
