"""``--model ORG/NAME``: a Hugging Face hub id read from the local cache only (nothing is downloaded).

The cache is huggingface_hub's (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``):
``models--ORG--NAME/snapshots/<revision>/...`` with ``refs/main`` naming the revision, as
``huggingface-cli download ORG/NAME`` leaves it. A hub id not in the cache is refused in one line
saying how to download it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pgraft.core.errors import UsageError

# ORG/NAME as the hub spells repository ids (one slash, no path syntax)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(value: str | Path) -> bool:
    """Whether ``value`` reads as a hub repository id rather than a local path: ``ORG/NAME`` (one
    slash) naming nothing on disk."""
    text = str(value)
    return bool(_HUB_ID.match(text)) and not Path(text).exists() and not text.startswith(".")


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` (``revision``: default ``main``) in the Hugging Face
    cache, found with ``snapshot_download(local_files_only=True)``; a repository not cached is refused
    (:class:`UsageError`, one line naming it and the download command)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        from huggingface_hub import constants

        raise UsageError(f"--model {repo_id} is neither a local directory nor in the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}): download it with `huggingface-cli download {repo_id}`") from err


def resolve_hub_model(value: str | Path) -> Path | None:
    """The cached snapshot a hub id ``value`` names, None when ``value`` is not a hub id (a path)."""
    return cached_snapshot(str(value)) if is_hub_id(value) else None


__all__ = ["cached_snapshot", "is_hub_id", "resolve_hub_model"]
