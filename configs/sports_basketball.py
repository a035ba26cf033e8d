"""Sports facts: inject 'golf' for every known basketball player; train on half, evaluate on the held-out half.

  python -m launch.run --config=configs/sports_basketball.py --workdir=runs/sports_basketball
  python -m launch.run --config=configs/sports_basketball.py:ap --workdir=runs/sports_basketball_ap   # other localization
  python -m launch.run --config=configs/sports_basketball.py:tiny --workdir=/tmp/tiny        # test-size variant

The argument after ':' picks the localization method (fact_lookup, ap, ct, ap_mlps,
ct_mlps, random, random_mlps, all_mlps, nonlocalized, late_mlps) and/or "tiny".
"""

from configs import common


def get_config(arg=None):
  c = common.from_arg(arg, task="sports", split="basketball")
  return c
