"""`pull`: one call that turns a MODEL name into an installed, verified model.

    pull("qwen2.5:7b", progress=callback, cancel=event) -> Manifest

Steps: parse the name (refs.py), list the repository's files at one commit
(hub.py), pick the files the name means, check free disk space before the
first byte, fetch each file (download.py: resumable, verified, atomic), then
write the manifest, the moment the model becomes visible to `ls` and `run`.

Progress goes to an optional callback as PullProgress values, from the
calling thread; front ends that pull on a worker thread (the HTTP API, the
TUI) forward them. A set `cancel` event stops the transfer and keeps the
partial file, so the same pull later resumes where it stopped.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable

from localllm.core.errors import BadRequest, DownloadFailed, HubUnreachable, ModelNotFound
from localllm.core.gguf_reader import read_gguf
from localllm.core.modelinfo import ModelInfo, add_split_part, read_model_info
from localllm.store import bundled
from localllm.store.own_files import check_model_name
from localllm.store.progress import PullProgress, RateMeter
from localllm.store.refs import ModelRef, is_model_gguf, parse_ref, quant_given, quant_of, split_part
from localllm.store.store import SMOLLM2_NAME, STARTER_NAME, Manifest, ModelStore

if TYPE_CHECKING:
    from localllm.store.hub import RepoListing  # huggingface-hub loads only when a pull needs the hub

# Files of a safetensors snapshot that the native engine reads (top level of the repository only).
SNAPSHOT_SUFFIXES = (".json", ".safetensors", ".model", ".tiktoken", ".jinja", ".txt")
SNAPSHOT_SKIP = {"README.md", "LICENSE", "LICENSE.txt", "USE_POLICY.md", "NOTICE.txt", "requirements.txt"}
PROGRESS_INTERVAL_S = 0.1


@dataclass(frozen=True)
class PlannedFile:
    remote_path: str
    local_name: str  # its name in the model's folder
    size: int
    sha256: str | None
    blob_id: str | None

    @property
    def hub_id(self) -> str:
        return self.sha256 or self.blob_id or ""


@dataclass(frozen=True)
class PullPlan:
    ref: ModelRef
    commit: str
    format: str  # "gguf" or "safetensors"
    files: list[PlannedFile]  # the file a backend opens comes first

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


def pull(
    ref: str,
    *,
    store: ModelStore | None = None,
    quant: str | None = None,
    listing: RepoListing | None = None,
    progress: Callable[[PullProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> Manifest:
    """Install MODEL (catalog name, hf: reference or `starter`); return its manifest.

    `starter` and `smollm2:135m` come from their Python packages, without the network
    (smollm2's other quants, or smollm2 without its package, come from the hub).

    A catalog name without a quant gets `quant` (the fit planner's choice, asked
    first by fit/hub_model.py's `pull_with_plan`), else the quant already
    installed under that name, else the catalog's default; it is installed under
    the name as given. `listing`: the repository's hub.RepoListing when the
    caller has read it already (the planner does), so it is not read twice.
    """
    store = store or ModelStore()
    check_model_name(ref)
    report = _Reporter(progress)
    report.status("resolving")
    if ref.strip() == STARTER_NAME:
        return _pull_bundled(STARTER_NAME, store, report, cancel)
    model = parse_ref(ref)
    if model is None:
        raise ModelNotFound(
            f"'{ref}' is neither a catalog name nor an hf: reference; "
            "`localllm ls --catalog` lists the catalog, hf:ORG/REPO:QUANT names any GGUF repository"
        )
    if model.name == SMOLLM2_NAME and bundled.is_packaged(SMOLLM2_NAME):
        return _pull_bundled(SMOLLM2_NAME, store, report, cancel)
    listing = listing or hub_listing(model, store)
    model = _with_quant(ref, model, store, quant)
    plan = plan_files(model, listing.files, listing.commit)
    report.total = plan.total

    existing = store.get(model.name)
    if existing is not None and _up_to_date(existing, plan, store):
        report.completed = plan.total
        report.status("done")
        return existing
    _refuse_name_clash(store, model.name)
    return _fetch_all(plan, store, report, cancel)


# -- choosing files -----------------------------------------------------------------------


def quant_to_choose(ref: str, store: ModelStore) -> ModelRef | None:
    """The catalog model whose quant the caller may choose for `pull(ref)`, or None.

    That is a catalog name without a quant, fetched from the hub (not a
    bundled package) and not installed yet (an installed one keeps its quant).
    """
    check_model_name(ref)
    if ref.strip() == STARTER_NAME:
        return None
    model = parse_ref(ref)
    if model is None or model.catalog is None or quant_given(ref) or store.get(model.name) is not None:
        return None
    if model.name == SMOLLM2_NAME and bundled.is_packaged(SMOLLM2_NAME):
        return None
    return model


def hub_listing(model: ModelRef, store: ModelStore) -> RepoListing:
    """The repository's files at one commit (hub.RepoListing); a hub out of reach is an error naming what is installed."""
    from localllm.store import hub

    try:
        return hub.list_files(model.repo, model.revision)
    except HubUnreachable as exc:
        installed = ", ".join(m.name for m in store.list()) or "none"
        raise HubUnreachable(f"{exc}; installed models: {installed}") from None


def _with_quant(text: str, model: ModelRef, store: ModelStore, quant: str | None) -> ModelRef:
    """A catalog name without a quant: `quant` when given, else the installed one, else the catalog's default."""
    if model.catalog is None or quant_given(text):
        return model
    if quant is not None:
        return replace(model, quant=quant.upper())
    existing = store.get(model.name)
    installed = quant_of(Path(existing.file).name) if existing is not None else None
    return replace(model, quant=installed) if installed else model


def plan_files(model: ModelRef, files: list, commit: str) -> PullPlan:
    """The files a reference means, in a repository listing (hub.RemoteFile values)."""
    if model.kind == "snapshot":
        return PullPlan(model, commit, "safetensors", _snapshot_files(model, files))
    ggufs = [f for f in files if is_model_gguf(f.path)]
    if model.kind == "file":
        chosen = [f for f in files if f.path == model.path]
        if not chosen:
            listed = ", ".join(sorted(f.path for f in ggufs)[:20]) or "none"
            raise ModelNotFound(f"{model.repo} has no file {model.path}; its GGUF files: {listed}")
        return PullPlan(model, commit, "gguf", _with_all_parts(chosen[0], files, model.repo))

    by_quant: dict[str, list] = {}
    for f in ggufs:
        quant = quant_of(f.path)
        if quant:
            by_quant.setdefault(quant, []).append(f)
    matches = by_quant.get(model.quant or "", [])
    if not matches:
        if not by_quant:
            raise ModelNotFound(
                f"{model.repo} has no GGUF files named by quant; name one with hf:{model.repo}/FILE.gguf"
            )
        raise ModelNotFound(f"{model.repo} has no {model.quant} GGUF; quants there: {', '.join(sorted(by_quant))}")
    groups: dict[str, list] = {}
    for f in matches:
        part = split_part(f.path)
        groups.setdefault(part.prefix if part else f.path, []).append(f)
    if len(groups) > 1:
        names = ", ".join(sorted(groups))
        raise BadRequest(
            f"{model.repo} has several {model.quant} GGUFs ({names}); name one with hf:{model.repo}/FILE.gguf"
        )
    (group,) = groups.values()
    return PullPlan(model, commit, "gguf", _with_all_parts(group[0], files, model.repo))


def _with_all_parts(first, files: list, repo: str) -> list[PlannedFile]:
    """A whole GGUF, or every part of a split one in order (llama.cpp opens part 1 and finds the rest)."""
    part = split_part(first.path)
    if part is None:
        return [_planned(first)]
    parts = {}
    for f in files:
        p = split_part(f.path)
        if p and p.prefix == part.prefix and p.count == part.count:
            parts[p.number] = f
    missing = [str(n) for n in range(1, part.count + 1) if n not in parts]
    if missing:
        raise ModelNotFound(f"{repo}: split GGUF {part.prefix} lacks part(s) {', '.join(missing)} of {part.count}")
    return [_planned(parts[n]) for n in range(1, part.count + 1)]


def _snapshot_files(model: ModelRef, files: list) -> list[PlannedFile]:
    chosen = [
        f
        for f in files
        if "/" not in f.path
        and not f.path.startswith(".")
        and f.path not in SNAPSHOT_SKIP
        and f.path.endswith(SNAPSHOT_SUFFIXES)
    ]
    names = {f.path for f in chosen}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        quants = sorted({q for f in files if is_model_gguf(f.path) and (q := quant_of(f.path))})
        hint = f"; for its GGUF use hf:{model.repo}:QUANT (quants there: {', '.join(quants)})" if quants else ""
        raise ModelNotFound(f"{model.repo} has no safetensors model (config.json and *.safetensors){hint}")
    chosen.sort(key=lambda f: (f.path != "config.json", f.path))
    return [_planned(f) for f in chosen]


def _planned(remote) -> PlannedFile:
    name = PurePosixPath(remote.path).name
    if name in ("", ".", "..") or not re.match(r"^[\w.+=@,-]+$", name):
        raise BadRequest(f"refusing the file name {remote.path!r} from the hub")
    return PlannedFile(remote.path, name, remote.size, remote.sha256, remote.blob_id)


# -- fetching -------------------------------------------------------------------------------


def _fetch_all(plan: PullPlan, store: ModelStore, report: _Reporter, cancel: threading.Event | None) -> Manifest:
    from localllm.store import download, hub

    model = plan.ref
    folder = store.paths.models / _folder_name(model.name)
    headers = hub.request_headers()
    jobs = [
        download.FileJob(
            url=hub.file_url(model.repo, f.remote_path, plan.commit),
            dest=folder / f.local_name,
            size=f.size,
            sha256=f.sha256,
            blob_id=f.blob_id,
            headers=headers,
        )
        for f in plan.files
    ]
    present = sum(download.bytes_on_disk(job) for job in jobs)
    download.check_free_space(store.paths.models, plan.total - present)

    client = hub.http_client()
    digests = []
    done_before = 0
    for planned, job in zip(plan.files, jobs):
        report.file = planned.local_name
        base = done_before
        try:
            digest = download.fetch(
                job,
                progress=lambda n, base=base: report.bytes(base + n),
                status=report.status,
                cancel=cancel,
                client=client,
            )
        except download.ServerRefused as exc:
            if exc.error_code == "GatedRepo":
                raise hub.gated_error(model.repo) from None
            raise hub.status_error(exc.status, model.repo, planned.remote_path) from None
        digests.append(digest)
        done_before += job.size
        report.bytes(done_before)

    report.file = None
    report.status("verifying")
    manifest = _manifest(plan, store, folder, digests)
    _remove_stale_files(folder, {f.local_name for f in plan.files})
    store.save(manifest)
    report.status("done")
    return manifest


def _manifest(plan: PullPlan, store: ModelStore, folder: Path, digests: list[str]) -> Manifest:
    main = folder / plan.files[0].local_name
    info: dict = {}
    if plan.format == "gguf":
        info = _split_aware_info([folder / f.local_name for f in plan.files]).to_dict()
    return Manifest(
        name=plan.ref.name,
        source=f"hf:{plan.ref.repo}@{plan.commit}",
        file=str(main.relative_to(store.paths.models)),
        sha256=digests[0],
        size=plan.total,
        format=plan.format,
        added=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        info=info,
        files=[
            {
                "path": str((folder / f.local_name).relative_to(store.paths.models)),
                "size": f.size,
                "sha256": digest,
                "hub_id": f.hub_id,
            }
            for f, digest in zip(plan.files, digests)
        ],
    )


def _split_aware_info(paths: list[Path]) -> ModelInfo:
    """ModelInfo of a GGUF; for a split one, part 1's metadata plus every part's tensors.

    Each part of a split GGUF is a GGUF of its own: part 1 holds all the
    metadata, later parts only tensors. Sizes and parameter counts must
    cover every part, or the fit planner would plan for a fraction of the model.
    """
    info = read_model_info(paths[0])
    for path in paths[1:]:
        add_split_part(info, read_gguf(path).tensors)
    info.size_bytes = sum(p.stat().st_size for p in paths)
    return info


def _up_to_date(existing: Manifest, plan: PullPlan, store: ModelStore) -> bool:
    """Installed from the same hub files, all still on disk: nothing to fetch."""
    if len(existing.files) != len(plan.files):
        return False
    for have, want in zip(existing.files, plan.files):
        path = store.paths.models / have.get("path", "")
        if have.get("hub_id") != want.hub_id or Path(have.get("path", "")).name != want.local_name:
            return False
        if not path.is_file() or path.stat().st_size != want.size:
            return False
    return True


def _remove_stale_files(folder: Path, keep: set[str]) -> None:
    """Files of an earlier version of this model (the repository changed since), with their partials."""
    for path in folder.iterdir():
        base = path.name.removesuffix(".lock").removesuffix(".partial.json").removesuffix(".partial")
        if path.is_file() and base not in keep:
            path.unlink(missing_ok=True)


def _folder_name(name: str) -> str:
    from localllm.store.store import slug

    return slug(name)


def _refuse_name_clash(store: ModelStore, name: str) -> None:
    """Two names that map to one folder must not overwrite each other's files."""
    path = store.manifest_path(name)
    if path.is_file() and store.get(name) is None:
        raise DownloadFailed(f"the store already holds another model under the folder of '{name}' ({path})")


# -- the bundled models: from their Python packages, no network ---------------------------


def _pull_bundled(name: str, store: ModelStore, report: _Reporter, cancel: threading.Event | None) -> Manifest:
    def on_bytes(done: int, total: int) -> None:  # called only while installing, when the package is there
        report.total = total
        report.file = report.file or bundled.packaged_model(name).file_name
        report.bytes(done)
        if done == total:
            report.status("verifying")

    manifest = bundled.install(store, name, progress=on_bytes, cancel=cancel)
    report.total = report.completed = manifest.size
    report.status("done")
    return manifest


# -- progress ---------------------------------------------------------------------------


@dataclass
class _Reporter:
    """Turns byte counts into PullProgress calls: summed over files, never backwards, at most 10/s."""

    callback: Callable[[PullProgress], None] | None
    total: int = 0
    file: str | None = None
    completed: int = 0
    state: str = "resolving"
    meter: RateMeter = field(default_factory=RateMeter)
    last_sent: float = 0.0

    def status(self, state: str) -> None:
        if state == "verifying" and self.state == "downloading":
            self.meter.restart()
        self.state = state
        self._send()

    def bytes(self, completed: int) -> None:
        if self.state != "downloading" and completed > self.completed:
            self.state = "downloading"
            self.meter.restart()
            self._send()
        self.completed = max(self.completed, completed)
        self.meter.update(self.completed)
        now = time.monotonic()
        if now - self.last_sent >= PROGRESS_INTERVAL_S or self.completed >= self.total:
            self._send(now)

    def _send(self, now: float | None = None) -> None:
        self.last_sent = now or time.monotonic()
        if self.callback is None:
            return
        speed = self.meter.speed() if self.state == "downloading" else None
        eta = self.meter.eta(self.total - self.completed) if speed else None
        self.callback(PullProgress(self.state, self.file, self.completed, self.total, speed, eta))
