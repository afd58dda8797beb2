"""Echo: build a chat language model end to end and see what each step did."""

__version__ = "0.1.0"
