"""Tests for llmfleet: unit tests, service tests and the local cluster harness."""
