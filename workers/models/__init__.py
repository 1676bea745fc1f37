"""The built-in models and where every model's files come from: the catalog, the tiny and random-weight builders, the demo model and the committed configs."""
