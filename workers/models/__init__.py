"""The built-in models and where every model's files come from (catalog, builders, demo, configs)."""
