"""Tests for server.engine: pure scheduler / block manager tests, and engine tests on real models."""
