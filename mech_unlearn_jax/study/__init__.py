"""The reproduction study: settings x methods x seeds, each cell a full main-job run.

`run_study(config, workdir)` runs every cell of a `StudyConfig` (a setting such as
"16 athletes -> another sport", a localization method, a seed) as one
`experiment.run_experiment` with every robustness stage, then turns the cells'
results into the paper's tables and figures with intervals over seeds:

  workdir/
    shared/knowledge/<task>-<hash>.json      the per-model knowledge filter (every
                                             cell whose model and data agree)
    shared/<setting>-<hash>/seed<k>/evidence   fact-lookup evidence (every method's
                                             budget comes from it)
    shared/<setting>-<hash>/seed<k>/unedited   the unedited model's evaluation and
                                             robustness control
    cells/<setting>/<method>/seed<k>/        the cell's run (stages, checkpoints)
    mask_records/<setting>/<method>/seed<k>/ the cell's localization alone (its mask
                                             record and twin check, `find_twin`)
    results/                                 (or `out_dir`) what a reader wants:
      study.csv        long format: setting, method, seed, metric, value
      study.md         per setting: the paper's three tables (mean and t-interval
                       over seeds), format validity, the claims, cell wall times
      figures/         relearning curves, probe accuracy by layer, forget accuracy
                       in other formats vs side effects
      cells/<setting>__<method>__seed<k>.json   a small summary per finished cell
      shared/          copies of the shared outputs' JSON and score files
                       (`sync_shared`), copied back into a workdir that lacks them

The hashes name the settings' experiment configs, so a changed config never reads
another config's shared outputs. The sampled retain text is cached by the library
per (model, seed) outside the workdir, so it too is computed once per seed.

Twins: a cell whose mask and experiment (all but the method's name) equal a finished
cell's of the same setting and seed takes that cell's results (`find_twin`;
`StudyConfig.reuse_identical_edits`), its summary naming it in `reused_from`.

Resuming: a cell whose summary exists is never rerun (its recorded config must equal
the current one, or the study stops naming the keys that differ); a killed cell
resumes inside `run_experiment` (finished stages are read back, the edit continues
from its checkpoint). The model is loaded once per study (once per seed for "tiny-*"
presets, whose random weights are seeded).

Metrics (`cell_metrics`): accuracies are probabilities, as in the paper: sports
answers normalized over the candidate sports, letter-MC over the option letters;
CounterFact (except letter-MC) the full-vocabulary probability of the first target
token. `<metric>_argmax` is the matching argmax accuracy (CounterFact: top-1 over the
vocabulary). Unedited-model control rows (method "unedited") come from the shared
unedited evaluation and robustness stages.

The package's modules, in dependency order: `config` (settings, cells, each cell's
experiment), `metrics` (one cell's metric dict), `aggregate` (values over seeds,
t-intervals, study.csv), `comparisons` (the paper's claims as paired differences, and
their controls), `report` (study.md, figures, `write_outputs`), `runner` (cells,
shared outputs, twins, mask records, `run_study`) and `plan` (each cell's state and
the time left, read from files: `launch.study --plan`). The names below are the API.
"""

from mech_unlearn_jax.study.aggregate import CSV_COLUMNS, Interval, StudyData, collect, csv_text, finished_cells, t_interval
from mech_unlearn_jax.study.comparisons import (
    OUTPUT_TRACING,
    Comparison,
    baseline_contrasts,
    claims,
    fact_lookup_values,
    same_mask_contrasts,
    same_mask_seeds,
)
from mech_unlearn_jax.study.config import UNEDITED, Cell, StudyConfig, StudySetting
from mech_unlearn_jax.study.metrics import MASK_JACCARD, cell_metrics, robustness_metrics
from mech_unlearn_jax.study.plan import CellState, cell_states, cells_before, past_deadline, plan_markdown, remaining_seconds, seconds_left
from mech_unlearn_jax.study.report import headline_markdown, per_seed_markdown, setting_markdown, study_markdown, table_columns, write_outputs
from mech_unlearn_jax.study.runner import (
    CellOutcome,
    backfill_mask_records,
    cell_mask,
    find_twin,
    mask_record,
    run_cell,
    run_study,
    shared_outputs,
    sync_shared,
)
