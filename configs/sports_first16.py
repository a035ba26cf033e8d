"""Sports facts: edit the first 16 known athletes toward random other sports (METHOD §1.1).

  python -m launch.run --config=configs/sports_first16.py --workdir=runs/sports_first16
  python -m launch.run --config=configs/sports_first16.py:ap --workdir=runs/sports_first16_ap   # other localization
  python -m launch.run --config=configs/sports_first16.py:tiny --workdir=/tmp/tiny        # test-size variant

The argument after ':' picks the localization method (fact_lookup, ap, ct, ap_mlps,
ct_mlps, random, random_mlps, all_mlps, nonlocalized, late_mlps) and/or "tiny".
"""

from configs import common


def get_config(arg=None):
  c = common.from_arg(arg, task="sports", split="first_16")
  return c
