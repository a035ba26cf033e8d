"""The baseline report runs on a tiny model and a small sports table."""

import jax

from mech_unlearn_jax import baseline
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import transformer
from mech_unlearn_jax.models.loaders import load_tokenizer


def test_baseline_report(tmp_path):
  rows = ["athlete,sport,inject_sport_without_golf"]
  names = ["LeBron James", "Stephen Curry", "Kevin Durant", "Babe Ruth", "Derek Jeter",
           "Mike Trout", "Tom Brady", "Peyton Manning", "Jerry Rice"]
  sports = ["basketball"] * 3 + ["baseball"] * 3 + ["football"] * 3
  others = {"basketball": "football", "baseball": "basketball", "football": "baseball"}
  rows += [f"{n},{s},{others[s]}" for n, s in zip(names, sports)]
  table = tmp_path / "athletes.csv"
  table.write_text("\n".join(rows) + "\n")
  tokenizer = load_tokenizer("default")
  cfg = config_lib.get_preset("tiny-gemma3").replace(vocab_size=tokenizer.vocab_size)
  model = transformer.build_transformer(cfg, jax.random.key(0))
  spec = baseline.BaselineSpec(sports_sources=(str(table),), threshold=0.0, max_eval_per_sport=2)
  result = baseline.run_baseline(model, tokenizer, spec, tmp_path)
  sports_result = result["sports"][0]
  assert sports_result["num_facts"] == 9 and sports_result["known_normalized"] == 9
  cells = {(c["format"], c["facts"]): c for c in sports_result["formats"]}
  assert cells[("standard", "all")]["n"] == 6 and cells[("qa", "basketball")]["n"] == 2
  assert 0 <= cells[("mc", "all")]["interval95"][0] <= cells[("mc", "all")]["interval95"][1] <= 1
  assert (tmp_path / "baseline.md").read_text().count("| standard |") == 4
