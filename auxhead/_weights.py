"""Weights from files: pretrained weights through torchvision's and timm's caches, and the
files a user brings (`auxhead train --init`).

Every file that cannot be read, and every download that cannot happen, is one
`WeightsUnavailable` line naming the file (or the hub repository) and the way out, raised
within seconds: a cached file is read before anything is downloaded, and nothing is
downloaded from a host that does not answer (huggingface_hub would otherwise retry for
half a minute). Imports only torch at module level; torchvision, timm, huggingface_hub and
safetensors where they are used.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = [
    "InitWeights",
    "WeightsUnavailable",
    "load_weights_file",
    "read_init",
    "timm_pretrained",
    "torchvision_pretrained",
]

# How long to wait for a hub's host to accept a connection before calling it offline.
CONNECT_TIMEOUT = 3.0

# What `--init` takes, for the messages.
EXPECTED = (
    "expected a state_dict (torch.save(model.state_dict(), path)), a .safetensors file, or "
    "the checkpoint.pth of `auxhead train`"
)


class WeightsUnavailable(RuntimeError):
    """Weights that cannot be had: a file that cannot be read, or pretrained weights that are
    neither in the cache nor downloadable. The message names the file or repository and the
    way out."""


def _reason(error: BaseException) -> str:
    """Why a weights file did not load, in a few words (never torch's weights-only essay)."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled Python object ({found.group(1)}), not only tensors"
    if isinstance(error, pickle.UnpicklingError) and "Weights only" in text:
        if "Unsupported operand" in text or "invalid load key" in text:  # not a pickle at all
            return "it is not a torch.save or safetensors file"
        return "it holds pickled Python objects, not only tensors"
    if isinstance(error, EOFError) or (not text and not isinstance(error, KeyError)):
        return "it is empty or cut short"
    if "zip archive" in text:
        return "it is cut short or damaged (not a whole torch.save file)"
    first = " ".join(text.split())[:100]
    return f"it is not a torch.save or safetensors file ({type(error).__name__}: {first})"


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as file:
        head = file.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def load_weights_file(path: str | Path) -> Any:
    """What a weights file holds: a safetensors file's tensors, or what `torch.save` wrote
    (tensors and plain containers only: `weights_only=True`). Raises what the readers raise."""
    path = Path(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_cached(path: Path, what: str) -> Any:
    """A cached download, or one line naming it and the way out."""
    try:
        return load_weights_file(path)
    except Exception as error:  # any reader's complaint is the file's
        real = path.resolve()  # the hub cache links snapshots/<commit>/<file> to blobs/<hash>
        also = "" if real == path.absolute() else f" and the file it links to, {real},"
        raise WeightsUnavailable(
            f"the cached file of {what}, {path}, cannot be read: {_reason(error)}; delete it"
            f"{also} and run again to download it again (or copy a good copy there)"
        ) from None


def _proxied() -> bool:
    names = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    return any(os.environ.get(name) for name in names)


def _reachable(url: str) -> bool:
    """Whether `url`'s host accepts a connection within CONNECT_TIMEOUT (behind a proxy: assume
    so, the proxy decides)."""
    if _proxied():
        return True
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError:
        return False
    return True


def _hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps `url`'s file: `torch.hub.get_dir()/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _download_to_hub(url: str, what: str) -> Path:
    """`url`'s file in torch.hub's cache, downloaded there if missing (its hash checked when
    the name carries one, as torch.hub does)."""
    cached = _hub_checkpoint(url)
    if cached.is_file():
        return cached
    way_out = f"download {url} on a machine with access and copy it to {cached}"
    if not _reachable(url):
        raise WeightsUnavailable(
            f"{what} are not in the cache ({cached}) and {urlparse(url).hostname} cannot be "
            f"reached (offline?): {way_out}, or start from a weights file (--init PATH)"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    found = torch.hub.HASH_REGEX.search(cached.name)
    try:
        torch.hub.download_url_to_file(url, str(cached), found.group(1) if found else None, False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash RuntimeError
        message = " ".join(str(error).split())[:120]
        raise WeightsUnavailable(
            f"{what} could not be downloaded from {url} ({type(error).__name__}: {message}): "
            f"{way_out}, or start from a weights file (--init PATH)"
        ) from None
    return cached


def torchvision_pretrained(name: str) -> dict[str, torch.Tensor]:
    """The DEFAULT weights of torchvision's model `name`, read from torch.hub's cache
    (`torch.hub.get_dir()/checkpoints/<file>`, i.e. `$TORCH_HOME/hub/checkpoints`), downloaded
    there first if missing.

    Raises:
        WeightsUnavailable: no such weights, offline without them, or a cached file that
            cannot be read (the message names it).
    """
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise WeightsUnavailable(f"torchvision has no pretrained weights for {name!r}") from None
    what = f"the pretrained weights of torchvision's {name}"
    state = _read_cached(_download_to_hub(weights.url, what), what)
    if not isinstance(state, dict):
        raise WeightsUnavailable(
            f"the cached file {_hub_checkpoint(weights.url)} holds no state_dict; delete it and "
            "run again to download it again"
        )
    return state


def _hf_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (the environment read now)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def _hf_filenames(filename: str | None) -> list[str]:
    """The files timm tries in a hub repository, in order: the safetensors alternative first."""
    filename = filename or "pytorch_model.bin"
    safe = {
        "pytorch_model.bin": "model.safetensors",
        "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
    }.get(filename)
    if safe is None and filename.endswith(".bin"):
        safe = filename[: -len(".bin")] + ".safetensors"
    return [safe, filename] if safe else [filename]


def _from_hf_hub(hub_id: str, filename: str | None, what: str) -> Path:
    """A weights file of hub repository `hub_id` ("org/name[@revision]"): from the cache, or
    downloaded into it when the hub answers."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    cache = _hf_cache()
    names = _hf_filenames(filename)
    for name in names:
        found = huggingface_hub.try_to_load_from_cache(
            repo, name, cache_dir=cache, revision=revision or None
        )
        if isinstance(found, str):
            return Path(found)
    folder = cache / f"models--{repo.replace('/', '--')}"
    if _hf_offline() or not _reachable(constants.ENDPOINT):
        raise WeightsUnavailable(
            f"{what} ({repo} on the Hugging Face hub) are not in its cache ({folder}) and the "
            f"hub cannot be reached (offline, or HF_HUB_OFFLINE set): download them once on a "
            f"machine with access (`hf download {repo}`) and copy {folder.name} into {cache}, "
            "or start from a weights file (--init PATH)"
        )
    error: Exception | None = None
    for name in names:
        try:
            return Path(
                huggingface_hub.hf_hub_download(
                    repo, name, revision=revision or None, cache_dir=cache
                )
            )
        except EntryNotFoundError as missing:  # try the next name
            error = missing
        except Exception as failed:  # network, authorisation, disk
            error = failed
            break
    message = " ".join(str(error).split())[:120]
    raise WeightsUnavailable(
        f"{what} could not be downloaded from {repo} ({type(error).__name__}: {message}); "
        f"download them on a machine with access and copy {folder.name} into {cache}"
    )


def timm_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained=True, **kwargs)`, its weights read from the Hugging
    Face hub cache (`HF_HUB_CACHE`, `$HF_HOME/hub`) or, for models without a hub copy, from
    torch.hub's cache; downloaded there first if missing and the host answers.

    Raises:
        WeightsUnavailable: no pretrained weights, offline without them, or a cached file that
            cannot be read (the message names it).
    """
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    what = f"the pretrained weights of timm's {name}"
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsUnavailable(f"timm has no pretrained weights for {name!r}")
    if cfg.hf_hub_id and (cfg.source in (None, "", "hf-hub")):
        path = _from_hf_hub(cfg.hf_hub_id, cfg.hf_hub_filename, what)
        overlay: dict[str, Any] = {"state_dict": _read_cached(path, what)}
    else:
        url = cfg.url if isinstance(cfg.url, str) else cfg.url[0]
        path = _download_to_hub(url, what)
        if cfg.custom_load:  # a foreign format (JAX .npz) that the model reads itself
            overlay = {"file": str(path), "custom_load": True}
        else:
            overlay = {"state_dict": _read_cached(path, what)}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        message = " ".join(str(error).split())[:120]
        raise WeightsUnavailable(
            f"{what} in {path} do not load into the model ({type(error).__name__}: {message}); "
            "delete the file and run again to download it again"
        ) from None


@dataclass
class InitWeights:
    """A weights file read for `--init`: the model's tensors, and, from an `auxhead train`
    checkpoint, its heads' tensors (keyed as `AuxModel.heads.state_dict()`) and its notes
    (arch, taps, head, classes)."""

    path: Path
    model: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:4]) + (", ..." if len(obj) > 4 else "")
        return f"a dict without tensors (keys {keys})" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


def read_init(path: str | Path) -> InitWeights:
    """Read a weights file to start a model from: a state_dict (`torch.save` or safetensors),
    fastai's `learn.save` file, or `auxhead train`'s `checkpoint.pth` (the model with its
    heads: the model's tensors lose the "model." prefix of `AuxModel`, the heads' are kept
    apart).

    Raises:
        WeightsUnavailable: a file it cannot read, or one that holds no tensors; the message
            names the file, what it holds and what is expected.
    """
    path = Path(path)
    try:
        obj = load_weights_file(path)
    except Exception as error:  # any reader's complaint is the file's
        raise WeightsUnavailable(f"{path} cannot be read: {_reason(error)}; {EXPECTED}") from None
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and {"generator", "discriminator"} <= obj.keys():
        raise WeightsUnavailable(
            f"{path} is a checkpoint of `auxhead acgan` (a generator and a discriminator), not "
            f"of a classifier; {EXPECTED}"
        )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # auxhead's checkpoint
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # fastai's learn.save
        obj = obj["model"]
    tensors = {}
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise WeightsUnavailable(f"{path} holds {_describe(obj)}, not a state_dict; {EXPECTED}")
    if all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    heads = {}
    model_keys = [k for k in tensors if k.startswith("model.")]
    head_keys = [k for k in tensors if k.startswith("heads.")]
    if model_keys and head_keys:  # an AuxModel's: the model under "model.", heads under "heads."
        heads = {k.removeprefix("heads."): tensors[k] for k in head_keys}
        tensors = {k.removeprefix("model."): tensors[k] for k in model_keys}
    return InitWeights(path, tensors, heads, meta)
