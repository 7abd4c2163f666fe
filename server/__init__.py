"""quantserve's server: an OpenAI-compatible HTTP API over a continuous-batching engine."""
