"""CounterFact: rewrite the first 16 known facts to their target_false (METHOD §1.2).

  python -m launch.run --config=configs/counterfact_16.py --workdir=runs/counterfact_16
  python -m launch.run --config=configs/counterfact_16.py:ap --workdir=runs/counterfact_16_ap   # other localization
  python -m launch.run --config=configs/counterfact_16.py:tiny --workdir=/tmp/tiny        # test-size variant

The argument after ':' picks the localization method (fact_lookup, ap, ct, ap_mlps,
ct_mlps, random, random_mlps, all_mlps, nonlocalized, late_mlps) and/or "tiny".
"""

from configs import common


def get_config(arg=None):
  c = common.from_arg(arg, task="counterfact", split="first_16")
  common.use_counterfact_defaults(c)
  return c
