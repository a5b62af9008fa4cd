"""What every recipe sets up the same way: the data root, the study split, the model, the datasets.

Dataset settings (slices, image size, channels) come from the model's ``preprocess_cfg``: config
``data.num_slices / image_size / channels`` are applied to the model when it is created (so the
tiny preset can train at 32 px) and must agree with it when the model is loaded (``init_from``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

from ..errors import SpineDataError, SpineModelError
from ..pipeline.detect import preprocess_settings


def prepare_root(config: dict[str, Any], accelerator: Any) -> Path:
    """The data root; when ``data.phantom`` is set and the root has no ``train.csv``, the main
    process writes a phantom there first (the others wait)."""
    data = config["data"]
    if not data["root"]:
        raise SpineDataError("config data.root is not set: point it at an RSNA-layout folder "
                             "(or set data.phantom to write a phantom dataset there)")
    root = Path(data["root"]).expanduser()
    if data["phantom"] and not (root / "train.csv").is_file():
        if accelerator.is_main_process:
            import inspect

            from ..data.phantom import make_phantom

            options = dict(data["phantom"])
            known = set(inspect.signature(make_phantom).parameters) - {"root", "progress"}
            if set(options) - known:
                raise SpineModelError(f"data.phantom keys {sorted(set(options) - known)} are not options of "
                                      f"make_phantom; valid: {sorted(known)}")
            make_phantom(root, progress=bool(config["log"]["progress"]), **options)
        accelerator.wait_for_everyone()
    if not (root / "train.csv").is_file():
        raise SpineDataError(f"{root / 'train.csv'} does not exist (data.root={data['root']!r})")
    return root


def split_studies(frame: Any, config: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(train ids, val ids): ``split.fold`` of a ``split.folds``-fold split, else a
    ``split.val_fraction`` holdout; studies limited to the first ``data.max_studies``."""
    from ..data.dataset import kfold_split, study_split

    split = config["split"]
    ids = sorted({int(s) for s in frame["study_id"]})
    if config["data"]["max_studies"]:
        ids = ids[: int(config["data"]["max_studies"])]
    if split["fold"] is not None:
        return kfold_split(ids, int(split["folds"]), int(split["fold"]), seed=int(split["seed"]))
    return study_split(ids, float(split["val_fraction"]), seed=int(split["seed"]))


def model_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """``create_model`` overrides: ``model.kwargs`` plus the set ``data.num_slices/image_size/channels``."""
    overrides = dict(config["model"]["kwargs"] or {})
    data = config["data"]
    for key, target in (("num_slices", "num_slices"), ("image_size", "vision.image_size"),
                        ("channels", "channels")):
        if data[key] is not None:
            overrides[target] = data[key]
    return overrides


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """``load_model(init_from)`` or ``create_model(model.name, **overrides)``, then LoRA
    (``lora.r > 0``), the tower freezes of ``train.freeze_vision / freeze_text`` and
    ``train.compile``."""
    from ..models.factory import create_model, load_model

    if config["init_from"]:
        model = load_model(config["init_from"])
        pre = preprocess_settings(model)
        for key in ("num_slices", "image_size", "channels"):
            want = config["data"][key]
            if want is not None and want != pre[key]:
                raise SpineModelError(
                    f"data.{key}={want!r} but the model in init_from={config['init_from']} was built for "
                    f"{pre[key]!r}; drop the override or rebuild the model")
    else:
        model = create_model(config["model"]["name"], **model_overrides(config))
    lora = config["lora"]
    if int(lora["r"]) > 0:
        from ..models.lora import add_lora

        kwargs = {"r": int(lora["r"]), "alpha": lora["alpha"], "dropout": lora["dropout"]}
        if lora["targets"] is not None:
            kwargs["targets"] = lora["targets"]
        add_lora(model, **kwargs)
    for flag, tower in (("freeze_vision", "vision"), ("freeze_text", "text")):
        if config["train"][flag]:
            module = getattr(model, tower, None)
            if module is None:
                raise SpineModelError(f"train.{flag}: the model has no '{tower}' tower")
            for name, param in module.named_parameters():
                if "lora_" not in name:
                    param.requires_grad_(False)
    if config["train"]["compile"]:
        # in place (nn.Module.compile): parameter names, LoRA merging and saving are unchanged
        model.vision.compile(fullgraph=True)
    return model


def make_datasets(root: Path, frame: Any, train_ids: list[int], val_ids: list[int], model: torch.nn.Module,
                  config: dict[str, Any], store: Any = None) -> tuple[Any, Any]:
    """Train (augmented when ``data.augment``) and val :class:`~spinemm.data.SpineDataset` built
    for the model's preprocessing."""
    from ..data.dataset import SpineDataset

    pre = preprocess_settings(model)
    data = config["data"]
    common = {**pre, "store": store, "frame": frame} if store is not None else \
        {**pre, "cache_dir": data["cache_dir"], "frame": frame}
    train = SpineDataset(root, "train", study_ids=train_ids, augment=bool(data["augment"]),
                         seed=int(config["train"]["seed"]), **common)
    val = SpineDataset(root, "train", study_ids=val_ids, augment=False, **common)
    if len(train) == 0 or len(val) == 0:
        raise SpineDataError(f"empty split: {len(train)} train and {len(val)} val studies under {root}")
    return train, val


def epoch_shard(n: int, accelerator: Any, generator: torch.Generator) -> torch.Tensor:
    """This process's share of a random order of ``n`` items: every process gets the same count
    (``n // num_processes``, so DDP steps stay in lockstep), the processes' shares are disjoint."""
    world = accelerator.num_processes
    order = torch.randperm(n, generator=generator)[: (n // world) * world]
    return order[accelerator.process_index::world]


def seed_everything(seed: int) -> None:
    """Same initial weights on every process (DDP would broadcast them anyway)."""
    from accelerate.utils import set_seed

    set_seed(int(seed))


def model_card(run: Run, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model card's facts of a run (``save_pretrained(model_card_kwargs=...)``): what it was
    trained on (folder, studies, split, whether it is spinemm's synthetic phantom and its seed),
    its validation metrics (scalars) and, for a phantom, the prior-only and oracle scores that
    bracket them."""
    split = run.config["split"]
    how = (f"fold {split['fold']} of {split['folds']}" if split.get("fold") is not None
           else f"a {split['val_fraction']:.0%} hold-out")
    data = (f"{len(run.train_ids)} training and {len(run.val_ids)} validation studies of `{run.root.name}` "
            f"(study-level split: {how}, seed {split['seed']})")
    scalars = {k: round(float(v), 4) for k, v in (metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
    info_path = run.root / "phantom_info.json"
    phantom = info_path.is_file()
    if phantom:
        info = json.loads(info_path.read_text())
        variety = f", variety {info['variety']}" if info.get("variety") else ""
        data += (f". The data is spinemm's synthetic phantom (seed {info.get('seed')}, {info.get('n_studies')} "
                 f"studies{variety}), not MRI of people")
        scalars.update({"phantom prior-only score": info.get("prior_score"),
                        "phantom oracle score": info.get("oracle_score")})
    return {"training_data": data + ".", "metrics": scalars, "phantom": phantom}


def save_model(model: torch.nn.Module, directory: str | Path, card: dict[str, Any] | None = None) -> Path:
    """``save_pretrained(directory)``, loadable by :func:`spinemm.load_model`, with the model card's
    ``card`` facts (:func:`model_card`). A LoRA model is saved merged (a copy; ``merge_lora`` checks
    the merge numerically) with its adapter in ``directory/adapter``."""
    if getattr(model, "lora_config", None) is None:
        return model.save_pretrained(directory, model_card_kwargs=card)
    from ..models.lora import merge_lora, save_adapter

    save_adapter(model, Path(directory) / "adapter")
    # A model prepared for mixed precision runs forward under autocast; the merge check compares
    # outputs in fp32 (to 1e-4), so the copy gets its own forward back (the model keeps autocast)
    plain = extract_model_from_parallel(copy.deepcopy(model), keep_fp32_wrapper=False)
    return merge_lora(plain).save_pretrained(directory, model_card_kwargs=card)


@dataclass
class Run:
    """Everything a recipe sets up before its loop: accelerator, data, split, model and loaders."""

    config: dict[str, Any]
    accelerator: Any
    output_dir: Path
    root: Path
    frame: Any  # load_tables(root, "train")
    train_ids: list[int]
    val_ids: list[int]
    model: torch.nn.Module | None
    store: Any = None  # the SeriesStore every dataset of the run reads from (each series decoded once)
    train_loader: Any = None
    sampler: Any = None
    val_loader: Any = None


def start_run(config: dict[str, Any], model: bool = True) -> Run:
    """Accelerator, resolved config saved beside the outputs, seeded RNGs, the data root (a phantom
    written first when asked), the label tables, the study split, the series store (over
    ``data.cache_dir``) and, with ``model``, the model; no loaders yet."""
    from ..data.store import SeriesStore
    from ..data.tables import load_tables
    from .config import save_config
    from .engine import make_accelerator

    output_dir = Path(config["output_dir"])
    accelerator = make_accelerator(config, output_dir)
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")
    seed_everything(config["train"]["seed"])
    root = prepare_root(config, accelerator)
    frame = load_tables(root, "train")
    train_ids, val_ids = split_studies(frame, config)
    store = SeriesStore(root, "train", cache_dir=config["data"]["cache_dir"])
    return Run(config, accelerator, output_dir, root, frame, train_ids, val_ids,
               build_model(config) if model else None, store)


def setup_run(config: dict[str, Any]) -> Run:
    """:func:`start_run` plus the train/val loaders of whole studies (:class:`~spinemm.data.SpineDataset`)."""
    from ..data.dataset import collate
    from .engine import make_loader

    run = start_run(config)
    train_set, val_set = make_datasets(run.root, run.frame, run.train_ids, run.val_ids, run.model, config, run.store)
    data, seed = config["data"], int(config["train"]["seed"])
    run.train_loader, run.sampler = make_loader(train_set, int(data["batch_size"]), collate, seed, shuffle=True,
                                                num_workers=int(data["num_workers"]))
    run.val_loader, _ = make_loader(val_set, int(data["eval_batch_size"] or data["batch_size"]), collate, seed,
                                    shuffle=False, num_workers=int(data["num_workers"]))
    return run


def prepare_training(run: Run, module: torch.nn.Module) -> tuple[torch.nn.Module, Any, Any]:
    """AdamW + warmup/cosine for ``module`` (the model or a loss wrapper around it), everything passed
    through ``accelerator.prepare``; the run's loaders are replaced by their prepared versions.
    Returns ``(module, optimizer, scheduler)``."""
    from .engine import budget, make_optimizer, make_scheduler

    accelerator, optim = run.accelerator, run.config["optim"]
    optimizer = make_optimizer(module, optim)
    module, optimizer, run.train_loader = accelerator.prepare(module, optimizer, run.train_loader)
    if run.val_loader is not None:
        run.val_loader = accelerator.prepare(run.val_loader)
    _, total = budget(run.config, len(run.train_loader), accelerator.gradient_accumulation_steps)
    scheduler = accelerator.prepare(make_scheduler(optimizer, total, float(optim["warmup_ratio"])))
    return module, optimizer, scheduler
