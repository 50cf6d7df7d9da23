"""loragate: an OpenAI-compatible gateway for many LoRA adapters on one shared base model."""

__version__ = "0.1.0"
