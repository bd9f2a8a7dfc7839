"""Launchers for `python -m jaxmodels.main`: local multi-process, TPU pod, SLURM GPU.

What the remote launchers share: the command line split at `--`, the one git commit every worker runs
(the local HEAD unless --commit names one; uncommitted changes refused unless --allow-dirty), the shell
lines that put that commit into a checkout, and the run's name.
"""

import argparse
import os
import shlex
import subprocess
import sys


class LaunchError(Exception):
    """A launch that cannot work, found before anything runs; the message says what to fix."""


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher's own args, entry-point args): the two sides of the first `--`."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def launcher_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser with the options every remote launcher has: which commit, the run's name, --dry-run."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default=None, help="git commit every worker runs (default: local HEAD)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="launch although the local checkout has uncommitted changes (the run will not have them)")
    parser.add_argument("--name", default=None, help="run name of logs and pid files (default: the workdir's basename)")
    parser.add_argument("--dry-run", action="store_true", help="print every command and script without running any")
    return parser


def run_launcher(parser: argparse.ArgumentParser, launch, argv: list[str] | None) -> int:
    """Parse `argv` (default: the command line) at `--`, call launch(options, entry-point args), and turn a
    LaunchError into its message and exit code 2."""
    own, main_args = split_args(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if not main_args:
        parser.error("give the entry point's arguments after `--`")
    try:
        return launch(args, main_args)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def git(repo: str, *args: str) -> str:
    """`git -C repo args` stdout, stripped; LaunchError with git's message if it fails."""
    r = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
    if r.returncode:
        raise LaunchError(f"`git -C {repo} {' '.join(args)}` failed: {r.stderr.strip()}")
    return r.stdout.strip()


def resolve_commit(repo: str, commit: str | None, *, allow_dirty: bool) -> str:
    """The full hash of `commit` (default HEAD) in the local checkout `repo`. Refuses a checkout with
    uncommitted changes unless allow_dirty: the workers would run the commit, not what is on disk here."""
    dirty = git(repo, "status", "--porcelain", "--untracked-files=no")
    if dirty and not allow_dirty:
        raise LaunchError(f"{repo} has uncommitted changes, which the workers would not run:\n{dirty}\n"
                          "commit (and push) them, or pass --allow-dirty to launch the commit as it is")
    return git(repo, "rev-parse", "--verify", f"{commit or 'HEAD'}^{{commit}}")


def checkout_lines(url: str, repo: str, commit: str, *, fetch: bool) -> list[str]:
    """Bash lines that make `repo` (a shell expression) a checkout of `commit` from `url`: clone on first
    use, fetch (when the commit may be new there), then a forced detached checkout of exactly `commit`."""
    lines = [f"test -d {repo}/.git || git clone --quiet {shlex.quote(url)} {repo}"]
    if fetch:
        lines.append(f"git -C {repo} fetch --quiet origin")
    lines.append(f"git -C {repo} checkout --quiet --force --detach {commit} || "
                 f"{{ echo \"$(hostname): commit {commit} is not in {url}: push it first\" >&2; exit 1; }}")
    return lines


def verify_lines(repo: str, commit: str) -> list[str]:
    """Bash lines that stop unless the checkout `repo` is at `commit` (when the checkout step is skipped)."""
    return [f'test "$(git -C {repo} rev-parse HEAD)" = {commit} || {{ echo "$(hostname): {repo} is at '
            f'$(git -C {repo} rev-parse HEAD), not {commit}: launch without --skip-setup" >&2; exit 1; }}']


def shell_path(path: str) -> str:
    """`path` for a bash script on another machine: a leading ~ becomes "$HOME", the rest is quoted."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + (shlex.quote(path[1:]) if path[1:] else "")
    return shlex.quote(path)


def run_name(main_args: list[str], name: str | None = None) -> str:
    """`name`, else the basename of the entry point's --workdir, else "jaxmodels"."""
    if name:
        return name
    for i, arg in enumerate(main_args):
        if arg.startswith("--workdir="):
            return os.path.basename(arg.split("=", 1)[1].rstrip("/")) or "jaxmodels"
        if arg == "--workdir" and i + 1 < len(main_args):
            return os.path.basename(main_args[i + 1].rstrip("/")) or "jaxmodels"
    return "jaxmodels"


def follow_table(rows: dict[str, str]) -> str:
    """The "label: command" lines a launcher prints last (follow, stop ...), ending with how to resume."""
    rows = {**rows, "resume": "run this launch command again with the same --workdir"}
    return "\n".join(f"{label + ':':<19}{command}" for label, command in rows.items())


def repo_root() -> str:
    """The root of the git checkout this launcher runs from."""
    return git(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rev-parse", "--show-toplevel")
