"""QLoRA Studio engine: headless 4-bit QLoRA fine-tuning."""

__version__ = "0.1.0"
