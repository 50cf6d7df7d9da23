"""loragate: an OpenAI-compatible gateway for many LoRA adapters on one shared base model."""

from gateway.native import package_path

__version__ = "0.1.0"
__path__ = package_path(__path__)  # the compiled record path first, while it matches the sources (gateway.native)
