"""The localhost API: OpenAI- and Ollama-compatible HTTP routes over the same backends.

`create_app(settings)` (app.py) builds the FastAPI application; `serve(settings)`,
`ServerThread` and `HostedServer` (run.py) run it under uvicorn.
"""
