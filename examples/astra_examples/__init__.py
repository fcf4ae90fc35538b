"""What only the examples (and the tests that run them) need: offline datasets (`astra_examples.data`) and
metrics (`astra_examples.metrics`). Not part of the transformers-astra library, so ``import transformers_astra``
does not pull in ``datasets`` or ``evaluate`` (the ``[examples]`` extra installs them).

The example scripts find this package beside them (``python examples/x.py`` puts examples/ on the path);
pytest adds examples/ to the path too (pyproject.toml).
"""
