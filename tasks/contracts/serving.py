"""Serving limits shared by the model repository, the compile step and the consumer."""

MAX_BATCH = 256
"""Largest batch every model in the Triton repository accepts; the consumer's micro-batch goes as one request."""
