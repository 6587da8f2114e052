"""Fetching and converting a registered release (used by :func:`visd.pretrained.fetch_pretrained`).

The text-encoder files come through ``hf_hub_download``; the release files through
:func:`visd._download.download_file`; the conversion goes to a temporary folder beside the cache folder
and is renamed into place, with the completion marker written last, only when it succeeded. Anything
that cannot be fetched raises one :class:`~visd.errors.WeightsNotFoundError` naming the files, their
sizes and the manual route.

The model class is handed in (:func:`convert_release`), never imported: see :mod:`visd.pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from visd._io import atomic_write_text
from visd._release import MARKER_NAME, MIRROR_ENV, PretrainedEntry, release_url
from visd.errors import WeightsNotFoundError

__all__ = ["convert_release", "fetch_release", "fetch_text_encoder"]

logger = logging.getLogger(__name__)


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_available(entry: PretrainedEntry, reason: str) -> WeightsNotFoundError:
    te = entry.text_encoder
    files = "\n".join(f"  {f.filename}: {f.size:,} bytes, sha256 {f.sha256}, from {release_url(f)}" for f in entry.files)
    checkpoints = " ".join(f"--checkpoint {f.filename}" for f in entry.files)
    return WeightsNotFoundError(
        f"cannot fetch the pretrained model {entry.name!r}: {reason}.\n"
        f"First use downloads {entry.size:,} bytes:\n{files}\n"
        f"  {', '.join(te.files + te.optional_files)} of the Hugging Face Hub repo {te.repo_id} at revision {te.revision}\n"
        f"Fix: connect and run again (interrupted downloads resume), or set {MIRROR_ENV} to a mirror of these files "
        "(and HF_ENDPOINT to a Hub mirror), or download them by hand, check their sha256 and convert them:\n"
        f"  visd convert {checkpoints} --text-encoder <text-encoder folder> --out <folder>\n"
        "then load the folder with ViSDModel.from_pretrained('<folder>')."
    )


def fetch_text_encoder(entry: PretrainedEntry) -> Path:
    from huggingface_hub import constants, errors, hf_hub_download

    te = entry.text_encoder
    remote_missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    folder = None
    for filename in te.files + te.optional_files:
        try:
            path = Path(hf_hub_download(te.repo_id, filename, revision=te.revision))
        except errors.LocalEntryNotFoundError as e:  # offline or unreachable, and not in the HF cache
            if _hf_offline():
                raise _not_available(entry, f"{te.repo_id}/{filename} is not in the Hugging Face cache and HF_HUB_OFFLINE "
                                            "is set, so visd makes no download (unset it to download)") from e
            raise _not_available(entry, f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached for "
                                        f"{te.repo_id}/{filename}") from e
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise WeightsNotFoundError(
                f"the text encoder of {entry.name!r} is not on the Hub ({constants.ENDPOINT}): no repo {te.repo_id!r} "
                f"at revision {te.revision!r}. Check HF_ENDPOINT, or the entry's text_encoder."
            ) from e
        except remote_missing as e:
            if filename in te.optional_files:
                continue
            raise WeightsNotFoundError(f"the Hub repo {te.repo_id} at {te.revision} has no {filename}, which "
                                       f"{entry.name!r} needs") from e
        except (errors.HfHubHTTPError, OSError) as e:
            raise _not_available(entry, f"downloading {te.repo_id}/{filename} from the Hub failed: {e}") from e
        folder = path.parent
    assert folder is not None
    return folder


def fetch_release(entry: PretrainedEntry, downloads: Path, progress: bool) -> list[Path]:
    from visd._download import DownloadUnreachable, download_file, file_matches

    paths = []
    for f in entry.files:
        dest = downloads / f.filename
        if _hf_offline() and not file_matches(dest, size=f.size, sha256=f.sha256):
            raise _not_available(entry, "HF_HUB_OFFLINE is set, so visd makes no download (unset it to download)")
        try:
            paths.append(download_file(release_url(f), dest, size=f.size, sha256=f.sha256, progress=progress))
        except DownloadUnreachable as e:
            raise _not_available(entry, str(e)) from e
    return paths


def _model_card_source(entry: PretrainedEntry) -> str:
    te = entry.text_encoder
    rows = "\n".join(f"| {f.filename} | {f.size:,} | `{f.sha256}` | {f.url} |" for f in entry.files)
    return (
        f"\n## Source: pretrained model `{entry.name}`\n\n{entry.description}\n\n"
        "Converted by visd (`ViSDModel.from_official`) from these files, applied in this order:\n\n"
        f"| file | bytes | sha256 | URL |\n|---|---|---|---|\n{rows}\n\n"
        f"Text encoder: Hugging Face Hub `{te.repo_id}` at revision `{te.revision}`.\n\n"
        f"Licence: {entry.license or 'not stated'}\n\nCitation: {entry.citation or 'not stated'}\n"
    )


def convert_release(
    model_cls: type, entry: PretrainedEntry, checkpoints: list[Path], text_encoder: Path, final: Path
) -> None:
    """Convert with ``model_cls.from_official`` (a strict load) into a temporary folder beside ``final``,
    mark it complete, rename it into place."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{entry.name}.tmp-"))
    try:
        logger.info("converting %s into %s", ", ".join(map(str, checkpoints)), final)
        model = model_cls.from_official(checkpoints, text_encoder, config=entry.model_config(text_encoder))
        model.save_pretrained(tmp)
        card = tmp / "README.md"
        atomic_write_text(card, (card.read_text() if card.exists() else "") + _model_card_source(entry))
        atomic_write_text(tmp / MARKER_NAME, json.dumps(entry.fingerprint(), indent=1))
        if final.exists():  # converted from files no longer registered (see cached_folder): replace it
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{entry.name}.old-"))
            os.replace(final, old / entry.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
