"""Every recipe config key, as dataclasses: one section each, the comment beside a field is its
``--help`` text. :data:`~spinemm.training.config.DEFAULTS` is derived from :class:`RecipeConfig`,
and the stage sections hold the stage's own model dataclass (``grader.model``: GraderConfig,
``locator.model``: LocatorConfig), so each key has one definition, one default and one description.

A default of ``{}`` or None marks a free-form key (any mapping or value goes, e.g. ``model.kwargs``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..models.config import GraderConfig, LocatorConfig

__all__ = ["RecipeConfig", "defaults_of"]


@dataclass
class ModelSection:
    name: str = "spine-tiny"  # spinemm.list_models() preset
    kwargs: dict = field(default_factory=dict)  # create_model(name, **kwargs) config overrides, e.g. {text.type: none}


@dataclass
class DataSection:
    root: str | None = None  # RSNA-layout folder (train.csv, train_images/, ...)
    phantom: dict | None = None  # {n_studies, n_test, image_size, seed}: write a phantom to root if it is empty
    # null = the model preset's; set, they override the preset when the model is created
    num_slices: int | None = None
    image_size: int | None = None  # pixels of each resampled slice; null = the model preset's
    channels: str | None = None  # 2.5d | single
    augment: bool = False  # random flips, shifts and intensity changes of the training studies
    cache_dir: str | None = None  # series cache folder (spinemm cache); null: decode the DICOM each run
    batch_size: int = 4  # studies per step and process
    eval_batch_size: int | None = None  # default: batch_size
    num_workers: int = 0  # DataLoader worker processes
    max_studies: int | None = None  # use only the first N studies (smoke runs)


@dataclass
class SplitSection:
    val_fraction: float = 0.2  # study-level holdout when fold is null
    fold: int | None = None  # k-fold index in [0, folds)
    folds: int = 5  # number of study-level folds
    seed: int = 0  # seed of the study split


@dataclass
class TrainSection:
    seed: int = 0  # seed of the model's initialisation, the sampler and augmentation
    epochs: int = 1  # passes over the training studies
    max_steps: int | None = None  # cap on optimizer steps (the budget of compare_backbones)
    stop_at_step: int | None = None  # stop after this many steps as if killed (resume tests); schedule unchanged
    gradient_accumulation_steps: int = 1  # batches summed into one optimizer step
    mixed_precision: str | None = None  # no | bf16 | fp16; null = the launcher's (accelerate config), else no
    cpu: bool = False  # train on CPU even where a GPU is visible
    compile: bool = False  # the vision tower under torch.compile(fullgraph=True), LoRA included
    location_weight: float = 0.5  # weight of the location loss beside the severity loss
    any_severe_weight: float = 1.0  # weight of the any-severe-spinal term of the official metric's loss
    freeze_vision: bool = False  # ignored for towers that carry LoRA (peft freezes their base weights)
    freeze_text: bool = False  # keep the text tower's weights as they are
    eval_every_epochs: int = 1  # evaluate on the validation studies this often
    select_window: int = 1  # keep the epoch whose mean score over this many evaluations (ending there) is best


@dataclass
class OptimSection:
    lr: float = 3.0e-4  # fusion, heads and every fully trained parameter
    lr_lora: float = 1.0e-4  # LoRA adapter weights
    weight_decay: float = 0.05  # AdamW's decoupled weight decay
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW's moment coefficients
    warmup_ratio: float = 0.1  # of the total optimizer steps
    max_grad_norm: float = 1.0  # gradients clipped to this global norm


@dataclass
class LoraSection:
    r: int = 0  # adapter rank; 0: no LoRA, the towers train fully
    alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the adapters' input
    targets: list | None = None  # layers to adapt; null = auto per tower kind (README: Model details)


@dataclass
class CheckpointSection:
    every_steps: int = 50  # write a resumable checkpoint this often (and at the end)
    keep_last: int | None = 2  # checkpoints kept, newest by write order (null or 0: all)
    # a new run (resume null) into an output_dir holding an earlier run's checkpoints deletes
    # them first; false refuses (resume=latest continues that run, resume=force whatever it was)
    overwrite: bool = False


@dataclass
class LogSection:
    tensorboard: bool = True  # TensorBoard scalars through accelerate's trackers
    progress: bool = True  # tqdm progress bars
    every_steps: int = 10  # log the training loss this often


@dataclass
class PretrainSection:
    output_dir: str = "runs/pretrain"  # where pretraining writes model/, best/ and its checkpoints
    epochs: int | None = None  # null -> train.epochs
    lr: float | None = None  # null -> optim.lr
    side_mm: float | None = None  # finding crop side in patient mm; null = the model's roi_side_mm (saved with it)
    crop_size: int | None = None  # pixels the crop is cut at; null = the vision tower's input size
    shift: float = 0.1  # largest random shift of a training crop, a fraction of its side
    batch_size: int = 64  # (crop, prompt) pairs per process and step
    balanced: bool = True  # draw pairs in inverse proportion to their severity's frequency
    positives: str = "severity"  # severity: same-severity pairs are positives | text: same prompt | pair
    # create_model overrides of a dual encoder built for pretraining alone, applied over
    # model.kwargs and in place of data's sizes: the tower the grader reads (grader.towers_from)
    # may differ from the detect model's, e.g. the demo's conv tower at 32 px; null: the run's model
    towers: dict | None = None


@dataclass
class PipelineSection:
    output_dir: str = "runs/pipeline"  # one folder per stage trained, and pipeline/ (the pipeline folder)
    # which to train, in order; e.g. stages=[grade] keeps init_from's locate
    stages: list = field(default_factory=lambda: ["locate", "grade"])


@dataclass
class GraderSection:
    epochs: int = 15  # passes over the training findings
    lr: float = 2.0e-3  # the decoder, heads and projections (and the whole CNN grader)
    tower_lr: float = 3.0e-4  # the clip grader's pretrained towers (or their LoRA adapters); a fresh one trains at lr
    # train the clip grader's text tower; false: keep it as towers_from has it, and compute each
    # distinct finding text's features once before training instead of every step
    train_text: bool = True
    # dropout of the clip grader's text tower while it trains (every BERT dropout, attention's
    # too; LoRA adapters keep lora.dropout); null: the tower's own. 0 by default: dropout's masks
    # and the attention kernel they force took 8-20 ms of a 58-77 ms grade step on a CPU, for
    # no measured quality gain (RESULTS.md)
    text_dropout: float | None = 0.0
    # the clip grader's encoder: a saved model folder (e.g. pretraining's model/); null: the detect model
    towers_from: str | None = None
    # create_model overrides for a fresh vision tower beside that text tower (the backbone
    # comparison), e.g. {vision: {type: cnn, ...}}; null: the towers_from / detect model's own
    towers: dict | None = None
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    batch_size: int = 64  # crops per step and process
    shift: float = 0.2  # largest crop shift, a fraction of the crop side (about the localiser's error)
    slice_jitter: int = 1  # largest shift in original slices
    eval_every_epochs: int = 1  # score the pipeline on the val studies (and keep the best) this often
    # keep the evaluation ending the best run of 3 (mean score): one lucky score on a few val
    # studies does not pick a mid-schedule epoch (RESULTS.md: "Model selection")
    select_window: int = 3
    # keep the mean of the weights at those select_window evaluations, not the last of them (a
    # weight average over the end of the run; each evaluation's weights go to window/)
    average_window: bool = False
    stop_at_step: int | None = None  # stop this stage after this many steps as if killed (resume tests)
    # an ensemble of one grade stage per study-level fold of all the run's studies (train and val
    # together), each selected, and its study context fitted, on its own fold; their out-of-fold
    # grades go to grade/oof.csv. 1: one grade stage, trained on train and selected on val
    folds: int = 1
    # an ensemble over training seeds (every fold's member once per seed); null: train.seed alone
    seeds: list | None = None
    # the out-of-fold label check: training labels whose out-of-fold probability of their recorded
    # grade (oof_from: an earlier fold ensemble's grade/oof.csv) is below drop_below are left out,
    # as some top RSNA solutions dropped labels their folds contradicted; null: every label is used
    drop_below: float | None = None
    oof_from: str | None = None  # the oof.csv drop_below reads
    model: GraderConfig = field(default_factory=GraderConfig)  # the grade stage's model (GraderConfig)


@dataclass
class LocatorSection:
    epochs: int = 20  # passes over the labelled sagittal slices
    lr: float = 3.0e-3  # AdamW learning rate of the whole locator
    weight_decay: float = 1.0e-4  # AdamW's decoupled weight decay
    batch_size: int = 32  # slices per step and process
    shift: float = 0.1  # largest random shift of a training slice, a fraction of its side
    eval_every_epochs: int = 1  # score the validation slices this often
    select_window: int = 1  # keep the epoch whose mean score over this many evaluations is best
    stop_at_step: int | None = None  # stop this stage after this many steps as if killed (resume tests)
    model: LocatorConfig = field(default_factory=LocatorConfig)  # the locate stage's model (LocatorConfig)


@dataclass
class CompareSection:
    output_dir: str = "runs/compare"  # one folder per row, and comparison.md / .csv / .png
    # rows of the table: {name: str, overrides: {dotted.key: value}} applied over this config
    backbones: list = field(default_factory=list)
    only: list | None = None  # run only these names (list), e.g. [cnn, clip]
    # detect: each row trains the detect stage (train_detect); grade: each row trains the grade
    # stage of the pipeline init_from (train_stages, pipeline.stages [grade]): same located points
    stage: str = "detect"


@dataclass
class RecipeConfig:
    """Every key the recipes read. Sections: model, data, split, train, optim, lora, checkpoint,
    log, pretrain, pipeline, grader, locator, compare; plus top-level output_dir, init_from, resume."""

    output_dir: str = "runs/severity"  # where the run writes its checkpoints, model/, best/ and config.yaml
    init_from: str | None = None  # a model dir (e.g. pretrain_clip's output/model) to start from
    resume: str | None = None  # null | "latest" (checked against the run's settings) | "force" | a checkpoint-STEP dir
    model: ModelSection = field(default_factory=ModelSection)  # the detect model (train_detect) or the run's model
    data: DataSection = field(default_factory=DataSection)  # where the studies are and how they are read
    split: SplitSection = field(default_factory=SplitSection)  # the study-level train / validation split
    train: TrainSection = field(default_factory=TrainSection)  # the training loop
    optim: OptimSection = field(default_factory=OptimSection)  # AdamW and its schedule
    # peft LoRA on the towers (spinemm.models.add_lora); fusion and heads train fully
    lora: LoraSection = field(default_factory=LoraSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)  # resumable checkpoints
    log: LogSection = field(default_factory=LogSection)  # TensorBoard and progress bars
    # recipes/pretrain_clip.py; other sections (data, split, train, optim, lora) are shared
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    # recipes/train_stages.py: the stages after detect (init_from: the detect model or a pipeline)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    grader: GraderSection = field(default_factory=GraderSection)  # the grade stage: the ROI grader on crops
    locator: LocatorSection = field(default_factory=LocatorSection)  # the locate stage: the level locator
    compare: CompareSection = field(default_factory=CompareSection)  # recipes/compare_backbones.py


def defaults_of(config: Any) -> dict[str, Any]:
    """A config dataclass (instance or class) as a nested dict of defaults (tuples as YAML lists)."""
    instance = config() if isinstance(config, type) else config

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(instance)
