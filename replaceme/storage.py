"""Filesystems for URIs (local paths, file://, s3://, …) through fsspec, with errors a user can act on.

S3-compatible servers are reached the way s3fs users expect: ``storage.endpoint_url`` in the
config, or the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …), which
s3fs/botocore read themselves. Credentials are never put into messages.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.core import url_to_fs

from replaceme.errors import ReplaceMeError


def fsspec_options(uri: str, endpoint_url: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``fsspec`` to open ``uri``."""
    settings = dict(options or {})
    if endpoint_url and uri.startswith(("s3://", "s3a://")):
        settings.setdefault("endpoint_url", endpoint_url)
    return settings


def filesystem(uri: str, *, field: str, endpoint_url: str | None = None,
               options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``uri`` and the path inside it; a missing driver is a clear error."""
    try:
        return url_to_fs(uri, **fsspec_options(uri, endpoint_url, options))
    except ImportError as exc:
        scheme = uri.split("://", 1)[0]
        extra = "s3" if scheme in ("s3", "s3a") else None
        hint = f"pip install 'replaceme[{extra}]'" if extra else f"install the fsspec driver for {scheme}://"
        raise ReplaceMeError(f"{field}: {uri} needs a filesystem driver that is not installed ({exc}); {hint}") from None
