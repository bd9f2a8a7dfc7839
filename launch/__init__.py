"""Launchers for `python -m jaxmodels.main`: local multi-process, TPU pod, SLURM GPU."""


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher's own args, entry-point args): the two sides of the first `--`."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
