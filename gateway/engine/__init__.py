"""The inference engine: vLLM OpenAI servers, started and supervised here or reached at given URLs."""
