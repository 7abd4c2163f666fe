"""The HTTP layer: app, routes, wire protocol, streaming, errors, metrics, memory report.

It talks to the engine only through the narrow interface of `engine.AsyncEngine` (generate,
abort, health, stats), reached through the registry's ServedModel."""
