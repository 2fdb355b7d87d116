"""Standard evaluation of exported models with lm-evaluation-harness (the optional `eval` extra)."""
