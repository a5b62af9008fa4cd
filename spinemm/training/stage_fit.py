"""Train one pipeline stage through the shared engine (:func:`~spinemm.training.engine.fit`).

Each stage trains in its own folder with its own accelerator, so it gets what the first stage has:
multi-process data parallelism and mixed precision, gradient accumulation, atomic checkpoints,
``resume=latest`` that reproduces the uninterrupted run, TensorBoard scalars and tqdm. The stage's
config section (``locator`` or ``grader``) supplies ``epochs``, ``lr``, ``weight_decay``,
``batch_size``, ``eval_every_epochs`` (the last epoch is always evaluated), ``select_window`` and
``stop_at_step``; the rest (``train``, ``optim``, ``checkpoint``, ``log``, ``resume``) is the
recipe's. The best epoch (lowest mean ``score`` over ``select_window`` evaluations ending there) is
kept, in memory and as ``best.safetensors``, so a resumed run that had already passed it restores it.

With ``average_window: true`` in the section, the kept weights are the mean of the weights at the
evaluations that best window's score averages (its trainable parameters and float buffers; the
frozen ones are the same at every evaluation), not the last of them: a weight average over the end
of the run the selection found good, as stochastic weight averaging takes over the end of a run.
Each evaluation's weights are written under ``window/`` (the last ``select_window`` of them are
kept), so a resumed run averages the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from ..errors import SpineModelError
from .engine import StepFn, TrainState, adamw, budget, fit, make_accelerator, make_loader, make_scheduler

BEST = "best.safetensors"
WINDOW = "window"  # each evaluation's averaged weights, with average_window


def stage_config(config: dict[str, Any], section: str, output_dir: Path) -> dict[str, Any]:
    """The engine config of one stage: the recipe's, with the section's epochs and stop_at_step."""
    options = config[section]
    if int(options["epochs"]) < 1:
        raise SpineModelError(f"{section}.epochs must be at least 1 to train the stage, got {options['epochs']}")
    run = copy.deepcopy(config)
    run["output_dir"] = str(output_dir)
    run["train"].update(epochs=int(options["epochs"]), max_steps=None, stop_at_step=options["stop_at_step"],
                        eval_every_epochs=int(options["eval_every_epochs"]),
                        select_window=int(options["select_window"]))
    return run


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's augmentations: never the global RNG, so a resumed run repeats.
    Datasets draw every item's augmentation from it at once (in ``set_epoch``), so an item's draw
    depends on (seed, epoch, index) only, not on batching or the number of processes."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + 17)


def batch_collate(batch: Any) -> Any:
    """A batch a dataset's ``__getitems__`` already stacked passes through; items are stacked."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def fit_stage(config: dict[str, Any], section: str, module: torch.nn.Module, train_set: Dataset, step_fn: StepFn,
              eval_fn: Callable[[torch.nn.Module], dict[str, Any]], output_dir: Path,
              collate: Callable = batch_collate,
              params: list[dict[str, Any]] | None = None) -> tuple[TrainState, dict[str, Any] | None]:
    """Train ``module`` (its trainable parameters, or the optimizer groups ``params``, each with its
    own ``lr``) on ``train_set`` and leave it holding its best epoch's weights; returns the engine's
    final state and last evaluation (None if stopped early)."""
    from safetensors.torch import load_file, save

    from ..files import write_atomic

    run = stage_config(config, section, output_dir)
    options = config[section]
    accelerator = make_accelerator(run, output_dir)
    seed = int(run["train"]["seed"])
    loader, sampler = make_loader(train_set, int(options["batch_size"]), collate, seed, shuffle=True,
                                  num_workers=int(run["data"]["num_workers"]))
    if params is None:
        params = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": float(options["lr"])}]
    optimizer = adamw(params, lr=float(options["lr"]), weight_decay=float(options["weight_decay"]))
    wrapped, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    _, total = budget(run, len(loader), accelerator.gradient_accumulation_steps)
    scheduler = accelerator.prepare(make_scheduler(optimizer, total, float(run["optim"]["warmup_ratio"])))
    best: dict[str, Any] = {}
    window = WeightWindow(module, output_dir / WINDOW, int(options["select_window"]), accelerator,
                          fresh=not run.get("resume")) if options.get("average_window") else None

    def on_best(_: dict[str, Any]) -> None:
        state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
        if window is not None:
            state.update(window.mean())
        best["state"] = state
        if accelerator.is_main_process:
            write_atomic(output_dir / BEST, save(state))  # a kill mid-write leaves the previous best
        accelerator.wait_for_everyone()

    state, metrics = fit(accelerator, wrapped, optimizer, scheduler, loader, sampler, step_fn,
                         lambda _: eval_fn(module), run, output_dir, on_best=on_best,
                         on_eval=window.keep if window is not None else None, watch=(section,))
    if state.stopped:
        return state, None
    if "state" in best:
        module.load_state_dict(best["state"])
    elif (output_dir / BEST).is_file():  # resumed after the best epoch: it is on disk
        try:
            module.load_state_dict(load_file(str(output_dir / BEST)))
        except Exception as exc:  # safetensors' own error types, or keys/shapes of another model
            raise SpineModelError(f"{output_dir / BEST}: cannot restore the best epoch's weights ({exc})") from exc
    if metrics is None:  # resumed after the run had finished
        metrics = eval_fn(module)
    module.eval()
    return state, metrics


class WeightWindow:
    """The weights at the last ``size`` evaluations, on disk (``folder/epoch-E.safetensors``), for
    ``average_window``: only what training changes, i.e. trainable parameters and float buffers."""

    def __init__(self, module: torch.nn.Module, folder: Path, size: int, accelerator: Any,
                 fresh: bool = True) -> None:
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        buffers = {name for name, b in module.named_buffers() if b.is_floating_point()}
        self.module, self.folder, self.size, self.accelerator = module, Path(folder), int(size), accelerator
        self.keys = [k for k in module.state_dict() if k in trainable | buffers]
        self.epoch = 0
        if fresh and accelerator.is_main_process:  # a run that does not resume averages none of an earlier run's
            for old in self.folder.glob("epoch-*.safetensors"):
                old.unlink()
        accelerator.wait_for_everyone()

    def _files(self) -> list[Path]:
        """The snapshots up to the current evaluation, oldest first (later ones are a killed run's)."""
        found = [(int(f.stem.split("-", 1)[1]), f) for f in self.folder.glob("epoch-*.safetensors")
                 if f.stem.split("-", 1)[1].isdigit()]
        return [f for epoch, f in sorted(found) if epoch <= self.epoch]

    def keep(self, record: dict[str, Any]) -> None:
        """Write this evaluation's weights and drop those outside the window (engine ``on_eval``)."""
        from safetensors.torch import save

        from ..files import write_atomic

        self.epoch = int(record["epoch"])
        if self.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            state = self.module.state_dict()
            weights = {k: state[k].detach().cpu().clone().contiguous() for k in self.keys}
            write_atomic(self.folder / f"epoch-{self.epoch}.safetensors", save(weights))
            for old in self._files()[:-self.size]:
                old.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def mean(self) -> dict[str, torch.Tensor]:
        """The mean of the window's weights (float32 sums, cast back to each tensor's dtype)."""
        from safetensors.torch import load_file

        files = self._files()[-self.size:]
        if not files:
            raise SpineModelError(f"{self.folder}: no evaluation's weights to average")
        total: dict[str, torch.Tensor] = {}
        state = self.module.state_dict()
        for f in files:
            try:
                weights = load_file(str(f))
            except Exception as err:  # safetensors' own error types: a damaged file
                raise SpineModelError(f"{f}: cannot read an evaluation's weights ({err})") from None
            if set(weights) != set(self.keys) or any(weights[k].shape != state[k].shape for k in self.keys):
                raise SpineModelError(f"{f}: holds other weights than this stage's; delete {self.folder} to start over")
            for k, v in weights.items():
                total[k] = total.get(k, 0) + v.float()
        return {k: (v / len(files)).to(state[k].dtype) for k, v in total.items()}
