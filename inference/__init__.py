"""The llmfleet inference service: RPC workers, the serving head and its tools."""

__version__ = "0.1.0"
