"""Facts datasets, prompt formats, splits and retain text."""

from mech_unlearn_jax.data.facts import (
    GOLF,
    SPORTS,
    SPORTS_WITH_GOLF,
    CounterFactFact,
    CounterFactMC,
    FactsDataError,
    SportsFact,
    load_counterfact,
    load_counterfact_all,
    load_counterfact_mc,
    load_sports_facts,
)
from mech_unlearn_jax.data.formats import (
    CounterFactMultipleChoiceFormat,
    CounterFactPromptFormat,
    FormattedPrompt,
    PromptFormat,
    SportsMultipleChoiceFormat,
    SportsTemplateFormat,
    counterfact_formats,
    sports_formats,
)
from mech_unlearn_jax.data.list_repr import parse_list_repr
from mech_unlearn_jax.data.splits import (
    Split,
    SplitTooSmallError,
    filter_known,
    make_counterfact_split,
    make_sports_split,
)
