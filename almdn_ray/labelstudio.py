"""Label Studio through its API (``label-studio-sdk``): push the selection, pull the finished annotations.

:func:`push_selection` creates (or reuses) a project with the run's labelling config and imports the images the
run waits for as tasks, with the model's detections as predictions (pre-annotations); each task's ``data``
carries the image id, the run and the cycle, and the run records which task is which image
(``cycles/NNN/labels-labelstudio.json``, ``initial-labels-labelstudio.json`` for a cold start's first set).
:func:`pull_labels` fetches the recorded tasks and imports their annotations through
:func:`almdn_ray.labels.import_label_file`: the matching, the checks and the errors of ``labels import``, and
nothing is written unless all is right. The API token is never written anywhere nor shown in a message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from almdn_ray import storage
from almdn_ray.data.labelfiles import read_labelstudio_tasks
from almdn_ray.data.records import Prediction
from almdn_ray.labels import (
    Awaited,
    ImportSummary,
    LabelImportError,
    awaiting,
    export_names,
    import_label_file,
    labelstudio_config,
    labelstudio_tasks,
)
from almdn_ray.layout import RunLayout
from almdn_ray.state import load_state

logger = logging.getLogger(__name__)

__all__ = [
    "TOKEN_ENV", "LabelStudioError", "PushSummary", "PullResult", "read_token", "public_url", "push_selection",
    "pull_labels", "push_record_uri", "pushed_for",
]  # fmt: skip

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
IMAGE_STORAGE_TITLE = "almdn-ray images"
SHOWN = 10  # task ids named in one message
PAGE = 500  # tasks per request when listing a project


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a request; nothing was imported."""


@dataclass(frozen=True)
class PushSummary:
    url: str
    project_id: int
    project: str
    tasks: int  # tasks of the selection in the project now
    created: int  # of which this push created
    predictions: int  # detections offered as pre-annotations on the created tasks
    record: str  # where the run keeps the push


@dataclass(frozen=True)
class PullResult:
    """``summary`` when the labels were imported; else the tasks that still need an annotation (nothing
    imported). ``skipped``: tasks whose only annotations were skipped (cancelled)."""

    tasks: int
    unlabelled: list[int]
    skipped: list[int]
    summary: ImportSummary | None


def read_token(token_file: str | Path | None) -> str:
    """The API token from ``token_file``, else from ``LABEL_STUDIO_API_KEY``."""
    if token_file is not None:
        token = Path(token_file).read_text().strip()
        if not token:
            raise LabelStudioError(f"{token_file} is empty: write the Label Studio access token in it")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise LabelStudioError(
            f"no Label Studio token: set {TOKEN_ENV} or give --token-file (Label Studio: Account & Settings -> "
            "Personal Access Token, or the legacy token)"
        )
    return token


def public_url(url: str) -> str:
    """``url`` without credentials, query or fragment: what the run may record."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LabelStudioError(f"{url!r} is not a Label Studio URL: give http(s)://HOST[:PORT]")
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


@contextmanager
def _answers(url: str, token: str, doing: str) -> Iterator[None]:
    """Label Studio's refusals and network errors as :class:`LabelStudioError` naming ``doing``, token-free."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as error:
        body = error.body
        if isinstance(body, dict):
            body = body.get("validation_errors") or body.get("detail") or body
        hint = f"; check the token ({TOKEN_ENV} or --token-file)" if error.status_code in (401, 403) else ""
        message = f"Label Studio at {url} refused to {doing}: HTTP {error.status_code}: {body}{hint}"
        raise LabelStudioError(message.replace(token, "<token>")) from None
    except httpx.HTTPError as error:
        message = f"cannot reach Label Studio at {url} to {doing}: {error}"
        raise LabelStudioError(message.replace(token, "<token>")) from None


def _client(url: str, token: str):
    try:
        from label_studio_sdk import LabelStudio
    except ImportError as error:
        raise LabelStudioError(
            "labels push/pull talk to Label Studio through its own client, which is not installed: "
            "pip install 'almdn-ray[labelstudio]'"
        ) from error

    client = LabelStudio(base_url=url, api_key=token, timeout=120)
    with _answers(url, token, "identify the token's user"):
        client.users.whoami()
    return client


def push_record_uri(target: str) -> str:
    """Where a push for the labels stored at ``target`` is recorded."""
    return target.removesuffix(".json") + "-labelstudio.json"


def _what(cycle: int, initial: bool) -> str:
    return f"the initial set of cycle {cycle}" if initial else f"cycle {cycle}'s selection"


# ---- push -----------------------------------------------------------------------------------------------------
def _image_urls(records, image_root: str | None, url_prefix: str | None) -> tuple[dict[str, str], str | None]:
    """``image_id -> name`` for :func:`labelstudio_tasks`, and the local folder Label Studio must serve (None for
    object storage or a ``url_prefix``). Local names are relative to ``image_root`` (the server's
    ``LOCAL_FILES_DOCUMENT_ROOT``) and URL-quoted."""
    names = export_names(records, image_root)  # object storage: the URI is the URL
    local = {r.image_id: r.uri.removeprefix("file://") for r in records}
    paths = {i: os.path.abspath(u) for i, u in local.items() if "://" not in u and not storage.is_remote(u)}
    if url_prefix is not None or not paths:
        return names, None
    folder = os.path.commonpath([os.path.dirname(p) for p in paths.values()])
    if not image_root:  # a guess would make tasks whose images the server cannot find, and report success
        raise LabelStudioError(
            f"the pool's images are local files (under {folder}) and no folder is known that Label Studio serves "
            "them from: give --document-root, the server's LOCAL_FILES_DOCUMENT_ROOT (a parent of the images)"
        )
    root = os.path.abspath(image_root)
    for image_id, path in paths.items():
        relative = os.path.relpath(path, root)
        if relative.startswith(".."):
            raise LabelStudioError(
                f"image {image_id} ({path}) is not under the document root {root}: give --document-root, the folder "
                "Label Studio serves (its LOCAL_FILES_DOCUMENT_ROOT), a parent of the pool's images"
            )
        names[image_id] = quote(relative.replace(os.sep, "/"))
    return names, folder


def _project(client, url: str, token: str, title: str, classes: Sequence[str]):
    """The project titled ``title``, created with the run's labelling config when there is none; an existing one
    whose rectangle labels lack a class gets the run's config."""
    config = labelstudio_config(classes)
    with _answers(url, token, f"find project {title!r}"):
        found = [p for p in client.projects.list(title=title) if p.title == title]
    if len(found) > 1:
        raise LabelStudioError(f"{url}: {len(found)} projects are titled {title!r} (ids {[p.id for p in found]})")
    if not found:
        with _answers(url, token, f"create project {title!r}"):
            project = client.projects.create(title=title, label_config=config)
        logger.info("created Label Studio project %r (#%s)", title, project.id)
        return project
    project = found[0]
    control = (project.parsed_label_config or {}).get("label") or {}
    if control.get("type") != "RectangleLabels" or not set(classes) <= set(control.get("labels") or ()):
        with _answers(url, token, f"give project {title!r} the run's labelling config (a label per class)"):
            client.projects.update(project.id, label_config=config)
    return project


def _serve(client, url: str, token: str, project_id: int, folder: str) -> None:
    """A local-files storage on the project covering ``folder``: Label Studio serves a local file only then."""
    with _answers(url, token, "list the project's local storages"):
        storages = client.import_storage.local.list(project=project_id)
    if any(s.path and (folder + "/").startswith(s.path.rstrip("/") + "/") for s in storages):
        return
    with _answers(url, token, f"serve the images in {folder} (a local files storage)"):
        client.import_storage.local.create(
            project=project_id, path=folder, title=IMAGE_STORAGE_TITLE, use_blob_urls=True, recursive_scan=True
        )


def _pushed_tasks(client, url: str, token: str, project_id: int, mark: Mapping[str, object]) -> dict[str, int]:
    """``image_id -> task id`` of the project's tasks whose data carries ``mark`` (this run, this set)."""
    with _answers(url, token, "list the project's tasks"):
        tasks = list(client.tasks.list(project=project_id, fields="task_only", page_size=PAGE))
    return {
        str(t.data["almdn_image_id"]): t.id
        for t in tasks
        if isinstance(t.data, dict) and "almdn_image_id" in t.data and all(t.data.get(k) == v for k, v in mark.items())
    }


def push_selection(
    run: str,
    pool,
    *,
    url: str,
    token: str,
    project: str,
    predictions: Mapping[str, Sequence[Prediction]] | None = None,
    image_root: str | None = None,
    url_prefix: str | None = None,
) -> PushSummary:
    """Make the images the run waits for tasks of Label Studio project ``project`` and record them in the run.

    A task already pushed for this run and set (found by its ``data``) is kept, not created again, so a push
    can be repeated (it recreates deleted tasks). Args as :func:`almdn_ray.labels.export_labels`;
    ``image_root`` is the server's ``LOCAL_FILES_DOCUMENT_ROOT`` for local images.
    """
    url = public_url(url)
    waited = awaiting(run)
    state = load_state(run)
    selection = storage.read_parquet(waited.selection)
    wanted = selection.column("image_id").to_pylist()
    scores = dict(zip(wanted, selection.column("score").to_pylist())) if "score" in selection.column_names else {}
    records = pool.records(wanted)
    names, folder = _image_urls(records, image_root, url_prefix)
    mark = {
        "almdn_run": state.run_id,
        "almdn_cycle": waited.cycle,
        "almdn_set": "initial" if waited.cold else "selection",
    }
    tasks = labelstudio_tasks(records, names, scores, predictions, pool.classes, waited.cycle, url_prefix)
    for task in tasks:
        task["data"].update(mark)
    client = _client(url, token)
    found = _project(client, url, token, project, pool.classes)
    if folder is not None:
        _serve(client, url, token, found.id, folder)
    before = _pushed_tasks(client, url, token, found.id, mark)
    new = [t for t in tasks if t["data"]["almdn_image_id"] not in before]
    if new:
        with _answers(url, token, f"import {len(new)} tasks into project {project!r}"):
            client.projects.import_tasks(found.id, request=new)
    pushed = _pushed_tasks(client, url, token, found.id, mark)
    missing = [i for i in wanted if i not in pushed]
    if missing:
        raise LabelStudioError(f"{url}: project {project!r} lacks tasks for images {missing[:SHOWN]} after the import")
    record = push_record_uri(waited.labels)
    storage.write_json(
        record,
        {
            "version": 1,
            "cycle": waited.cycle,
            "set": mark["almdn_set"],
            "labels": waited.labels,
            "url": url,
            "project": {"id": found.id, "title": project},
            "tasks": [{"task": pushed[i], "image_id": i} for i in wanted],
            "pushed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    offered = sum(len(t["predictions"][0]["result"]) for t in new if "predictions" in t)
    logger.info("pushed %d tasks (%d new) to %s project %r (#%s)", len(wanted), len(new), url, project, found.id)
    return PushSummary(url, found.id, project, len(wanted), len(new), offered, record)


# ---- pull -----------------------------------------------------------------------------------------------------
def _ids(values: Sequence[object]) -> str:
    more = f" … and {len(values) - SHOWN} more" if len(values) > SHOWN else ""
    return f"{list(values[:SHOWN])}{more}"


def _latest_push(run: str) -> dict | None:
    """The newest push record of the run: the latest cycle's selection, back to the initial set."""
    state, layout = load_state(run), RunLayout(run)
    targets = [layout.cycle(k, "labels.json") for k in range(state.cycle, -1, -1)] + [layout.initial_labels]
    for target in targets:
        if storage.exists(push_record_uri(target)):
            return storage.read_json(push_record_uri(target))
    return None


def _refuse_taken(run: str, waited: Awaited | None) -> LabelImportError | None:
    """Why there is nothing to pull: the last push's tasks were for labels the run has taken already (None when
    nothing was ever pushed)."""
    state, last = load_state(run), _latest_push(run)
    if last is None:
        return None
    tasks = [t["task"] for t in last["tasks"]]
    what = _what(last["cycle"], last["set"] == "initial")
    then = f"; push {_what(waited.cycle, waited.cold)} first (`almdn-ray labels push`)" if waited is not None else ""
    return LabelImportError(
        f"{run}: Label Studio tasks {_ids(tasks)} of project {last['project']['title']!r} (#{last['project']['id']}) "
        f"were pushed for {what}, whose labels the run has taken already: it is now {state.status} (cycle "
        f"{state.cycle}, stage {state.stage}); nothing imported{then}"
    )


def pushed_for(run: str) -> dict:
    """The record of the push of the labels the run waits for. Raises :class:`LabelImportError` naming the tasks
    of the last push when the run has taken its labels already (or waits for none), or when nothing was pushed."""
    try:
        waited = awaiting(run)
    except LabelImportError as error:
        raise (_refuse_taken(run, None) or error) from None
    if not storage.exists(push_record_uri(waited.labels)):
        raise _refuse_taken(run, waited) or LabelImportError(
            f"{run}: nothing was pushed to Label Studio for {_what(waited.cycle, waited.cold)}: push it first "
            "(`almdn-ray labels push`)"
        )
    return storage.read_json(push_record_uri(waited.labels))


def _as_export(task) -> dict:
    """A task from the API in the form of Label Studio's JSON export (what ``labels import`` reads)."""
    keys = ("id", "result", "was_cancelled", "ground_truth", "created_at", "updated_at", "completed_by")
    return {
        "id": task.id,
        "data": task.data,
        "annotations": [{k: a.get(k) for k in keys} for a in task.annotations or []],
    }


def pull_labels(run: str, pool, *, token: str, url: str | None = None) -> PullResult:
    """Import the annotations of the tasks pushed for the labels the run waits for.

    Nothing is imported while a task has no annotation (that was not skipped); a recorded task that is gone from
    the project, or a push for labels the run has taken already, raises :class:`LabelImportError` naming the
    tasks. ``url`` replaces the recorded server address (a server that moved).
    """
    record = pushed_for(run)
    url = public_url(url or record["url"])
    project_id, title = record["project"]["id"], record["project"]["title"]
    client = _client(url, token)
    with _answers(url, token, f"list the tasks of project {title!r} (#{project_id})"):
        tasks = {t.id: t for t in client.tasks.list(project=project_id, fields="all", page_size=PAGE)}
    source = f"Label Studio {url} project {title!r} (#{project_id})"
    gone = [t for t in record["tasks"] if t["task"] not in tasks]
    if gone:
        shown = "\n  ".join(f"task {t['task']} (image {t['image_id']}) is missing from the project" for t in gone)
        raise LabelImportError(
            f"{source}: {len(gone)} pushed task(s) are gone, nothing imported; push again to recreate them "
            f"(`almdn-ray labels push`):\n  {shown}"
        )
    pulled = [_as_export(tasks[t["task"]]) for t in record["tasks"]]
    unlabelled = [t["id"] for t in pulled if not any(not a["was_cancelled"] for a in t["annotations"])]
    skipped = [t["id"] for t in pulled if t["id"] in unlabelled and t["annotations"]]
    if unlabelled:
        logger.info("%s: %d of %d tasks unlabelled", source, len(unlabelled), len(pulled))
        return PullResult(len(pulled), unlabelled, skipped, None)
    summary = import_label_file(run, read_labelstudio_tasks(source, pulled), pool)
    return PullResult(len(pulled), [], [], summary)
