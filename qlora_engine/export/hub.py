"""Push an export (adapter, merged model or GGUF folder) to a model repository on the Hugging Face Hub.

``qlora-engine push FOLDER OWNER/NAME`` uploads exactly the files of one export folder, with
``huggingface_hub``'s ``upload_folder``, into a model repository it creates when missing
(private unless ``--public``). What is uploaded is checked first: a folder written by
``qlora-engine export`` (it has the model card the export writes), never a run folder (its
checkpoints hold optimizer state and its config may name local paths).

The token is never asked for, passed on a command line, or written anywhere by this module: it
is the one ``huggingface_hub`` finds itself, ``HF_TOKEN`` in the environment or the saved login
of ``hf auth login``. ``HF_ENDPOINT`` points it at another hub (a mirror, an enterprise hub).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qlora_engine.errors import ExportError

SKIPPED = [".*", "**/.*", "__pycache__/**"]
"""Never uploaded: hidden files (an editor's swap file, a scratch file) and caches."""


def check_export_folder(folder: str | Path) -> Path:
    """The folder if it is an export (a model card beside model or adapter files); else raise.

    Raises:
        ExportError: not a folder, a run folder, or not an export.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ExportError(f"{path}: no such folder", file=str(path), fix="export the run first (qlora-engine export)")
    if (path / "events.jsonl").is_file() or (path / "checkpoints").is_dir():
        raise ExportError(
            f"{path} is a run folder, not an export: its checkpoints and logs are not for a model hub",
            file=str(path),
            fix=f"export it first: qlora-engine export {path} --format adapter --out {path}-adapter",
        )
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.gguf"))
    if not (path / "README.md").is_file() or not has_weights:
        raise ExportError(
            f"{path} does not look like an export (a README.md model card and .safetensors or .gguf files)",
            file=str(path),
            fix="push a folder written by qlora-engine export",
        )
    return path


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the export ``folder`` to the model repository ``repo_id``; returns the commit's URL.

    Raises:
        ExportError: the folder is not an export, there is no token, or the hub refused.
    """
    from huggingface_hub import HfApi, get_token  # lazy: only a push needs huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError  # lazy: only a push needs huggingface_hub

    path = check_export_folder(folder)
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise ExportError(f"{repo_id!r}: a repository is named OWNER/NAME", field="repo_id")
    if get_token() is None:
        raise ExportError(
            "no Hugging Face token: nothing can be pushed",
            fix="set HF_TOKEN in the environment, or log in once with `hf auth login` (the token stays in "
            "huggingface_hub's own file; QLoRA Studio never stores it)",
        )
    api = HfApi()  # the token huggingface_hub finds itself; never passed around or written here
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(path),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {path.name} from QLoRA Studio",
            ignore_patterns=SKIPPED,
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        fix = {
            401: "the token was refused: log in again (`hf auth login`) or set a valid HF_TOKEN",
            403: "the token may not write to this repository: use a token with write access, or your own namespace",
        }.get(status, "check the repository name and your network, then push again")
        raise ExportError(f"the hub refused the upload to {repo_id} (HTTP {status})", fix=fix) from None
    return str(getattr(info, "commit_url", info))


def cmd_push(args: argparse.Namespace) -> int:
    url = push_to_hub(
        args.folder, args.repo_id, private=not args.public, revision=args.revision, commit_message=args.message
    )
    print(f"pushed: {url}", file=sys.stderr)
    return 0


def add_cli(sub: Any) -> None:
    s = sub.add_parser(
        "push",
        help="upload an export folder (adapter, merged or GGUF) to a model repository on the Hugging Face Hub",
        description="Uploads exactly the files of one export folder into OWNER/NAME (created, private, when missing). "
        "The token is HF_TOKEN or your saved `hf auth login`; it is never written anywhere.",
    )
    s.add_argument("folder", help="a folder written by `qlora-engine export`")
    s.add_argument("repo_id", help="the model repository, OWNER/NAME")
    s.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    s.add_argument("--revision", help="branch to push to (default: main)")
    s.add_argument("--message", help="commit message")
    s.set_defaults(func=cmd_push)
