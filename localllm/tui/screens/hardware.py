"""The hardware screen: CPU, RAM, GPUs and VRAM, refreshed every second, and the active backend."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, Static

from localllm.core.hardware import GPU, Hardware
from localllm.core.units import human_bytes


@dataclass
class LiveReading:
    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int
    gpus: list[GPU] = field(default_factory=list)


class HardwareProbe:
    """Real readings: the slow, fixed facts once (on a thread), psutil every second."""

    def __init__(self) -> None:
        self.facts: Hardware | None = None
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._detect, daemon=True).start()

    def _detect(self) -> None:
        from localllm.core.hardware import detect

        self.facts = detect()

    def live(self) -> LiveReading:
        vm = psutil.virtual_memory()
        gpus = self.facts.gpus if self.facts else []
        if gpus and gpus[0].source == "nvidia-smi":
            from localllm.core.hardware import nvidia_smi_gpus

            gpus = nvidia_smi_gpus() or gpus
        return LiveReading(psutil.cpu_percent(interval=None), vm.total - vm.available, vm.total, gpus)


class HardwareScreen(Screen):
    def __init__(self) -> None:
        super().__init__(name="hardware")

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="hardware"):
            yield Static("", id="cpu-facts")
            yield Static("CPU", classes="gauge-label")
            yield ProgressBar(total=100, show_eta=False, id="cpu-bar")
            yield Static("", id="ram-label", classes="gauge-label")
            yield ProgressBar(total=100, show_eta=False, id="ram-bar")
            yield Static("", id="gpus")
            yield Static("", id="backend")
        yield Footer()

    def on_mount(self) -> None:
        self.app.hardware_probe.start()
        self.refresh_readings()
        self.set_interval(1.0, self.refresh_readings)

    def refresh_readings(self) -> None:
        probe = self.app.hardware_probe
        reading = probe.live()
        facts = probe.facts
        if facts:
            self.query_one("#cpu-facts", Static).update(
                f"[b]{facts.cpu_model}[/b]\n{facts.physical_cores} cores, {facts.logical_cores} threads · "
                f"{' '.join(facts.cpu_flags) or 'no SIMD flags found'}\n{facts.os} {facts.os_release} · Python {facts.python}"
            )
        else:
            self.query_one("#cpu-facts", Static).update("reading the hardware …")
        self.query_one("#cpu-bar", ProgressBar).update(progress=reading.cpu_percent)
        self.query_one("#ram-label", Static).update(
            f"RAM  {human_bytes(reading.ram_used_bytes)} used of {human_bytes(reading.ram_total_bytes)}"
        )
        self.query_one("#ram-bar", ProgressBar).update(progress=100 * reading.ram_used_bytes / max(reading.ram_total_bytes, 1))
        if reading.gpus:
            lines = [
                f"GPU {g.index}: {g.name} · {human_bytes(g.vram_total_bytes - g.vram_free_bytes)} used of "
                f"{human_bytes(g.vram_total_bytes)} VRAM" + (f" · compute {g.compute_capability}" if g.compute_capability else "")
                for g in reading.gpus
            ]
            self.query_one("#gpus", Static).update("\n".join(lines))
        else:
            self.query_one("#gpus", Static).update("GPUs: none found (models run on the CPU)")
        engines = ""
        if facts:
            lc = facts.llama_cpp
            offload = ", ".join(n for n, on in (("CUDA", lc.cuda), ("Metal", lc.metal)) if on) or "CPU only"
            engines = f"llama.cpp {lc.version or 'not installed'} ({offload}) · torch {facts.torch_version or 'not installed'}\n"
        self.query_one("#backend", Static).update(engines + self.app.backend_explanation())
