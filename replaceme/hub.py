"""``output.push_to_hub``: upload the published ``model/`` (with its card) to the Hugging Face Hub.

The token is looked up before any model pass (:func:`hub_token`), so a run that could not upload
fails at once, not after hours of calibration; the upload itself happens once the run is published.
The token is never logged or written anywhere.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from replaceme import __version__
from replaceme.config import ReplaceMeConfig, redact_uri
from replaceme.errors import ReplaceMeError
from replaceme.storage import filesystem

log = logging.getLogger("replaceme")


def hub_token(config: ReplaceMeConfig) -> str:
    """The token ``output.push_to_hub`` uploads with: ``token`` in the config, else ``HF_TOKEN`` or the
    token ``hf auth login`` stored (huggingface_hub's own lookup); refused, naming the field, if none."""
    repo = config.output.push_to_hub
    if config.save_transform_only:
        raise ReplaceMeError(f"output.push_to_hub: {repo} would get no model: save_transform_only writes no model/; "
                             "remove one of the two")
    if config.token is not None:
        return config.token.get_secret_value()
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ReplaceMeError(f"output.push_to_hub: no Hugging Face token to upload to {repo} with; set token in the "
                             "config, HF_TOKEN in the environment, or log in with `hf auth login` (a token with "
                             "write access)")
    return token


def push_model(config: ReplaceMeConfig, token: str) -> str:
    """Upload ``<output_dir>/model`` to ``output.push_to_hub`` (the repo created if missing, private
    unless ``output.private: false``; the branch ``output.revision`` created if missing). Returns the URL."""
    from huggingface_hub import HfApi

    o = config.output
    repo = o.push_to_hub
    assert repo is not None
    model_uri = f"{config.output_dir.rstrip('/')}/model"
    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=o.private, exist_ok=True)
        if o.revision:
            api.create_branch(repo, branch=o.revision, repo_type="model", exist_ok=True)
        with _local_folder(model_uri, config.storage_options(model_uri)) as folder:
            api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model", revision=o.revision,
                              commit_message=f"Upload a model pruned with replaceme {__version__}")
    except Exception as exc:  # noqa: BLE001 - network, auth, quota: one message, the outputs are complete
        reason = str(exc).replace(token, "***").splitlines()[0][:300] if str(exc) else ""
        raise ReplaceMeError(
            f"output.push_to_hub: the run is complete in {redact_uri(config.output_dir)}, but uploading model/ to "
            f"{repo} failed ({type(exc).__name__}{': ' + reason if reason else ''}); check the token's write access "
            f"and upload it with `hf upload {repo} {redact_uri(model_uri)}`") from None
    url = f"https://huggingface.co/{repo}" + (f"/tree/{o.revision}" if o.revision else "")
    log.info("pushed model/ to %s", url)
    return url


@contextmanager
def _local_folder(uri: str, options: dict[str, Any]):
    """``uri`` as a local folder: itself when local, else a temporary copy (upload_folder reads local files)."""
    fs, root = filesystem(uri, field="output_dir", options=options)
    if isinstance(fs, LocalFileSystem):
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="replaceme-push-") as folder:
        for path in fs.ls(root, detail=False):
            fs.get(path, f"{folder}/{path.rstrip('/').rsplit('/', 1)[-1]}")
        yield folder
