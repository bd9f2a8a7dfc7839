"""Generate text with a trained run's model: the command line of `jaxmodels.inference`.

    python -m jaxmodels.generate --workdir /tmp/lm_tiny --prompt "def " [--prompt "class " ...] \
        [--prompts_file F] [--max_new_tokens 200 --temperature 0.8 --top_k 0 --top_p 1.0 --seed 0] [--step N]

The console script `jaxmodels-generate` runs the same. Settings left out are the run's own (its
config.sample, config.train.seed for --seed), so `python -m jaxmodels.generate --workdir W` prints the
sample that ended the run (summary.json's "sample"). Prompts of equal token length are decoded as one
batch; the g-th such group draws with seed + g (`jaxmodels.inference.generate_text`). Each text is printed
after a header line naming its prompt, then a line with the decoding speed and the device.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import jax
from etils import epath

from jaxmodels.inference import LoadModelError, generate_text, load_model, run_tokenizer
from jaxmodels.models.lm import check_top_k, check_top_p
from jaxmodels.ops.checks import non_negative_int, positive_int, real_in_range
from jaxmodels.ops.precision import DTYPES


def _checked(check: Callable, convert: type) -> Callable[[str], object]:
    """An argparse `type`: the text converted by `convert` (int or float), then checked by `check`, whose
    message becomes argparse's error."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if convert is int else 'a real number'}, "
                                             f"got {text!r}") from None
        try:
            return check(value)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _prompt(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a prompt must be non-empty text (generation continues it)")
    return text


def read_prompts(path: str) -> list[str]:
    """The prompts of a --prompts_file: a `.json` file holds a JSON list of strings (prompts with newlines);
    any other file one prompt per line, empty lines skipped. Raises ValueError naming the file."""
    text = epath.Path(path).read_text()
    if path.endswith(".json"):
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"--prompts_file {path} must hold a JSON list of non-empty strings")
    else:
        prompts = [line for line in text.splitlines() if line]
    if not prompts:
        raise ValueError(f"--prompts_file {path} holds no prompt")
    return prompts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxmodels.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the workdir of a training run (a path or gs:// URL)")
    parser.add_argument("--prompt", action="append", type=_prompt, default=[],
                        help="text to continue; repeat for several (default: the run's config.sample.prompt)")
    parser.add_argument("--prompts_file", default=None,
                        help="more prompts: one per line, or a .json file holding a list of strings")
    parser.add_argument("--max_new_tokens", type=_checked(lambda v: positive_int("--max_new_tokens", v), int),
                        default=None, help="tokens to generate per prompt (default: the run's)")
    parser.add_argument("--temperature", type=_checked(lambda v: real_in_range("--temperature", v, 0), float),
                        default=None, help="0: greedy (default: the run's)")
    parser.add_argument("--top_k", type=_checked(lambda v: non_negative_int("--top_k", v), int), default=None,
                        help="sample from the k most likely tokens; 0: off (default: the run's)")
    parser.add_argument("--top_p", type=_checked(lambda v: check_top_p(v, "--top_p"), float), default=None,
                        help="nucleus sampling: the most likely tokens holding this mass, in (0, 1]; 1: off "
                             "(default: the run's, else 1)")
    parser.add_argument("--seed", type=_checked(lambda v: non_negative_int("--seed", v), int), default=None,
                        help="the g-th group of prompts of equal token length draws with seed + g "
                             "(default: the run's train.seed)")
    parser.add_argument("--step", type=_checked(lambda v: non_negative_int("--step", v), int), default=None,
                        help="the checkpoint to load (default: the newest)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="cast the parameters and compute in this dtype (default: the run's)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Load the run, generate, print each text and the speed. Exits with "error: ..." for a workdir with no
    model, an unreadable prompts file, or a setting that is neither given nor in the run's config.sample, or
    that the model refuses (--top_k above its vocabulary)."""
    args = parse_args(argv)
    try:
        model, config = load_model(args.workdir, step=args.step, dtype=args.dtype)
        sample = config.get("sample") or {}

        def setting(name: str, given, default=None):
            """The command line's value, else the run's config.sample.NAME, else `default`."""
            if given is not None:
                return given
            if name in sample:
                return sample[name]
            if default is None:
                raise ValueError(f"the run's config has no sample.{name}; pass --{name}")
            return default

        prompts = args.prompt + (read_prompts(args.prompts_file) if args.prompts_file else [])
        prompts = prompts or [setting("prompt", None)]
        top_k = check_top_k(setting("top_k", args.top_k, 0), model.vocab_size, "--top_k")
        settings = dict(max_new_tokens=setting("max_new_tokens", args.max_new_tokens),
                        temperature=setting("temperature", args.temperature), top_p=setting("top_p", args.top_p, 1.0))
    except (LoadModelError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    seed = config.train.seed if args.seed is None else args.seed
    texts, stats = generate_text(model, run_tokenizer(config), prompts, seed=seed, top_k=top_k, **settings)
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        print(f"=== {i + 1}/{len(prompts)}: {prompt!r}")
        print(text)
    device = jax.devices()[0]
    print(f"{stats['new_tokens']} new tokens in {stats['seconds']:.3f} s: {stats['tokens_per_second']:.1f} tokens/s "
          f"on {device.platform}:{device.id} ({device.device_kind}); compiling took {stats['compile_seconds']:.2f} s "
          f"for {stats['groups']} batch{'es' if stats['groups'] > 1 else ''}")


if __name__ == "__main__":
    main()
