"""The default model's name, apart from the models themselves: the CLI's parser shows it without
loading diffusers (`models.builtin` defines the model)."""

DEFAULT_MODEL = "tiny-sdxl"
"""The built-in model a command or server uses when none is named."""
