"""saeflow's pipeline stages, one module per stage, plus the config and artifact helpers."""
