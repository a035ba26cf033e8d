"""CounterFact, sequential: four rounds of 16 rewrites, each round editing the previous round's model.

  python -m launch.run --config=configs/counterfact_sequential.py --workdir=runs/counterfact_sequential
  python -m launch.run --config=configs/counterfact_sequential.py:ap --workdir=runs/counterfact_sequential_ap   # other localization
  python -m launch.run --config=configs/counterfact_sequential.py:tiny --workdir=/tmp/tiny        # test-size variant

The argument after ':' picks the localization method (fact_lookup, ap, ct, ap_mlps,
ct_mlps, random, random_mlps, all_mlps, nonlocalized, late_mlps) and/or "tiny".
"""

from configs import common


def get_config(arg=None):
  c = common.from_arg(arg, task="counterfact", split="first_64")
  common.use_counterfact_defaults(c)
  c.data.sequential_rounds = 4
  return c
