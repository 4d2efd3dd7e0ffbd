"""The models screen: installed models and the catalog in one table, downloads with progress.

A download runs on a thread of its own (cancellable, never in Textual's default
pool) and reports through `post_message`; a cancelled download keeps its
partial file, so starting it again resumes where it stopped.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, Static

from localllm.core.errors import LocalLLMError
from localllm.core.hardware import Hardware
from localllm.core.quant_table import estimated_bytes
from localllm.store.store import ModelStore
from localllm.core.units import human_bytes


@dataclass
class ModelRow:
    name: str
    installed: bool
    size_bytes: int
    size_is_estimate: bool
    quant: str
    context: int | None
    description: str = ""
    info: dict | None = None  # an installed model's cached ModelInfo, for the fit planner


def fit_badge(row: ModelRow, hw: Hardware) -> str:
    """The fit planner's verdict: "GPU 8k", "GPU+CPU 20L", "CPU 8k", "too large".

    Installed models get a real plan from their header facts; catalog models,
    whose headers are not read until `localllm fit` or a pull asks, an
    estimate from their size, marked with "~".
    """
    from localllm.fit import Wishes, plan_fit
    from localllm.fit.render import badge, size_badge
    from localllm.fit.settings import FitSettings
    from localllm.core.modelinfo import ModelInfo

    if row.info:
        try:
            return badge(plan_fit(ModelInfo.from_dict(row.info), hw, Wishes(), FitSettings.from_env()))
        except (LocalLLMError, KeyError, TypeError, ValueError):
            pass  # an old or odd cache entry: estimate instead
    return "~" + size_badge(row.size_bytes, hw)


def planning_hardware(facts: Hardware | None, reading) -> Hardware:
    """The probe's fixed facts with this second's RAM and GPU readings (facts may still be loading)."""
    from localllm.core.hardware import LlamaCppSupport

    hw = copy.deepcopy(facts) if facts is not None else Hardware(
        os="", os_release="", machine="", python="", cpu_model="", physical_cores=1, logical_cores=1,
        cpu_flags=[], ram_total_bytes=0, ram_available_bytes=0, llama_cpp=LlamaCppSupport(),
    )
    hw.ram_total_bytes = reading.ram_total_bytes
    hw.ram_available_bytes = max(0, reading.ram_total_bytes - reading.ram_used_bytes)
    hw.gpus = list(reading.gpus)
    return hw


def model_rows(store: ModelStore) -> list[ModelRow]:
    from localllm.store.catalog import default_catalog

    rows = []
    installed = store.list()
    for m in installed:
        info = m.info or {}
        rows.append(ModelRow(m.name, True, m.size, False, info.get("quantization") or "-", info.get("context_length"), info=m.info))
    names = {m.name for m in installed}
    for entry in default_catalog().entries:
        if entry.name in names:
            continue
        size = estimated_bytes(entry.parameter_count, entry.default_quant)
        rows.append(ModelRow(entry.name, False, size, True, entry.default_quant, entry.context_length, entry.description))
    return rows


class DownloadProgress(Message):
    def __init__(self, model: str, progress) -> None:
        super().__init__()
        self.model, self.progress = model, progress


class DownloadFinished(Message):
    def __init__(self, model: str, error: str | None, cancelled: bool) -> None:
        super().__init__()
        self.model, self.error, self.cancelled = model, error, cancelled


class ModelsScreen(Screen):
    BINDINGS = [
        Binding("enter", "activate", "Download / use", priority=True),
        Binding("d", "delete", "Delete"),
        Binding("c", "cancel_download", "Cancel download"),
        Binding("r", "refresh_rows", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(name="models")
        self.rows: list[ModelRow] = []
        self.downloading: str | None = None
        self.cancel_event: threading.Event | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="models"):
            yield Static("Enter: download a catalog model, or use an installed one in the chat · d: delete · c: cancel a download",
                         id="models-help")
            yield DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
            with Horizontal(id="download"):
                yield Label("", id="download-label")
                yield ProgressBar(total=100, show_eta=False, id="download-bar")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("NAME", "STATUS", "SIZE", "QUANT", "CONTEXT", "FIT")
        self.query_one("#download").display = False
        self.action_refresh_rows()

    def on_screen_resume(self) -> None:
        self.action_refresh_rows()

    def action_refresh_rows(self) -> None:
        try:
            self.rows = model_rows(self.app.store)
        except (LocalLLMError, OSError, ValueError) as exc:
            self.notify(f"cannot list models: {exc}", severity="error")
            self.rows = []
        probe = self.app.hardware_probe
        probe.start()
        hw = planning_hardware(probe.facts, probe.live())
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for row in self.rows:
            size = ("~" if row.size_is_estimate else "") + human_bytes(row.size_bytes)
            status = "installed" if row.installed else ("downloading" if row.name == self.downloading else "catalog")
            table.add_row(row.name, status, size, row.quant, str(row.context or "-"),
                          fit_badge(row, hw), key=row.name)
        if self.rows:
            table.move_cursor(row=min(cursor, len(self.rows) - 1))

    def selected(self) -> ModelRow | None:
        table = self.query_one(DataTable)
        if not self.rows or table.cursor_row < 0:
            return None
        return self.rows[min(table.cursor_row, len(self.rows) - 1)]

    # -- actions -------------------------------------------------------------------
    def action_activate(self) -> None:
        row = self.selected()
        if row is None:
            return
        if row.installed:
            self.app.chat.use_model(row.name)
            self.app.switch_mode("chat")
            self.notify(f"the chat now uses {row.name}")
        else:
            self.start_download(row.name)

    def start_download(self, model: str) -> None:
        if self.downloading:
            self.notify(f"{self.downloading} is downloading; c cancels it", severity="warning")
            return
        self.downloading, self.cancel_event = model, threading.Event()
        self.query_one("#download").display = True
        self.query_one("#download-label", Label).update(f"{model}: resolving …")
        self.query_one("#download-bar", ProgressBar).update(total=None, progress=0)
        threading.Thread(target=self._download, args=(model, self.cancel_event), name=f"pull:{model}", daemon=True).start()
        self.action_refresh_rows()

    def _download(self, model: str, cancel: threading.Event) -> None:
        from localllm.fit.hub_model import pull_with_plan

        error = None
        try:
            pull_with_plan(model, store=self.app.store, progress=lambda p: self.post_message(DownloadProgress(model, p)), cancel=cancel)
        except LocalLLMError as exc:
            error = str(exc)
        except Exception as exc:  # the app must report, never crash
            error = f"{type(exc).__name__}: {exc}"
        self.post_message(DownloadFinished(model, error, cancel.is_set()))

    @on(DownloadProgress)
    def _progress(self, message: DownloadProgress) -> None:
        p = message.progress
        bar = self.query_one("#download-bar", ProgressBar)
        if p.total:
            bar.update(total=p.total, progress=p.completed)
        speed = f" · {human_bytes(p.speed_bps)}/s" if p.speed_bps else ""
        eta = f" · {_duration(p.eta_s)} left" if p.eta_s is not None and p.status == "downloading" else ""
        self.query_one("#download-label", Label).update(
            f"{message.model}: {p.status} {human_bytes(p.completed)} of {human_bytes(p.total)}{speed}{eta}"
        )

    @on(DownloadFinished)
    def _finished(self, message: DownloadFinished) -> None:
        self.downloading, self.cancel_event = None, None
        if message.cancelled:
            self.notify(f"download of {message.model} cancelled; Enter resumes it")
        elif message.error:
            self.notify(f"download of {message.model} failed: {message.error}", severity="error", timeout=10)
        else:
            self.notify(f"{message.model} is installed; Enter uses it in the chat")
        self.query_one("#download").display = False
        self.action_refresh_rows()

    def action_cancel_download(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()
            self.query_one("#download-label", Label).update(f"{self.downloading}: cancelling …")

    def action_delete(self) -> None:
        row = self.selected()
        if row is None or not row.installed:
            return
        from localllm.tui.screens.dialogs import Confirm

        async def done(yes: bool | None) -> None:
            if not yes:
                return
            current = self.app.session.current
            if current is not None and current.name == row.name:
                await self.app.session.close()
            try:
                self.app.store.remove(row.name)
                self.notify(f"deleted {row.name}")
            except LocalLLMError as exc:
                self.notify(str(exc), severity="error")
            self.action_refresh_rows()

        self.app.push_screen(Confirm(f"Delete {row.name} ({human_bytes(row.size_bytes)}) from this machine?"), done)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

