"""`python -m experiments.main ...` from a checkout runs the entry point `jaxmodels.main` (see there)."""

from jaxmodels.main import run

if __name__ == "__main__":
    run()
