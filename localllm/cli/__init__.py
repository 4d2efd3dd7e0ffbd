"""The command line: the parser (parser.py) and the Ollama-style verbs (commands.py and friends)."""
