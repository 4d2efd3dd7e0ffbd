"""The prompts both speculative-decoding benchmarks run (speculative_cpu.py, speculative_llamacpp.py).

The starter is a base model, so the prompts are plain text:
- copy-heavy: a paragraph, then an invitation to write it out again; the
  model copies it, and prompt lookup finds every next token in the prompt;
- open-ended: two prompts whose continuation is the model's own (greedy with
  llama.cpp's usual repetition penalty, see OPEN), and a sampled story.
"""

from __future__ import annotations

from localllm.core.requests import SamplingParams

PARAGRAPH = (
    "The lighthouse at the end of the harbour was built in 1871 from granite quarried on the island. "
    "Its lamp, first fed with whale oil and later with paraffin, could be seen twenty miles out to sea. "
    "Three keepers lived in the cottages below it, taking turns to watch the light through the night, "
    "winding the clockwork that turned the lens every four hours and writing the weather in the log."
)
GREEDY = SamplingParams(temperature=0)
# Greedy decoding of a small base model falls into loops on open prompts ("The bicycle was a very
# popular vehicle. The bicycle was a very popular vehicle. ..."), which prompt lookup would predict
# perfectly; llama.cpp's default repetition penalty over the last 64 tokens keeps the text open.
OPEN = SamplingParams(temperature=0, repeat_penalty=1.15)
SAMPLED = SamplingParams(temperature=0.8, seed=7)  # llama.cpp's defaults otherwise (top-k 40, top-p 0.95, min-p 0.05)
CASES = [  # name, prompt, sampling
    ("copy-heavy", f"Original text:\n\n{PARAGRAPH}\n\nThe same text, copied word for word:\n\n", GREEDY),
    ("open: history", "The history of the bicycle begins in the early nineteenth century, when", OPEN),
    ("open: question", "Question: What are the main causes of inflation, and how do central banks respond to it?\nAnswer:", OPEN),
    ("open: sampled", "Once upon a time, in a village at the edge of a great forest, there lived a girl who", SAMPLED),
]
