"""jaxmodels: JAX/Flax research models built from tested pure functions.

Layers (dependencies point one way): ops <- nn <- models <- tasks <- train <- experiments;
`parallel` and `data` serve `train`. See README "Architecture".
"""

__version__ = "0.1.0"
