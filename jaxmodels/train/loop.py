"""The training loop: sharded init or restore, jitted steps, eval, metrics, checkpoints, signals, profiles,
goodput. Every file goes through etils.epath (`jaxmodels.train.paths`), so the workdir may be a gs:// URL."""

import contextlib
import json
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxmodels.data.errors import DataError
from jaxmodels.parallel import sharding as sh
from jaxmodels.parallel.distributed import check_processes_agree, describe_processes
from jaxmodels.parallel.mesh import make_mesh
from jaxmodels.parallel.strategy import make_strategy
from jaxmodels.train.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings, restore_params
from jaxmodels.train.config import ConfigError, validate_config
from jaxmodels.train.finetune import FROZEN, fine_tune
from jaxmodels.train.goodput import Goodput, goodput_text
from jaxmodels.train.loss_scaling import loss_scaling_from_config
from jaxmodels.train.metrics import MetricWriter, device_peak_flops
from jaxmodels.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from jaxmodels.train.paths import check_writable, workdir_path
from jaxmodels.train.profiling import StepProfiler, check_profile_steps
from jaxmodels.train.step import make_eval_step, make_train_step
from jaxmodels.train.trackers import check_trackers, make_trackers
from jaxmodels.train.workdir import WorkdirLock


class NonFiniteLossError(FloatingPointError):
    """Raised with train.nan_policy="halt" when a step's loss or gradient is not finite."""


@contextlib.contextmanager
def stop_on_signals(signums=(signal.SIGTERM, signal.SIGINT)):
    """Yield a callable that is True once SIGTERM/SIGINT arrived; a second signal acts as usual."""
    received = []
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])

    for s in signums:
        signal.signal(s, handler)
    try:
        yield lambda: bool(received)
    finally:
        for s in signums:
            signal.signal(s, previous[s])


# Config sections that decide the layout of the saved train state.
STATE_SECTIONS = ("model", "parallel", "mesh", "sharding_rules", "precision", "peft")
# Fields a resumed run may not change without --allow_config_changes: what is learned and from what.
PROTECTED = ("task", "model.", "diffusion.", "peft.", "data.name", "data.files", "data.tokenizer", "data.text_key")


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def previous_config(config_json: epath.Path) -> dict | None:
    """The config.json a previous run left in the workdir, as a dict; None when there is none."""
    if not config_json.exists():
        return None
    return json.loads(config_json.read_text())


def config_changes(previous: dict | None, config: ml_collections.ConfigDict) -> list[str]:
    """'field: old -> new' for every field where `config` differs from `previous` (a previous run's config,
    `previous_config`); empty when there is none."""
    if previous is None:
        return []
    current = json.loads(config.to_json_best_effort())
    sections = tuple(sorted(set(previous) | set(current)))
    old, new = (_flat({k: c.get(k) for k in sections}) for c in (previous, current))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def init_rngs(config: ml_collections.ConfigDict) -> nnx.Rngs:
    """The Rngs of parameter initialisation: seed config.train.seed, PRNG config.train.prng_impl."""
    return nnx.Rngs(jax.random.key(config.train.seed, impl=config.train.prng_impl))


class Trainer:
    """Everything that is fixed for a run: mesh, shardings, compiled steps, data, writers.

    The task (`jaxmodels.tasks.base.Task`) supplies the model, loss and batches; config.parallel.strategy
    (`jaxmodels.parallel.strategy.Strategy`) supplies the optimiser-state layout and the collectives of the
    one train step (`make_train_step`); config.peft (`jaxmodels.train.finetune`) makes the trained params the
    adapters of a frozen pre-trained model, held in the state's "frozen" entry. The config and the workdir (a
    local path or a URL such as gs://bucket/run, which every process must be able to write) are checked first,
    before anything is built.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices: list | None = None):
        if jax.process_count() > 1:  # first: a process that fails alone would leave the others waiting
            check_processes_agree(config)
        self.config, self.workdir = config, workdir_path(workdir)  # a local path made absolute: orbax needs that
        check_writable(self.workdir, jax.process_index())
        self.task = validate_config(config, num_devices=len(devices) if devices else None)
        check_trackers(config.train.trackers)
        check_profile_steps(config.train.profile_steps)
        self.mesh = make_mesh(dict(config.mesh), devices)
        self.strategy = make_strategy(config.parallel, self.mesh)
        rules = tuple(tuple(r) for r in config.sharding_rules)
        num_steps, accum = config.train.num_steps, config.train.grad_accum_steps
        self.schedule = learning_rate_schedule(config.optimizer, num_steps)
        self.loss_scaling = loss_scaling_from_config(config)  # config.precision: {} or {"loss_scale"} in the state

        abstract_model = nnx.eval_shape(lambda: self.task.build_model(init_rngs(config)))
        self.graphdef = nnx.graphdef(abstract_model)
        self.flops_per_example = self.task.flops_per_example(abstract_model)
        param_specs = model_specs = sh.param_specs(abstract_model, self.mesh, rules)
        # Decay mask and clipping norm come from the whole parameters, even where the optimiser sees shards.
        abstract_params = nnx.state(abstract_model, nnx.Param).to_pure_dict()
        init_params = lambda: nnx.state(self.task.build_model(init_rngs(config)), nnx.Param).to_pure_dict()
        self.fine_tune = fine_tune(config, self.task.build_model, lambda: init_rngs(config))  # None: all params train
        if self.fine_tune:  # the state's params are the adapters; the pre-trained ones are its "frozen" entry
            self.graphdef, abstract_params, init_params = (self.fine_tune.graphdef, self.fine_tune.abstract_trainable,
                                                           self.fine_tune.init)
            param_specs, frozen_specs, model_specs = self.fine_tune.specs(self.mesh, rules)
        # The model's per-parameter learning-rate multipliers (muP); a fine-tune trains adapters, which have none.
        lr_multipliers = None if self.fine_tune else abstract_model.lr_multipliers()
        optimizer = make_optimizer(config.optimizer, num_steps, decay=decay_mask(abstract_params),
                                   lr_multipliers=lr_multipliers, axis_name=self.strategy.update_axis)

        def init():
            params = init_params()
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": optimizer.init(self.strategy.opt_layout(params)), **self.loss_scaling.state()}

        self.abstract_state = jax.eval_shape(init)
        opt_param_specs = self.strategy.opt_param_specs(param_specs)
        specs = {"step": P(), "params": param_specs,
                 "opt_state": sh.opt_state_specs(optimizer, self.abstract_state["opt_state"], opt_param_specs),
                 **self.loss_scaling.state_specs()}
        if self.fine_tune:
            specs[FROZEN], self.abstract_state[FROZEN] = frozen_specs, self.fine_tune.abstract_frozen
        self.state_shardings = sh.named(self.mesh, specs)
        self.model_shardings = sh.named(self.mesh, model_specs)
        self.abstract_batch = self.task.abstract_batch()  # pytree of global ShapeDtypeStructs
        batch_spec = jax.tree.map(lambda b: sh.batch_spec(rules, b.ndim), self.abstract_batch)
        self.batch_sharding = sh.named(self.mesh, batch_spec)
        replicated = NamedSharding(self.mesh, P())
        self.init = jax.jit(init, out_shardings={k: v for k, v in self.state_shardings.items() if k != FROZEN})
        step = make_train_step(self.graphdef, self.task.loss, optimizer, self.schedule, accum, strategy=self.strategy,
                               state_specs=specs, batch_spec=batch_spec, loss_scaling=self.loss_scaling,
                               reparametrize=self.fine_tune.reparametrize if self.fine_tune else None)
        self.train_step = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self.eval_step = jax.jit(make_eval_step(self.graphdef, self.task.loss),
                                 in_shardings=(self.model_shardings, self.batch_sharding),
                                 out_shardings=replicated)
        if self.fine_tune:
            self.combine = jax.jit(self.fine_tune.combine, in_shardings=(self.state_shardings["params"],
                                                                         self.state_shardings[FROZEN]),
                                   out_shardings=self.model_shardings)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", every=config.train.checkpoint_every,
                                         keep=config.train.keep_checkpoints, transient=(FROZEN,))
        peak = device_peak_flops(self.mesh.devices.flat[0].device_kind, config.train.peak_flops)
        self.peak_flops_total = peak * self.mesh.size if peak else None

    def compile_train_step(self) -> dict[str, float]:
        """Compile the train step ahead of time (the compiled executable then serves every call) and
        return its per-device memory in GiB: the parameters and the optimizer state as stored (from
        their shardings; a fine-tune's frozen base too), and from XLA's memory analysis the arguments (params,
        optimizer state, batch), temporaries (activations, gradients) and the peak where the backend reports it."""
        batch = abstract_with_shardings(self.abstract_batch, self.batch_sharding)
        state = abstract_with_shardings(self.abstract_state, self.state_shardings)
        self.train_step = self.train_step.lower(state, batch).compile()
        stats = self.train_step.memory_analysis()
        gib = 2.0**30
        memory = {f"{k}_gib": sh.bytes_per_device(self.abstract_state[k], self.state_shardings[k]) / gib
                  for k in ("params", "opt_state", FROZEN) if k in self.abstract_state}
        memory.update(arguments_gib=stats.argument_size_in_bytes / gib, temporaries_gib=stats.temp_size_in_bytes / gib)
        if getattr(stats, "peak_memory_in_bytes", 0):
            memory["peak_gib"] = stats.peak_memory_in_bytes / gib
        return memory

    def global_batch(self, local_batch):
        """This process's rows of a batch (a pytree of NumPy arrays) -> the global, sharded batch."""
        return jax.tree.map(jax.make_array_from_process_local_data, self.batch_sharding, local_batch)

    def restore_or_init(self, allow_config_changes: bool = False):
        """(start_step, state): the newest readable checkpoint, or a fresh sharded init at step 0, whose params
        come from config.train.init_from when it names a checkpoint (`restore_params`: a tensor of another
        shape raises ConfigError, a ValueError, naming it and both shapes; the optimizer state starts afresh).
        init_from is ignored, with a note, when the workdir has checkpoints: resuming wins. A fine-tune
        (config.peft, `jaxmodels.train.finetune`) reads its frozen base from init_from instead, at the start and
        at every resume (its checkpoints hold only the adapters), so resuming one may not change init_from.

        Resuming with a config that changes what is learned (PROTECTED fields: the task, the model, the
        diffusion objective, the data set) raises CheckpointError naming the changes, unless
        `allow_config_changes`; other changes (steps, schedule, mesh ...) are printed and allowed.
        """
        init_from = self.config.train.get("init_from", "")
        started = FROZEN if self.fine_tune else "params"  # the entry init_from gives
        if not self.checkpointer.manager.all_steps():
            if not init_from:
                return 0, self.init()
            return 0, {**self.init(), started: self._restore_init_from(started)}
        if init_from and not self.fine_tune and jax.process_index() == 0:
            print(f"config.train.init_from={init_from!r} is ignored: resuming from {self.checkpointer.directory}",
                  flush=True)
        previous = previous_config(self.workdir / "config.json")
        changes = config_changes(previous, self.config)
        # A fine-tune reads its frozen base from init_from again: changing it would change the model under the adapters
        protected = [c for c in changes if c.startswith(PROTECTED + (("train.init_from",) if self.fine_tune else ()))]
        if protected and not allow_config_changes:
            raise CheckpointError(f"{self.workdir} holds a run of another model or objective: "
                                  f"{'; '.join(protected)}. Resume with the same config, use another --workdir, "
                                  "or pass --allow_config_changes to resume the old state under the new config")
        error = previous and self.strategy.resume_error(previous["parallel"]["strategy"])
        if error:
            raise CheckpointError(f"{self.workdir} holds checkpoints of another data-parallel strategy: {error}")
        if changes and jax.process_index() == 0:
            print("resuming with config changes: " + "; ".join(changes), flush=True)
        layout = [c for c in changes if c.split(".", 1)[0].split(":", 1)[0] in STATE_SECTIONS]
        hint = ". The checkpoints were written with a different config (state layout): " + "; ".join(layout)
        step, state = self.checkpointer.restore_latest(
            abstract_with_shardings(self.abstract_state, self.state_shardings), hint if layout else "")
        if step is None:
            step, state = 0, self.init()
        if self.fine_tune:
            state = {**state, FROZEN: self._restore_init_from(FROZEN)}
        return step, state

    def _restore_init_from(self, entry: str):
        """The state's `entry` ("params", or a fine-tune's frozen base) read from config.train.init_from
        (`restore_params`); a checkpoint that does not fit raises ConfigError naming the tensors and shapes."""
        init_from = self.config.train.init_from
        try:
            return restore_params(init_from, self.abstract_state[entry], self.state_shardings[entry])
        except ValueError as e:  # a ConfigError: the entry point reports it without a traceback
            raise ConfigError(f"config.train.init_from={init_from!r}: {e}") from None

    def model_params(self, state) -> dict:
        """The model's parameters in `state`: its params, or for a fine-tune the adapters combined with the
        frozen base (`FineTune.combine`), laid out for the eval step."""
        return self.combine(state["params"], state[FROZEN]) if self.fine_tune else state["params"]

    def evaluate(self, params, batches) -> dict[str, float]:
        """The task's metrics over the fixed eval batches, combined by `Task.combine_metrics` (counts summed,
        weighted means weighted by their counts: exact over batches of unequal size, e.g. a padded last one)."""
        per_batch = [self.eval_step(params, self.global_batch(b)) for b in batches]  # dispatched, not awaited
        return self.task.combine_metrics([{k: float(v) for k, v in m.items()} for m in jax.device_get(per_batch)])

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, nnx.State(params))


def _step_scalars(metrics, step_time: float | None, trainer: Trainer) -> dict[str, float]:
    """The step's metrics plus throughput; no timing for a step whose time includes compilation."""
    out = {k: float(v) for k, v in metrics.items()}
    if step_time is None:
        return out
    cfg = trainer.config
    out["step_time_s"] = step_time
    out["examples_per_s"] = cfg.data.global_batch_size / step_time
    if trainer.task.tokens_per_example:
        out["tokens_per_s"] = trainer.task.tokens_per_example * cfg.data.global_batch_size / step_time
    if trainer.peak_flops_total and trainer.flops_per_example:
        out["mfu"] = trainer.flops_per_example * cfg.data.global_batch_size / step_time / trainer.peak_flops_total
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None, *,
                       allow_config_changes: bool = False) -> dict:
    """Train config.train.num_steps steps in workdir, resuming from its latest checkpoint.

    `devices` (default: all) restricts the mesh, e.g. to compare one device with several.
    Returns a summary dict (start/end eval metrics, baseline, final step, whether interrupted,
    generated sample, goodput). SIGTERM/SIGINT save a checkpoint and return early with interrupted=True.
    One run per workdir: a second one is refused while the first lives (`WorkdirLock`). A run that
    already finished returns its summary without training or evaluating again. `allow_config_changes`:
    see `Trainer.restore_or_init`.

    Goodput (`jaxmodels.train.goodput`) splits the host's wall time into disjoint parts: "compile" is the
    ahead-of-time compilation of the train step; "eval" each evaluation, its step's first compilation
    included; "checkpoint" the time the loop is blocked in saves (orbax finishes writing in the
    background, and that overlaps the steps); "data" fetching and sharding each batch; "steps"
    dispatching each step plus waiting for its metrics. The loop fetches a step's metrics only after
    dispatching the next one, so the device runs step k while the host loads batch k+1: "data" is an
    upper bound on the time data loading cost, and goodput = steps / wall a lower bound.
    """
    goodput = Goodput()
    trainer = Trainer(config, workdir, devices)  # validates the config and checks the workdir first
    lock = WorkdirLock(trainer.workdir)
    lock.acquire()
    try:
        return _train(trainer, lock, goodput, allow_config_changes)
    finally:
        lock.release()


def _finished_summary(trainer: Trainer, start: int) -> dict | None:
    """The summary of a run that already trained its num_steps (None if it has not, or left no summary)."""
    path = trainer.workdir / "summary.json"
    if start < trainer.config.train.num_steps or not path.exists():
        return None
    return json.loads(path.read_text())


def _train(trainer: Trainer, lock: WorkdirLock, goodput: Goodput, allow_config_changes: bool) -> dict:
    config, workdir, tc = trainer.config, trainer.workdir, trainer.config.train
    lead = jax.process_index() == 0
    start, state = trainer.restore_or_init(allow_config_changes)
    finished = _finished_summary(trainer, start)
    if finished is not None:
        if lead:
            print(f"{workdir} already finished at step {start} (train.num_steps={tc.num_steps}); nothing to do. "
                  "Raise train.num_steps to train further.", flush=True)
        return finished
    # From scratch, rows a previous attempt left (killed before its first checkpoint) are dropped.
    writer = MetricWriter(make_trackers(tc, workdir, start if start else -1) if lead else [],
                          console_every=tc.log_every, enabled=lead)
    if lead:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        writer.log_config(json.loads(config.to_json_best_effort()))
    profiler = StepProfiler(tc.profile_steps, workdir, enabled=lead)
    writer.print(f"{describe_processes(trainer.mesh)}, strategy {config.parallel.strategy!r}; "
                 f"{'resuming from step ' + str(start) if start else 'starting from scratch'}")
    if note := trainer.loss_scaling.note(config.model):
        writer.print(note)
    with goodput.timing("compile"):
        summary_memory = trainer.compile_train_step()
    writer.print(f"train step per-device memory ({config.parallel.strategy}; params and optimizer state as "
                 "stored, the rest from XLA memory analysis): "
                 + ", ".join(f"{k.removesuffix('_gib')} {v * 2**10:,.2f} MiB" for k, v in summary_memory.items()))
    eval_batches = trainer.task.eval_batches()
    baseline = trainer.task.baseline()
    summary = {"baseline": baseline, "start_step": start, "strategy": config.parallel.strategy,
               "memory_per_device": summary_memory}

    def run_eval(step):
        with goodput.timing("eval"):
            metrics = trainer.evaluate(trainer.model_params(state), eval_batches)
        writer.write(step, {**metrics, **baseline}, prefix="eval")
        return metrics

    if start == 0:
        summary["eval_start"] = run_eval(0)
    batches = trainer.task.train_batches(start, jax.process_index(), jax.process_count())
    bar = tqdm(total=tc.num_steps, initial=start, disable=not lead, desc="train", dynamic_ncols=True)
    pending, last_time, step, interrupted, skipped = None, None, start, False, 0

    def report(step_done, metrics):
        nonlocal last_time, skipped
        with goodput.timing("steps"):
            metrics = jax.device_get(metrics)  # waits for that step only; the next one is already queued
        now = time.perf_counter()
        step_time, last_time = (now - last_time if last_time else None), now
        skipped = skipped + 1 if metrics["nonfinite"] else 0
        if metrics["nonfinite"]:
            msg = f"non-finite loss or gradient at step {step_done} (loss={float(metrics['loss'])}, " \
                  f"grad_norm={float(metrics['grad_norm'])}); the update was skipped" + \
                  (f" (loss scale {float(metrics['loss_scale']):g})" if "loss_scale" in metrics else "")
            writer.print(msg)
            if tc.nan_policy == "halt":
                raise NonFiniteLossError(msg + "; halting (train.nan_policy='halt')")
            if skipped > tc.max_consecutive_skips:
                raise NonFiniteLossError(f"{skipped} consecutive steps up to step {step_done} were not finite "
                                         f"(train.max_consecutive_skips={tc.max_consecutive_skips}); halting. The "
                                         "last checkpoint holds the last finite state: resume from it with a "
                                         "lower learning rate, or find the data that breaks it")
        writer.write(step_done, _step_scalars(metrics, step_time, trainer))
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        bar.update(1)

    # One process handles SIGTERM/SIGINT itself; several rely on JAX's preemption sync point, at which
    # every host saves the same step (orbax's PreemptionCheckpointingPolicy).
    signums = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
    with stop_on_signals(signums) as stop_requested:
        try:
            for step in range(start, tc.num_steps):
                with goodput.timing("data"):
                    try:
                        batch = trainer.global_batch(next(batches))
                    except DataError:  # keep what was learned: resume from here once the data are fixed
                        if pending is not None:
                            report(*pending)
                        trainer.checkpointer.save_final(step, state)
                        raise
                profiler.before_step(step)
                with goodput.timing("steps"):
                    state, metrics = trainer.train_step(state, batch)
                profiler.after_step(step + 1, metrics)
                if pending is not None:
                    report(*pending)
                pending = (step + 1, metrics)
                with goodput.timing("checkpoint"):
                    trainer.checkpointer.save(step + 1, state)
                lock.heartbeat()
                if stop_requested() or trainer.checkpointer.reached_preemption(step + 1):
                    interrupted = True
                    break
                if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.num_steps:
                    report(*pending)  # so that the eval's time is not counted as a train step's
                    pending, last_time = None, None
                    run_eval(step + 1)
            if pending is not None:
                report(*pending)
            step = int(state["step"])
            with goodput.timing("checkpoint"):
                trainer.checkpointer.save_final(step, state)
            interrupted = interrupted or stop_requested()  # a signal during the last step still ends the run
        finally:
            profiler.finish()
            with goodput.timing("checkpoint"):
                trainer.checkpointer.wait()
            bar.close()
    summary.update(final_step=step, interrupted=interrupted)
    if not interrupted:
        summary["eval_end"] = run_eval(step)
        summary["sample"] = trainer.task.sample(trainer.model(trainer.model_params(state)), tc.seed)
    summary["goodput"] = goodput.summary()
    writer.print(f"interrupted at step {step}: checkpoint saved in {workdir}; run the same command to resume"
                 if interrupted else _summary_text(summary))
    if lead and not interrupted:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    writer.close()
    trainer.checkpointer.close()
    return summary


def _summary_text(summary: dict) -> str:
    lines = ["", "== summary =="]
    for k, v in summary["baseline"].items():
        lines.append(f"{k}: {v:.4f}")
    for when in ("eval_start", "eval_end"):
        if when in summary:
            lines.append(f"{when}: " + "  ".join(f"{k}={v:.4f}" for k, v in summary[when].items()))
    lines.append(goodput_text(summary["goodput"]))
    if "sample" in summary:
        lines += ["sample:", summary["sample"], "=" * 13]
    return "\n".join(lines)
