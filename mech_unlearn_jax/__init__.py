"""mech_unlearn_jax: mechanistic localization, editing and unlearning of facts in JAX.

Localize the components of a language model that carry a fact, edit or unlearn it by
training only those parameters, and measure how robust the edit is and what it costs.
"""
