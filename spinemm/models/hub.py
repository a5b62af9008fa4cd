"""Where pretrained files come from: a local folder or file, then the Hugging Face cache, then the hub.

Offline (``HF_HUB_OFFLINE=1``) and not cached, :func:`resolve_files` raises a
:class:`~spinemm.errors.SpineModelError` that names the repo, the files, the command that fetches
them and the folder the loader will then read, plus the config key that takes a local folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import SpineModelError

#: A file name, or alternatives in order of preference (e.g. safetensors before a pickle).
FileSpec = str | tuple[str, ...]
#: Weight formats that need unpickling. spinemm's own checkpoints never use them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
#: Files of a saved transformers tokenizer (whichever exist are read); one of the first two is needed.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TOKENIZER_REQUIRED = ("tokenizer.json", "vocab.txt")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (read now, not at import, so tests can flip it)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache this loader reads (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _alternatives(spec: FileSpec) -> tuple[str, ...]:
    return (spec,) if isinstance(spec, str) else tuple(spec)


def resolve_files(
    source: str | os.PathLike, files: Sequence[FileSpec], *, setting: str, optional: Sequence[FileSpec] = ()
) -> dict[str, Path]:
    """Find ``files`` (and whichever of ``optional`` exist) for ``source``.

    ``source`` is a local folder, a local file (when exactly one file is asked for), or a hub repo
    id. Returns ``{first alternative of each spec: local path}``. ``setting`` is the config key
    (e.g. ``"vision.pretrained"``) a user can point at a local folder instead; it goes in the error.
    Each file found is checked for its format (:func:`check_file_format`) before it is handed out.
    """
    found = _resolve(source, files, setting=setting, optional=optional)
    for path in found.values():
        check_file_format(path)
    return found


def check_file_format(path: Path) -> None:
    """Raise SpineModelError naming ``path`` when a ``.safetensors`` file has no valid safetensors
    header (e.g. a pickle renamed, a truncated download) or a ``.json`` file is not JSON. Both
    checks read only the header or the small JSON file; other files pass unchecked."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):  # parses the header, checks the offsets
                pass
        elif suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # safetensors raises its own error type; json and decoding raise ValueErrors
        kind = "safetensors" if suffix == ".safetensors" else "JSON"
        raise SpineModelError(f"{path}: not a valid {kind} file ({type(exc).__name__}: {exc})") from exc


def _resolve(
    source: str | os.PathLike, files: Sequence[FileSpec], *, setting: str, optional: Sequence[FileSpec]
) -> dict[str, Path]:
    path = Path(source).expanduser()
    if path.is_file():
        if len(files) != 1:
            raise SpineModelError(
                f"{setting}={str(source)!r} is a file, but {len(files)} files are needed: "
                f"{[_alternatives(f) for f in files]}; give a folder that holds them"
            )
        return {_alternatives(files[0])[0]: path}
    if path.is_dir():
        return _from_folder(path, files, optional, setting)
    if os.path.isabs(str(source)) or str(source).startswith((".", "~")):
        raise SpineModelError(f"{setting}: local path {str(source)!r} does not exist")
    return _from_hub(str(source), files, optional, setting)


def _from_folder(
    folder: Path, files: Sequence[FileSpec], optional: Sequence[FileSpec], setting: str
) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for spec, required in [(f, True) for f in files] + [(f, False) for f in optional]:
        names = _alternatives(spec)
        hit = next((folder / n for n in names if (folder / n).is_file()), None)
        if hit is not None:
            found[names[0]] = hit
        elif required:
            raise SpineModelError(f"{setting}: folder {folder} has no {' or '.join(names)}")
    return found


def _from_hub(
    repo: str, files: Sequence[FileSpec], optional: Sequence[FileSpec], setting: str
) -> dict[str, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise SpineModelError(f"{setting}={repo!r} is neither a local path nor a hub repo id ({exc})") from exc
    cache = hub_cache_dir()
    offline = hub_offline()
    found: dict[str, Path] = {}
    missing: list[tuple[str, ...]] = []
    # no network: say so now rather than after huggingface_hub's retries (minutes per file)
    reason = "" if offline else unreachable_reason()
    for spec, required in [(f, True) for f in files] + [(f, False) for f in optional]:
        names = _alternatives(spec)
        hit = None
        for name in names:  # the cache first, so a cached copy never touches the network
            try:
                hit = hf_hub_download(repo, name, cache_dir=cache, local_files_only=True)
                break
            except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
                continue
        if hit is None and not offline and not reason:
            for name in names:
                try:
                    hit = hf_hub_download(repo, name, cache_dir=cache)
                    break
                except LocalEntryNotFoundError as exc:  # an EntryNotFoundError subclass: the network failed
                    reason = f"download failed: {type(exc).__name__}: {exc}"
                    break
                except EntryNotFoundError:  # this alternative is not in the repo; try the next
                    continue
                except Exception as exc:  # network down, unknown repo, auth: no point asking again
                    reason = f"download failed: {type(exc).__name__}: {exc}"
                    break
        if hit is not None:
            found[names[0]] = Path(hit)
        elif required:
            missing.append(names)
    if missing:
        if not reason:
            reason = OFFLINE_REASON if offline else f"{repo} has none of them"
        raise MissingHubFiles({repo: missing}, {repo: setting}, cache, reason)
    return found


class MissingHubFiles(SpineModelError):
    """Pretrained files that are neither local nor cached and cannot be downloaded now.

    ``needs`` maps repo id -> file alternatives; ``settings`` maps repo id -> the config key that
    takes a local folder instead. :meth:`merge` joins the errors of several towers into one message.
    """

    def __init__(
        self, needs: dict[str, list[tuple[str, ...]]], settings: dict[str, str], cache: Path, reason: str
    ) -> None:
        self.needs, self.settings, self.cache, self.reason = needs, settings, cache, reason
        super().__init__(self._message())

    @classmethod
    def merge(cls, errors: Sequence[MissingHubFiles]) -> MissingHubFiles:
        needs: dict[str, list[tuple[str, ...]]] = {}
        settings: dict[str, str] = {}
        for err in errors:
            for repo, groups in err.needs.items():
                needs.setdefault(repo, [])
                needs[repo] += [g for g in groups if g not in needs[repo]]
                settings.setdefault(repo, err.settings[repo])
        return cls(needs, settings, errors[0].cache, errors[0].reason)

    def _message(self) -> str:
        # The command names the last alternative of each group: the legacy name every repo of that
        # kind has (e.g. open_clip_pytorch_model.bin); the loader still prefers the first when present.
        lines = [
            f"pretrained files are missing: {self.reason}, and the hub cache {self.cache} has no copy of"
        ]
        for repo, groups in self.needs.items():
            lines.append(f"  {repo}: " + ", ".join(" or ".join(names) for names in groups))
        lines.append("To fix, on a machine with network run:")
        for repo, groups in self.needs.items():
            lines.append(
                f"    hf download {repo} {' '.join(names[-1] for names in groups)} --cache-dir {self.cache}"
            )
        lines.append(f"and bring {self.cache} here (or set HF_HUB_CACHE to a copy); the loader reads")
        for repo in self.needs:
            lines.append(
                f"    {self.cache / ('models--' + repo.replace('/', '--')) / 'snapshots' / '<revision>'}/"
            )
        lines.append(
            "Or put each repo's files in a folder of their own and set "
            + ", ".join(f"{self.settings[repo]}='/folder/with/{repo.split('/')[-1]}'" for repo in self.needs)
            + "."
        )
        return "\n".join(lines)


def refuse_pickle(path: Path) -> None:
    """spinemm never unpickles its own weights: a pickle-format file is refused."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SpineModelError(
            f"refusing to load {path}: {path.suffix} weights are Python pickles, which can run code when "
            f"loaded. spinemm reads model.safetensors only; convert with safetensors.torch.save_file."
        )


def load_upstream_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an upstream (open_clip / HF) checkpoint: safetensors, or a pickle read with
    ``weights_only=True`` (tensors and containers only, no code) for repos that ship nothing else.
    A file that is neither (a pickle that would run code, one renamed ``.safetensors``, garbage, a
    mapping of anything but named tensors) is a :class:`SpineModelError` naming it; nothing in it runs."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors' own error types: not a safetensors file
            raise SpineModelError(f"{path}: not a valid safetensors file ({type(exc).__name__}: "
                                  f"{_first_line(exc)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses code (UnpicklingError); garbage fails in many ways
            raise SpineModelError(
                f"{path}: not a checkpoint of plain tensors (read with torch.load(weights_only=True), which "
                f"runs no code: {type(exc).__name__}: {_first_line(exc)}); convert it with "
                f"safetensors.torch.save_file") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SpineModelError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise SpineModelError(f"{path}: expected a state dict of tensors; entries {odd[:5]!r} are not named tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _first_line(exc: BaseException) -> str:
    """An exception's message up to its first line break (torch's weights_only advice runs to 20 lines)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


# ------------------------------------------------------------------------ whole repos, fail fast
OFFLINE_REASON = "HF_HUB_OFFLINE=1 is set"
#: Seconds to wait for the hub (or the HTTPS proxy) to accept a connection before calling it unreachable.
PROBE_TIMEOUT_S = 3.0


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str:
    """``""`` when the hub endpoint (through the environment's HTTPS proxy, if any) accepts a TCP
    connection within ``timeout`` seconds, else why not, e.g.
    ``"cannot reach https://huggingface.co ([Errno -2] Name or service not known)"``.

    huggingface_hub retries a dead network for about 23 s per file; asking once first lets a
    loader fail in seconds with a message true to what it saw.
    """
    import socket
    import threading
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    host = urlsplit(endpoint).hostname or endpoint
    proxy = None if proxy_bypass(host) else getproxies().get("https")
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    target = urlsplit(proxy or endpoint)
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str] = []

    def connect() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
            outcome.append("")
        except OSError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if outcome and not outcome[0]:
        return ""
    why = outcome[0] if outcome else f"no answer within {timeout:g} s"
    via = f" through the proxy {proxy}" if proxy else ""
    return f"cannot reach {endpoint}{via} ({why})"


def download_repo(repo: str, *, setting: str, revision: str | None = None) -> Path:
    """A whole spinemm model or pipeline repo (``hf-hub:org/name``) as a local folder: downloaded
    into the hub cache when the hub is reachable, else the cache's copy, else a
    :class:`~spinemm.errors.SpineModelError` that says why and what to download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    reason = OFFLINE_REASON if hub_offline() else unreachable_reason()
    if not reason:
        try:
            return Path(snapshot_download(repo, cache_dir=cache, revision=revision))
        except Exception as exc:  # unknown repo, auth, network: the message names it; the cache may still hold it
            reason = f"download failed: {type(exc).__name__}: {exc}"
    try:
        return Path(snapshot_download(repo, cache_dir=cache, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise SpineModelError(
            f"{setting}: cannot get hf-hub:{repo}{f' at revision {revision}' if revision else ''}: {reason}, "
            f"and the hub cache {cache} has no copy.\n"
            f"To fix, on a machine with network run:\n    hf download {repo}"
            f"{f' --revision {revision}' if revision else ''} --cache-dir {cache}\n"
            f"and bring {cache} here (or set HF_HUB_CACHE to a copy), or give the folder the repo was "
            f"downloaded to (hf download {repo} --local-dir FOLDER)."
        ) from None
