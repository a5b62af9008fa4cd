"""The hub round trip of models and pipelines: huggingface_hub's ``ModelHubMixin`` plus spinemm's card.

* ``save_pretrained(folder, model_card_kwargs=...)`` writes the model's files and ``README.md``,
  the model card (rewritten on every save, so it never describes an older model).
* ``push_to_hub("org/name", model_card_kwargs=...)`` is the mixin's own: ``create_repo`` and one
  ``upload_folder`` commit of what ``save_pretrained`` writes.
* ``from_pretrained(name)`` reads any model name (:mod:`spinemm.models.names`), ``hf-hub:org/name``
  included, with the same fast offline failure as ``load_model``.

Card keyword arguments: ``training_data`` (a sentence: what it was trained on), ``metrics``
(name -> value, e.g. the held-out official score) and ``phantom`` (True when trained on spinemm's
synthetic phantom: the card then says the numbers are not about real MRI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelHubMixin
from huggingface_hub.errors import OfflineModeIsEnabled

from ..errors import SpineModelError, unknown_key
from .names import HF_HUB_PREFIX, parse_model_name

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}
{% if phantom %}
> **Trained on spinemm's synthetic phantom, not on MRI of people.** Its numbers say how well the
> code learns a known synthetic task, nothing about real scans. Not for clinical use.
{% endif %}
{{ summary }}

- Architecture preset: `{{ preset }}`
{%- if stages %}
- Stages: {{ stages }}
{%- endif %}
- Written by spinemm {{ spinemm_version }}

## Use

```python
import torch
import spinemm

{{ loader | replace("ORG/NAME", repo_id | default("ORG/NAME", true)) }}
```

## Intended use

Research on grading lumbar spine degeneration from MRI, on data in the RSNA 2024 layout. Not for
clinical use: no regulator has reviewed it, and it must not inform a diagnosis.
{% if towers %}
## Base towers

{{ towers }}. Weights they bring from upstream keep their upstream licences.
{% endif %}
## Training data

{{ training_data | default("Not recorded when this card was written.", true) }}

## Metrics

{% if metrics -%}
| metric | value |
|---|---|
{% for name, value in metrics.items() -%}
| {{ name }} | {{ value }} |
{% endfor %}
{%- else -%}
None recorded.
{%- endif %}

## Caveats

{% if phantom -%}
- **Trained on spinemm's synthetic phantom**, not on MRI of people. Its metrics say how well the code
  learns a known synthetic task; they say nothing about real scans.
{% endif -%}
- Research code, not a medical device. The official RSNA 2024 score is a weighted log loss (lower is
  better); compare it with the prior-only score of the same data.
"""


class SpineHubMixin(
    ModelHubMixin,
    library_name="spinemm",
    license="mit",
    tags=["medical-imaging", "mri", "lumbar-spine", "multimodal"],
    model_card_template=CARD_TEMPLATE,
):
    """``ModelHubMixin`` for spinemm classes. A subclass implements ``_save_pretrained(folder)``,
    ``_load_folder(folder)`` and :meth:`card_facts`."""

    def card_facts(self) -> dict[str, Any]:
        """Title, summary, preset, stages and loader line of the card (subclasses fill them in)."""
        raise NotImplementedError

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        from .. import __version__

        return super().generate_model_card(**{"spinemm_version": __version__, **self.card_facts(), **kwargs})

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_card_kwargs: dict[str, Any] | None = None,
                        **kwargs: Any) -> Path:
        """Write the folder and its model card; returns the folder. ``push_to_hub=True, repo_id=...``
        also pushes it (as :meth:`push_to_hub`)."""
        folder = Path(save_directory)
        (folder / "README.md").unlink(missing_ok=True)  # the mixin keeps an existing card; ours must be current
        super().save_pretrained(folder, model_card_kwargs=model_card_kwargs, **kwargs)
        return folder

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """The mixin's push (one commit of what ``save_pretrained`` writes); the card's loader line
        names the repo. ``repo_id`` is ``org/name`` or ``hf-hub:org/name``, the form loading takes.
        Returns the commit URL. Without a network: a :class:`SpineModelError` saying how to upload
        the saved folder from elsewhere, never a raw connection error."""
        repo = repo_id.removeprefix(HF_HUB_PREFIX)
        parse_model_name(HF_HUB_PREFIX + repo, setting="push_to_hub(repo_id)")  # a valid repo id, or a clear error
        card = {"repo_id": repo, **(model_card_kwargs or {})}
        try:
            return super().push_to_hub(repo, model_card_kwargs=card, **kwargs)
        except Exception as err:
            if not _network_error(err):
                raise
            raise SpineModelError(
                f"push_to_hub({HF_HUB_PREFIX}{repo}): cannot reach the hub ({type(err).__name__}: {err}). "
                f"Save the folder here (save_pretrained(FOLDER)) and, on a machine with network, run:\n"
                f"    hf upload {repo} FOLDER"
            ) from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                        torch_dtype: Any = None, device: Any = None, map_location: Any = None, **unknown: Any):
        """Load by model name: a saved folder or ``hf-hub:org/name`` (read from the hub cache or
        downloaded; offline, a clear error in seconds), in eval mode.

        ``revision``: a hub branch, tag or commit to pin (hub names only); ``torch_dtype``: cast the
        weights (e.g. ``torch.bfloat16``); ``device`` (or ``map_location``): move the model there.
        Any other keyword is refused, with the nearest accepted one."""
        setting = f"{cls.__name__}.from_pretrained"
        if unknown:
            raise unknown_key(sorted(unknown)[0], ("revision", "torch_dtype", "device", "map_location"), setting)
        name = parse_model_name(pretrained_model_name_or_path, setting=setting)
        if revision is not None and name.kind != "hub":
            raise SpineModelError(f"{setting}: revision={revision!r} needs a hub name (hf-hub:org/name), "
                                  f"not the {name.kind} {name.name!r}")
        folder = name.saved_folder(setting, revision=revision)
        model = cls._from_pretrained(model_id=str(folder), revision=revision, cache_dir=None, force_download=False,
                                     local_files_only=True, token=None)
        if device is not None and map_location is not None and device != map_location:
            raise SpineModelError(f"{setting}: give device or map_location, not both")
        device = device if device is not None else map_location
        if torch_dtype is not None:
            model = model.to(dtype=torch_dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **_: Any):
        return cls._load_folder(Path(model_id))

    @classmethod
    def _load_folder(cls, folder: Path):
        raise NotImplementedError


def _network_error(err: BaseException) -> bool:
    """A push that failed for want of a network (offline mode, DNS, refused or dropped connection)."""
    root = type(err).__module__.split(".")[0]
    return isinstance(err, (OfflineModeIsEnabled, ConnectionError, TimeoutError)) or root in (
        "httpx", "httpcore", "requests", "urllib3")
